"""Saved results: the kernel's matrices and gradients must not change when its code is reorganised.

``tests/data/golden.npz`` holds, for a fixed set of cases (every activation, every output,
float32 and float64, symmetric and cross matrices, diagonals, ARD, batches, a matrix large
enough for several row blocks), the kernel matrix (or a fixed sample of its entries) and the
gradient of ``<W, K>`` with respect to every hyperparameter and both inputs, as computed by
the release the file was written with. The test recomputes each case and compares.

Regenerate (only after a change that is meant to alter results, with the reason in the
commit message), all cases or those of one activation::

    python tests/test_golden.py --write [ACTIVATION]
"""

from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import deq_kernel

GOLDEN = Path(__file__).resolve().parent / "data" / "golden.npz"

#: Largest difference allowed, relative to the largest entry of the saved value.
TOLERANCE = {"float64": {"value": 1e-13, "grad": 1e-12}, "float32": {"value": 2e-6, "grad": 2e-5}}

ACTIVATIONS = ["relu", "leaky_relu", "abs", "identity", "step", "erf", "gelu", "sin", "cos"]
ACTIVATIONS += ["tanh", "sigmoid", "softplus", "silu"]
#: Entries sampled from matrices larger than this.
SAMPLED = 1024


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


def _cases() -> list[dict]:
    cases = []
    for name in ACTIVATIONS:
        outputs = ["nngp", "preactivation"] + ([] if name == "step" else ["ntk"])
        for output in outputs:
            for dtype in ("float64", "float32"):
                for layout in ("symmetric", "cross", "diag"):
                    cases.append(dict(activation=name, output=output, dtype=dtype, layout=layout))
        cases.append(dict(activation=name, output="nngp", dtype="float64", layout="symmetric", ard=True))
        cases.append(dict(activation=name, output="nngp", dtype="float64", layout="cross", batch=True))
    for name in ("relu", "erf", "tanh", "gelu"):
        for output in ("nngp", "ntk"):
            cases.append(dict(activation=name, output=output, dtype="float64", layout="symmetric", large=True))
        cases.append(dict(activation=name, output="nngp", dtype="float64", layout="cross", large=True))
    cases.append(dict(activation="callable_tanh", output="nngp", dtype="float64", layout="symmetric"))
    cases.append(dict(activation="leaky_relu", output="nngp", dtype="float64", layout="symmetric", slope=0.2))
    return cases


def _key(case: dict) -> str:
    return "|".join(f"{k}={case[k]}" for k in sorted(case))


def _compute(case: dict) -> dict[str, np.ndarray]:
    """The case's kernel values and gradients, as float64 numpy arrays."""
    dtype = getattr(torch, case["dtype"])
    gen = np.random.default_rng(zlib.crc32(_key(case).encode()))  # stable across processes
    large = case.get("large", False)
    n, m, d = (520, 300, 5) if large else (11, 7, 3)
    batch = (2,) if case.get("batch") else ()
    x1 = gen.normal(size=(*batch, n, d)) * gen.uniform(0.3, 2.0, size=(*batch, n, 1))
    x1[..., 1, :] = x1[..., 0, :]  # identical points
    x1[..., 2, :] = 0.0  # a zero input
    x2 = gen.normal(size=(*batch, m, d))
    x2[..., 0, :] = x1[..., 3, :]  # a point shared by both sets
    act = case["activation"]
    activation = _tanh if act == "callable_tanh" else act
    kwargs = {"negative_slope": case["slope"]} if "slope" in case else {}
    bound = deq_kernel.get_activation(activation, **kwargs).weight_variance_bound
    w0 = 0.6 * bound if math.isfinite(bound) else 0.8
    hypers = {
        "weight_variance": torch.tensor([w0, 0.5 * w0] if batch else w0, dtype=dtype),
        "input_variance": torch.tensor(gen.uniform(0.5, 2.0, size=d) if case.get("ard") else 1.3, dtype=dtype),
        "bias_variance": torch.tensor(0.2, dtype=dtype),
        "output_variance": torch.tensor(1.7, dtype=dtype),
    }
    for t in hypers.values():
        t.requires_grad_(True)
    t1 = torch.tensor(x1, dtype=dtype, requires_grad=True)
    t2 = torch.tensor(x2 if case["layout"] == "cross" else x1[..., :n, :], dtype=dtype, requires_grad=True)
    second = None if case["layout"] == "symmetric" else t2
    out = deq_kernel.equilibrium_covariance(
        t1, second, activation=activation, output=case["output"], diag=case["layout"] == "diag", **hypers, **kwargs
    )
    weights = torch.tensor(gen.uniform(-1.0, 1.0, size=out.shape), dtype=dtype)
    leaves = [t1, *hypers.values()] + ([t2] if second is not None else [])
    grads = torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)
    names = ["x1", *hypers] + (["x2"] if second is not None else [])
    result = {}
    values = out.detach().double().numpy()
    if values.size > SAMPLED:
        idx = gen.choice(values.size, size=SAMPLED, replace=False)
        result["value"] = values.reshape(-1)[idx]
        result["value_sum"] = np.array([values.sum(), np.abs(values).sum()])
    else:
        result["value"] = values
    for name, g in zip(names, grads, strict=True):
        result[f"grad_{name}"] = np.zeros(1) if g is None else g.double().numpy()
    return result


def _load() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return dict(data)


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_results_match_the_saved_release(case):
    saved = _load()
    key = _key(case)
    ours = _compute(case)
    tol = TOLERANCE[case["dtype"]]
    for name, value in ours.items():
        expected = saved[f"{key}::{name}"]
        assert value.shape == expected.shape, (key, name)
        scale = max(float(np.abs(expected).max()), 1e-300)
        err = float(np.abs(value - expected).max()) / scale
        assert err <= tol["grad" if name.startswith("grad") else "value"], (key, name, err)


def test_every_case_is_saved():
    saved = _load()
    keys = {k.split("::")[0] for k in saved}
    assert keys == {_key(c) for c in CASES}


def _write(activation: str | None = None) -> None:
    """Save every case, or only the cases of one activation (keeping the others as saved)."""
    GOLDEN.parent.mkdir(exist_ok=True)
    arrays = _load() if activation is not None else {}
    cases = [c for c in CASES if activation is None or c["activation"] == activation]
    for case in cases:
        for name, value in _compute(case).items():
            arrays[f"{_key(case)}::{name}"] = value
    np.savez_compressed(GOLDEN, **arrays)
    print(f"wrote {len(cases)} cases to {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"] or len(sys.argv) > 3:
        sys.exit("usage: python tests/test_golden.py --write [ACTIVATION]")
    _write(sys.argv[2] if len(sys.argv) == 3 else None)
