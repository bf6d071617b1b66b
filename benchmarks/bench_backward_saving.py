"""Forward+backward of ``DEQKernel("relu")`` with the table blocks' saved derivatives against recomputing them.

For each ``n`` in ``--n`` (512, 1024, 2048; inputs ``(n, 6)``, float64, standard normal, seed 0):
``K = kernel(x).to_dense(); K.sum().backward()`` with ``blocks.SAVE_BYTES`` at its default (the
forward pass keeps each block's derivatives) and at 0 (the backward pass solves the blocks again),
and GPyTorch's ``RBFKernel`` on the same ``x`` as the baseline; the three alternate call by call
in one process, and each time is the median after two warm-up rounds.

Usage::

    python benchmarks/bench_backward_saving.py
    python benchmarks/bench_backward_saving.py --n 256,512 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import gpytorch
import torch

from deq_kernel.equilibrium import blocks
from deq_kernel.gpytorch import DEQKernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; relu, d=6, float64")
    print(f"{'n':>6} {'saved ms':>9} {'again ms':>9} {'rbf ms':>8} {'saved/rbf':>10} {'again/rbf':>10}")
    budget = blocks.SAVE_BYTES
    for n in (int(v) for v in args.n.split(",")):
        torch.manual_seed(0)
        x = torch.randn(n, 6, dtype=torch.float64)
        kernel, rbf = DEQKernel("relu").double(), gpytorch.kernels.RBFKernel().double()
        times: dict[str, list[float]] = {"saved": [], "again": [], "rbf": []}
        try:
            for _ in range(args.repeats):
                for mode in times:
                    blocks.SAVE_BYTES = 0 if mode == "again" else budget
                    start = time.perf_counter()
                    (rbf if mode == "rbf" else kernel)(x).to_dense().sum().backward()
                    times[mode].append(time.perf_counter() - start)
        finally:
            blocks.SAVE_BYTES = budget
        med = {mode: statistics.median(v[2:]) * 1e3 for mode, v in times.items()}
        print(
            f"{n:6d} {med['saved']:9.2f} {med['again']:9.2f} {med['rbf']:8.2f} "
            f"{med['saved'] / med['rbf']:9.2f}x {med['again'] / med['rbf']:9.2f}x"
        )


if __name__ == "__main__":
    main()
