r"""The plan of a call: validate its arguments and choose its pair solver.

This is the only place a path is chosen. :data:`SOLVERS` lists the pair solvers in order
of preference, each with the condition under which it serves a call, read from what the
activation offers (:class:`~deq_kernel.activations.Offers`) and from the call's shapes and
values; the first that applies serves it. The general solver applies to everything, so a
call always has a solver; ``deq_kernel.settings.pair_solver`` can force one (for
verification), and :func:`choose` then says why a forced solver cannot serve.

Validation (:func:`as_input`, :func:`as_hyper`, :func:`batch_shape`) turns array-likes and
numbers into tensors of one dtype and device and raises ``ValueError``/``TypeError`` naming
the argument for anything malformed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import settings
from ..activations import Activation
from . import pairs as _pairs
from .arcsine import arcsine_resolves
from .dense import dense, dense_both, dense_refuses, dense_suits
from .pairs import Pairs, broadcast_shapes

__all__ = [
    "OUTPUTS",
    "SOLVERS",
    "PairSolver",
    "as_hyper",
    "as_input",
    "batch_shape",
    "check_hypers",
    "choose",
]

#: Values accepted for ``output``.
OUTPUTS = ("nngp", "preactivation", "ntk")


@dataclass(frozen=True)
class PairSolver:
    """A pair solver: its name, when it serves a call, and the function that runs it.

    ``refuses(act, pairs, w, ov)`` returns ``None`` where the solver can serve the call, else a
    sentence saying why not; ``suits(act, pairs, w, ov)`` says whether it is the one to prefer
    there (by default wherever it can serve); ``run(act, pairs, w, ov, nngp)`` returns
    ``ov * E[phi(u) phi(v)]`` (``nngp``) or ``K*``, differentiable by the implicit function theorem.
    """

    name: str
    summary: str
    refuses: Callable[[Activation, Pairs, Tensor, Tensor], str | None]
    run: Callable[[Activation, Pairs, Tensor, Tensor, bool], Tensor]
    suits: Callable[[Activation, Pairs, Tensor, Tensor], bool] = lambda act, p, w, ov: True
    run_both: Callable[[Activation, Pairs, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def both(self, act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> tuple[Tensor, Tensor]:
        """``(ov * E[phi(u) phi(v)], K*)``: from one solve where the solver can, else from two."""
        if self.run_both is not None:
            return self.run_both(act, p, w, ov)
        return self.run(act, p, w, ov, True), self.run(act, p, w, ov, False)


def _table_refuses(act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> str | None:
    if act.offers.pair_equation != "correlation_table":
        return f"activation {act.name!r} is not positively homogeneous (relu family)"
    return None


def _arcsine_refuses(act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> str | None:
    if act.offers.pair_equation != "arcsine":
        return f"activation {act.name!r} has no arcsine pair equation (erf)"
    if not arcsine_resolves(p.q1, p.q2):
        return "the variances are too large for the arcsine variable in this dtype"
    return None


def _series_refuses(act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> str | None:
    if not act.offers.hermite_series:
        return f"activation {act.name!r} has no Hermite series"
    return _pairs.series_applies(p, w, ov)


#: The pair solvers, in order of preference.
SOLVERS: tuple[PairSolver, ...] = (
    PairSolver(
        "dense",
        "relu family and erf, small pair arrays: solved whole, eagerly, gradients through one Newton step",
        dense_refuses,
        dense,
        dense_suits,
        dense_both,
    ),
    PairSolver(
        "table",
        "relu family: rho*(c~) tabulated once per weight variance, one fused pass after one product",
        _table_refuses,
        _pairs.one_product,
        run_both=_pairs.one_product_both,
    ),
    PairSolver(
        "arcsine",
        "erf: t - alpha asin t = beta by monotone Newton steps, one fused pass after one product",
        _arcsine_refuses,
        _pairs.one_product,
        run_both=_pairs.one_product_both,
    ),
    PairSolver(
        "series",
        "smooth activations: Mehler's series with per-point Hermite coefficients, one fused pass",
        _series_refuses,
        _pairs.series,
    ),
    PairSolver(
        "general",
        "any activation: bracketed Newton with the exact dual, pair by pair (vectorised)",
        lambda act, p, w, ov: None,
        _pairs.general,
    ),
)


def choose(act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> PairSolver:
    """The solver that serves these pairs: the first of :data:`SOLVERS` that applies, or the forced one."""
    forced = settings.pair_solver.value()
    if forced != "auto":
        solver = next(s for s in SOLVERS if s.name == forced)
        reason = solver.refuses(act, p, w, ov)
        if reason is not None:
            raise ValueError(f"settings.pair_solver({forced!r}) cannot serve this call: {reason}")
        return solver
    return next(s for s in SOLVERS if s.refuses(act, p, w, ov) is None and s.suits(act, p, w, ov))


# --------------------------------------------------------------------------- validation

ArrayLike = Any


def as_input(x: ArrayLike, name: str, like: Tensor | None = None) -> Tensor:
    """``x`` as a float32 or float64 tensor of shape ``(..., n, d)``, finite, on ``like``'s device.

    Floating tensors keep their dtype; everything else (integer or boolean tensors, lists,
    numpy arrays other than float32) becomes float64: one rule for tensors and array-likes.
    """
    if isinstance(x, Tensor):
        t = x
        if t.dtype in (torch.float16, torch.bfloat16) or t.is_complex():
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if not t.is_floating_point():
            t = t.to(torch.float64)
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be a tensor or a numeric array-like: {exc}") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got an array of dtype {arr.dtype}")
        if arr.dtype != np.float32:
            arr = arr.astype(np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if like is not None:
            t = t.to(like.device)
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., n, d) with at least 2 dimensions, got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature (d >= 1), got shape {tuple(t.shape)}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} must be on the same device as x1 ({like.device}), got {t.device}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def check_hypers(**hypers: Tensor) -> None:
    """Raise ``ValueError`` naming the first hyperparameter that is not finite and non-negative.

    One synchronisation for all of them; the message is worked out only when one fails.
    """
    values = torch.cat([t.detach().reshape(-1) for t in hypers.values()])
    if not bool((values >= 0).all()) or not bool(torch.isfinite(values).all()):
        for name, t in hypers.items():
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"{name} must be finite and non-negative, got {_describe(t)}")


def as_hyper(value: Any, name: str, like: Tensor, *, check: bool = True) -> Tensor:
    """A hyperparameter as a tensor of ``like``'s dtype and device, finite and non-negative.

    ``check=False`` leaves the value check to :func:`check_hypers` (one synchronisation for all).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a tensor, got {value!r}")
    if isinstance(value, Tensor):
        if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        t = value.to(device=like.device, dtype=like.dtype)
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number or a tensor, got {value!r}") from None
        t = torch.as_tensor(arr, dtype=like.dtype, device=like.device)
    if check:
        check_hypers(**{name: t})
    return t


def _describe(t: Tensor) -> str:
    t = t.detach()
    return repr(float(t)) if t.numel() == 1 else f"a tensor with values in [{float(t.min()):.4g}, {float(t.max()):.4g}]"


def batch_shape(x1: Tensor, x2: Tensor, **hypers: Tensor) -> torch.Size:
    """The broadcast batch shape of the inputs and hyperparameters (keys ``w``, ``iv``, ``b``, ``ov``)."""
    names = {"w": "weight_variance", "iv": "input_variance", "b": "bias_variance", "ov": "output_variance"}
    try:
        batch = broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the batch shapes of x1 {tuple(x1.shape[:-2])} and x2 {tuple(x2.shape[:-2])} do not broadcast"
        ) from None
    for key, t in hypers.items():
        shape = t.shape[:-1] if key == "iv" and t.dim() >= 1 else t.shape
        try:
            batch = broadcast_shapes(batch, shape)
        except RuntimeError:
            raise ValueError(
                f"{names[key]} of shape {tuple(t.shape)} does not broadcast against the batch shape {tuple(batch)}"
            ) from None
    return batch
