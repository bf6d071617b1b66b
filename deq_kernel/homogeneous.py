r"""The relu family: the pair equation has one input, so its solution is a table.

For a positively homogeneous activation of degree 1 (relu, leaky_relu, abs, identity)
:math:`V = \sqrt{q_1 q_2}\,\kappa(\rho)`, and the pair equation becomes
:math:`G(\rho) = \rho - w\kappa(\rho) = \tilde c` with :math:`\tilde c = s_{12}/\sqrt{q_1 q_2}`.
Its root :math:`\rho^*(\tilde c)` is tabulated once per weight variance (by the solver's
Newton method, 2048 intervals) and read back by cubic Hermite interpolation, then
polished by one Newton step. The table's abscissa is :math:`\varphi = \arccos(1 - 2t)`,
``t`` the position of :math:`\tilde c` in the range of ``G``, and its ordinate is
:math:`\theta = \arccos\rho`: both ends of ``G`` have square-root behaviour, which this
change of variables makes analytic, so the interpolation error is uniformly
:math:`O(h^4)` (about 1e-12 before polishing, rounding level after).

:math:`\tilde c` itself comes out of one matrix product, with :math:`1/\sqrt{q}` folded into
the operands. Everything after the product is one elementwise pass, run in row blocks
(fused by ``torch.compile`` where :mod:`deq_kernel.backend` allows): no array of the size
of the result other than the result exists, in either direction. The backward pass
recomputes each block from the operands of the product and applies the implicit
function theorem, :math:`d\rho = (d\tilde c + \kappa\,dw)/(1 - w\kappa'(\rho))`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend
from .activations import PiecewiseLinear
from .solver import ConvergenceError, _newton

__all__ = ["TABLE_SIZE", "CorrelationTable", "homogeneous_kernel"]

#: Intervals of the correlation table.
TABLE_SIZE = 2048


class CorrelationTable:
    """``rho*(c_tilde)`` for one weight variance of a relu-family activation.

    Holds the cubic pieces of ``theta(phi)`` on the uniform grid of ``phi`` in [0, pi] in
    the working dtype and device, and ``params = (scale, shift, w, negative_slope)``, where
    ``cos(phi) = scale * c_tilde + shift``, as a tensor so that compiled kernels do not
    specialise on their values. Tables are built and verified in float64 on the CPU
    (a few hundred small operations: cheaper there than as GPU launches) and the most
    recent ones are kept.
    """

    def __init__(self, act: PiecewiseLinear, w: float, dtype: torch.dtype, device: torch.device) -> None:
        self.act = act
        self.w = w
        coefs, params = _build_table(act.negative_slope, act.name, w)
        self.coefs = tuple(c.to(device=device, dtype=dtype) for c in coefs)
        self.params = params.to(device=device, dtype=dtype)

    def solve(self, c_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(rho, kappa(rho), kappa'(rho), residual of the interpolated value)``, elementwise."""
        return _solve(c_tilde, self.params, *self.coefs)


