"""Time exact-GP training with ScaleKernel(DEQKernel) against the same model with ScaleKernel(RBFKernel).

Both models are GPyTorch ``ExactGP`` s with a constant mean, Gaussian noise and
``ScaleKernel(base)``, trained by ``steps`` Adam steps (learning rate 0.1) on the exact
marginal likelihood, on the same data (x standard normal, n x d; y a smooth function plus
noise), one after the other in the same run. ``base`` is ``DEQKernel("relu")`` or
``RBFKernel()`` (both with ARD when ``--ard``). Two inference modes are timed:

* ``gpytorch``: GPyTorch's defaults, ``ExactMarginalLogLikelihood`` (above 800 points,
  conjugate gradients and stochastic Lanczos quadrature), the loop of GPyTorch's tutorials;
* ``cholesky``: ``deq_kernel.gpytorch.CholeskyMarginalLogLikelihood`` (dense Cholesky
  factorisation, closed-form gradient), the objective ``fit_exact_gp`` uses.

Each time is the best of ``--repeats`` runs; the ratio is DEQ over RBF. A warm-up run first
(``torch.compile``, where :mod:`deq_kernel.equilibrium.backend` uses it, compiles on first use).

Usage::

    python benchmarks/bench_gp_training.py              # n = 2000, d = 8, 50 steps, float64
    python benchmarks/bench_gp_training.py --quick      # n = 500, 10 steps (CI)
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import gpytorch
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from gpytorch.likelihoods import GaussianLikelihood

import deq_kernel
from deq_kernel import DEQKernel
from deq_kernel.gpytorch import CholeskyMarginalLogLikelihood, ExactGPModel


def make_data(n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (
        torch.sin(x[:, 0])
        + torch.relu(x[:, 1 % d])
        - 0.5 * x[:, 2 % d]
        + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    )
    return x.to(dtype), y.to(dtype)


def train(
    base: gpytorch.kernels.Kernel, x: torch.Tensor, y: torch.Tensor, steps: int, mode: str
) -> tuple[float, float]:
    """Seconds for ``steps`` Adam steps, and the final marginal log likelihood per point."""
    torch.manual_seed(0)  # the probe vectors of GPyTorch's stochastic estimators
    model = ExactGPModel(x, y, GaussianLikelihood(), covar_module=ScaleKernel(base)).to(x.dtype)
    model.train()
    mll_class = CholeskyMarginalLogLikelihood if mode == "cholesky" else gpytorch.mlls.ExactMarginalLogLikelihood
    mll = mll_class(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, -loss.item()


def best_of(repeats: int, fn) -> tuple[float, float]:
    best, value = math.inf, math.nan
    for _ in range(repeats):
        seconds, value = fn()
        best = min(best, seconds)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--modes", default="gpytorch,cholesky")
    parser.add_argument("--ard", action="store_true", help="one input variance / length scale per dimension")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--compile", default="auto", choices=["auto", "true", "false"], help="deq_kernel.settings.compile"
    )
    parser.add_argument("--quick", action="store_true", help="n = 500, 10 steps, one repeat (CI)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps, args.repeats = 500, 10, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    compile_mode = {"auto": "auto", "true": True, "false": False}[args.compile]
    with deq_kernel.settings.compile(compile_mode):
        run(args)


def run(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    x, y = make_data(args.n, args.d, dtype)
    ard = args.d if args.ard else None
    print(f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}, gpytorch {gpytorch.__version__}")
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"deq_kernel.settings.compile={args.compile}"
    )
    print(f"exact GP, {args.steps} Adam steps, n={args.n}, d={args.d}, {args.dtype}, ARD={args.ard}")
    # warm-up: first calls compile kernels and fill caches
    train(DEQKernel("relu", ard_num_dims=ard), x[:256], y[:256], 2, "cholesky")
    train(RBFKernel(ard_num_dims=ard), x[:256], y[:256], 2, "cholesky")
    header = f"{'mode':<10} {'RBF s':>8} {'DEQ s':>8} {'DEQ/RBF':>8} {'RBF mll':>9} {'DEQ mll':>9}"
    print(header)
    print("-" * len(header))
    for mode in args.modes.split(","):
        t_rbf, mll_rbf = best_of(args.repeats, lambda m=mode: train(RBFKernel(ard_num_dims=ard), x, y, args.steps, m))
        t_deq, mll_deq = best_of(
            args.repeats, lambda m=mode: train(DEQKernel("relu", ard_num_dims=ard), x, y, args.steps, m)
        )
        print(f"{mode:<10} {t_rbf:8.2f} {t_deq:8.2f} {t_deq / t_rbf:7.2f}x {mll_rbf:9.3f} {mll_deq:9.3f}")


if __name__ == "__main__":
    main()
