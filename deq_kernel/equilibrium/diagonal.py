r"""The diagonal fixed point, one per point: :math:`q = w\,D(q) + s`, :math:`D(q) = E[\phi(u)^2]`.

Closed form for activations whose :math:`D` is linear (the relu family); for many points
and one weight variance of an activation whose dual is a quadrature, one scalar function
:math:`q^*(s)` interpolated from a few exact solves and polished by Newton's method. An
exact solve is Newton's method without a bracket, which converges monotonically where
:math:`D` is concave or convex (erf, sin, cos) and is checked as it goes elsewhere; where
that check fails, the bracketed Newton method of :mod:`.newton`. The gradient is the
implicit function theorem's, :math:`dq = (D\,dw + ds)/(1 - w D'(q))`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import settings
from .._autograd import first_derivatives_only
from ..activations import Activation
from .newton import newton, tolerance

__all__ = ["bracketed_diagonal", "interpolated_diagonal", "monotone_diagonal", "solve_diagonal"]


#: Chebyshev nodes of the interpolated start of the diagonal (see :func:`interpolated_diagonal`).
DIAGONAL_NODES = 33


def _diagonal_forward(act: Activation, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, D(q), D'(q))`` at the diagonal fixed point (an activation without a closed form)."""
    if w.numel() == 1 and s.numel() > 2 * DIAGONAL_NODES and not act.offers.monotone_diagonal:
        # Many points of an activation whose dual is costly (a quadrature per point).
        done = interpolated_diagonal(act, s, w)
        if done is not None:
            return done
    return _exact_diagonal(act, s, w)


#: Newton steps from the interpolated start before the bracketed method takes over.
DIAGONAL_POLISH = 4


