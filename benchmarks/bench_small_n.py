"""Time the DEQ kernel at small n against GPyTorch's RBFKernel, and a scikit-learn fit against ARD RBF.

Most GP fits are small, where fixed per-call costs (Python, dispatch, the solver's set-up), not
flops, decide the time. Every ratio is measured in the same run on the same data.

**Kernel section.** For each ``n`` in ``--n`` (16, 64, 256, 1024), inputs ``x`` of shape
``(n, 6)`` (float64, standard normal, seed 0), and for each activation in ``--activations``
(relu, erf, tanh, gelu, softplus):

* **fwd**: ``DEQKernel(activation).double()(x).to_dense()`` under ``torch.no_grad()``;
* **fwd+bwd**: ``K = kernel(x).to_dense(); K.sum().backward()``, the gradient with respect to the
  kernel's raw parameters (weight, input and bias variances; the lengthscale for RBF);

against the same two operations of the baseline ``gpytorch.kernels.RBFKernel().double()`` on the
same ``x``. Each time is the median of ``--repeats`` calls (default 50 at n <= 64, 20 at n <= 256,
5 above) after 3 warm-up calls; the kernels are timed round-robin (one call of each in turn), so
that a load on the machine falls on all of them alike.

Targets (the fwd+bwd ratio to RBF):

* n = 64: <= 4x for relu and erf, <= 10x for tanh, gelu and softplus;
* n = 256 and n = 1024: <= 3x for relu and erf, <= 8x for tanh, gelu and softplus.

**scikit-learn section** (``--sklearn``, on by default; ``--no-sklearn`` skips it). The fit time
of ``GaussianProcessRegressor(ConstantKernel() * DEQ(activation=a) + WhiteKernel(),
normalize_y=True, n_restarts_optimizer=2, random_state=0)`` for each ``a`` in
``--sklearn-activations`` (relu, erf), against the baseline ``GaussianProcessRegressor(
ConstantKernel() * RBF(np.ones(10)) + WhiteKernel(), ...)`` (ARD RBF, same arguments), on
scikit-learn's diabetes data: a fixed 75% train split (331 points, ``train_test_split(...,
random_state=0)``), inputs standardised with ``StandardScaler`` and targets standardised, both
with the training split's statistics (``--sklearn-n`` keeps only the first points of it, for a
quick check). The log marginal likelihood of the fitted kernel and the R^2 on the other 111
points are printed for orientation. Each fit runs in its own (spawned) process, after a warm-up
kernel evaluation with gradient on 8 points; a fit that takes longer than ``--sklearn-timeout``
seconds (default 900) is stopped and reported as ``> timeout``. Target: <= 2x the ARD RBF fit
for relu and erf.

The fits run in each configuration of ``--sklearn-blas-threads`` (default ``default,1``):
``default`` leaves every thread pool as the process found it; a number wraps the fit in
``threadpoolctl.threadpool_limits(number, user_api="blas")``, which is how scikit-learn's
documentation tells users to keep thread pools from oversubscribing the cores. Each
configuration has its own RBF baseline. On a machine with few cores it matters: scipy's
OpenBLAS threads keep spinning for about 0.1 s after each of the fit's Cholesky solves, and the
kernel's torch operations, run inside that window on torch's OpenMP threads, wait for the cores
(on 2 cores the same ``DEQ(...)(X, eval_gradient=True)`` took 25 ms alone and 120 ms right after
a Cholesky solve). The RBF kernel is plain NumPy and does not meet the contention.

Usage::

    python benchmarks/bench_small_n.py                                   # both sections
    python benchmarks/bench_small_n.py --no-sklearn --json small_n.json  # kernel section only
    python benchmarks/bench_small_n.py --n 16,64 --activations relu --no-sklearn          # smoke test
    python benchmarks/bench_small_n.py --n 16 --activations relu --sklearn-n 100 --sklearn-activations relu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import gpytorch
import numpy as np
import sklearn
import torch
from sklearn.datasets import load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import deq_kernel
from deq_kernel.sklearn import DEQ

D = 6
WARMUP = 3
CLOSED = ("relu", "erf")  # activations with the tighter targets
#: Targets of the fwd+bwd ratio to RBF: {n: (closed forms, other activations)}.
TARGETS = {64: (4.0, 10.0), 256: (3.0, 8.0), 1024: (3.0, 8.0)}
SKLEARN_TARGET = 2.0
#: Seconds a fit's process may take to start (imports) before its fit is timed.
STARTUP_LIMIT_S = 600.0


def target(n: int, name: str) -> float | None:
    if n not in TARGETS or name == "rbf":
        return None
    closed, other = TARGETS[n]
    return closed if name in CLOSED else other


def default_repeats(n: int) -> int:
    return 50 if n <= 64 else 20 if n <= 256 else 5


# ----------------------------------------------------------------------------- kernel section


def time_kernels(n: int, names: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of fwd and fwd+bwd for RBF and each DEQ kernel, timed round-robin."""
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernels = {"rbf": gpytorch.kernels.RBFKernel().double()}
    kernels.update({name: deq_kernel.DEQKernel(name).double() for name in names})

    def forward(kernel) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            kernel(x).to_dense()
        return time.perf_counter() - start

    def forward_backward(kernel) -> float:
        kernel.zero_grad(set_to_none=True)
        start = time.perf_counter()
        K = kernel(x).to_dense()
        K.sum().backward()
        return time.perf_counter() - start

    times = {name: {"fwd": [], "fwd_bwd": []} for name in kernels}
    for op, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        for _ in range(WARMUP):
            for kernel in kernels.values():
                fn(kernel)
        for _ in range(repeats):
            for name, kernel in kernels.items():
                times[name][op].append(fn(kernel))
    return {name: {op: statistics.median(ts) for op, ts in ops.items()} for name, ops in times.items()}


