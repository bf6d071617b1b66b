"""Time the Monte Carlo sampler of finite DEQs against a network-by-network loop.

Both estimate the output covariance of ``n_networks`` relu DEQs of one width on the same
ten inputs (d = 10, weight_variance 0.36, the paper's sigma_w = 0.6), in float32:

* ``loop``: the original authors' method, one ``torch.nn`` network at a time, each
  initialised and run for 100 plain fixed-point steps (no convergence test);
* ``batched``: :func:`deq_kernel.finite.sample_outputs`, networks stacked and solved
  together with ``torch.bmm``, each equilibrium found to a relative residual of 1e-5.

The loop is timed on a subset of the networks and scaled (every network costs the
same); the table marks it with ``~``. The relative Frobenius error of each estimate
against :func:`deq_kernel.equilibrium_covariance` is printed alongside.

Usage::

    python benchmarks/bench_finite.py                 # width 512, 3000 networks
    python benchmarks/bench_finite.py --quick         # width 256, 300 networks
    python benchmarks/bench_finite.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import deq_kernel
from deq_kernel.finite import sample_outputs

WEIGHT_VARIANCE = 0.36


def loop_outputs(x: torch.Tensor, width: int, n_networks: int, seed: int) -> torch.Tensor:
    """The authors' method: one network at a time, 100 Picard steps from h = 0."""
    torch.manual_seed(seed)
    d = x.shape[1]
    outputs = []
    with torch.no_grad():
        for _ in range(n_networks):
            u = torch.randn(width, d, device=x.device) * (1.0 / d) ** 0.5
            w = torch.randn(width, width, device=x.device) * (WEIGHT_VARIANCE / width) ** 0.5
            v = torch.randn(width, device=x.device) * (1.0 / width) ** 0.5
            injection = x @ u.T
            h = torch.zeros_like(injection)
            for _ in range(100):
                h = torch.relu(h @ w.T + injection)
            outputs.append(h @ v)
    return torch.stack(outputs)


def error(outputs: torch.Tensor, exact: torch.Tensor) -> float:
    f = outputs.double().cpu()
    return float(torch.linalg.matrix_norm(f.T @ f / len(f) - exact) / torch.linalg.matrix_norm(exact))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 256, 300 networks")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    width, n_networks = (256, 300) if args.quick else (512, 3000)
    device = torch.device(args.device)
    x = torch.randn(10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = deq_kernel.equilibrium_covariance(x, weight_variance=WEIGHT_VARIANCE)
    x32 = x.float().to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sample_outputs(x32, width=width, n_networks=8, seed=1, weight_variance=WEIGHT_VARIANCE)  # warm-up
    sync()
    start = time.perf_counter()
    batched = sample_outputs(x32, width=width, n_networks=n_networks, seed=0, weight_variance=WEIGHT_VARIANCE)
    sync()
    t_batched = time.perf_counter() - start

    subset = min(n_networks, 100)
    loop_outputs(x32, width, 4, seed=1)  # warm-up
    sync()
    start = time.perf_counter()
    looped = loop_outputs(x32, width, subset, seed=0)
    sync()
    t_loop = (time.perf_counter() - start) * n_networks / subset

    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    print(f"# relu DEQ, width {width}, {n_networks} networks, 10 inputs in d = 10, float32")
    print(f"{'method':>8} {'seconds':>9} {'ratio':>7} {'rel. Frobenius error':>21}")
    print(f"{'loop':>8} {'~':>1}{t_loop:8.2f} {1.0:7.2f} {error(looped, exact):>17.3f} ({subset} nets)")
    print(f"{'batched':>8} {t_batched:9.2f} {t_batched / t_loop:7.3f} {error(batched, exact):21.3f}")


if __name__ == "__main__":
    main()
