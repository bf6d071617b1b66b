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

For the positively homogeneous activations (relu, leaky_relu, abs, identity)
:math:`V = \sqrt{q_1 q_2}\,\kappa(\rho)` and the pair equation
:math:`G(\rho) = \rho - w\kappa(\rho) = \tilde c`, :math:`\tilde c = s_{12}/\sqrt{q_1 q_2}`, has a
single input. Its solution :math:`\rho^*(\tilde c)` is tabulated once per call (by the
same Newton method) and read back with cubic Hermite interpolation, then polished by
one Newton step. The table's abscissa is :math:`\varphi = \arccos(1 - 2t)`, ``t`` the
position of :math:`\tilde c` in the range of ``G``, and its ordinate
:math:`\theta = \arccos\rho`: both ends of ``G`` have square-root behaviour that this
change of variables makes analytic, so the interpolation error is uniformly
:math:`O(h^4)`.

Gradients come from the implicit function theorem, never from back-propagating
through iterations: for :math:`r(\rho, \vartheta) = 0`,
:math:`\partial\rho/\partial\vartheta = -(\partial r/\partial\vartheta)/(\partial r/\partial\rho)`,
applied by custom ``torch.autograd.Function`` s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import settings
from .activations import Activation, PiecewiseLinear, State, safe_sqrt

__all__ = [
    "ConvergenceError",
    "CorrelationTable",
    "homogeneous_pairs",
    "solve_diagonal",
    "solve_pairs",
]

#: Intervals of the correlation table (the prototype's 2048 gave 2e-15 relative error).
TABLE_SIZE = 2048


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