def kernel_section(args: argparse.Namespace) -> list[dict]:
    names = args.activations.split(",")
    header = f"{'n':>5} {'kernel':<9} {'fwd ms':>9} {'fwd/rbf':>8} {'f+b ms':>9} {'f+b/rbf':>8} {'target':>7} {'':>6}"
    print(header)
    print("-" * len(header))
    rows = []
    for n in (int(v) for v in args.n.split(",")):
        repeats = args.repeats if args.repeats is not None else default_repeats(n)
        medians = time_kernels(n, names, repeats)
        rbf = medians["rbf"]
        for name, t in medians.items():
            fwd_ratio, both_ratio = t["fwd"] / rbf["fwd"], t["fwd_bwd"] / rbf["fwd_bwd"]
            goal = target(n, name)
            met = None if goal is None else both_ratio <= goal
            rows.append(
                dict(
                    n=n,
                    kernel=name,
                    repeats=repeats,
                    fwd_s=t["fwd"],
                    fwd_bwd_s=t["fwd_bwd"],
                    fwd_ratio=fwd_ratio,
                    fwd_bwd_ratio=both_ratio,
                    target=goal,
                    met=met,
                )
            )
            goal_text = "-" if goal is None else f"{goal:g}x"
            met_text = "" if met is None else "met" if met else "MISSED"
            print(
                f"{n:>5} {name:<9} {1e3 * t['fwd']:9.3f} {fwd_ratio:7.2f}x {1e3 * t['fwd_bwd']:9.3f} "
                f"{both_ratio:7.2f}x {goal_text:>7} {met_text:>6}"
            )
    return rows


# ------------------------------------------------------------------------ scikit-learn section


