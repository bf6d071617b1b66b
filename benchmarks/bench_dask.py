"""Throughput of distributed prediction (deq_kernel.dask.predict) against one in-process call.

A ``DEQGPRegressor(method="svgp")`` is fitted on 20000 points (d = 16), then predicts mean and
standard deviation at ``n`` new points twice, in the same run, on the same machine:

* in process (the baseline): one call of ``estimator.predict(X, return_std=True)`` on the whole
  array (the SVGP predicts in blocks of ``batch_size`` rows), with all of torch's threads; and,
  as a second baseline, the same call on the distributed run's blocks of ``--block`` rows in
  turn (a single call on 10^6 rows took more than twice as long per point as calls on 10^5
  rows on the 2-core machine, which flatters a ratio against one call);
* distributed: :func:`deq_kernel.dask.predict` over a dask array of ``n`` rows generated on the
  workers in blocks of ``--block`` rows (the same distribution; drawing a block costs under 1 %
  of predicting it), on a ``LocalCluster`` of ``--workers`` worker processes with one thread
  each on 127.0.0.1. Each block is fetched into the client's arrays as soon as it is finished,
  so that a worker holds only the blocks in flight, whatever ``n``.

Both sides are warmed up first (imports, the estimator on the workers), outside the timings.
It prints points per second for each and their ratio, the mean compute time of one block on a
worker, and each worker's memory: resident set size after the warm-up (the baseline), and the
peak above it during the run, sampled every 5 ms by a thread in the worker and, as a check, read
from the kernel's high-water mark (``VmHWM``, reset at the start of the run). The run is
repeated at ``n / 10``: the peak is bounded by the block size, not by ``n``.

(``ru_maxrss`` is no measure here: a worker is forked from the process that runs the cluster
and then executes a fresh interpreter, and Linux keeps the larger of the two processes' peaks
across both, so each worker reported the benchmark process's own peak, gigabytes.)

Usage::

    python benchmarks/bench_dask.py              # n = 10^7, 2 workers
    python benchmarks/bench_dask.py --quick      # n = 10^6
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import threading
import time

import numpy as np
import torch

import deq_kernel
from deq_kernel.sklearn import DEQGPRegressor

MIB = 2**20


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_mark() -> int | None:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def start_memory_watch(dask_worker) -> dict:
    """In a worker: the resident set size now, then a thread that records its maximum."""
    watch = {"baseline": _resident(), "stop": threading.Event()}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set size
        watch["hwm_reset"] = True
    except OSError:
        watch["hwm_reset"] = False
    watch["peak"] = watch["baseline"]

    def sample() -> None:
        while not watch["stop"].wait(0.005):
            watch["peak"] = max(watch["peak"], _resident())

    watch["thread"] = threading.Thread(target=sample, daemon=True)
    watch["thread"].start()
    dask_worker.deq_memory_watch = watch
    return {"torch_threads": torch.get_num_threads(), "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def stop_memory_watch(dask_worker) -> dict:
    watch = dask_worker.deq_memory_watch
    watch["stop"].set()
    watch["thread"].join()
    hwm = _high_water_mark() if watch["hwm_reset"] else None
    return {
        "baseline": watch["baseline"],
        "sampled_peak": max(watch["peak"], _resident()),
        "hwm_peak": hwm,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def distributed_run(client, estimator, n: int, d: int, block: int) -> tuple[float, float, dict]:
    """Seconds for ``n`` predictions, mean seconds of one block's task, and each worker's memory."""
    import dask.array as da
    from distributed import as_completed, get_task_stream

    from deq_kernel.dask import predict

    X = da.random.default_rng(1).standard_normal((n, d), chunks=(block, d))
    mean, std = predict(estimator, X, return_std=True)
    bounds = np.concatenate([[0], np.cumsum(X.chunks[0])])
    out = {"mean": np.empty(n), "std": np.empty(n)}
    parts, places = [], []
    for name, column in (("mean", mean), ("std", std)):
        # optimize_graph=False keeps the prediction task shared by the mean and std of a block
        # (optimised, each column would fuse its own copy of it and every block be predicted twice).
        for i, part in enumerate(column.to_delayed(optimize_graph=False)):
            parts.append(part)
            places.append((name, slice(int(bounds[i]), int(bounds[i + 1]))))
    settings = client.run(start_memory_watch)
    with get_task_stream(client) as stream:
        start = time.perf_counter()
        futures = client.compute(parts)
        where = {future.key: place for future, place in zip(futures, places, strict=True)}
        pending = as_completed(futures, with_results=True)
        # Each block lands in the client's arrays when it is done; then no future refers to it
        # any more, and its worker drops it.
        del futures
        for future, values in pending:
            name, rows = where[future.key]
            out[name][rows] = values
        seconds = time.perf_counter() - start
    memory = client.run(stop_memory_watch)
    assert np.all(np.isfinite(out["mean"])) and np.all(out["std"] >= 0)
    computes = [
        part["stop"] - part["start"]
        for task in stream.data
        if "predict_block" in str(task["key"])
        for part in task["startstops"]
        if part["action"] == "compute"
    ]
    for address, info in memory.items():
        info.update(settings[address])
    return seconds, float(np.mean(computes)), memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--inducing", type=int, default=512)
    parser.add_argument("--block", type=int, default=100_000, help="rows per dask block")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="n = 10^6")
    parser.add_argument(
        "--dask-only",
        action="store_true",
        help="no in-process baselines (and no ratio): the workers' memory at large n",
    )
    args = parser.parse_args()
    if args.quick:
        args.n = 1_000_000

    from distributed import Client, LocalCluster

    began = time.perf_counter()
    print(f"deq_kernel {deq_kernel.__version__} ({os.path.dirname(deq_kernel.__file__)}), torch {torch.__version__}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    r = np.random.default_rng(0)
    X_train = r.standard_normal((20_000, args.d))
    y_train = np.sin(X_train[:, 0]) + 0.5 * X_train[:, 1] + 0.1 * r.standard_normal(20_000)
    estimator = DEQGPRegressor(method="svgp", n_inducing=args.inducing, epochs=1, random_state=0)
    estimator.fit(X_train, y_train)
    print(f"SVGP regressor, {args.inducing} inducing points, d={args.d}; predicting mean and std")

    loads = {}
    local = local_blocks = None
    if not args.dask_only:
        X = np.random.default_rng(1).standard_normal((args.n, args.d))
        estimator.predict(X[:2048], return_std=True)  # warm-up
        loads["in process"] = os.getloadavg()[0]
        start = time.perf_counter()
        estimator.predict(X, return_std=True)
        local = time.perf_counter() - start
        loads["in process, by blocks"] = os.getloadavg()[0]
        start = time.perf_counter()
        for rows in range(0, args.n, args.block):
            estimator.predict(X[rows : rows + args.block], return_std=True)
        local_blocks = time.perf_counter() - start
        del X

    cluster = LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with Client(cluster) as client:
        distributed_run(client, estimator, 2 * args.workers * args.block, args.d, args.block)  # warm-up
        loads["dask"] = os.getloadavg()[0]
        runs = [distributed_run(client, estimator, n, args.d, args.block) for n in (args.n, args.n // 10)]
        loads["end"] = os.getloadavg()[0]
    cluster.close()

    first = next(iter(runs[0][2].values()))
    print(
        f"in process: {torch.get_num_threads()} torch threads; workers: {first['torch_threads']} torch thread each, "
        f"MALLOC_TRIM_THRESHOLD_={first['malloc_trim']}"
    )
    header = (
        f"{'run':<26} {'n':>9} {'seconds':>8} {'points/s':>9} {'s/block':>8}  "
        "per worker (MiB): baseline, peak above it sampled / VmHWM"
    )
    print(header)
    print("-" * len(header))
    if local is not None:
        print(f"{'in process, one call':<26} {args.n:9d} {local:8.2f} {args.n / local:9.0f}")
        per_block = local_blocks * args.block / args.n
        print(
            f"{'in process, block by block':<26} {args.n:9d} {local_blocks:8.2f} "
            f"{args.n / local_blocks:9.0f} {per_block:8.2f}"
        )
    for n, (seconds, per_block, memory) in zip((args.n, args.n // 10), runs, strict=True):
        cells = []
        for info in sorted(memory.values(), key=lambda info: info["baseline"]):
            hwm = "n/a" if info["hwm_peak"] is None else f"{(info['hwm_peak'] - info['baseline']) / MIB:.0f}"
            cells.append(
                f"{info['baseline'] / MIB:.0f}, +{(info['sampled_peak'] - info['baseline']) / MIB:.0f} / +{hwm}"
            )
        label = f"dask, {args.workers} workers x 1 thread"
        print(f"{label:<26} {n:9d} {seconds:8.2f} {n / seconds:9.0f} {per_block:8.2f}  {'; '.join(cells)}")
    if local is not None:
        print(
            f"ratio distributed / in process (points/s at n={args.n}): {local / runs[0][0]:.2f}x against one call, "
            f"{local_blocks / runs[0][0]:.2f}x against the same blocks in turn; block {args.block} rows"
        )
    rusage = ", ".join(f"{info['ru_maxrss'] / MIB:.0f}" for info in runs[0][2].values())
    print(
        f"(ru_maxrss per worker, not a measure: {rusage} MiB; this process's own peak: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
    )
    print(
        "1-minute load average before each part (other processes count too): "
        + ", ".join(f"{part} {load:.2f}" for part, load in loads.items())
    )
    print(f"total wall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
