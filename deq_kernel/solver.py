r"""The equilibrium fixed points and their implicit gradients.

This module is the only place that knows how a fixed point is found. Two scalar
equations make up the kernel (see DESIGN.md):

* the diagonal, one per point: :math:`q = w\,D(q) + s`, with :math:`D(q) = E[\phi(u)^2]`;
* the pair, one per pair given the two diagonals, in the correlation
  :math:`\rho = c/\sqrt{q_1 q_2}`:
  :math:`r(\rho) = \rho - (w\,V(q_1, q_2, \rho) + s_{12})/\sqrt{q_1 q_2} = 0`.

Nothing couples different points or pairs, so every equation is solved elementwise
and vectorised, by Newton's method safeguarded by bisection: a bracket with
:math:`r \le 0` on one side and :math:`r \ge 0` on the other is kept (for the pair,
Cauchy-Schwarz gives it as :math:`[-1, 1]`), and a step that leaves it is replaced by
the bracket's midpoint. Iteration stops when the residual is at the rounding level of
the working dtype (``settings.tolerance_factor`` machine epsilons), after which one
more Newton step is taken; if that does not happen within ``settings.max_iterations``
iterations, :class:`ConvergenceError` is raised. An unconverged matrix is never returned.

For the positively homogeneous activations (relu, leaky_relu, abs, identity) the pair
equation has a single input and :mod:`deq_kernel.homogeneous` tabulates its solution with
the Newton method here.

Gradients come from the implicit function theorem, never from back-propagating
through iterations: for :math:`r(\rho, \vartheta) = 0`,
:math:`\partial\rho/\partial\vartheta = -(\partial r/\partial\vartheta)/(\partial r/\partial\rho)`,
applied by custom ``torch.autograd.Function`` s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import backend, settings
from .activations import Activation, PiecewiseLinear, State, safe_sqrt

__all__ = ["ConvergenceError", "solve_diagonal", "solve_pairs"]


class ConvergenceError(RuntimeError):
    """A fixed-point solve did not reach its tolerance within the iteration cap.

    Attributes
    ----------
    residual : float
        The largest residual left, in the units of the equation solved.
    iterations : int
        Iterations taken.
    """

    def __init__(self, message: str, *, residual: float, iterations: int) -> None:
        super().__init__(message)
        self.residual = residual
        self.iterations = iterations


def _tolerance(dtype: torch.dtype) -> float:
    return settings.tolerance_factor.value() * torch.finfo(dtype).eps


def _newton(
    residual: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    *,
    what: str,
    skip: Tensor | None = None,
) -> Tensor:
    """Solve the increasing equations ``r(x) = 0`` elementwise, with ``r(lo) <= 0 <= r(hi)``.

    ``residual(x)`` returns ``(r, dr/dx, scale)``; an entry has converged when
    ``|r| <= tol * scale`` or its bracket has shrunk to rounding size. Entries in
    ``skip`` are left as they are.
    """
    tol = _tolerance(x.dtype)
    max_iter = settings.max_iterations.value()
    for iteration in range(max_iter + 1):
        r, dr, scale = residual(x)
        done = (r.abs() <= tol * scale) | (hi - lo <= tol * (1.0 + x.abs()))
        if skip is not None:
            done = done | skip
        lo = torch.where(r < 0, x, lo)
        hi = torch.where(r > 0, x, hi)
        step = x - r / dr
        inside = (dr > 0) & (step >= lo) & (step <= hi)  # False for NaN as well
        newton_or_bisect = torch.where(inside, step, 0.5 * (lo + hi))
        if bool(done.all()):
            # One more Newton step from the converged point: the stopping test is met
            # at the tolerance, the step takes the root to rounding level.
            return torch.where(inside & ~(skip if skip is not None else torch.zeros_like(done)), step, x)
        if iteration == max_iter:
            open_r = torch.where(done, torch.zeros_like(r), r.abs() / scale)
            worst = float(open_r.max())
            raise ConvergenceError(
                f"the {what} fixed point did not converge in {max_iter} iterations "
                f"(largest relative residual {worst:.3g}, tolerance {tol:.3g}); raise "
                "deq_kernel.settings.max_iterations or check the hyperparameters",
                residual=worst,
                iterations=max_iter,
            )
        x = torch.where(done, x, newton_or_bisect)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- diagonal


def _diagonal_forward(act: Activation, s: Tensor, w: Tensor) -> Tensor:
    if isinstance(act, PiecewiseLinear):
        return s / (1.0 - w * act.variance_gain)

    def residual(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d, dd = act.diag_dual(q)
        return q - w * d - s, 1.0 - w * dd, q.abs() + (w * d).abs() + s

    lo = s.clone()
    hi = s + w * act.diag_dual(s)[0]
    # Expand the upper end until the residual is non-negative; under the activation's
    # bound the map is a contraction in sqrt(q), so a root exists and this terminates.
    for _ in range(200):
        r_hi = residual(hi)[0]
        if bool((r_hi >= 0).all()):
            break
        hi = torch.where(r_hi >= 0, hi, 2.0 * hi + 1.0)
    else:  # pragma: no cover - only for activations outside their bound
        raise ConvergenceError("no bracket found for the diagonal fixed point", residual=math.inf, iterations=200)
    x0 = 0.5 * (lo + hi)
    return _newton(residual, x0, lo, hi, what="diagonal")


class _DiagonalFixedPoint(torch.autograd.Function):
    """``(s, w) -> (q, D(q))`` with ``q = w D(q) + s``; implicit backward."""

    @staticmethod
    def forward(ctx: Any, act: Activation, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        q = _diagonal_forward(act, s, w)
        d, dd = act.diag_dual(q)
        ctx.act = act
        ctx.save_for_backward(w, d, dd)
        ctx.shapes = (s.shape, w.shape)
        return q, d

    @staticmethod
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
    return _DiagonalFixedPoint.apply(act, s, w)


# --------------------------------------------------------------------------- pairs


def _root(state1: State, state2: State) -> Tensor:
    return safe_sqrt(state1[0] * state2[0])


@functools.cache
def _step_function(act: Activation) -> Callable[..., tuple[Tensor, ...]]:
    """One safeguarded Newton step on a block of pairs, for ``act`` (fusable)."""

    def step(
        rho: Tensor,
        lo: Tensor,
        hi: Tensor,
        c_tilde: Tensor,
        inv_root: Tensor,
        w: Tensor,
        free: Tensor,
        tol: float,
        *states: Tensor,
    ) -> tuple[Tensor, ...]:
        half = len(states) // 2
        v, vc = act.bulk_pair_dual(states[:half], states[half:], rho)
        mapped = w * v * inv_root + c_tilde
        r = rho - mapped
        dr = 1.0 - w * vc
        scale = 1.0 + mapped.abs()
        done = (r.abs() <= tol * scale) | (hi - lo <= tol * (1.0 + rho.abs())) | ~free
        lo = torch.where(r < 0, rho, lo)
        hi = torch.where(r > 0, rho, hi)
        newton = rho - r / dr
        inside = (dr > 0) & (newton >= lo) & (newton <= hi)  # False for NaN as well
        moved = torch.where(free, torch.where(inside, newton, 0.5 * (lo + hi)), rho)
        # Once every pair meets the test, one more Newton step takes it to rounding level.
        polished = torch.where(free & inside, newton, rho)
        worst = torch.where(done, 0.0, r.abs() / scale).amax()
        return moved, polished, lo, hi, done.all(), worst

    return step


@functools.cache
def _value_function(act: Activation) -> Callable[..., Tensor]:
    def value(rho: Tensor, *states: Tensor) -> Tensor:
        half = len(states) // 2
        return act.bulk_pair_dual(states[:half], states[half:], rho)[0]

    return value


def _pairs_forward(
    act: Activation, state1: State, state2: State, s12: Tensor, w: Tensor, pinned: Tensor, matrix: bool
) -> tuple[Tensor, Tensor]:
    """``(rho, V)`` at the pair fixed points (pinned pairs: rho = 0 and V there).

    Row blocks are iterated to convergence one at a time with a (fusable) Newton step on
    the activation's bulk dual; pairs for which the bulk dual is not exact are then
    solved again with the exact dual, gathered.
    """
    shape = torch.broadcast_shapes(s12.shape, pinned.shape, state1[0].shape, state2[0].shape)
    rho = s12.new_empty(shape)
    value = s12.new_empty(shape)
    total = math.prod(shape)
    step = backend.fused(_step_function(act), total, s12.device)
    dual = backend.fused(_value_function(act), total, s12.device)
    tol = _tolerance(s12.dtype)
    max_iter = settings.max_iterations.value()
    rows_total = shape[-2] if matrix else 1
    per_row = total // max(rows_total, 1)
    block = max(1, backend.block_elements(total, s12.device) // max(per_row, 1)) if matrix else 1
    for start in range(0, max(rows_total, 1), block):
        sel = (Ellipsis, slice(start, start + block), slice(None)) if matrix else (Ellipsis,)
        st1 = tuple(_rows_of(t, sel, matrix) for t in state1)
        root = safe_sqrt(st1[0] * state2[0])
        positive = root > 0
        inv_root = torch.where(positive, 1.0 / torch.where(positive, root, 1.0), 0.0)
        s12_b = _rows_of(s12, sel, matrix)
        c_tilde = s12_b * inv_root
        free = ~_rows_of(pinned, sel, matrix) & positive
        x = torch.where(free, c_tilde.clamp(-1.0, 1.0), 0.0)
        lo, hi = -torch.ones_like(x), torch.ones_like(x)
        for iteration in range(max_iter + 1):
            moved, polished, lo, hi, all_done, worst = step(x, lo, hi, c_tilde, inv_root, w, free, tol, *st1, *state2)
            if bool(all_done):
                x = polished
                break
            if iteration == max_iter:
                raise ConvergenceError(
                    f"the pair fixed point did not converge in {max_iter} iterations "
                    f"(largest relative residual {float(worst):.3g}, tolerance {tol:.3g}); raise "
                    "deq_kernel.settings.max_iterations or check the hyperparameters",
                    residual=float(worst),
                    iterations=max_iter,
                )
            x = moved
        x = x.clamp(-1.0, 1.0)
        rho[sel] = x.expand(rho[sel].shape)
        value[sel] = dual(x, *st1, *state2).expand(value[sel].shape)
    inexact = act.inexact_pairs(state1, state2, rho)
    if inexact is not None:
        inexact = inexact.expand(shape) & ~pinned.expand(shape)
        if bool(inexact.any()):
            _resolve_exactly(act, state1, state2, s12, w, rho, value, inexact)
    return rho, value


def _rows_of(t: Tensor, sel: tuple, matrix: bool) -> Tensor:
    """Rows ``sel`` of a tensor that broadcasts against the pair array (size-1 rows stay)."""
    if not matrix or t.dim() < 2 or t.shape[-2] == 1:
        return t
    return t[sel]


def _gather(t: Tensor, shape: torch.Size, mask: Tensor) -> Tensor:
    """Entries of a broadcast tensor at ``mask`` (over the trailing pair dims), leading dims kept."""
    lead = t.shape[: t.dim() - len(shape)] if t.dim() > len(shape) else ()
    return t.expand(*lead, *shape)[(Ellipsis, mask)] if lead else t.expand(shape)[mask]


def _resolve_exactly(
    act: Activation, state1: State, state2: State, s12: Tensor, w: Tensor, rho: Tensor, value: Tensor, mask: Tensor
) -> None:
    """Solve the pairs in ``mask`` again with the exact dual, starting from the bulk solution."""
    shape = mask.shape
    st1 = tuple(_gather(t, shape, mask) for t in state1)
    st2 = tuple(_gather(t, shape, mask) for t in state2)
    s12_m, w_m = _gather(s12, shape, mask), _gather(w, shape, mask)
    root = safe_sqrt(st1[0] * st2[0])

    def residual(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v, vc = act.pair_dual(st1, st2, x)
        mapped = (w_m * v + s12_m) / root
        return x - mapped, 1.0 - w_m * vc, 1.0 + mapped.abs()

    x0 = rho[mask]
    x = _newton(residual, x0, -torch.ones_like(x0), torch.ones_like(x0), what="pair").clamp(-1.0, 1.0)
    rho[mask] = x
    value[mask] = act.pair_dual(st1, st2, x)[0]


class _PairFixedPoint(torch.autograd.Function):
    """``(s12, w, states) -> (rho, V)`` for a general activation; implicit backward."""

    @staticmethod
    def forward(
        ctx: Any,
        act: Activation,
        pinned: Tensor,
        pinned_rho: Tensor,
        matrix: bool,
        n1: int,
        s12: Tensor,
        w: Tensor,
        *states: Tensor,
    ) -> tuple[Tensor, Tensor]:
        state1, state2 = tuple(states[:n1]), tuple(states[n1:])
        # Pinned pairs are solved at rho = 0: their dual is either independent of rho (a
        # zero-variance point) or replaced by the caller (identical points), and rho = 1 is
        # where some duals have an infinite slope.
        rho, value = _pairs_forward(act, state1, state2, s12, w, pinned, matrix)
        rho = torch.where(pinned, pinned_rho, rho)
        ctx.act, ctx.n1 = act, n1
        ctx.save_for_backward(rho, pinned, s12, w, *states)
        ctx.mark_non_differentiable(pinned)
        return rho, value

    @staticmethod
    def backward(ctx: Any, grad_rho: Tensor, grad_value: Tensor) -> tuple[Tensor | None, ...]:
        rho, pinned, s12, w, *states = ctx.saved_tensors
        act, n1 = ctx.act, ctx.n1
        needs = ctx.needs_input_grad[5:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip([s12, w, *states], needs, strict=False)]
            s12_, w_, *states_ = leaves
            state1, state2 = tuple(states_[:n1]), tuple(states_[n1:])
            value, slope = act.pair_dual(state1, state2, torch.where(pinned, 0.0, rho))
            slope = slope.detach()
            root = _root(state1, state2)
            free = ~pinned & (root.detach() > 0)
            safe_root = torch.where(free, root, 1.0)
            # r = rho - (w V + s12) / sqrt(q1 q2);  dr/drho = 1 - w V_c;  dV/drho = sqrt(q1 q2) V_c.
            dr_drho = torch.where(free, 1.0 - w.detach() * slope, 1.0)
            lam = torch.where(free, (grad_rho + grad_value * root.detach() * slope) / dr_drho, 0.0)
            r = torch.where(free, rho - (w_ * value + s12_) / safe_root, 0.0)
            total = (grad_value * value).sum() - (lam * r).sum()
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(total, wanted, allow_unused=True)) if wanted else iter(())
        out = []
        for leaf in leaves:
            if not leaf.requires_grad:
                out.append(None)
                continue
            g = next(grads)
            out.append(torch.zeros_like(leaf) if g is None else g)
        return (None, None, None, None, None, *out)


def solve_pairs(
    act: Activation,
    state1: State,
    state2: State,
    s12: Tensor,
    w: Tensor,
    *,
    pinned: Tensor,
    pinned_rho: Tensor,
    matrix: bool = True,
) -> tuple[Tensor, Tensor]:
    """Return ``(rho, V)``: the pair fixed point's correlation and the dual there.

    ``state1`` and ``state2`` are point states (from ``act.prepare``) broadcast as rows
    ``(..., n, 1)`` and columns ``(..., 1, m)`` (``matrix``), or elementwise ``(..., n)``;
    ``pinned`` marks pairs whose correlation is known and ``pinned_rho`` gives it
    (identical points: 1; a zero-variance point: any value), their ``V`` is the dual at
    ``rho = 0``. Differentiable in ``s12``, ``w`` and the states by the implicit function
    theorem.
    """
    n1 = len(state1)
    return _PairFixedPoint.apply(act, pinned, pinned_rho, matrix, n1, s12, w, *state1, *state2)
