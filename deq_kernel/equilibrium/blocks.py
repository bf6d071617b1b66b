r"""Pair kernels whose equation is read off one matrix product.

For the relu family (:mod:`.table`) and for erf (:mod:`.arcsine`)
the pair fixed point depends on the two points only through one number per pair that a
matrix product delivers, ``c = lhs @ rhs^T`` (the per-point normalisations are folded into
the operands), and through per-point factors ``r1``, ``r2``. A *family* supplies two pure
elementwise block functions:

* ``forward(out, c, r1, r2, scale, params, *coefs, value)`` writes the block's result into
  ``out`` and returns ``None`` or a scalar tensor, the block's largest estimated relative
  error, which the family's ``check`` then judges (refining the block or raising);
* ``backward(c, grad, grad_t, r1, r2, scale, params, *coefs, value, matrix)`` returns
  ``(dL/dc, dL/dw, dL/dr1, dL/dr2, dL/dscale)`` for the gradient ``grad`` (plus ``grad_t``,
  that of the mirrored block, unless ``None``), reduced over the block where shared.

This module runs them in row blocks (fused by ``torch.compile`` where
:mod:`.backend` allows): no array of the size of the result other than the result
exists, in either direction. A symmetric result is computed on and above the diagonal and
mirrored, which halves the work and makes it bitwise symmetric. The
backward pass recomputes each block from the operands of the product, except where the
forward pass ran eagerly and kept each block's derivatives (families with
``forward_saving``, within :data:`SAVE_BYTES`): then it multiplies them out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .._autograd import first_derivatives_only
from . import backend

__all__ = ["Family", "product_kernel"]


class Family(Protocol):
    """Per-weight-variance data of a pair family, with its block functions."""

    params: Tensor
    coefs: tuple[Tensor, ...]
    forward_block: Callable[..., Tensor | None]
    backward_block: Callable[..., tuple[Tensor, ...]]
    # A family whose forward block returns an error estimate also has
    # ``check(miss, out, c, r1, r2, scale, value)``. A family may also have
    # ``forward_saving`` (the forward block, returning the arrays its backward needs) and
    # ``backward_saved(saved, grad, grad_t, r1, r2, scale, params, value, matrix)``.


def _c_block(lhs: Tensor, rhs: Tensor, rows: slice, cols: slice, matrix: bool, two_sided: bool) -> Tensor:
    """``lhs[rows] rhs[cols]^T`` (symmetrised with the transposed product when ``two_sided``)."""
    if not matrix:
        return (lhs * rhs).sum(-1)
    out = lhs[..., rows, :] @ rhs[..., cols, :].mT
    if two_sided:
        out = 0.5 * (out + rhs[..., rows, :] @ lhs[..., cols, :].mT)
    return out


def _pieces(rows: slice, n: int, symmetric: bool) -> list[tuple[slice, bool]]:
    """The column ranges of a row block, each with whether it is mirrored below the diagonal.

    A symmetric result is computed on and above the diagonal: the square on the diagonal
    (made symmetric by copying its upper triangle down) and the columns right of it, whose
    values are copied, transposed, below the diagonal.
    """
    if not symmetric:
        return [(slice(None), False)]
    stop = min(rows.stop, n)
    square = [(slice(rows.start, stop), False)]
    return [*square, (slice(stop, None), True)] if stop < n else square


def _symmetrise_square(target: Tensor, rows: slice) -> None:
    """Copy the upper triangle of the square on the diagonal to its lower triangle (exact symmetry)."""
    block = target[..., rows, rows]
    size = block.shape[-1]
    upper = torch.ones(size, size, dtype=torch.bool, device=block.device).triu_()
    block.copy_(torch.where(upper, block, block.mT))


def _folded_square(grad: Tensor, rows: slice, zero_diagonal: bool) -> Tensor:
    """Gradient of the square's computed upper triangle when its lower triangle is a mirror.

    Entry ``(i, j)``, ``i < j``, feeds both ``(i, j)`` and ``(j, i)``; the diagonal feeds itself
    (nothing, where the diagonal is replaced afterwards); the lower triangle feeds nothing.
    """
    square = grad[..., rows, rows]
    folded = (square + square.mT).triu(1)
    if not zero_diagonal:
        folded = folded + torch.diag_embed(square.diagonal(dim1=-2, dim2=-1))
    return folded


def _rows(t: Tensor, rows: slice, matrix: bool) -> Tensor:
    return t[..., rows, :] if matrix and t.shape[-2] > 1 else t


def _cols(t: Tensor, cols: slice, matrix: bool) -> Tensor:
    return t[..., :, cols] if matrix and t.shape[-1] > 1 else t


class _ProductKernel(torch.autograd.Function):
    """``(lhs, rhs, w, r1, r2, scale[, diagonal]) -> scale * f(lhs rhs^T, r1, r2)`` for a family.

    All tensors arrive expanded to the full batch shape; with one family entry per batch
    entry the batch is flattened and handled entry by entry.
    """

    @staticmethod
    def forward(
        ctx: Any,
        parts: list[Family],
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
        flat = result.reshape(len(parts), *shape[len(shape) - (2 if matrix else 1) :]) if len(parts) > 1 else result
        kernel = backend.fused(parts[0].forward_block, total, lhs.device)
        n = shape[-2] if matrix else 0
        # Eager blocks keep what the backward pass needs, where a gradient is wanted and memory
        # allows: the backward pass is then a few products instead of a second solve.
        saving = _saves(parts[0], kernel, ctx, total, (2 if value else 3) * lhs.element_size(), lhs.device)
        saved: list[tuple[Tensor, ...]] = []
        row_blocks = _row_blocks(flat[0].shape if len(parts) > 1 else shape, matrix, total, lhs.device, symmetric)
        for part, (a, b, s1, s2, sc), out in _parts(parts, (lhs, rhs, r1, r2, scale), matrix):
            target = flat[out]
            for rows in row_blocks:
                for cols, mirrored in _pieces(rows, n, symmetric):
                    dest = target[..., rows, cols] if matrix else target
                    c = _c_block(a, b, rows, cols, matrix, two_sided)
                    s1_b, s2_b = _rows(s1, rows, matrix), _cols(s2, cols, matrix)
                    if saving:
                        # A family that saves has no error bound to check (its blocks are exact).
                        saved.append(part.forward_saving(dest, c, s1_b, s2_b, sc, part.params, *part.coefs, value))
                        miss = None
                    else:
                        miss = kernel(dest, c, s1_b, s2_b, sc, part.params, *part.coefs, value)
                    if miss is not None:
                        part.check(miss, dest, c, s1_b, s2_b, sc, value)
                    if mirrored:
                        # A transposed store inside the fused loop is several times slower.
                        target[..., cols, rows] = dest.mT
                if symmetric:
                    _symmetrise_square(target, rows)
        if diagonal is not None:
            result.diagonal(dim1=-2, dim2=-1).copy_(diagonal)
        ctx.parts, ctx.flags = parts, (value, matrix, two_sided, symmetric)
        # The saved arrays belong to these row blocks (the settings may differ in the backward pass).
        ctx.saved_blocks = (row_blocks, saved) if saving else None
        ctx.has_diagonal = diagonal is not None
        ctx.save_for_backward(lhs, rhs, w, r1, r2, scale)
        return result

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        lhs, rhs, w, r1, r2, scale = ctx.saved_tensors
        parts, (value, matrix, two_sided, symmetric) = ctx.parts, ctx.flags
        need_lhs, need_rhs, need_w, need_r1, need_r2, need_scale, need_diag = ctx.needs_input_grad[5:12]
        grad_diag = None
        if ctx.has_diagonal:
            grad_diag = grad.diagonal(dim1=-2, dim2=-1).clone() if need_diag else None
            if not symmetric:
                grad = grad.clone()
                grad.diagonal(dim1=-2, dim2=-1).zero_()  # the overridden entries do not depend on the rest
        shape = grad.shape
        total = math.prod(shape)
        many = len(parts) > 1
        point_dims = 2 if matrix else 1
        grad = grad.expand(shape)
        flat_grad = grad.reshape(len(parts), *shape[len(shape) - point_dims :]) if many else grad
        grads = {
            name: torch.zeros_like(t)
            for name, t in (("lhs", lhs), ("rhs", rhs), ("r1", r1), ("r2", r2), ("scale", scale))
        }
        flat = {
            k: (_flatten(v, len(parts), tail) if many else v)
            for (k, v), tail in zip(grads.items(), _tails(matrix), strict=True)
        }
        grad_w = torch.zeros(len(parts), dtype=w.dtype, device=w.device)
        kernel = backend.fused(parts[0].backward_block, total, lhs.device)
        n = shape[-2] if matrix else 0
        saved = None if ctx.saved_blocks is None else iter(ctx.saved_blocks[1])
        for k, (part, (a, b, s1, s2, sc), out) in enumerate(_parts(parts, (lhs, rhs, r1, r2, scale), matrix)):
            g_all = flat_grad[out]
            ga, gb, gs1, gs2, gsc = (flat[name][out] for name in ("lhs", "rhs", "r1", "r2", "scale"))
            if saved is not None:
                row_blocks = ctx.saved_blocks[0]
            else:
                row_blocks = _row_blocks(g_all.shape, matrix, total, lhs.device, symmetric)
            for rows in row_blocks:
                for cols, mirrored in _pieces(rows, n, symmetric):
                    if not matrix:
                        g, g_t = g_all, None
                    elif symmetric and not mirrored:
                        g, g_t = _folded_square(g_all, rows, ctx.has_diagonal), None
                    else:
                        g = g_all[..., rows, cols]
                        g_t = g_all[..., cols, rows].mT if mirrored else None
                    s1_b, s2_b = _rows(s1, rows, matrix), _cols(s2, cols, matrix)
                    if saved is not None:
                        lam, gw, g1, g2, g3 = part.backward_saved(
                            next(saved), g, g_t, s1_b, s2_b, sc, part.params, value, matrix
                        )
                    else:
                        c = _c_block(a, b, rows, cols, matrix, two_sided)
                        lam, gw, g1, g2, g3 = kernel(c, g, g_t, s1_b, s2_b, sc, part.params, *part.coefs, value, matrix)
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


#: Largest memory, in bytes, the blocks' saved arrays may take (and at most a quarter of what
#: is available): beyond it the backward pass solves the blocks again.
SAVE_BYTES = 1 << 30


def _saves(family: Family, kernel: Callable[..., Any], ctx: Any, total: int, per_pair: int, device: Any) -> bool:
    """Whether the forward pass keeps the backward pass's arrays: an eager family that can (one
    whose blocks need no error check: the relu family's tables), a gradient wanted, and room
    for about ``per_pair`` bytes per pair (half the pairs of a symmetric result are enough, but
    the budget assumes all)."""
    if not hasattr(family, "forward_saving") or kernel is not family.forward_block or not any(ctx.needs_input_grad):
        return False
    needed = total * per_pair
    if needed > SAVE_BYTES:
        return False
    free = backend.available_memory(device) if needed > backend.SMALL_OUTPUT_BYTES else None
    return free is None or needed <= free // 4


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


def _parts(
    parts: list[Family], tensors: tuple[Tensor, ...], matrix: bool
) -> Iterator[tuple[Family, tuple[Tensor, ...], Any]]:
    """``(part, tensors, out index)``: everything at once, or one flattened batch entry at a time."""
    if len(parts) == 1:
        yield parts[0], tensors, (Ellipsis,)
        return
    flat = [_flatten(t, len(parts), tail) for t, tail in zip(tensors, _tails(matrix), strict=True)]
    for b, part in enumerate(parts):
        yield part, tuple(t[b] for t in flat), (b,)


#: Largest row block of a symmetric result: the square on the diagonal is computed whole
#: and then symmetrised, so its size is wasted work.
SQUARE_ROWS = 256


def _row_blocks(shape: torch.Size, matrix: bool, total: int, device: torch.device, symmetric: bool) -> list[slice]:
    if not matrix:
        return [slice(None)]
    rows = shape[-2]
    per_row = max(1, math.prod(shape) // max(1, rows))
    step = max(1, backend.block_elements(total, device) // per_row)
    if symmetric:
        step = min(step, SQUARE_ROWS)
    return [slice(i, i + step) for i in range(0, rows, step)]


def family_parts(make: Callable[[float], Family], w: Tensor, batch: torch.Size, point_dims: int) -> list[Family]:
    """One family entry for a scalar ``w``; else one per entry of the batch (shared where equal)."""
    values = w.detach().to(torch.float64)
    if values.numel() == 1:
        return [make(float(values.reshape(())))]
    cache: dict[float, Family] = {}
    parts = []
    per_batch = values.reshape(values.shape[: values.dim() - point_dims])
    for value in per_batch.expand(batch).reshape(-1).tolist():
        if value not in cache:
            cache[value] = make(value)
        parts.append(cache[value])
    return parts


def product_kernel(
    make: Callable[[float], Family],
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
    """Broadcast the arguments to the batch shape and run the family ``make(w)`` blockwise.

    ``want`` is ``"cov"`` (the pre-activation covariance ``K*``) or ``"value"``
    (``E[phi(u) phi(v)]``); what the family computes for each is its own.

    ``lhs``, ``rhs``: ``(..., n, k)`` and ``(..., m, k)``, with ``c = lhs @ rhs^T``
    (``matrix``; symmetrised, ``(lhs rhs^T + rhs lhs^T) / 2``, with ``two_sided``) or elementwise
    pairs ``c = (lhs * rhs).sum(-1)``. ``w`` broadcasts against the batch with size-1 point
    dimensions; ``r1``, ``r2`` are ``(..., n, 1)`` and ``(..., 1, m)`` (``matrix``), else
    ``(..., n)``. ``scale`` is applied last; ``diagonal`` replaces the diagonal of a square
    result; ``symmetric`` declares the result square and symmetric. Returns the result with
    the full batch shape, differentiable in every tensor.
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
    parts: Sequence[Family] = family_parts(make, w, batch, point_dims)
    return _ProductKernel.apply(
        list(parts), want == "value", matrix, two_sided, symmetric and matrix, lhs, rhs, w, r1, r2, scale, diagonal
    )
