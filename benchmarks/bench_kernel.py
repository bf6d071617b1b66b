"""Time K(X, X) of the DEQ kernel against GPyTorch's RBFKernel and the 100-step Picard iteration.

Every ratio is measured in the same run on the same X (standard normal, n x d):

* ``rbf``: ``gpytorch.kernels.RBFKernel()(X).to_dense()`` (the baseline a GP user pays);
* ``picard``: the original authors' method, 100 Picard steps of the whole matrix
  ``K <- w E[phi(u) phi(v)](K) + S`` from ``K = S``. For relu each step uses the
  arc-cosine formula on the whole matrix. For activations without a closed form each
  step needs a 2-D Gauss-Hermite rule per pair (20 x 20 nodes); that is timed on a block of
  rows for one step and scaled to n rows and 100 steps (every step and row costs the same),
  which the table marks with ``~``;
* ``deq``: :func:`deq_kernel.equilibrium_covariance`;
* ``bwd/fwd``: the backward pass (the gradient of the scalar ``<W, K>`` for a fixed random
  ``W`` with respect to the weight, input and bias variances, taken as the backward of ``K``
  with upstream gradient ``W``, as a marginal likelihood hands it over) over the forward
  time, the backward time being the time of forward and backward together minus the
  forward time.

The error column is the largest difference of ``deq`` from an independent float64 reference,
relative to the largest entry: for relu the float64 Picard result on the whole matrix
(converged: its contraction factor is ``w/2`` = 0.5 per step); otherwise
``tests/reference.py``'s Picard iteration run to 1e-14 (numpy, closed-form duals or a 2-D
trapezoid rule, nothing from deq_kernel) on the first 256 points (closed forms) or 12
points (quadrature activations), compared with that block of ``deq``'s matrix.

Usage::

    python benchmarks/bench_kernel.py            # n = 4096, d = 64: relu and tanh, float64 and float32
    python benchmarks/bench_kernel.py --quick     # n = 512, for CI
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import gpytorch
import numpy as np
import torch

import deq_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import CLOSED_FORMS, picard_kernel  # the tests' independent reference

BIAS_VARIANCE = 0.1


def weight_variance(name: str) -> float:
    """Half the activation's bound (relu: 1.0, tanh: 0.5); 0.5 where it has none."""
    bound = deq_kernel.get_activation(name).weight_variance_bound
    return 0.5 * bound if math.isfinite(bound) else 0.5


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def relu_picard(x: torch.Tensor, w: float, b: float, steps: int = 100) -> torch.Tensor:
    """The authors' iteration with the arc-cosine formula, on the whole matrix."""
    s = x @ x.T / x.shape[1] + b
    k = s.clone()
    for _ in range(steps):
        d = k.diagonal().clamp_min(0).sqrt()
        norm = d[:, None] * d[None, :]
        rho = (k / norm).clamp(-1, 1)
        theta = torch.arccos(rho)
        dual = norm * (torch.sin(theta) + (math.pi - theta) * rho) / (2 * math.pi)
        k = w * dual + s
    d = k.diagonal().clamp_min(0).sqrt()
    rho = (k / (d[:, None] * d[None, :])).clamp(-1, 1)
    theta = torch.arccos(rho)
    return d[:, None] * d[None, :] * (torch.sin(theta) + (math.pi - theta) * rho) / (2 * math.pi)


def quadrature_picard_step_time(x: torch.Tensor, fn, w: float, b: float, rows: int, nodes: int = 20) -> float:
    """Seconds for one Picard step of ``rows`` rows with a 2-D Gauss-Hermite rule per pair."""
    z, wts = np.polynomial.hermite_e.hermegauss(nodes)
    z = torch.as_tensor(z, dtype=x.dtype)
    wts = torch.as_tensor(wts / wts.sum(), dtype=x.dtype)
    s = x @ x.T / x.shape[1] + b
    k = s[:rows]
    q = s.diagonal()

    def step() -> torch.Tensor:
        q1 = q[:rows, None]
        rho = (k / (q1 * q[None, :]).sqrt()).clamp(-1, 1)
        u = q1.sqrt()[..., None, None] * z[:, None]
        v = q[None, :].sqrt()[..., None, None] * (
            rho[..., None, None] * z[:, None] + (1 - rho**2).sqrt()[..., None, None] * z[None, :]
        )
        dual = (fn(u) * fn(v) * wts[:, None] * wts[None, :]).sum((-1, -2))
        return w * dual + s[:rows]

    return best_time(step, 1)