def diabetes(n: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardised diabetes data: a 75% train split (or its first ``n`` points) and the test split."""
    X, y = load_diabetes(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    if n is not None:
        X_train, y_train = X_train[:n], y_train[:n]
    scaler = StandardScaler().fit(X_train)
    mean, std = y_train.mean(), y_train.std()
    return scaler.transform(X_train), (y_train - mean) / std, scaler.transform(X_test), (y_test - mean) / std


def make_regressor(name: str) -> GaussianProcessRegressor:
    inner = RBF(np.ones(10)) if name == "rbf" else DEQ(activation=name)
    return GaussianProcessRegressor(
        ConstantKernel() * inner + WhiteKernel(), normalize_y=True, n_restarts_optimizer=2, random_state=0
    )


def _fit_child(name: str, data: tuple, threads: int | None, blas_threads: int | None, conn) -> None:
    """Fit in a spawned process; send "started" just before the timed fit, then the result."""
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        X, y, X_test, y_test = data
        gpr = make_regressor(name)
        gpr.kernel(X[:8], eval_gradient=True)  # warm-up: first-call costs are not the fit's
        conn.send("started")
        limits = contextlib.nullcontext() if blas_threads is None else threadpool_limits(blas_threads, user_api="blas")
        with limits, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            start = time.perf_counter()
            gpr.fit(X, y)
            fit_s = time.perf_counter() - start
        conn.send(
            dict(
                fit_s=fit_s,
                log_marginal_likelihood=float(gpr.log_marginal_likelihood_value_),
                test_r2=float(gpr.score(X_test, y_test)),
                fitted_kernel=str(gpr.kernel_),
                convergence_warnings=sum(issubclass(w.category, ConvergenceWarning) for w in caught),
            )
        )
    except Exception as exc:
        conn.send(dict(error=f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def timed_fit(name: str, data: tuple, threads: int | None, blas_threads: int | None, timeout: float) -> dict:
    """The fit of ``name`` in a spawned process, stopped after ``timeout`` seconds of fitting."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_fit_child, args=(name, data, threads, blas_threads, sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(STARTUP_LIMIT_S):
            return dict(error=f"process did not start within {STARTUP_LIMIT_S:g} s")
        message = receiver.recv()
        if message != "started":
            return message
        if not receiver.poll(timeout):
            return dict(timeout=True, fit_s=None)
        return receiver.recv()
    except EOFError:
        return dict(error=f"process died (exit status {process.exitcode})")
    finally:
        if process.is_alive():
            process.terminate()
        process.join()
        receiver.close()


def sklearn_section(args: argparse.Namespace) -> list[dict]:
    data = diabetes(args.sklearn_n)
    print(
        f"diabetes: {len(data[0])} standardised training points, {len(data[2])} test points; "
        f"GaussianProcessRegressor(C * kernel + White, normalize_y=True, n_restarts_optimizer=2, random_state=0); "
        f"timeout {args.sklearn_timeout:g} s"
    )
    header = f"{'kernel':<12} {'fit s':>9} {'ratio':>7} {'target':>7} {'':>6} {'LML':>9} {'test R^2':>9} {'warn':>5}"
    rows = []
    for blas in args.sklearn_blas_threads.split(","):
        blas_threads = None if blas == "default" else int(blas)
        print()
        limit = "as the process found them" if blas_threads is None else f"threadpool_limits({blas})"
        print(f"BLAS threads: {limit}")
        print(header)
        print("-" * len(header))
        rows += _sklearn_fits(args, data, blas_threads)
    return rows


def _sklearn_fits(args: argparse.Namespace, data: tuple, blas_threads: int | None) -> list[dict]:
    """The baseline's and the DEQ kernels' fits in one BLAS configuration, ratios to that baseline."""
    rows = []
    baseline = None
    for name in ["rbf", *args.sklearn_activations.split(",")]:
        fit = timed_fit(name, data, args.threads, blas_threads, args.sklearn_timeout)
        result = dict(kernel=name, blas_threads=blas_threads, **fit)
        rows.append(result)
        label = "ARD RBF" if name == "rbf" else f"DEQ {name}"
        if "error" in result:
            print(f"{label:<12} failed: {result['error']}")
            continue
        if result.get("timeout"):
            print(f"{label:<12} {'> ' + format(args.sklearn_timeout, 'g'):>9}")
            continue
        if name == "rbf":
            baseline = result["fit_s"]
        ratio = None if baseline is None else result["fit_s"] / baseline
        goal = None if name == "rbf" else SKLEARN_TARGET
        met = None if goal is None or ratio is None else ratio <= goal
        result.update(ratio=ratio, target=goal, met=met)
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        met_text = "" if met is None else "met" if met else "MISSED"
        print(
            f"{label:<12} {result['fit_s']:9.2f} {ratio_text:>7} {'-' if goal is None else f'{goal:g}x':>7} "
            f"{met_text:>6} {result['log_marginal_likelihood']:9.2f} {result['test_r2']:9.3f} "
            f"{result['convergence_warnings']:>5}"
        )
        print(f"{'':<12} kernel_: {result['fitted_kernel']}")
    return rows


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="16,64,256,1024", help="comma-separated sizes (default 16,64,256,1024)")
    parser.add_argument("--activations", default="relu,erf,tanh,gelu,softplus")
    parser.add_argument("--repeats", type=int, default=None, help="calls per median (default: 50, 20 or 5 by n)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--sklearn", action=argparse.BooleanOptionalAction, default=True, help="time scikit-learn fits (default on)"
    )
    parser.add_argument("--sklearn-activations", default="relu,erf")
    parser.add_argument("--sklearn-n", type=int, default=None, help="first N of the 331 training points (default all)")
    parser.add_argument(
        "--sklearn-blas-threads",
        default="default,1",
        help="comma-separated BLAS thread limits for the fits, 'default' for none (default: default,1)",
    )
    parser.add_argument("--sklearn-timeout", type=float, default=900.0, help="seconds per fit (default 900)")
    parser.add_argument("--json", type=Path, default=None, help="also save the results to this file")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also through a pipe
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}, gpytorch {gpytorch.__version__}, "
        f"scikit-learn {sklearn.__version__}"
    )
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    print(f"d={D}, float64; deq_kernel.settings.compile: {deq_kernel.settings.compile.value()!r}")
    print("kernel targets (f+b/rbf): n=64 relu, erf <= 4x, others <= 10x; n=256, 1024 relu, erf <= 3x, others <= 8x")
    kernel_rows = kernel_section(args)
    sklearn_rows = None
    if args.sklearn:
        print()
        print(f"scikit-learn fit target: <= {SKLEARN_TARGET:g}x the ARD RBF fit")
        sklearn_rows = sklearn_section(args)

    if args.json is not None:
        payload = dict(
            benchmark="bench_small_n",
            deq_kernel=deq_kernel.__version__,
            torch=torch.__version__,
            gpytorch=gpytorch.__version__,
            scikit_learn=sklearn.__version__,
            machine=platform.processor() or platform.machine(),
            cpus=os.cpu_count(),
            python=sys.version.split()[0],
            threads=torch.get_num_threads(),
            compile_setting=deq_kernel.settings.compile.value(),
            d=D,
            kernel_section=kernel_rows,
            sklearn_section=sklearn_rows,
        )
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