@functools.lru_cache(maxsize=64)
def _build_table(negative_slope: float, name: str, w: float) -> tuple[tuple[Tensor, ...], Tensor]:
    act = PiecewiseLinear(negative_slope, name=name)
    a, m = act.negative_slope, act.variance_gain
    g_minus = -1.0 + w * a  # G(-1)
    g_range = (1.0 - w * m) - g_minus  # G(1) - G(-1)
    theta, slope = _tabulate(act, w, g_minus, g_range, torch.device("cpu"))
    h = math.pi / TABLE_SIZE
    t0, t1, d0, d1 = theta[:-1], theta[1:], h * slope[:-1], h * slope[1:]
    coefs = tuple(c.contiguous() for c in (t0, d0, 3.0 * (t1 - t0) - 2.0 * d0 - d1, 2.0 * (t0 - t1) + d0 + d1))
    params = (-2.0 / g_range, 1.0 + 2.0 * g_minus / g_range, w, a)
    _verify(act, params, coefs, g_minus, g_range)
    return coefs, torch.tensor(params, dtype=torch.float64)

    def solve(self, c_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(rho, kappa(rho), kappa'(rho), residual of the interpolated value)``, elementwise."""
        return _solve(c_tilde, self.params, *self.coefs)


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


def _verify(act: PiecewiseLinear, params: tuple, coefs: tuple[Tensor, ...], g_minus: float, g_range: float) -> None:
    """Check the interpolated table (before polishing) at four points per interval and both ends.

    The interpolation error of a cubic piece varies smoothly inside its interval, so this
    bounds it everywhere; one Newton step then squares it. A table that misses raises
    instead of producing a wrong matrix.
    """
    probes = torch.linspace(0.0, 1.0, 4 * TABLE_SIZE + 1, dtype=torch.float64, device=coefs[0].device)
    c_tilde = g_minus + g_range * probes
    residual = _solve(c_tilde, torch.tensor(params, dtype=torch.float64, device=c_tilde.device), *coefs)[3]
    worst = float(residual.abs().max())
    if not worst <= 1e-8:
        raise ConvergenceError(
            f"the correlation table of {act.name} at weight_variance={params[2]:.6g} misses the fixed point "
            f"by {worst:.3g}",
            residual=worst,
            iterations=1,
        )


# --------------------------------------------------------------------------- kernels
# Pure elementwise functions of a block: run eagerly or fused by torch.compile.


def _solve(
    c_tilde: Tensor, params: Tensor, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Table look-up, cubic interpolation of theta and one Newton polish of rho."""
    scale, shift, w, a = params[0], params[1], params[2], params[3]
    n = c0.shape[0]
    cos_phi = (c_tilde * scale + shift).clamp(-1.0, 1.0)
    pos = torch.arccos(cos_phi) * (n / math.pi)
    idx = pos.long().clamp(max=n - 1)
    u = pos - idx
    theta = c0[idx] + u * (c1[idx] + u * (c2[idx] + u * c3[idx]))
    cos_t, sin_t = torch.cos(theta), torch.sin(theta)
    k1 = (1.0 - a) ** 2 / (2.0 * math.pi)
    pi_minus = math.pi - theta
    kappa = k1 * (sin_t + pi_minus * cos_t) + a * cos_t
    kappa_prime = k1 * pi_minus + a
    r = cos_t - w * kappa - c_tilde
    delta = r / (w * kappa_prime - 1.0)
    return (cos_t + delta).clamp(-1.0, 1.0), kappa + kappa_prime * delta, kappa_prime, r


def _forward_block(
    out: Tensor,
    c_tilde: Tensor,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    params: Tensor,
    c0: Tensor,
    c1: Tensor,
    c2: Tensor,
    c3: Tensor,
    value: bool,
) -> None:
    """Write the block's result into ``out`` (compiled, one fused loop that stores in place)."""
    rho, kappa, _, _ = _solve(c_tilde, params, c0, c1, c2, c3)
    # (r1 r2) first: for a symmetric block with r1 = r2 the product is bitwise symmetric.
    out.copy_((r1 * r2) * (kappa if value else rho) * scale)


def _backward_block(
    c_tilde: Tensor,
    grad: Tensor,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    params: Tensor,
    c0: Tensor,
    c1: Tensor,
    c2: Tensor,
    c3: Tensor,
    value: bool,
    matrix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dL/dc_tilde, dL/dw, dL/dr1, dL/dr2, dL/dscale)``, reduced over the block where shared."""
    rho, kappa, kappa_prime, _ = _solve(c_tilde, params, c0, c1, c2, c3)
    w = params[2]
    out = kappa if value else rho
    root = r1 * r2
    g = grad * scale
    lam = root * g / (1.0 - w * kappa_prime)  # d rho = (d c_tilde + kappa dw) / (1 - w kappa')
    if value:
        lam = lam * kappa_prime  # d kappa = kappa' d rho
    g_root = g * out
    dims = (-2, -1) if matrix else (-1,)
    g_scale = (grad * root * out).sum(dims, keepdim=True)
    if matrix:
        return (
            lam,
            (lam * kappa).sum(),
            (g_root * r2).sum(-1, keepdim=True),
            (g_root * r1).sum(-2, keepdim=True),
            g_scale,
        )
    return lam, (lam * kappa).sum(), g_root * r2, g_root * r1, g_scale


# --------------------------------------------------------------------------- the Function


def _c_tilde(lhs: Tensor, rhs: Tensor, rows: slice, cols: slice, matrix: bool, two_sided: bool) -> Tensor:
    """``lhs[rows] rhs[cols]^T`` (symmetrised with the transposed product when ``two_sided``)."""
    if not matrix:
        return (lhs * rhs).sum(-1)
    out = lhs[..., rows, :] @ rhs[..., cols, :].mT
    if two_sided:
        out = 0.5 * (out + rhs[..., rows, :] @ lhs[..., cols, :].mT)
    return out


def _mirror(target: Tensor, rows: slice) -> None:
    """Copy a finished row block's upper part to the columns below it (exact symmetry)."""
    start, stop = rows.start, min(rows.stop, target.shape[-2])
    block = target[..., start:stop, start:stop]
    block.copy_(block.triu() + block.triu(1).mT)
    target[..., stop:, start:stop] = target[..., start:stop, stop:].mT


def _fold(grad: Tensor, rows: slice) -> Tensor:
    """Gradient of a row block's computed entries when the lower part is a mirror of the upper.

    Entry ``(i, j)``, ``i < j``, feeds both ``(i, j)`` and ``(j, i)``; the diagonal feeds itself;
    the block's own lower triangle is overwritten and feeds nothing.
    """
    start, stop = rows.start, min(rows.stop, grad.shape[-2])
    folded = grad[..., start:stop, start:] + grad[..., start:, start:stop].mT
    size = stop - start
    square = folded[..., :, :size]
    square.copy_(square.triu(1) + torch.diag_embed(grad[..., start:stop, start:stop].diagonal(dim1=-2, dim2=-1)))
    return folded


def _rows(t: Tensor, rows: slice, matrix: bool) -> Tensor:
    return t[..., rows, :] if matrix and t.shape[-2] > 1 else t


def _cols(t: Tensor, cols: slice, matrix: bool) -> Tensor:
    return t[..., :, cols] if matrix and t.shape[-1] > 1 else t


class _HomogeneousKernel(torch.autograd.Function):
    """``(lhs, rhs, w, r1, r2, scale[, diagonal]) -> r1 r2 scale f(rho*(lhs rhs^T))``.

    ``f`` is ``rho`` (``want="cov"``) or ``kappa(rho)`` (``want="value"``). All tensors arrive
    expanded to the full batch shape; with one table per batch entry the batch is
    flattened and handled entry by entry.
    """

    @staticmethod
    def forward(
        ctx: Any,
        tables: list[CorrelationTable],
        value: bool,
        matrix: bool,
        two_sided: bool,
        symmetric: bool,
        lhs: Tensor,
        rhs: Tensor,
        w: Tensor,
        r1: Tensor,
        r2: Tensor,
        scale: Tensor,
        diagonal: Tensor | None,
    ) -> Tensor:
        shape = _out_shape(lhs, rhs, matrix)
        total = math.prod(shape)
        result = lhs.new_empty(shape)
        flat = result.reshape(len(tables), *shape[len(shape) - (2 if matrix else 1) :]) if len(tables) > 1 else result
        kernel = backend.fused(_forward_block, total, lhs.device)
        for table, (a, b, s1, s2, sc), out in _parts(tables, (lhs, rhs, r1, r2, scale), matrix):
            target = flat[out]
            for rows in _row_blocks(target.shape, matrix, total, lhs.device):
                # A symmetric matrix is computed on and right of the diagonal, then mirrored.
                cols = slice(rows.start, None) if symmetric else slice(None)
                dest = target[..., rows, cols] if matrix else target
                c = _c_tilde(a, b, rows, cols, matrix, two_sided)
                kernel(dest, c, _rows(s1, rows, matrix), _cols(s2, cols, matrix), sc, table.params, *table.coefs, value)
                if symmetric:
                    _mirror(target, rows)
        if diagonal is not None:
            result.diagonal(dim1=-2, dim2=-1).copy_(diagonal)
        ctx.tables, ctx.flags = tables, (value, matrix, two_sided, symmetric)
        ctx.has_diagonal = diagonal is not None
        ctx.save_for_backward(lhs, rhs, w, r1, r2, scale)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        lhs, rhs, w, r1, r2, scale = ctx.saved_tensors
        tables, (value, matrix, two_sided, symmetric) = ctx.tables, ctx.flags
        need_lhs, need_rhs, need_w, need_r1, need_r2, need_scale, need_diag = ctx.needs_input_grad[5:12]
        grad_diag = None
        if ctx.has_diagonal:
            grad_diag = grad.diagonal(dim1=-2, dim2=-1).clone() if need_diag else None
            grad = grad.clone()
            grad.diagonal(dim1=-2, dim2=-1).zero_()  # the overridden entries do not depend on the rest
        shape = grad.shape
        total = math.prod(shape)
        many = len(tables) > 1
        point_dims = 2 if matrix else 1
        grad = grad.expand(shape)
        flat_grad = grad.reshape(len(tables), *shape[len(shape) - point_dims :]) if many else grad
        grads = {
            name: torch.zeros_like(t)
            for name, t in (("lhs", lhs), ("rhs", rhs), ("r1", r1), ("r2", r2), ("scale", scale))
        }
        flat = {
            k: (_flatten(v, len(tables), tail) if many else v)
            for (k, v), tail in zip(grads.items(), _tails(matrix), strict=True)
        }
        grad_w = torch.zeros(len(tables), dtype=w.dtype, device=w.device)
        kernel = backend.fused(_backward_block, total, lhs.device)
        parts = _parts(tables, (lhs, rhs, r1, r2, scale), matrix)
        for k, (table, (a, b, s1, s2, sc), out) in enumerate(parts):
            g_all = flat_grad[out]
            ga, gb, gs1, gs2, gsc = (flat[name][out] for name in ("lhs", "rhs", "r1", "r2", "scale"))
            for rows in _row_blocks(g_all.shape, matrix, total, lhs.device):
                cols = slice(rows.start, None) if symmetric else slice(None)
                if not matrix:
                    g = g_all
                else:
                    g = _fold(g_all, rows) if symmetric else g_all[..., rows, cols]
                c = _c_tilde(a, b, rows, cols, matrix, two_sided)
                lam, gw, g1, g2, g3 = kernel(
                    c,
                    g,
                    _rows(s1, rows, matrix),
                    _cols(s2, cols, matrix),
                    sc,
                    table.params,
                    *table.coefs,
                    value,
                    matrix,
                )
                grad_w[k] += gw
                gsc += g3
                if matrix:
                    gs1[..., rows, :] += g1
                    gs2[..., :, cols] += g2
                    if need_lhs or need_rhs:
                        _accumulate_product_grads(lam, a, b, ga, gb, rows, cols, two_sided)
                else:
                    gs1 += g1
                    gs2 += g2
                    ga += lam.unsqueeze(-1) * b
                    gb += lam.unsqueeze(-1) * a
        grad_w = grad_w.reshape(shape[: len(shape) - point_dims] + (1,) * point_dims) if many else grad_w.sum()
        return (
            None,
            None,
            None,
            None,
            None,
            grads["lhs"] if need_lhs else None,
            grads["rhs"] if need_rhs else None,
            grad_w.expand_as(w) if (need_w and not many) else (grad_w.sum_to_size(w.shape) if need_w else None),
            grads["r1"] if need_r1 else None,
            grads["r2"] if need_r2 else None,
            grads["scale"] if need_scale else None,
            grad_diag,
        )


def _accumulate_product_grads(
    lam: Tensor, a: Tensor, b: Tensor, ga: Tensor, gb: Tensor, rows: slice, cols: slice, two_sided: bool
) -> None:
    """Gradients of ``c = a[rows] b[cols]^T`` (or its symmetrised form) given ``dL/dc = lam``."""
    half = 0.5 if two_sided else 1.0
    ga[..., rows, :] += half * (lam @ b[..., cols, :])
    gb[..., cols, :] += half * (lam.mT @ a[..., rows, :])
    if two_sided:
        gb[..., rows, :] += 0.5 * (lam @ a[..., cols, :])
        ga[..., cols, :] += 0.5 * (lam.mT @ b[..., rows, :])


def _out_shape(lhs: Tensor, rhs: Tensor, matrix: bool) -> torch.Size:
    return torch.Size((*lhs.shape[:-1], rhs.shape[-2])) if matrix else lhs.shape[:-1]


def _tails(matrix: bool) -> tuple[int, ...]:
    """Trailing (non-batch) dimensions of ``(lhs, rhs, r1, r2, scale)``: operands are always
    ``(points, features)``; the factors have the pair array's point dimensions."""
    point_dims = 2 if matrix else 1
    return (2, 2, point_dims, point_dims, point_dims)


def _flatten(t: Tensor, entries: int, tail: int) -> Tensor:
    return t.reshape(entries, *t.shape[t.dim() - tail :])


def _parts(tables: list[CorrelationTable], tensors: tuple[Tensor, ...], matrix: bool):
    """``(table, tensors, out index)``: everything at once, or one flattened batch entry at a time."""
    if len(tables) == 1:
        yield tables[0], tensors, (Ellipsis,)
        return
    flat = [_flatten(t, len(tables), tail) for t, tail in zip(tensors, _tails(matrix), strict=True)]
    for b, table in enumerate(tables):
        yield table, tuple(t[b] for t in flat), (b,)


def _row_blocks(shape: torch.Size, matrix: bool, total: int, device: torch.device) -> list[slice]:
    if not matrix:
        return [slice(None)]
    rows = shape[-2]
    per_row = max(1, math.prod(shape) // max(1, rows))
    step = max(1, backend.block_elements(total, device) // per_row)
    return [slice(i, i + step) for i in range(0, rows, step)]


def correlation_tables(
    act: PiecewiseLinear, w: Tensor, batch: torch.Size, point_dims: int, dtype: torch.dtype
) -> list[CorrelationTable]:
    """One table for a scalar ``w``; else one per entry of the batch (shared where equal)."""
    values = w.detach().to(torch.float64)
    if values.numel() == 1:
        return [CorrelationTable(act, float(values.reshape(())), dtype, w.device)]
    cache: dict[float, CorrelationTable] = {}
    tables = []
    per_batch = values.reshape(values.shape[: values.dim() - point_dims])
    for value in per_batch.expand(batch).reshape(-1).tolist():
        if value not in cache:
            cache[value] = CorrelationTable(act, value, dtype, w.device)
        tables.append(cache[value])
    return tables


def homogeneous_kernel(
    act: PiecewiseLinear,
    lhs: Tensor,
    rhs: Tensor,
    w: Tensor,
    r1: Tensor,
    r2: Tensor,
    *,
    want: str,
    matrix: bool,
    two_sided: bool = False,
    symmetric: bool = False,
    scale: Tensor | None = None,
    diagonal: Tensor | None = None,
) -> Tensor:
    """Pairs of the relu family, from operands whose product is ``c_tilde = s12 / sqrt(q1 q2)``.

    Parameters
    ----------
    lhs, rhs : Tensor
        ``(..., n, k)`` and ``(..., m, k)``: ``c_tilde = lhs @ rhs^T`` (``matrix``), or
        elementwise pairs ``c_tilde = (lhs * rhs).sum(-1)`` with ``m = n``. With
        ``two_sided`` the product is symmetrised, ``(lhs rhs^T + rhs lhs^T) / 2``.
    w : Tensor
        Weight variance, broadcasting against the batch with size-1 point dimensions.
    r1, r2 : Tensor
        Factors with ``r1 r2 = sqrt(q1 q2)``: ``(..., n, 1)`` and ``(..., 1, m)`` (``matrix``),
        else ``(..., n)`` each.
    want : {"cov", "value"}
        ``r1 r2 rho*`` (``K*``) or ``r1 r2 kappa(rho*)`` (``E[phi(u) phi(v)]``).
    scale : Tensor, optional
        Output scale applied last, broadcasting like ``w``.
    symmetric : bool
        The result is square and symmetric (``lhs`` and ``rhs`` the same operand, or
        ``two_sided``): it is computed on and above the diagonal and mirrored, which halves
        the work and makes it bitwise symmetric.
    diagonal : Tensor, optional
        Replaces the diagonal of a square result.

    Returns the result with the full batch shape, differentiable in every tensor.
    """
    if want not in ("cov", "value"):
        raise ValueError(f"want must be 'cov' or 'value', got {want!r}")
    point_dims = 2 if matrix else 1
    one = torch.ones((1,) * point_dims, dtype=lhs.dtype, device=lhs.device)
    scale = one if scale is None else scale
    batch = torch.broadcast_shapes(
        lhs.shape[:-2],
        rhs.shape[:-2],
        r1.shape[: r1.dim() - point_dims],
        r2.shape[: r2.dim() - point_dims],
        w.shape[: max(0, w.dim() - point_dims)],
        scale.shape[: max(0, scale.dim() - point_dims)],
    )
    n, k = lhs.shape[-2], lhs.shape[-1]
    m = rhs.shape[-2]
    lhs = lhs.expand(*batch, n, k)
    rhs = rhs.expand(*batch, m, k)
    if matrix:
        r1, r2 = r1.expand(*batch, n, 1), r2.expand(*batch, 1, m)
        scale = scale.expand(*batch, 1, 1)
    else:
        r1, r2 = r1.expand(*batch, n), r2.expand(*batch, n)
        scale = scale.expand(*batch, 1)
    if diagonal is not None:
        diagonal = diagonal.expand(*batch, n)
    tables = correlation_tables(act, w, batch, point_dims, lhs.dtype)
    return _HomogeneousKernel.apply(
        tables, want == "value", matrix, two_sided, symmetric and matrix, lhs, rhs, w, r1, r2, scale, diagonal
    )