def run_case(name: str, x: torch.Tensor, repeats: int, reference: torch.Tensor | None) -> dict:
    """Times (seconds) of RBF, the DEQ kernel and Picard for one activation and dtype."""
    w = weight_variance(name)
    rbf = gpytorch.kernels.RBFKernel().to(x.dtype)
    with torch.no_grad():
        t_rbf = best_time(lambda: rbf(x).to_dense(), repeats)

        def kernel() -> torch.Tensor:
            return deq_kernel.equilibrium_covariance(x, activation=name, weight_variance=w, bias_variance=BIAS_VARIANCE)

        t_deq = best_time(kernel, repeats)
        ours = kernel()
        if name == "relu":
            start = time.perf_counter()
            picard = relu_picard(x, w, BIAS_VARIANCE)
            t_picard, extrapolated = time.perf_counter() - start, False
        else:
            rows = min(64, x.shape[0])
            step = quadrature_picard_step_time(x, deq_kernel.get_activation(name), w, BIAS_VARIANCE, rows)
            t_picard, extrapolated, picard = step * 100 * x.shape[0] / rows, True, None
    if reference is None:
        if picard is not None:
            reference = picard.double()
        else:
            m = 256 if name in CLOSED_FORMS else 12
            xm = x[:m].double().numpy()
            slope = getattr(deq_kernel.get_activation(name), "negative_slope", 0.0)
            reference = torch.as_tensor(
                picard_kernel(xm, activation=name, weight_variance=w, bias_variance=BIAS_VARIANCE, slope=slope)
            )
    m = reference.shape[-1]
    err = float((ours[:m, :m].double() - reference).abs().max() / reference.abs().max())

    def forward_backward() -> None:
        hypers = [torch.tensor(v, dtype=x.dtype, requires_grad=True) for v in (w, 1.0, BIAS_VARIANCE)]
        k = deq_kernel.equilibrium_covariance(
            x, activation=name, weight_variance=hypers[0], input_variance=hypers[1], bias_variance=hypers[2]
        )
        torch.autograd.grad(k, hypers, grad_outputs=weights)  # the gradient of <weights, K>

    weights = torch.rand(x.shape[0], x.shape[0], generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    t_both = best_time(forward_backward, repeats)
    return dict(
        rbf=t_rbf,
        deq=t_deq,
        backward=max(t_both - t_deq, 0.0),
        picard=t_picard,
        extrapolated=extrapolated,
        error=err,
        reference=reference,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--activations", default="relu,tanh")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n = 512, one repeat (CI)")
    parser.add_argument(
        "--compile",
        choices=("auto", "true", "false"),
        default=None,
        help="deq_kernel.settings.compile for the DEQ timings (default true, the compiled steady state of a "
        "long-running process, and with --quick auto; 'auto' compiles only after 20 s of eager use, 'false' never)",
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats = 512, 1
    if args.compile is None:
        args.compile = "auto" if args.quick else "true"

    print(f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}, gpytorch {gpytorch.__version__}")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; n={args.n}, d={args.d}")
    print(f"weight_variance: half the activation's bound; bias_variance={BIAS_VARIANCE}; input_variance=1")
    header = (
        f"{'activation':<10} {'dtype':<8} {'rbf s':>8} {'deq s':>8} {'deq/rbf':>8} "
        f"{'picard s':>10} {'picard/deq':>11} {'rel. error':>11} {'bwd/fwd':>8}"
    )
    print(header)
    print("-" * len(header))
    mode = {"auto": "auto", "true": True, "false": False}[args.compile]
    print(f"deq_kernel.settings.compile({mode!r}) for the DEQ timings")
    x64 = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with deq_kernel.settings.compile(mode):
        _rows(args, x64)


def _rows(args: argparse.Namespace, x64: torch.Tensor) -> None:
    for name in args.activations.split(","):
        reference = None
        for dtype_name in args.dtypes.split(","):
            r = run_case(name, x64.to(getattr(torch, dtype_name)), args.repeats, reference)
            reference = r["reference"] if dtype_name == "float64" else reference
            marker = "~" if r["extrapolated"] else " "
            print(
                f"{name:<10} {dtype_name:<8} {r['rbf']:8.3f} {r['deq']:8.3f} {r['deq'] / r['rbf']:7.1f}x "
                f"{marker}{r['picard']:9.1f} {r['picard'] / r['deq']:10.0f}x {r['error']:11.1e} "
                f"{r['backward'] / r['deq']:7.2f}x"
            )


if __name__ == "__main__":
    main()
