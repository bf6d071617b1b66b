"""Throughput of distributed prediction (deq_kernel.dask.predict) against one in-process call.

A ``DEQGPRegressor(method="svgp")`` is fitted on 20000 points (d = 16), then predicts mean and
standard deviation at ``n`` new points twice, in the same run:

* in process: one call of ``estimator.predict(X, return_std=True)`` on the whole array (the
  SVGP predicts in blocks of ``batch_size`` rows), with torch's threads;
* distributed: :func:`deq_kernel.dask.predict` over a dask array of ``n`` rows generated on the
  workers in blocks of ``--block`` rows, on a ``LocalCluster`` of ``--workers`` worker processes
  (one thread each) on 127.0.0.1, results gathered to the client.

It prints points per second for each and their ratio, and the peak resident memory of each
worker (``ru_maxrss``, workers restarted before the run), which the block size bounds, not
``n``: the run is repeated at ``n / 10`` for comparison.

Usage::

    python benchmarks/bench_dask.py              # n = 10^7, 2 workers
    python benchmarks/bench_dask.py --quick      # n = 10^6
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch

import deq_kernel
from deq_kernel.sklearn import DEQGPRegressor


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def distributed_run(client, estimator, n: int, d: int, block: int) -> tuple[float, list[float]]:
    import dask
    import dask.array as da

    from deq_kernel.dask import predict

    client.restart()  # fresh workers: their peak memory is this run's
    X = da.random.default_rng(1).standard_normal((n, d), chunks=(block, d))
    mean, std = predict(estimator, X, return_std=True)
    start = time.perf_counter()
    mean, std = dask.compute(mean, std)
    seconds = time.perf_counter() - start
    assert mean.shape == (n,) and np.all(np.isfinite(std))
    peaks = sorted(client.run(peak_rss_mib).values())
    return seconds, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--inducing", type=int, default=512)
    parser.add_argument("--block", type=int, default=100_000, help="rows per dask block")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="n = 10^6")
    args = parser.parse_args()
    if args.quick:
        args.n = 1_000_000

    from distributed import Client, LocalCluster

    print(f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}")
    print(f"{platform.processor() or platform.machine()}, in-process torch threads: {torch.get_num_threads()}")
    r = np.random.default_rng(0)
    X_train = r.standard_normal((20_000, args.d))
    y_train = np.sin(X_train[:, 0]) + 0.5 * X_train[:, 1] + 0.1 * r.standard_normal(20_000)
    estimator = DEQGPRegressor(method="svgp", n_inducing=args.inducing, epochs=1, random_state=0)
    estimator.fit(X_train, y_train)
    print(f"SVGP regressor, {args.inducing} inducing points, d={args.d}; predicting mean and std")

    X = np.random.default_rng(1).standard_normal((args.n, args.d))
    estimator.predict(X[:2048], return_std=True)  # warm-up
    start = time.perf_counter()
    estimator.predict(X, return_std=True)
    local = time.perf_counter() - start
    del X

    cluster = LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with Client(cluster) as client:
        distributed_run(client, estimator, 4 * args.block, args.d, args.block)  # warm-up
        seconds, peaks = distributed_run(client, estimator, args.n, args.d, args.block)
        small_seconds, small_peaks = distributed_run(client, estimator, args.n // 10, args.d, args.block)
    cluster.close()

    header = f"{'run':<28} {'n':>10} {'seconds':>9} {'points/s':>11} {'peak RSS per worker (MiB)':>27}"
    print(header)
    print("-" * len(header))
    print(f"{'in process, one call':<28} {args.n:10d} {local:9.2f} {args.n / local:11.0f}")
    rows = ((args.n, seconds, peaks), (args.n // 10, small_seconds, small_peaks))
    for n, secs, peak in rows:
        label = f"dask, {args.workers} workers x 1 thread"
        print(f"{label:<28} {n:10d} {secs:9.2f} {n / secs:11.0f} {', '.join(f'{p:.0f}' for p in peak):>27}")
    print(f"ratio distributed / in process (points/s at n={args.n}): {local / seconds:.2f}x; block {args.block} rows")


if __name__ == "__main__":
    main()