def interpolated_diagonal(act: Activation, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """The diagonal of many points from one scalar function: ``q*(s)`` for the given ``w``.

    ``q*`` is solved on :data:`DIAGONAL_NODES` Chebyshev nodes spanning the values of ``s`` (in
    ``log(s + delta)`` when they span more than a decade), interpolated to every point
    (barycentric formula), and polished by Newton's method with the exact dual until the
    solver's residual test holds, one evaluation per step: usually one, instead of about
    eight from a bracket. ``None`` (the bracketed method is used) if that takes more than
    :data:`DIAGONAL_POLISH` steps.
    """
    s64 = s.detach().to(torch.float64).reshape(-1)
    lo, hi = float(s64.min()), float(s64.max())
    delta = max(1e-3 * hi, 1e-300)
    logarithmic = lo >= 0.0 and hi > 10.0 * (lo + delta)
    u = torch.log(s64 + delta) if logarithmic else s64
    u_lo, u_hi = float(u.min()), float(u.max())
    k = torch.arange(DIAGONAL_NODES, dtype=torch.float64, device=s.device)
    u_nodes = 0.5 * (u_lo + u_hi) + 0.5 * (u_hi - u_lo) * torch.cos(math.pi * k / (DIAGONAL_NODES - 1))
    nodes = (torch.exp(u_nodes) - delta).clamp_min(0.0) if logarithmic else u_nodes
    w64 = w.detach().to(torch.float64).reshape(())
    q_nodes = _exact_diagonal(act, nodes, w64)[0]
    # Values spanning a few ulps (points on a sphere, whose s differ by rounding only) put the
    # nodes within rounding of each other: the barycentric weights 1/(u - u_k) then cancel to
    # inf - inf. One node's value, polished by Newton's method below, is then the start.
    if u_hi - u_lo > 64.0 * torch.finfo(torch.float64).eps * max(abs(u_lo), abs(u_hi)):
        weights = torch.where(k % 2 == 0, 1.0, -1.0)
        weights[0] *= 0.5
        weights[-1] *= 0.5
        diff = u.unsqueeze(-1) - u_nodes
        hit = diff == 0
        ratio = weights / torch.where(hit, 1.0, diff)
        ratio = torch.where(hit.any(-1, keepdim=True), hit.to(torch.float64), ratio)
        q = (ratio * q_nodes).sum(-1) / ratio.sum(-1)
    else:
        q = q_nodes[0].expand_as(s64)
    wd, sd = w.detach(), s.detach()
    q = torch.maximum(q.reshape(s.shape).to(s.dtype), sd)
    tol = tolerance(s.dtype)
    for _ in range(DIAGONAL_POLISH):
        d, dd = act.diag_dual(q)
        r = q - wd * d - sd
        step = r / (1.0 - wd * dd)
        if not bool(torch.isfinite(r).all()):
            return None
        if bool((r.abs() <= tol * (q.abs() + (wd * d).abs() + sd)).all()):
            # One more Newton step, as the bracketed method takes, with D updated linearly.
            return q - step, d - dd * step, dd
        q = torch.maximum(q - step, sd)
    return None


def monotone_diagonal(act: Activation, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(q, D(q), D'(q))`` at the roots of ``r(q) = q - w D(q) - s`` by Newton's method from ``q = s``, unbracketed.

    Where ``D`` is concave or convex on ``q >= 0`` (``act.offers.monotone_diagonal``: erf, sin,
    cos) this always converges: under the activation's bound ``r`` is increasing, and Newton's
    method on an increasing convex or concave function converges monotonically, after at most
    one step, from any start. The start ``q = s`` has ``r(s) = -w D(s) <= 0``: for a concave
    ``r`` (``D`` convex, cos) the iterates increase to the root, for a convex one (erf, sin) the
    first step lands above it and the rest decrease to it.

    For any other activation it is tried first, and checked as it goes: from the second step
    on, every residual must shrink (or meet the stopping rule), and the slope ``1 - w D'``
    must stay positive, as they do once Newton's method converges. It returns ``None``
    (the caller then uses :func:`bracketed_diagonal`) on the first violation, or when the
    stopping rule of :mod:`.newton` is not met within ``settings.max_iterations``; once it
    is met, one more step follows, as in the bracketed method. A few elementwise operations
    per step instead of the safeguards' few dozen.
    """
    tol = tolerance(s.dtype)
    q, previous = s, None
    for iteration in range(settings.max_iterations.value() + 1):
        d, dd = act.diag_dual(q)
        wd = w * d
        r = q - wd - s
        slope = 1.0 - w * dd
        size = r.abs()
        met = size <= tol * (q.abs() + wd.abs() + s)  # False for NaN
        fine = slope > 0
        if previous is not None:
            fine = fine & ((size < previous) | met)
        met_all, fine_all = torch.stack([met.all(), fine.all()]).tolist()
        if not fine_all:
            return None
        step = r / slope
        if met_all:
            return q - step, d - dd * step, dd
        q = q - step
        previous = size if iteration >= 1 else None  # the first step may overshoot
    return None


def _exact_diagonal(act: Activation, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, D(q), D'(q))``: :func:`monotone_diagonal` where it holds, else :func:`bracketed_diagonal`."""
    done = monotone_diagonal(act, s, w)
    return done if done is not None else bracketed_diagonal(act, s, w)


def bracketed_diagonal(act: Activation, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, D(q), D'(q))`` at the roots of ``q - w D(q) - s``, by the checked Newton method from ``q = s``.

    The residual is ``-w D(s) <= 0`` at ``q = s``, and under the activation's bound it has one
    root above, so the bracket starts as ``[s, inf)``; Newton's steps from ``s`` close it
    (about four evaluations of the dual instead of eight from a midpoint). ``D`` and ``D'``
    at the root follow from the last evaluation, linearly in the final step.
    """
    last: list[Tensor] = []

    def residual(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d, dd = act.diag_dual(q)
        last[:] = (q, d, dd)
        return q - w * d - s, 1.0 - w * dd, q.abs() + (w * d).abs() + s

    lo = s.clone()
    hi = torch.full_like(s, math.inf)
    q = newton(residual, s.clone(), lo, hi, what="diagonal")
    at, d, dd = last
    return q, d + dd * (q - at), dd


class _DiagonalFixedPoint(torch.autograd.Function):
    """``(s, w) -> (q, D(q))`` with ``q = w D(q) + s``; implicit derivatives, reverse and forward mode."""

    @staticmethod
    def forward(ctx: Any, act: Activation, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        q, d, dd = _diagonal_forward(act, s, w)
        ctx.act = act
        ctx.save_for_backward(w, d, dd)
        ctx.save_for_forward(w, d, dd)
        ctx.shapes = (s.shape, w.shape)
        return q, d

    @staticmethod
    def jvp(ctx: Any, _act: None, tangent_s: Tensor | None, tangent_w: Tensor | None) -> tuple[Tensor, Tensor]:
        w, d, dd = ctx.saved_tensors
        # dq = (D dw + ds) / (1 - w D'),  dD = D' dq.
        change = torch.zeros_like(d) if tangent_s is None else tangent_s.expand_as(d)
        if tangent_w is not None:
            change = change + d * tangent_w
        dq = change / (1.0 - w * dd)
        return dq, dd * dq

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad_q: Tensor, grad_d: Tensor) -> tuple[Tensor | None, ...]:
        w, d, dd = ctx.saved_tensors
        s_shape, w_shape = ctx.shapes
        # q = w D(q) + s  =>  dq = (D dw + ds) / (1 - w D'),  dD = D' dq.
        lam = (grad_q + grad_d * dd) / (1.0 - w * dd)
        grad_s = lam.sum_to_size(s_shape) if ctx.needs_input_grad[1] else None
        grad_w = (lam * d).sum_to_size(w_shape) if ctx.needs_input_grad[2] else None
        return None, grad_s, grad_w


def solve_diagonal(act: Activation, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(q, D(q))``: the diagonal fixed point ``q = w D(q) + s`` and its dual.

    ``s`` has the points in its last dimension; ``w`` broadcasts against it.
    Differentiable in ``s`` and ``w`` by the implicit function theorem.
    """
    if act.offers.linear_diagonal:
        # D(q) = gain q: the closed form, differentiated by autograd (any order).
        q = s / (1.0 - w * act.variance_gain)
        return q, act.variance_gain * q
    return _DiagonalFixedPoint.apply(act, s, w)