def _pairs_forward(
    act: Activation, state1: State, state2: State, s12: Tensor, w: Tensor, pinned: Tensor, pinned_rho: Tensor
) -> Tensor:
    root = _root(state1, state2)
    safe_root = torch.where(root > 0, root, 1.0)

    def residual(rho: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v, vc = act.pair_dual(state1, state2, rho)
        mapped = (w * v + s12) / safe_root
        return rho - mapped, 1.0 - w * vc, 1.0 + mapped.abs()

    shape = torch.broadcast_shapes(root.shape, s12.shape, pinned.shape)
    ones = torch.ones(shape, dtype=s12.dtype, device=s12.device)
    lo, hi = -ones, ones.clone()
    # Start from one Picard step from the input correlation (inside [-1, 1] by
    # Cauchy-Schwarz). The ends +-1 themselves are avoided: some duals are singular
    # there and series representations converge slowest.
    start = torch.where(pinned, 0.0, (s12 / safe_root).clamp(-1.0, 1.0))
    x0 = (start - residual(start)[0]).clamp(-1.0, 1.0)
    x0 = torch.where(pinned, 0.0, x0)
    rho = _newton(residual, x0, lo, hi, what="pair", skip=pinned)
    return torch.where(pinned, pinned_rho, rho.clamp(-1.0, 1.0))


class _PairFixedPoint(torch.autograd.Function):
    """``(s12, w, states) -> (rho, V)`` for a general activation; implicit backward."""

    @staticmethod
    def forward(
        ctx: Any, act: Activation, pinned: Tensor, pinned_rho: Tensor, n1: int, s12: Tensor, w: Tensor, *states: Tensor
    ) -> tuple[Tensor, Tensor]:
        state1, state2 = tuple(states[:n1]), tuple(states[n1:])
        rho = _pairs_forward(act, state1, state2, s12, w, pinned, pinned_rho)
        # Pinned pairs are evaluated at rho = 0: their dual is either independent of rho
        # (a zero-variance point) or replaced by the caller (identical points), and rho = 1
        # is where some duals have an infinite slope.
        value = act.pair_dual(state1, state2, torch.where(pinned, 0.0, rho))[0]
        ctx.act, ctx.n1 = act, n1
        ctx.save_for_backward(rho, pinned, s12, w, *states)
        ctx.mark_non_differentiable(pinned)
        return rho, value

    @staticmethod
    def backward(ctx: Any, grad_rho: Tensor, grad_value: Tensor) -> tuple[Tensor | None, ...]:
        rho, pinned, s12, w, *states = ctx.saved_tensors
        act, n1 = ctx.act, ctx.n1
        needs = ctx.needs_input_grad[4:]
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
        return (None, None, None, None, *out)


def solve_pairs(
    act: Activation,
    state1: State,
    state2: State,
    s12: Tensor,
    w: Tensor,
    *,
    pinned: Tensor,
    pinned_rho: Tensor,
) -> tuple[Tensor, Tensor]:
    """Return ``(rho, V)``: the pair fixed point's correlation and the dual there.

    ``state1`` and ``state2`` are broadcast point states (from ``act.prepare``);
    ``pinned`` marks pairs whose correlation is known, ``pinned_rho`` gives it
    (identical points: 1; a zero-variance point: any value). Differentiable in
    ``s12``, ``w`` and the states by the implicit function theorem.
    """
    n1 = len(state1)
    return _PairFixedPoint.apply(act, pinned, pinned_rho, n1, s12, w, *state1, *state2)


# --------------------------------------------------------------------------- homogeneous


class CorrelationTable:
    """``rho*(c_tilde)`` for one weight variance of a relu-family activation.

    Holds the cubic pieces of ``theta(phi)`` on the uniform grid of ``phi`` in [0, pi]
    (see the module docstring), in the working dtype, and the affine map from
    ``c_tilde`` to ``cos(phi)``.
    """

    def __init__(self, act: PiecewiseLinear, w: float, dtype: torch.dtype, device: torch.device) -> None:
        self.act = act
        self.w = w
        a, m = act.negative_slope, act.variance_gain
        g_minus = -1.0 + w * a  # G(-1)
        g_range = (1.0 - w * m) - g_minus  # G(1) - G(-1)
        # cos(phi) = 1 - 2 (c_tilde - G(-1)) / (G(1) - G(-1)) = scale * c_tilde + shift
        self.scale = -2.0 / g_range
        self.shift = 1.0 + 2.0 * g_minus / g_range
        theta, slope = _tabulate(act, w, g_minus, g_range, device)
        h = math.pi / TABLE_SIZE
        t0, t1, d0, d1 = theta[:-1], theta[1:], h * slope[:-1], h * slope[1:]
        coefs = (t0, d0, 3.0 * (t1 - t0) - 2.0 * d0 - d1, 2.0 * (t0 - t1) + d0 + d1)
        self.coefs = tuple(c.to(dtype).contiguous() for c in coefs)

    def solve(self, c_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(rho, kappa, kappa', residual of the table value)`` elementwise."""
        return _correlation_kernel(c_tilde, self.w, self.scale, self.shift, *self.coefs, self.act.negative_slope)


def _tabulate(
    act: PiecewiseLinear, w: float, g_minus: float, g_range: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``theta`` and ``dtheta/dphi`` on the grid, in float64, solved by Newton's method."""
    a, m = act.negative_slope, act.variance_gain
    phi = torch.linspace(0.0, math.pi, TABLE_SIZE + 1, dtype=torch.float64, device=device)
    target = g_minus + g_range * (1.0 - torch.cos(phi)) / 2.0

    def residual(rho: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        kappa, kappa_prime = act.kappa(rho)
        return rho - w * kappa - target, 1.0 - w * kappa_prime, 1.0 + target.abs()

    ends = torch.zeros_like(target, dtype=torch.bool)
    ends[0] = ends[-1] = True
    end_values = torch.sign(phi - 1.0)  # rho = -1 at phi = 0, rho = 1 at phi = pi
    x0 = torch.where(ends, end_values, (-1.0 + 2.0 * (target - g_minus) / g_range).clamp(-1.0, 1.0))
    rho = _newton(residual, x0, -torch.ones_like(target), torch.ones_like(target), what="correlation table", skip=ends)
    rho = torch.where(ends, end_values, rho).clamp(-1.0, 1.0)
    theta = torch.arccos(rho)
    _, kappa_prime = act.kappa(rho)
    sin_theta = torch.where(ends, 1.0, torch.sin(theta))
    slope = -(g_range * torch.sin(phi) / 2.0) / (sin_theta * (1.0 - w * kappa_prime))
    # At the ends both sines vanish; the limits follow from G(cos theta) near theta = pi, 0.
    slope[0] = -math.sqrt(g_range / (2.0 * (1.0 - w * a)))
    slope[-1] = -math.sqrt(g_range / (2.0 * (1.0 - w * m)))
    return theta, slope


def _correlation_kernel(
    c_tilde: Tensor, w: float, scale: float, shift: float, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, a: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Table look-up, cubic interpolation and one Newton polish, elementwise."""
    n = c0.numel()
    cos_phi = (c_tilde * scale + shift).clamp(-1.0, 1.0)
    pos = torch.arccos(cos_phi) * (n / math.pi)
    idx = pos.long().clamp(max=n - 1)
    u = pos - idx
    theta = c0.take(idx) + u * (c1.take(idx) + u * (c2.take(idx) + u * c3.take(idx)))
    cos_t, sin_t = torch.cos(theta), torch.sin(theta)
    k1 = (1.0 - a) ** 2 / (2.0 * math.pi)
    pi_minus = math.pi - theta
    kappa = k1 * (sin_t + pi_minus * cos_t) + a * cos_t
    kappa_prime = k1 * pi_minus + a
    r = cos_t - w * kappa - c_tilde
    delta = r / (w * kappa_prime - 1.0)
    return (cos_t + delta).clamp(-1.0, 1.0), kappa + kappa_prime * delta, kappa_prime, r


#: Elements of the pair matrix handled at once: temporaries then stay near the cache size.
BLOCK_ELEMENTS = 1 << 18


def _blocks(shape: torch.Size, point_ndim: int) -> list[tuple]:
    """Index tuples splitting a ``(..., n, m)`` array into row blocks (elementwise: one block)."""
    if point_ndim == 1:
        return [(Ellipsis,)]
    rows, per_row = shape[-2], max(1, math.prod(shape) // max(1, shape[-2]))
    step = max(1, BLOCK_ELEMENTS // per_row)
    return [(Ellipsis, slice(i, i + step), slice(None)) for i in range(0, rows, step)]


def _take_rows(t: Tensor, sel: tuple, point_ndim: int) -> Tensor:
    """Rows ``sel`` of a factor that broadcasts against the pair array (size-1 rows stay)."""
    if point_ndim == 1 or t.dim() < 2 or t.shape[-2] == 1:
        return t
    return t[sel]


def _parts(tables: list[CorrelationTable], c_tilde: Tensor, r1: Tensor, r2: Tensor, point_ndim: int):
    """Split the work by table: yields ``(table, c, r1, r2, out_index)`` over a flattened batch."""
    if len(tables) == 1:
        yield tables[0], c_tilde, r1, r2, (Ellipsis,)
        return
    points = c_tilde.shape[c_tilde.dim() - point_ndim :]
    batch = c_tilde.shape[: c_tilde.dim() - point_ndim]
    flat_c = c_tilde.reshape(-1, *points)
    flat_r1 = r1.expand(*batch, *r1.shape[r1.dim() - point_ndim :]).reshape(
        len(tables), *r1.shape[r1.dim() - point_ndim :]
    )
    flat_r2 = r2.expand(*batch, *r2.shape[r2.dim() - point_ndim :]).reshape(
        len(tables), *r2.shape[r2.dim() - point_ndim :]
    )
    for b, table in enumerate(tables):
        yield table, flat_c[b], flat_r1[b], flat_r2[b], (b,)


class _HomogeneousPairs(torch.autograd.Function):
    """``(c_tilde, w, r1, r2[, diagonal]) -> r1 r2 rho`` (``want="cov"``) or ``r1 r2 kappa(rho)``.

    ``rho`` solves ``rho - w kappa(rho) = c_tilde`` and ``r1 r2`` broadcasts against ``c_tilde``.
    ``diagonal``, if given, replaces the diagonal of the result. Computed in row blocks; the
    backward pass recomputes each block from ``c_tilde``, so neither direction keeps more
    than its inputs and output alive.
    """

    @staticmethod
    def forward(
        ctx: Any,
        tables: list[CorrelationTable],
        want: str,
        c_tilde: Tensor,
        w: Tensor,
        r1: Tensor,
        r2: Tensor,
        scale: Tensor | None,
        diagonal: Tensor | None,
        point_ndim: int,
    ) -> Tensor:
        many = len(tables) > 1
        flat_shape = (len(tables), *c_tilde.shape[c_tilde.dim() - point_ndim :]) if many else c_tilde.shape
        result = c_tilde.new_empty(flat_shape)
        worst = c_tilde.new_zeros(())
        for table, c, a1, a2, out in _parts(tables, c_tilde, r1, r2, point_ndim):
            target = result[out]
            for sel in _blocks(c.shape, point_ndim):
                rho, kappa, _, r = table.solve(c[sel])
                block = _take_rows(a1, sel, point_ndim) * a2 * (rho if want == "cov" else kappa)
                target[sel] = block if scale is None else block * _scale_part(scale, out)
                if r.numel():
                    worst = torch.maximum(worst, r.abs().max())
        if not float(worst) <= 1e-6:
            raise ConvergenceError(
                f"the correlation table missed the fixed point (residual {float(worst):.3g})",
                residual=float(worst),
                iterations=1,
            )
        result = result.reshape(c_tilde.shape)
        if diagonal is not None:
            result.diagonal(dim1=-2, dim2=-1).copy_(diagonal)
        ctx.tables, ctx.want, ctx.point_ndim = tables, want, point_ndim
        ctx.has_diagonal = diagonal is not None
        ctx.has_scale = scale is not None
        ctx.save_for_backward(c_tilde, w, r1, r2, *(() if scale is None else (scale,)))
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        c_tilde, w, r1, r2, *maybe_scale = ctx.saved_tensors
        scale = maybe_scale[0] if ctx.has_scale else None
        tables, want, point_ndim = ctx.tables, ctx.want, ctx.point_ndim
        need_c, need_w, need_r1, need_r2, need_scale, need_diag = ctx.needs_input_grad[2:8]
        grad_diag = None
        if ctx.has_diagonal:
            grad_diag = grad.diagonal(dim1=-2, dim2=-1).clone() if need_diag else None
            grad = grad.clone()
            grad.diagonal(dim1=-2, dim2=-1).zero_()  # the overridden entries do not depend on c_tilde
        many = len(tables) > 1
        batch = c_tilde.shape[: c_tilde.dim() - point_ndim]
        flat_shape = (len(tables), *c_tilde.shape[c_tilde.dim() - point_ndim :]) if many else c_tilde.shape
        grad = grad.expand(c_tilde.shape).reshape(flat_shape)
        grad_c = c_tilde.new_empty(flat_shape) if need_c else None
        # Parameter gradients are reduced block by block; with one table per batch entry
        # they are gathered per entry first ("flat") and reshaped at the end.
        parts = list(_parts(tables, c_tilde, r1, r2, point_ndim))
        acc_w = [0.0] * len(parts)
        acc_r1 = [None] * len(parts)
        acc_r2 = [0.0] * len(parts)
        acc_scale = [0.0] * len(parts)
        for k, (table, c, a1, a2, out) in enumerate(parts):
            g_all = grad[out]
            rows_r1 = []
            for sel in _blocks(c.shape, point_ndim):
                rho, kappa, kappa_prime, _ = table.solve(c[sel])
                g = g_all[sel]
                a1_rows = _take_rows(a1, sel, point_ndim)
                root = a1_rows * a2
                if scale is not None:
                    if need_scale:
                        unscaled = root * (rho if want == "cov" else kappa) * g
                        acc_scale[k] = acc_scale[k] + unscaled.sum_to_size(scale.shape if not many else ())
                    g = g * _scale_part(scale, out)
                if need_r1 or need_r2:
                    g_root = g * (rho if want == "cov" else kappa)
                    if need_r1:
                        rows_r1.append((g_root * a2).sum_to_size(a1_rows.shape))
                    if need_r2:
                        acc_r2[k] = acc_r2[k] + (g_root * a1_rows).sum_to_size(a2.shape)
                # d rho = (d c_tilde + kappa dw) / (1 - w kappa');  d kappa = kappa' d rho.
                lam = root * g / (1.0 - table.w * kappa_prime)
                if want == "value":
                    lam = lam * kappa_prime
                if grad_c is not None:
                    grad_c[out][sel] = lam
                if need_w:
                    acc_w[k] = acc_w[k] + (lam * kappa).sum_to_size(w.shape if not many else ())
            if need_r1:
                acc_r1[k] = _join_rows(rows_r1, a1, point_ndim)
        grad_w = grad_r1 = grad_r2 = grad_scale = None
        if many:
            if need_w:
                grad_w = torch.stack([torch.as_tensor(v, dtype=w.dtype, device=w.device) for v in acc_w])
                grad_w = grad_w.reshape(*batch, *([1] * point_ndim)).sum_to_size(w.shape)
            if need_scale:
                grad_scale = torch.stack([torch.as_tensor(v, dtype=w.dtype, device=w.device) for v in acc_scale])
                grad_scale = grad_scale.reshape(*batch, *([1] * point_ndim)).sum_to_size(scale.shape)
            if need_r1:
                grad_r1 = torch.stack(acc_r1).reshape(*batch, *acc_r1[0].shape).sum_to_size(r1.shape)
            if need_r2:
                grad_r2 = torch.stack(acc_r2).reshape(*batch, *acc_r2[0].shape).sum_to_size(r2.shape)
        else:
            grad_w = acc_w[0] if need_w else None
            grad_scale = acc_scale[0] if need_scale else None
            grad_r1 = acc_r1[0].sum_to_size(r1.shape) if need_r1 else None
            grad_r2 = acc_r2[0] if need_r2 else None
        grad_c = grad_c.reshape(c_tilde.shape) if grad_c is not None else None
        return None, None, grad_c, grad_w, grad_r1, grad_r2, grad_scale, grad_diag, None


def _scale_part(scale: Tensor, out: tuple) -> Tensor:
    """The output scale for one part: all of it, or its entry for one flattened batch entry."""
    if out == (Ellipsis,):
        return scale
    return scale.reshape(-1)[out[0]] if scale.numel() > 1 else scale.reshape(())


def _join_rows(pieces: list[Tensor], factor: Tensor, point_ndim: int) -> Tensor:
    """Reassemble per-block row gradients of a row factor (or sum them if it has one row)."""
    if point_ndim == 1 or factor.dim() < 2 or factor.shape[-2] == 1:
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        return total
    return torch.cat(pieces, dim=-2)


def correlation_tables(
    act: PiecewiseLinear, w: Tensor, batch: torch.Size, point_ndim: int, dtype: torch.dtype
) -> list[CorrelationTable]:
    """One table for a scalar ``w``; else one per entry of the batch (shared where equal)."""
    values = w.detach().to(torch.float64)
    if values.numel() == 1:
        return [CorrelationTable(act, float(values.reshape(())), dtype, w.device)]
    cache: dict[float, CorrelationTable] = {}
    tables = []
    for value in values.expand(*batch, *([1] * point_ndim)).reshape(-1).tolist():
        if value not in cache:
            cache[value] = CorrelationTable(act, value, dtype, w.device)
        tables.append(cache[value])
    return tables


def homogeneous_pairs(
    act: PiecewiseLinear,
    c_tilde: Tensor,
    w: Tensor,
    r1: Tensor,
    r2: Tensor,
    *,
    want: str,
    point_ndim: int,
    scale: Tensor | None = None,
    diagonal: Tensor | None = None,
) -> Tensor:
    """Pairs of the relu family from the normalised ``c_tilde = s12 / sqrt(q1 q2)``.

    Returns ``r1 r2 rho*`` (``want="cov"``; with ``r1 r2 = sqrt(q1 q2)`` this is ``K*``) or
    ``r1 r2 kappa(rho*)`` (``want="value"``), times ``scale`` if given (applied last, so that a
    symmetric ``c_tilde`` with ``r1 = r2`` gives a bitwise symmetric result).
    ``c_tilde`` has the full batch shape and ``point_ndim`` point dimensions (2: a matrix
    of pairs, 1: elementwise pairs); ``r1``, ``r2`` and ``w`` broadcast against it, ``w`` with
    size-1 point dimensions. ``diagonal`` replaces the diagonal of a square result.
    Differentiable in all tensors by the implicit function theorem.
    """
    if want not in ("cov", "value"):
        raise ValueError(f"want must be 'cov' or 'value', got {want!r}")
    batch = c_tilde.shape[: c_tilde.dim() - point_ndim]
    tables = correlation_tables(act, w, batch, point_ndim, c_tilde.dtype)
    return _HomogeneousPairs.apply(tables, want, c_tilde, w, r1, r2, scale, diagonal, point_ndim)
