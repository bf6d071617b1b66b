r"""The general pair solver: any activation, through its exact dual, by the checked Newton method.

The pair equation, one per pair given the two diagonals, in the correlation
:math:`\rho = c/\sqrt{q_1 q_2}`:

.. math:: r(\rho) = \rho - (w\,V(q_1, q_2, \rho) + s_{12})/\sqrt{q_1 q_2} = 0,

increasing on the bracket :math:`[-1, 1]` that Cauchy-Schwarz gives. Row blocks of the pair
array are iterated with a (fusable) safeguarded Newton step on the activation's bulk dual,
under the stopping rule of :mod:`.newton`; pairs at which the bulk dual is not exact are
solved again with the exact dual, gathered. This path serves every activation, batch and
broadcast pattern; the plan (:mod:`.plan`) prefers a faster one where one applies.

Gradients come from the implicit function theorem, never from back-propagating
through iterations: for :math:`r(\rho, \vartheta) = 0`,
:math:`\partial\rho/\partial\vartheta = -(\partial r/\partial\vartheta)/(\partial r/\partial\rho)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import settings
from .._autograd import first_derivatives_only
from ..activations import Activation, State, safe_sqrt
from . import backend
from .newton import newton, tolerance, unconverged

__all__ = ["snap_correlation", "solve_pairs"]


def _root(state1: State, state2: State) -> Tensor:
    return safe_sqrt(state1[0] * state2[0])


# Pure elementwise kernels of a block of pairs: run eagerly or fused by torch.compile.
# They return arrays only (no reductions), so that a fused kernel is one loop.


def _prepare_block(
    s12: Tensor, s11: Tensor, s22: Tensor, q1: Tensor, q2: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(s12 / sqrt(q1 q2), 1 / sqrt(q1 q2), free, identical)`` for a block.

    Points at zero distance ``sum_i input_variance_i (x_i - x'_i)^2 / d`` (to rounding) are
    the same point, with correlation exactly 1; a zero-variance point has covariance 0 with
    everything. Neither is iterated (``free`` is False).
    """
    root = torch.sqrt(q1 * q2)
    positive = root > 0
    inv_root = torch.where(positive, 1.0 / torch.where(positive, root, 1.0), 0.0)
    identical = (s11 + s22 - 2.0 * s12) <= (8.0 * eps) * (s11 + s22)
    return s12 * inv_root, inv_root, positive & ~identical, identical


@functools.lru_cache(maxsize=64)
def _step_function(act: Activation) -> Callable[..., tuple[Tensor, ...]]:
    """One safeguarded Newton step on a block of pairs, for ``act``."""

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
        return moved, polished, lo, hi, torch.where(done, 0.0, r.abs() / scale)

    return step


#: Correlations within this many machine epsilons of +-1 are taken as exactly +-1.
COLLINEAR_EPS = 16.0


def snap_correlation(rho: Tensor, eps: float) -> Tensor:
    """``rho`` clamped to [-1, 1], with values within ``COLLINEAR_EPS`` epsilons of +-1 set to +-1.

    Collinear inputs without bias (``x' = a x``) have correlation exactly +-1, which
    rounding turns into ``1 - O(eps)``; for activations whose dual has an infinite slope there
    (the step: ``arccos`` near 1 turns ``eps`` into ``sqrt(eps)``), two computations of the
    same pair (a joint matrix and a cross block) would then differ by 1e-8 instead of
    agreeing to rounding. Snapping moves a smooth dual by ``O(eps)`` only.
    """
    r = rho.clamp(-1.0, 1.0)
    return torch.where(r.abs() >= 1.0 - COLLINEAR_EPS * eps, torch.sign(r), r)


