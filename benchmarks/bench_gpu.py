"""The relu DEQ kernel on a GPU against GPyTorch's RBFKernel and the 100-step Picard iteration.

One prepared run (see benchmarks/RESULTS.md): float32, X standard normal, relu with
weight_variance 1.0 and bias_variance 0.1, for (n, d) = (16384, 64), (32768, 64) and
(32768, 784). Reported per case: RBF time, the DEQ kernel fused by torch.compile and
eager, each as a ratio to RBF, the first (compiling) call, and the error of the first 512
rows against a float64 computation. The 100-step Picard iteration of the whole matrix
(the original authors' method) is timed at (32768, 64), and the backward pass (gradient
of a scalar of K with respect to the hyperparameters) at (16384, 64).

Usage::

    PYTHONPATH=. python benchmarks/bench_gpu.py [--quick] [--device cuda] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gpytorch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import relu_picard

import deq_kernel
from deq_kernel import settings

W, B = 1.0, 0.1


def timed(fn, device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def deq(x: torch.Tensor, **kw) -> torch.Tensor:
    return deq_kernel.equilibrium_covariance(x, weight_variance=W, bias_variance=B, **kw)


def run_case(n: int, d: int, device: torch.device, repeats: int, picard: bool, backward: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(n + d)
    x = torch.randn(n, d, device=device, dtype=torch.float32, generator=gen)
    rbf = gpytorch.kernels.RBFKernel().to(device)
    row: dict = dict(n=n, d=d)
    with torch.no_grad():
        row["rbf"] = timed(lambda: rbf(x).to_dense(), device, repeats)
        with settings.compile(True):
            row["first_call"] = timed(lambda: deq(x), device, 1)  # compiles
            row["compiled"] = timed(lambda: deq(x), device, repeats)
            ours = deq(x)
        with settings.compile(False):
            row["eager"] = timed(lambda: deq(x), device, max(1, repeats // 2))
        ref = deq_kernel.equilibrium_covariance(x[:512].double(), x.double(), weight_variance=W, bias_variance=B)
        row["error"] = float((ours[:512].double() - ref).abs().max() / ref.abs().max())
        del ours, ref
        if picard:
            row["picard"] = timed(lambda: relu_picard(x, W, B), device, 1)
    if backward:
        w = torch.tensor(W, device=device, requires_grad=True)
        b = torch.tensor(B, device=device, requires_grad=True)

        def forward_backward() -> None:
            deq_kernel.equilibrium_covariance(x, weight_variance=w, bias_variance=b).sum().backward()

        with settings.compile(True):
            forward_backward()
            row["forward_backward"] = timed(forward_backward, device, repeats)
    return row


def describe(row: dict) -> str:
    rbf, compiled = row["rbf"], row["compiled"]
    msg = (
        f"n={row['n']:6d} d={row['d']:4d}  rbf {rbf * 1e3:8.2f} ms  compiled {compiled * 1e3:8.2f} ms "
        f"({compiled / rbf:5.2f}x)  eager {row['eager'] * 1e3:8.2f} ms ({row['eager'] / rbf:5.1f}x)  "
        f"first call {row['first_call']:6.1f} s  error {row['error']:.1e}"
    )
    if "picard" in row:
        msg += f"  picard {row['picard']:.2f} s ({row['picard'] / rbf:.0f}x rbf, {row['picard'] / compiled:.0f}x deq)"
    if "forward_backward" in row:
        both = row["forward_backward"]
        msg += f"  fwd+bwd {both * 1e3:.1f} ms (bwd/fwd {both / compiled - 1:.2f})"
    return msg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (to check the script)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = [(1024, 64), (2048, 64), (2048, 128)] if args.quick else [(16384, 64), (32768, 64), (32768, 784)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}, gpytorch {gpytorch.__version__}, {name}")
    rows = []
    for i, (n, d) in enumerate(cases):
        row = run_case(n, d, device, args.repeats, picard=i == 1, backward=i == 0)
        rows.append(row)
        print(describe(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # The general Newton path (no table), for information: erf at the first size.
    n, d = cases[0]
    x = torch.randn(n, d, device=device, dtype=torch.float32, generator=torch.Generator(device=device).manual_seed(1))
    rbf = gpytorch.kernels.RBFKernel().to(device)
    with torch.no_grad(), settings.compile(True):
        t_rbf = timed(lambda: rbf(x).to_dense(), device, args.repeats)
        kernel = lambda: deq_kernel.equilibrium_covariance(x, activation="erf", weight_variance=0.4)  # noqa: E731
        first = timed(kernel, device, 1)
        t_erf = timed(kernel, device, args.repeats)
    rows.append(dict(n=n, d=d, activation="erf", rbf=t_rbf, compiled=t_erf, first_call=first))
    print(
        f"erf n={n} d={d}: rbf {t_rbf * 1e3:.2f} ms, compiled {t_erf * 1e3:.2f} ms "
        f"({t_erf / t_rbf:.2f}x), first {first:.1f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, rows=rows), indent=2))


if __name__ == "__main__":
    main()
