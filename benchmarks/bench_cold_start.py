"""Time the first calls of the DEQ kernel in a fresh process, cold and warm.

A GP fit is short: a few dozen kernel evaluations. What a first-time user pays is then the first
forward and backward, in a fresh process, with compilation caches empty (``torch.compile``
kernels, generated code, lazily built tables, ...). This script measures that, per activation,
each case in its own Python process (this script re-invoked with a hidden ``--child`` flag):

* **cold**: a fresh process whose ``TORCHINDUCTOR_CACHE_DIR`` (and ``TRITON_CACHE_DIR``) is a
  fresh, empty temporary directory, so nothing compiled by an earlier run is reused;
* **warm** (the baseline): a fresh process, again with an empty cache directory, that first runs
  the whole timed workload below once (with other hyperparameter values) under
  ``settings.compile(True)`` and waits for any background compilation, so that everything the
  library compiles or caches is ready, and then times the same workload, compiled: the steady
  state of a long-running process (``--warm same`` keeps the cold child's settings instead).

The workload, on float64 inputs ``x`` of shape ``(n, d)`` (standard normal, seed 0) and
``k = gpytorch.kernels.ScaleKernel(deq_kernel.DEQKernel(activation)).double()``:

a. **first fwd**: the first ``k(x).to_dense()``, under ``torch.no_grad()``;
b. **first fwd+bwd**: the first ``K = k(x).to_dense(); (K * W).sum().backward()``, ``W`` a fixed
   random ``n x n`` matrix (seed 1), on freshly set hyperparameters;
c. **calls**: the sum of ``--calls`` (20) such forward+backward calls, each on new
   hyperparameters, as in a short fit.

Before each of these calls the base kernel's hyperparameters are set to values drawn from a fixed
generator: ``weight_variance`` uniform in ``[0.2, 0.8]`` times the activation's
``weight_variance_bound`` (times 2 for an activation without one), ``input_variance`` uniform in
``[0.5, 2]``, ``bias_variance`` uniform in ``[0.01, 0.5]``. Cold and warm children time the same
draws; the warm child's warm-up uses draws of another seed, so that it cannot be helped by a
cache of values, only by what was compiled or built.

Also printed: the time of ``import torch, gpytorch, deq_kernel`` in the cold child, and whether
the cold child wrote anything into its inductor cache (``compiled``: it compiled something).

Targets (cold child, n = 4096, d = 64):

* first fwd+bwd <= 5 s;
* the cold sum of the 20 calls <= 2x the warm sum.

Usage::

    python benchmarks/bench_cold_start.py                          # n = 4096, d = 64, relu, erf, tanh, gelu
    python benchmarks/bench_cold_start.py --activations relu --threads 2 --json cold.json
    python benchmarks/bench_cold_start.py --n 64 --d 4 --activations relu --calls 3   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The line of a child's output that holds its results.
RESULT_PREFIX = "BENCH_COLD_START_RESULT "

#: Targets of the docstring.
TARGET_FIRST_FWD_BWD_S = 5.0
TARGET_COLD_OVER_WARM = 2.0

#: Seeds: inputs, the upstream gradient W, timed hyperparameter draws, warm-up draws.
SEED_X, SEED_W, SEED_TIMED, SEED_WARMUP = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------- child


def _child(config: dict) -> dict:
    """Run the workload in this (fresh) process; return times in seconds and facts about the run."""
    start = time.perf_counter()
    import gpytorch
    import numpy as np
    import torch

    import deq_kernel

    import_s = time.perf_counter() - start
    if config["threads"] is not None:
        torch.set_num_threads(config["threads"])
    n, d, name, calls = config["n"], config["d"], config["activation"], config["calls"]
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(SEED_X), dtype=torch.float64)
    weights = torch.rand(n, n, generator=torch.Generator().manual_seed(SEED_W), dtype=torch.float64)
    k = gpytorch.kernels.ScaleKernel(deq_kernel.DEQKernel(name)).double()
    bound = deq_kernel.get_activation(name).weight_variance_bound
    bound = bound if math.isfinite(bound) else 2.0

    def set_hyperparameters(rng: np.random.Generator) -> None:
        base = k.base_kernel
        base.weight_variance = float(rng.uniform(0.2, 0.8)) * bound
        base.input_variance = float(rng.uniform(0.5, 2.0))
        base.bias_variance = float(rng.uniform(0.01, 0.5))

    def forward(rng: np.random.Generator) -> float:
        set_hyperparameters(rng)
        begin = time.perf_counter()
        with torch.no_grad():
            k(x).to_dense()
        return time.perf_counter() - begin

    def forward_backward(rng: np.random.Generator) -> float:
        set_hyperparameters(rng)
        k.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        K = k(x).to_dense()
        (K * weights).sum().backward()
        return time.perf_counter() - begin

    def workload(seed: int) -> dict:
        rng = np.random.default_rng(seed)
        first_fwd = forward(rng)
        first_fwd_bwd = forward_backward(rng)
        per_call = [forward_backward(rng) for _ in range(calls)]
        return dict(first_fwd=first_fwd, first_fwd_bwd=first_fwd_bwd, calls=sum(per_call), per_call=per_call)

    mode = config["compile"]
    if config["mode"] == "warm" and config["warm"] == "compiled":
        mode = True  # the steady state of a long-running process: everything compiled
    with contextlib.nullcontext() if mode is None else deq_kernel.settings.compile(mode):
        compile_value = deq_kernel.settings.compile.value()
        warmup_s = None
        if config["mode"] == "warm":
            begin = time.perf_counter()
            workload(SEED_WARMUP)
            wait = getattr(getattr(deq_kernel, "equilibrium", None), "backend", None)
            if wait is not None:
                wait.wait_compiled(config["timeout"])  # background compilations, where the library has them
            warmup_s = time.perf_counter() - begin
        result = workload(SEED_TIMED)
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return dict(
        result,
        mode=config["mode"],
        activation=name,
        import_s=import_s,
        warmup_s=warmup_s,
        threads=torch.get_num_threads(),
        compile=compile_value,
        inductor_cache_files=sum(1 for p in cache.rglob("*") if p.is_file()),
    )


# --------------------------------------------------------------------------------------- parent


def run_child(config: dict, timeout: float) -> dict:
    """Run one case in a fresh process with fresh, empty compiler cache directories."""
    with tempfile.TemporaryDirectory(prefix="deq_cold_start_") as tmp:
        env = dict(os.environ)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton")
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(config, error=f"timed out after {timeout:g} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return dict(config, error=f"exit status {proc.returncode}: " + " | ".join(tail))


def _fmt(value: float | None, width: int = 8, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", default="relu,erf,tanh,gelu")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20, help="forward+backward calls summed (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    parser.add_argument(
        "--compile",
        choices=("auto", "true", "false"),
        default=None,
        help="run the children under deq_kernel.settings.compile(...) (default: the library's setting)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per child (default 1800)")
    parser.add_argument(
        "--warm",
        choices=("compiled", "same"),
        default="compiled",
        help="the warm baseline: everything compiled (settings.compile(True), the steady state of a long "
        "process; default) or the same settings as the cold child",
    )
    parser.add_argument("--json", type=Path, default=None, help="also save the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        print(RESULT_PREFIX + json.dumps(_child(json.loads(args.child))), flush=True)
        return

    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also through a pipe
    import gpytorch
    import torch

    import deq_kernel

    compile_mode = {"auto": "auto", "true": True, "false": False, None: None}[args.compile]
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    print(f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}, gpytorch {gpytorch.__version__}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {threads} torch threads")
    print(
        f"n={args.n}, d={args.d}, float64, {args.calls} calls; deq_kernel.settings.compile: "
        f"{deq_kernel.settings.compile.value()!r}" + ("" if compile_mode is None else f" (run under {compile_mode!r})")
    )
    print(
        f"targets: cold first fwd+bwd <= {TARGET_FIRST_FWD_BWD_S:g} s, "
        f"cold {args.calls}-call sum <= {TARGET_COLD_OVER_WARM:g}x warm"
    )
    header = (
        f"{'activation':<10} {'import s':>8} {'compiled':>8} {'fwd cold':>8} {'fwd warm':>8} "
        f"{'f+b cold':>8} {'f+b warm':>8} {'sum cold':>8} {'sum warm':>8} {'cold/warm':>9} {'targets':>8}"
    )
    print(header)
    print("-" * len(header))

    results = []
    for name in args.activations.split(","):
        config = dict(
            n=args.n,
            d=args.d,
            activation=name,
            calls=args.calls,
            threads=args.threads,
            compile=compile_mode,
            warm=args.warm,
            timeout=args.timeout,
        )
        cold = run_child(dict(config, mode="cold"), args.timeout)
        warm = run_child(dict(config, mode="warm"), args.timeout)
        results.append(dict(activation=name, cold=cold, warm=warm))
        for case in (cold, warm):
            if "error" in case:
                print(f"{name:<10} {case['mode']} child failed: {case['error']}")
        if "error" in cold or "error" in warm:
            continue
        ratio = cold["calls"] / warm["calls"]
        met = cold["first_fwd_bwd"] <= TARGET_FIRST_FWD_BWD_S and ratio <= TARGET_COLD_OVER_WARM
        results[-1].update(ratio=ratio, targets_met=met)
        print(
            f"{name:<10} {_fmt(cold['import_s'])} {'yes' if cold['inductor_cache_files'] else 'no':>8} "
            f"{_fmt(cold['first_fwd'])} {_fmt(warm['first_fwd'])} "
            f"{_fmt(cold['first_fwd_bwd'])} {_fmt(warm['first_fwd_bwd'])} "
            f"{_fmt(cold['calls'])} {_fmt(warm['calls'])} {ratio:8.2f}x {'met' if met else 'MISSED':>8}"
        )

    if args.json is not None:
        payload = dict(
            benchmark="bench_cold_start",
            deq_kernel=deq_kernel.__version__,
            torch=torch.__version__,
            gpytorch=gpytorch.__version__,
            machine=platform.processor() or platform.machine(),
            cpus=os.cpu_count(),
            python=sys.version.split()[0],
            compile_setting=deq_kernel.settings.compile.value(),
            compile_override=compile_mode,
            n=args.n,
            d=args.d,
            calls=args.calls,
            threads=args.threads,
            targets=dict(first_fwd_bwd_s=TARGET_FIRST_FWD_BWD_S, cold_over_warm=TARGET_COLD_OVER_WARM),
            results=results,
        )
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
