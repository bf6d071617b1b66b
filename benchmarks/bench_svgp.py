"""Time an SVGP training epoch with ScaleKernel(DEQKernel) against the same model with ScaleKernel(RBFKernel).

Both models are :class:`deq_kernel.variational.SVGPModel` s (constant mean, Gaussian noise,
``m`` learned inducing points, Cholesky variational distribution), trained by
:func:`deq_kernel.variational.fit_svgp` (Adam, minibatches from a DataLoader) on the same data
(x standard normal, n x d; y a smooth function plus noise), one after the other in the same
run. Only the base kernel differs: ``DEQKernel("relu")`` or ``RBFKernel()``. Each model first
takes a few warm-up steps (``torch.compile`` compiles the DEQ kernel's passes on first use), then
one epoch is timed; the ratio is DEQ over RBF.

A step costs the same whatever ``n`` (it sees ``batch_size`` points), so ``--max-steps`` may
time part of an epoch and scale it to a whole one; the output says when it does.

Usage::

    python benchmarks/bench_svgp.py              # n = 10^6, d = 16, 512 inducing points, batch 1024
    python benchmarks/bench_svgp.py --quick      # n = 10^5
"""

from __future__ import annotations

import argparse
import math
import platform

import gpytorch
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from gpytorch.likelihoods import GaussianLikelihood

import deq_kernel
from deq_kernel import DEQKernel
from deq_kernel.variational import SVGPModel, fit_svgp


def make_data(n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = (
        torch.sin(x[:, 0])
        + torch.relu(x[:, 1 % d])
        - 0.5 * x[:, 2 % d]
        + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    )
    return x, y


def epoch_seconds(base: gpytorch.kernels.Kernel, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    """Seconds for one epoch (measured, or scaled from ``--max-steps`` steps)."""
    torch.manual_seed(0)
    model = SVGPModel(x[: args.inducing].clone(), GaussianLikelihood(), covar_module=ScaleKernel(base)).to(x.dtype)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    warm = min(len(x), 3 * args.batch_size)
    fit_svgp(model, x[:warm], y[:warm], epochs=1, batch_size=args.batch_size, initialize=False)
    rows = len(x) if args.max_steps is None else min(len(x), args.max_steps * args.batch_size)
    result = fit_svgp(
        model,
        x[:rows],
        y[:rows],
        epochs=1,
        batch_size=args.batch_size,
        learning_rate=0.01,
        initialize=False,
        generator=torch.Generator().manual_seed(0),
        verbose=args.verbose,
    )
    return result.epoch_seconds[0] * steps_per_epoch / result.n_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--inducing", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float64", "float32"])
    parser.add_argument("--max-steps", type=int, default=None, help="time this many steps and scale to an epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verbose", action="store_true", help="progress of each epoch on stderr")
    parser.add_argument("--quick", action="store_true", help="n = 10^5")
    args = parser.parse_args()
    if args.quick:
        args.n = 100_000
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    x, y = make_data(args.n, args.d, dtype)
    x, y = x.to(args.device), y.to(args.device)
    print(f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}, gpytorch {gpytorch.__version__}")
    device = torch.cuda.get_device_name() if x.is_cuda else (platform.processor() or platform.machine())
    compile_mode = deq_kernel.settings.compile.value()
    print(f"{device}, {torch.get_num_threads()} threads, deq_kernel.settings.compile={compile_mode}")
    steps = math.ceil(args.n / args.batch_size)
    scaled = "" if args.max_steps is None or args.max_steps >= steps else f" (from {args.max_steps} steps, scaled)"
    print(
        f"SVGP epoch: n={args.n}, d={args.d}, {args.inducing} inducing points, batch {args.batch_size}, "
        f"{steps} steps, {args.dtype}{scaled}"
    )
    t_rbf = epoch_seconds(RBFKernel(), x, y, args)
    t_deq = epoch_seconds(DEQKernel("relu"), x, y, args)
    header = f"{'RBF s/epoch':>12} {'DEQ s/epoch':>12} {'DEQ/RBF':>8}"
    print(header)
    print("-" * len(header))
    print(f"{t_rbf:12.2f} {t_deq:12.2f} {t_deq / t_rbf:7.2f}x")


if __name__ == "__main__":
    main()
