"""A long adversarial sweep of the matrix properties, counting every miss instead of stopping at the first.

The properties are those of :func:`test_properties._check_matrix` (finite, bitwise symmetric,
the diagonal path on the diagonal, positive semi-definite to round-off, float32 equal to
float64 of the same inputs to 1e-5), for the NNGP, the preactivation covariance and the NTK.
The cases are drawn as :func:`test_properties.inputs` and :func:`test_properties.hyperparameters`
draw them (every named activation, both dtypes, scales 1e-6 to 1e6, d in {1, 2, 3, 7, 2048},
duplicated, nearly duplicated, antipodal and zero rows, weight variances up to 0.9999 of the
bound), from a numpy generator, so that a run of any length is reproducible from its seed.
A case that raises ``ConvergenceError`` or ``ValueError`` naming what it cannot resolve is a
clear error, counted apart; anything else (an assertion, NaN, another exception) is a miss,
printed with the case that reproduces it.

Usage (from the repository root)::

    python tests/sweep_properties.py --examples 10000 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_properties import KINDS, _check_matrix, adversarial_rows

from deq_kernel import ACTIVATIONS, get_activation
from deq_kernel.equilibrium import ConvergenceError


def draw_inputs(rng: np.random.Generator, max_exponent: int = 6) -> np.ndarray:
    n = int(rng.integers(1, 7))
    d = int(rng.choice([1, 2, 3, 7, 2048]))
    scale = 10.0 ** int(rng.integers(-max_exponent, max_exponent + 1))
    x = rng.normal(size=(n, d)) * scale
    return adversarial_rows(x, str(rng.choice(KINDS)), scale)


def draw_hyperparameters(rng: np.random.Generator, activation: str) -> dict:
    bound = get_activation(activation).weight_variance_bound
    top = bound if math.isfinite(bound) else 8.0
    which = int(rng.integers(3))
    fraction = (rng.uniform(0.0, 0.99), rng.uniform(0.99, 0.9999), 0.0)[which]
    return dict(
        weight_variance=fraction * top,
        input_variance=float(rng.uniform(1e-3, 10.0)),
        bias_variance=0.0 if rng.integers(2) else float(rng.uniform(1e-6, 5.0)),
        output_variance=float(rng.uniform(0.1, 3.0)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--activations", default=",".join(ACTIVATIONS))
    args = parser.parse_args(argv)
    activations = args.activations.split(",")
    rng = np.random.default_rng(args.seed)
    misses: list[str] = []
    clear: collections.Counter = collections.Counter()
    per_activation: collections.Counter = collections.Counter()
    start = time.perf_counter()
    for k in range(args.examples):
        activation = str(rng.choice(activations))
        double = bool(rng.integers(2))
        x, hyper = draw_inputs(rng), draw_hyperparameters(rng, activation)
        per_activation[activation] += 1
        try:
            _check_matrix(x, activation, hyper, double)
        except (ConvergenceError, ValueError) as exc:
            clear[type(exc).__name__] += 1
            print(f"[{k}] clear error {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        except Exception as exc:  # a miss: report it and go on
            where = traceback.extract_tb(exc.__traceback__)[-1]
            misses.append(
                f"[{k}] {activation} float{'64' if double else '32'}: {type(exc).__name__} at line {where.lineno}"
            )
            print(
                f"[{k}] MISS {activation}, double={double}, x={x.tolist()!r}, {hyper=}: {repr(exc)[:400]}", flush=True
            )
    elapsed = time.perf_counter() - start
    print(
        f"\n{args.examples} examples (seed {args.seed}) in {elapsed:.0f} s: {len(misses)} misses, "
        f"{sum(clear.values())} clear errors {dict(clear)}"
    )
    print("per activation:", dict(sorted(per_activation.items())))
    for line in misses:
        print("  " + line)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