@functools.lru_cache(maxsize=64)
def _finish_function(act: Activation) -> Callable[..., tuple[Tensor, Tensor]]:
    """``rho`` and ``V`` of a converged block."""

    def finish(
        x: Tensor,
        free: Tensor,
        identical: Tensor,
        d_rows: Tensor,
        d_cols: Tensor,
        eps: float,
        *states: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        half = len(states) // 2
        at = torch.where(free, snap_correlation(x, eps), 0.0)
        v, _ = act.bulk_pair_dual(states[:half], states[half:], at)
        inexact = act.inexact_pairs(states[:half], states[half:], at)
        # Identical to rounding: D of either point; their mean keeps k(x, x') = k(x', x).
        return (
            torch.where(identical, 1.0, at),
            torch.where(identical, 0.5 * (d_rows + d_cols), v),
            None if inexact is None else inexact & free,
        )

    return finish


def _pairs_forward(
    act: Activation,
    state1: State,
    state2: State,
    s12: Tensor,
    s11: Tensor,
    s22: Tensor,
    w: Tensor,
    d_rows: Tensor,
    d_cols: Tensor,
    matrix: bool,
    symmetric: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(rho, V, free, identical)`` at the pair fixed points.

    Row blocks are iterated to convergence one at a time with a (fusable) Newton step on
    the activation's bulk dual; pairs for which the bulk dual is not exact are then solved
    again with the exact dual, gathered. Identical points get ``rho = 1`` and ``V = D(q)``
    (``d_rows``); zero-variance points ``rho = 0``.
    """
    shape = torch.broadcast_shapes(s12.shape, s11.shape, s22.shape, state1[0].shape, state2[0].shape, w.shape)
    if not matrix and math.prod(shape) <= FEW_PAIRS:
        return _few_pairs_forward(act, state1, state2, s12, s11, s22, w, d_rows, d_cols)
    rho = s12.new_empty(shape)
    value = s12.new_empty(shape)
    free = torch.empty(shape, dtype=torch.bool, device=s12.device)
    identical = torch.empty_like(free)
    total = math.prod(shape)
    device = s12.device
    prepare = backend.fused(_prepare_block, total, device)
    step = backend.fused(_step_function(act), total, device)
    finish = backend.fused(_finish_function(act), total, device)
    eps = torch.finfo(s12.dtype).eps
    tol = tolerance(s12.dtype)
    max_iter = settings.max_iterations.value()
    rows_total = shape[-2] if matrix else 1
    # A dozen block-sized temporaries live during the iteration: keep blocks modest.
    budget = max(1, backend.block_elements(total, device) // 4)
    block = max(1, budget // max(1, total // max(rows_total, 1))) if matrix else 1
    square = symmetric and matrix
    inexact = None  # pairs at which the bulk dual is not exact, once there are any
    for start in range(0, max(rows_total, 1), block):
        # A symmetric matrix is solved on and right of the diagonal, then mirrored.
        cols = slice(start, None) if square else slice(None)
        sel = (Ellipsis, slice(start, start + block), cols) if matrix else (Ellipsis,)
        st1 = tuple(_rows_of(t, sel, matrix) for t in state1)
        st2 = tuple(_cols_of(t, cols, matrix) for t in state2)
        c_tilde, inv_root, free_b, ident_b = prepare(
            _block(s12, sel, matrix), _rows_of(s11, sel, matrix), _cols_of(s22, cols, matrix), st1[0], st2[0], eps
        )
        x = torch.where(free_b, act.pair_start(st1, st2, c_tilde, inv_root, w), 0.0)
        lo, hi = -torch.ones_like(x), torch.ones_like(x)
        for iteration in range(max_iter + 1):
            moved, polished, lo, hi, open_residual = step(x, lo, hi, c_tilde, inv_root, w, free_b, tol, *st1, *st2)
            worst = float(open_residual.amax()) if open_residual.numel() else 0.0
            if worst == 0.0:
                x = polished
                break
            if iteration == max_iter:
                raise unconverged("pair", worst, tol, max_iter)
            x = moved
        free[sel] = free_b.expand(free[sel].shape)
        identical[sel] = ident_b.expand(identical[sel].shape)
        rho_b, value_b, inexact_b = finish(
            x,
            free_b,
            ident_b,
            _rows_of(d_rows, sel, matrix),
            _cols_of(d_cols, cols, matrix),
            eps,
            *st1,
            *st2,
        )
        rho[sel] = rho_b.expand(rho[sel].shape)
        value[sel] = value_b.expand(value[sel].shape)
        if inexact_b is not None and bool(inexact_b.any()):
            if inexact is None:
                inexact = torch.zeros_like(free)
            inexact[sel] = inexact_b.expand(inexact[sel].shape)
        if square:
            rows = slice(start, start + block)
            for t in (rho, value, free, identical) + (() if inexact is None else (inexact,)):
                _mirror_rows(t, rows)
    if inexact is not None:
        index = _resolve_exactly(act, state1, state2, s12, w, rho, value, inexact)
        if symmetric and matrix:
            # The exact fallback integrates in an order of the two points; average the
            # (mirrored, so symmetric) set of such pairs with their mirror images.
            mirror = (*index[:-2], index[-1], index[-2])
            rho[index], value[index] = 0.5 * (rho[index] + rho[mirror]), 0.5 * (value[index] + value[mirror])
    return rho, value, free, identical


#: Elementwise pair arrays up to this size (the pairs other solvers hand over) are solved
#: with the exact dual from the start: the bulk phase's set-up costs more than it saves.
FEW_PAIRS = 256


def _few_pairs_forward(
    act: Activation,
    state1: State,
    state2: State,
    s12: Tensor,
    s11: Tensor,
    s22: Tensor,
    w: Tensor,
    d_rows: Tensor,
    d_cols: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_pairs_forward` of a few elementwise pairs: the checked Newton method on the exact dual."""
    eps = torch.finfo(s12.dtype).eps
    c_tilde, inv_root, free, identical = _prepare_block(s12, s11, s22, state1[0], state2[0], eps)

    def residual(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v, vc = act.pair_dual(state1, state2, x)
        mapped = w * v * inv_root + c_tilde
        return x - mapped, 1.0 - w * vc, 1.0 + mapped.abs()

    start = torch.where(free, act.pair_start(state1, state2, c_tilde, inv_root, w), 0.0)
    x = newton(residual, start, -torch.ones_like(start), torch.ones_like(start), what="pair", skip=~free)
    at = torch.where(free, snap_correlation(x, eps), 0.0)  # as the bulk phase's finish has it
    value = act.pair_dual(state1, state2, at)[0]
    # Identical to rounding: D of either point; their mean keeps k(x, x') = k(x', x).
    rho = torch.where(identical, 1.0, at)
    value = torch.where(identical, 0.5 * (d_rows + d_cols), value)
    shape = rho.shape
    return rho, value, free.expand(shape), identical.expand(shape)


# Slices handed to the block kernels are copied to fresh storage: a compiled kernel guards
# on its inputs' storage offsets, and views at a new offset per block would recompile it
# block after block.


def _row_view(t: Tensor, sel: tuple, matrix: bool) -> Tensor:
    if not matrix or t.dim() < 2 or t.shape[-2] == 1:
        return t
    return t[..., sel[-2], :]


def _col_view(t: Tensor, cols: slice, matrix: bool) -> Tensor:
    if not matrix or t.shape[-1] == 1:
        return t
    return t[..., cols]


def _fresh(view: Tensor, t: Tensor) -> Tensor:
    return t if view is t else view.clone()


def _rows_of(t: Tensor, sel: tuple, matrix: bool) -> Tensor:
    """Rows ``sel[-2]`` of a tensor that broadcasts against the pair array (size-1 rows stay), copied."""
    return _fresh(_row_view(t, sel, matrix), t)


def _cols_of(t: Tensor, cols: slice, matrix: bool) -> Tensor:
    """Columns ``cols`` of a tensor that broadcasts against the pair array (size-1 columns stay), copied."""
    return _fresh(_col_view(t, cols, matrix), t)


def _block(t: Tensor, sel: tuple, matrix: bool) -> Tensor:
    """The block ``sel`` of a pair array, respecting broadcast (size-1) dimensions, copied once."""
    return _fresh(_col_view(_row_view(t, sel, matrix), sel[-1], matrix), t) if matrix else t


def _mirror_rows(t: Tensor, rows: slice) -> None:
    """Copy a finished row block's upper part to the columns below it (exact symmetry)."""
    start, stop = rows.start, min(rows.stop, t.shape[-2])
    square = t[..., start:stop, start:stop]
    size = stop - start
    upper = torch.ones(size, size, dtype=torch.bool, device=t.device).triu()
    square.copy_(torch.where(upper, square, square.mT))
    t[..., stop:, start:stop] = t[..., start:stop, stop:].mT


def _gather(t: Tensor, shape: torch.Size, index: tuple[Tensor, ...]) -> Tensor:
    """Entries of a broadcast tensor at ``index`` (over the trailing pair dims), leading dims kept."""
    lead = t.shape[: t.dim() - len(shape)] if t.dim() > len(shape) else ()
    return t.expand(*lead, *shape)[(Ellipsis, *index)]


def _resolve_exactly(
    act: Activation, state1: State, state2: State, s12: Tensor, w: Tensor, rho: Tensor, value: Tensor, mask: Tensor
) -> tuple[Tensor, ...]:
    """Solve the pairs in ``mask`` again with the exact dual, starting from the bulk solution.

    The pairs are located once (one pass over the mask), and their index is returned; every
    broadcast input is gathered by index, without expanding it to the pair array.
    """
    shape = mask.shape
    index = mask.nonzero(as_tuple=True)
    st1 = tuple(_gather(t, shape, index) for t in state1)
    st2 = tuple(_gather(t, shape, index) for t in state2)
    s12_m, w_m = _gather(s12, shape, index), _gather(w, shape, index)
    root = safe_sqrt(st1[0] * st2[0])

    def residual(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v, vc = act.pair_dual(st1, st2, x)
        mapped = (w_m * v + s12_m) / root
        return x - mapped, 1.0 - w_m * vc, 1.0 + mapped.abs()

    x0 = rho[index]
    x = newton(residual, x0, -torch.ones_like(x0), torch.ones_like(x0), what="pair").clamp(-1.0, 1.0)
    rho[index] = x
    value[index] = act.pair_dual(st1, st2, x)[0]
    return index


class _PairFixedPoint(torch.autograd.Function):
    """``(s12, s11, s22, w, D rows, states) -> (rho, V)`` for a general activation; implicit backward."""

    @staticmethod
    def forward(
        ctx: Any,
        act: Activation,
        matrix: bool,
        symmetric: bool,
        n1: int,
        s12: Tensor,
        s11: Tensor,
        s22: Tensor,
        w: Tensor,
        d_rows: Tensor,
        d_cols: Tensor,
        *states: Tensor,
    ) -> tuple[Tensor, Tensor]:
        state1, state2 = tuple(states[:n1]), tuple(states[n1:])
        rho, value, free, identical = _pairs_forward(
            act, state1, state2, s12, s11, s22, w, d_rows, d_cols, matrix, symmetric
        )
        ctx.act, ctx.n1 = act, n1
        ctx.save_for_backward(rho, free, identical, s12, w, d_rows, d_cols, *states)
        return rho, value

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad_rho: Tensor, grad_value: Tensor) -> tuple[Tensor | None, ...]:
        rho, free, identical, s12, w, d_rows, d_cols, *states = ctx.saved_tensors
        act, n1 = ctx.act, ctx.n1
        need_s12, _, _, need_w, need_d_rows, need_d_cols = ctx.needs_input_grad[4:10]
        needs_states = ctx.needs_input_grad[10:]
        half_identical = 0.5 * grad_value * identical
        grad_d_rows = half_identical.sum_to_size(d_rows.shape) if need_d_rows else None
        grad_d_cols = half_identical.sum_to_size(d_cols.shape) if need_d_cols else None
        with torch.enable_grad():
            s12_ = s12.detach().requires_grad_(need_s12)
            w_ = w.detach().requires_grad_(need_w)
            states_ = [t.detach().requires_grad_(need) for t, need in zip(states, needs_states, strict=True)]
            state1, state2 = tuple(states_[:n1]), tuple(states_[n1:])
            at = torch.where(free, rho, 0.0)
            value, slope = act.pair_dual(state1, state2, at)
            slope = slope.detach()
            root = _root(state1, state2)
            safe_root = torch.where(free, root, 1.0)
            # r = rho - (w V + s12) / sqrt(q1 q2);  dr/drho = 1 - w V_c;  dV/drho = sqrt(q1 q2) V_c.
            dr_drho = torch.where(free, 1.0 - w.detach() * slope, 1.0)
            g_value = torch.where(identical, 0.0, grad_value)
            lam = torch.where(free, (grad_rho + g_value * root.detach() * slope) / dr_drho, 0.0)
            r = torch.where(free, rho - (w_ * value + s12_) / safe_root, 0.0)
            total = (g_value * value).sum() - (lam * r).sum()
            leaves = [s12_, w_, *states_]
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(total, wanted, allow_unused=True)) if wanted else iter(())
        out = []
        for leaf in leaves:
            if not leaf.requires_grad:
                out.append(None)
                continue
            g = next(grads)
            out.append(torch.zeros_like(leaf) if g is None else g)
        grad_s12, grad_w, *grad_states = out
        return (None, None, None, None, grad_s12, None, None, grad_w, grad_d_rows, grad_d_cols, *grad_states)


def solve_pairs(
    act: Activation,
    state1: State,
    state2: State,
    s12: Tensor,
    s11: Tensor,
    s22: Tensor,
    w: Tensor,
    d_rows: Tensor,
    d_cols: Tensor,
    *,
    matrix: bool = True,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor]:
    """Return ``(rho, V)``: the pair fixed points' correlations and ``E[phi(u) phi(v)]`` there.

    ``state1`` and ``state2`` are point states (from ``act.prepare``) broadcast as rows
    ``(..., n, 1)`` and columns ``(..., 1, m)`` (``matrix``), or elementwise ``(..., n)``;
    ``s11`` and ``s22`` are the inputs' own covariances, broadcast the same way, and
    ``d_rows``, ``d_cols`` the points' ``D(q)``. Identical points get ``rho = 1`` and
    ``V = D(q)`` (the mean of the two, which agree to rounding), a zero-variance point
    ``rho = 0``. ``symmetric`` asks for a bitwise symmetric result (with symmetric inputs).
    Differentiable in ``s12``, ``w``, ``d_rows``, ``d_cols`` and the states by the implicit
    function theorem.
    """
    n1 = len(state1)
    return _PairFixedPoint.apply(act, matrix, symmetric, n1, s12, s11, s22, w, d_rows, d_cols, *state1, *state2)
