r"""Hermite series numerics: quadrature nodes, orthonormal Hermite polynomials, coefficients, Horner's rule.

Mathematics only, with no knowledge of activations or solvers: the trapezoid rule on
(mapped) nodes that computes the coefficients :math:`a_k(q) = E[\phi(\sqrt q Z) He_k(Z)]/\sqrt{k!}`
of Mehler's formula :math:`V = \sum_k a_k(q_1) a_k(q_2) \rho^k`, and the one Horner evaluation
of such a series (with its first two derivatives) that every series in the package uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._autograd import first_derivatives_only

__all__ = [
    "HermiteSeries",
    "hermite_expansion",
    "hermite_table",
    "horner",
    "mapped_nodes",
    "series_tolerance",
    "smallest_order",
    "trapezoid_nodes",
    "weighted_hermite_table",
]

_TWO_PI = 2.0 * math.pi


def trapezoid_nodes(spacing: float, half_width: float) -> tuple[Tensor, Tensor]:
    """Trapezoid nodes and N(0, 1) weights on [-half_width, half_width], float64.

    For an integrand analytic in the strip ``|Im z| < tau`` the error decays like
    ``exp(-2 pi tau / spacing)``; the Gaussian tail beyond ``half_width`` is ``exp(-half_width^2/2)``.
    """
    count = 2 * math.ceil(half_width / spacing) + 1
    z = torch.linspace(-half_width, half_width, count, dtype=torch.float64)
    h = float(z[1] - z[0])
    weights = torch.exp(-0.5 * z * z) * (h / math.sqrt(_TWO_PI))
    return z, weights


#: The map's scale ``a`` of :func:`mapped_nodes` is rounded down to a power of ``2**(-1/MAP_STEPS)``.
MAP_STEPS = 4


def _map_level(q_max: float) -> int:
    """``k`` with ``a = 2**(-k / MAP_STEPS) <= min(1, 1/sqrt(q_max))``, the largest such ``a``."""
    if not q_max > 1.0:
        return 0
    return max(0, math.ceil(MAP_STEPS * 0.5 * math.log2(q_max) - 1e-12))


def mapped_nodes(q_max: float, spacing: float, half_width: float) -> tuple[Tensor, Tensor]:
    r"""Nodes and N(0, 1) weights of the trapezoid rule under ``z = asinh(a sinh t)``, float64.

    ``a <= min(1, 1/sqrt(q_max))``, rounded down to a power of ``2**(-1/4)``: the rule is made
    for a slightly larger ``q_max``, which it integrates as accurately, and a few rules serve
    every call (they are cached; callers must not modify them). Near 0 the map is
    ``z = a t``, so an activation evaluated at ``sqrt(q) z`` varies on the scale of ``t``
    however large ``q`` is; away from 0 it is ``z = t + log(a/2)``, uniform spacing, which
    resolves the Hermite polynomials and the Gaussian. The map is analytic in a strip, so the
    rule keeps the trapezoid rule's exponential accuracy (about 1e-14 for tanh at any ``q``
    up to 1e16), with at most a few hundred more nodes than the uniform rule, rather than a
    number growing like ``sqrt(q)``. For ``q_max <= 1`` it is the uniform rule.
    """
    return _level_nodes(_map_level(q_max), float(spacing), float(half_width))


@functools.lru_cache(maxsize=64)
def _level_nodes(level: int, spacing: float, half_width: float) -> tuple[Tensor, Tensor]:
    a = 2.0 ** (-level / MAP_STEPS)
    top = half_width + math.log(2.0 / a) + 1.0
    t = torch.arange(-top, top + spacing / 2, spacing, dtype=torch.float64)
    sh = torch.sinh(t)
    z = torch.asinh(a * sh)
    dz = a * torch.cosh(t) / torch.sqrt(1.0 + (a * sh) ** 2)
    return z, torch.exp(-0.5 * z * z) * dz * (spacing / math.sqrt(_TWO_PI))


def weighted_hermite_table(q_max: float, spacing: float, half_width: float, order: int) -> tuple[Tensor, Tensor]:
    """``(z, table)``: the nodes of :func:`mapped_nodes` and ``weights * He_k(z)/sqrt(k!)``, ``(nodes, order + 1)``.

    Cached (a few megabytes each; callers must not modify them): the table is the same for
    every call whose ``q_max`` falls in one level of the map.
    """
    return _weighted_table(_map_level(q_max), float(spacing), float(half_width), int(order))


@functools.lru_cache(maxsize=16)
def _weighted_table(level: int, spacing: float, half_width: float, order: int) -> tuple[Tensor, Tensor]:
    z, weights = _level_nodes(level, spacing, half_width)
    return z, (hermite_table(z, order) * weights).T.contiguous()


def hermite_table(z: Tensor, order: int) -> Tensor:
    """Orthonormal probabilists' Hermite polynomials ``He_k(z)/sqrt(k!)``, ``k = 0..order``."""
    out = torch.empty(order + 1, z.numel(), dtype=z.dtype, device=z.device)
    out[0] = 1.0
    if order >= 1:
        out[1] = z
    for k in range(1, order):
        out[k + 1] = (z * out[k] - math.sqrt(k) * out[k - 1]) / math.sqrt(k + 1)
    return out


def hermite_expansion(
    fn: Callable[[Tensor], Tensor], q: Tensor, order: int, spacing: float, *, moment: bool = False
) -> tuple[Tensor, ...]:
    """``(a, D)`` of :meth:`Activation.hermite_expansion` for ``fn`` (``q`` float64, no gradient).

    The trapezoid rule on the mapped nodes of :func:`mapped_nodes` with a window of 14
    (Hermite products grow like ``exp(z^2 / 4)``). With ``moment``, also ``E[fn(u)^2 u^2]``,
    ``u = sqrt(q) Z``, from the same nodes.
    """
    with torch.no_grad():
        q_max = max_or_zero(q)
        z, weights = mapped_nodes(q_max, spacing, 14.0)
        _, weighted = weighted_hermite_table(q_max, spacing, 14.0, order)  # (nodes, order + 1)
        z, weights, weighted = z.to(q.device), weights.to(q.device), weighted.to(q.device)
        u = torch.sqrt(q.clamp_min(0.0)).unsqueeze(-1) * z
        phi = fn(u)  # no gradient here
        coef = torch.movedim(phi @ weighted, -1, 0)
        square = phi * phi * weights
        total = square.sum(-1)
        if moment:
            return coef, total, (square * u * u).sum(-1)
    return coef, total


#: Largest ``terms x pairs`` that :class:`HermiteSeries` evaluates from a table of powers (a few
#: operations on one array) instead of by Horner's rule (a few operations per term): the
#: handful of strongly correlated pairs that take hundreds of terms.
POWER_TABLE_ELEMENTS = 1 << 16


def _power_table(rho: Tensor, terms: int) -> Tensor:
    """``rho ** k`` for ``k = 0..terms-1``, stacked in a new first dimension."""
    k = torch.arange(terms, dtype=rho.dtype, device=rho.device).reshape(-1, *([1] * rho.dim()))
    return rho.unsqueeze(0) ** k


def _stacked(coef: Tensor, dims: int) -> Tensor:
    """A coefficient stack ``(K+1, ...)`` whose entries broadcast against ``dims``-dimensional
    arrays, with its per-entry dimensions aligned to theirs (size-1 dimensions prepended)."""
    return coef.reshape(coef.shape[0], *([1] * (dims - coef.dim() + 1)), *coef.shape[1:])


class HermiteSeries(torch.autograd.Function):
    r"""``V = sum_k A1[k] A2[k] rho^k`` (Mehler's formula) by Horner's rule, with ``dV/drho``.

    ``A1`` and ``A2`` are broadcast coefficient stacks ``(K+1, ...)``. The backward pass
    recomputes powers of ``rho`` one at a time, so memory stays O(size of V) for any K;
    arrays of at most :data:`POWER_TABLE_ELEMENTS` terms times pairs use a table of powers
    in both directions instead (the same sums to rounding).
    """

    @staticmethod
    def forward(ctx: Any, rho: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        terms = a1.shape[0]
        shape = torch.broadcast_shapes(rho.shape, a1.shape[1:], a2.shape[1:])
        if terms * math.prod(shape) <= POWER_TABLE_ELEMENTS:
            powers = _power_table(rho.expand(shape), terms)
            coef = _stacked(a1, len(shape)) * _stacked(a2, len(shape))
            value = (coef * powers).sum(0)
            k = torch.arange(1, terms, dtype=rho.dtype, device=rho.device).reshape(-1, *([1] * len(shape)))
            slope = (coef[1:] * k * powers[:-1]).sum(0) if terms > 1 else torch.zeros_like(value)
        else:
            powers = None
            value, slope, _ = horner(rho, lambda k: a1[k] * a2[k], range(terms), 1)
        value, slope = value.expand(shape), slope.expand(shape)
        ctx.save_for_backward(rho, a1, a2, slope, powers)
        ctx.mark_non_differentiable(slope)
        return value, slope

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad_value: Tensor, _grad_slope: Tensor) -> tuple[Tensor | None, ...]:
        rho, a1, a2, slope, powers = ctx.saved_tensors
        grad_rho = grad_value * slope if ctx.needs_input_grad[0] else None
        if powers is not None:
            weighted = grad_value * powers
            dims = powers.dim() - 1
            grad_a1 = grad_a2 = None
            if ctx.needs_input_grad[1]:
                grad_a1 = (weighted * _stacked(a2, dims)).sum_to_size(_stacked(a1, dims).shape).reshape(a1.shape)
            if ctx.needs_input_grad[2]:
                grad_a2 = (weighted * _stacked(a1, dims)).sum_to_size(_stacked(a2, dims).shape).reshape(a2.shape)
            return grad_rho.sum_to_size(rho.shape) if grad_rho is not None else None, grad_a1, grad_a2
        grad_a1 = torch.zeros_like(a1) if ctx.needs_input_grad[1] else None
        grad_a2 = torch.zeros_like(a2) if ctx.needs_input_grad[2] else None
        if grad_a1 is not None or grad_a2 is not None:
            power = grad_value
            for k in range(a1.shape[0]):
                if grad_a1 is not None:
                    grad_a1[k] = (power * a2[k]).sum_to_size(a1.shape[1:])
                if grad_a2 is not None:
                    grad_a2[k] = (power * a1[k]).sum_to_size(a2.shape[1:])
                power = power * rho
        return grad_rho, grad_a1, grad_a2


def _power(rho: Tensor, rho2: Tensor, g: int) -> Tensor | None:
    """``rho ** g`` for a small non-negative integer ``g`` (``None`` for 1, i.e. g = 0)."""
    if g == 0:
        return None
    out = rho if g % 2 else None
    for _ in range(g // 2):
        out = rho2 if out is None else out * rho2
    return out


def _mul(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a * b


def horner(
    rho: Tensor, term: Callable[[int], Tensor], exps: Sequence[int], derivatives: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``h``, ``h'`` (``derivatives >= 1``) and ``h''`` (``derivatives = 2``) of ``sum_i term(i) rho^exps[i]``.

    ``term(i)`` is the coefficient of ``rho^exps[i]`` (broadcasting against ``rho``), the
    exponents increasing. Pure elementwise code, so that ``torch.compile`` fuses it into one loop.

    Where the even exponents are ``0, 2, 4, ...`` and the odd ones ``1, 3, 5, ...`` (each
    possibly empty or cut short: every series of the library's activations), the series is
    ``E(u) + rho O(u)`` with ``u = rho^2``, two polynomials in ``u`` without gaps, each summed
    by Horner's rule with its derivatives carried along (one fused multiply-add per term and
    derivative): three to four operations per term where stepping by the gaps takes seven to
    twelve. Other exponent patterns step by their gaps (:func:`_horner_gaps`).
    """
    exps = tuple(exps)
    even = [i for i, e in enumerate(exps) if e % 2 == 0]
    odd = [i for i, e in enumerate(exps) if e % 2]
    if [exps[i] for i in even] != list(range(0, 2 * len(even), 2)) or [exps[i] for i in odd] != list(
        range(1, 2 * len(odd), 2)
    ):
        return _horner_gaps(rho, term, exps, derivatives)
    u = rho * rho
    e = _horner_u(u, term, even, derivatives)
    o = _horner_u(u, term, odd, derivatives)
    # h = E + rho O;  h' = 2 rho E' + O + 2 u O';  h'' = 2 E' + 4 u E'' + 6 rho O' + 4 rho u O''
    # (with the carried sums p1 = P' and p2 = P'' / 2).
    value = _sum([e[0], _times(rho, o[0])])
    first = second = None
    if derivatives >= 1:
        first = _sum([_scaled(_times(rho, e[1]), 2.0), o[0], _scaled(_times(u, o[1]), 2.0)])
    if derivatives >= 2:
        rho_u = rho * u
        second = _sum(
            [
                _scaled(e[1], 2.0),
                _scaled(_times(u, e[2]), 8.0),
                _scaled(_times(rho, o[1]), 6.0),
                _scaled(_times(rho_u, o[2]), 8.0),
            ]
        )
    zero = torch.zeros_like(rho) if derivatives else None
    if value is None:
        value = torch.zeros_like(rho)
    return (
        value,
        (first if first is not None else zero),
        (second if second is not None else (zero if derivatives >= 2 else None)),
    )


def _horner_u(
    u: Tensor, term: Callable[[int], Tensor], indices: Sequence[int], derivatives: int
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(P, P', P''/2)`` at ``u`` of ``P(u) = sum_k term(indices[k]) u^k`` (``None`` for a zero part)."""
    if not indices:
        return None, None, None
    p = term(indices[-1])
    p1 = p2 = None
    for i in reversed(indices[:-1]):
        if derivatives >= 2 and p1 is not None:
            p2 = p1 if p2 is None else torch.addcmul(p1, p2, u)
        if derivatives >= 1:
            p1 = p if p1 is None else torch.addcmul(p, p1, u)
        p = torch.addcmul(term(i), p, u)
    return p, p1, p2


def _times(a: Tensor, b: Tensor | None) -> Tensor | None:
    """``a * b`` where ``None`` stands for zero."""
    return None if b is None else a * b


def _scaled(a: Tensor | None, factor: float) -> Tensor | None:
    return None if a is None else a * factor


def _sum(parts: list[Tensor | None]) -> Tensor | None:
    present = [part for part in parts if part is not None]
    return functools.reduce(torch.add, present) if present else None


def _horner_gaps(
    rho: Tensor, term: Callable[[int], Tensor], exps: Sequence[int], derivatives: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`horner` for any increasing exponents: Horner's rule stepping by their gaps with powers of ``rho**2``."""
    rho2 = rho * rho
    last = len(exps) - 1
    v = term(last)
    d: Tensor | None = None
    dd: Tensor | None = None

    def step(v: Tensor, d: Tensor | None, dd: Tensor | None, g: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        pg = _power(rho, rho2, g)
        pg1 = _power(rho, rho2, g - 1)
        if derivatives >= 2:
            terms = [_mul(dd, pg)] if dd is not None else []
            if d is not None:
                terms.append(_mul(d, pg1) * (2.0 * g))
            if g >= 2:
                terms.append(_mul(v, _power(rho, rho2, g - 2)) * float(g * (g - 1)))
            dd = functools.reduce(torch.add, terms) if terms else None
        if derivatives >= 1:
            slope = _mul(v, pg1) * float(g)
            d = slope if d is None else _mul(d, pg) + slope
        return _mul(v, pg), d, dd

    for i in range(last - 1, -1, -1):
        v, d, dd = step(v, d, dd, exps[i + 1] - exps[i])
        v = v + term(i)
    if exps[0] > 0:
        v, d, dd = step(v, d, dd, exps[0])
    zero = torch.zeros_like(v) if (d is None or dd is None) and derivatives else None
    return v, (d if d is not None or not derivatives else zero), (dd if dd is not None or derivatives < 2 else zero)


def smallest_order(
    coefs: Sequence[Tensor], totals: Sequence[Tensor], orders: Sequence[int], cover: float, tol: float
) -> int | None:
    """The first of ``orders`` whose truncation bound holds at ``|rho| <= cover`` for every point, or ``None``.

    The bound at order ``K`` is ``max_q T_K(q) / D(q) * cover^(K+1) <= tol``, with the tail
    ``T_K = D - sum_{k <= K} a_k^2``; the tails of every order come from one cumulative sum
    (coefficient stacks ``(K+1, points)`` with their totals ``D``), and one transfer.
    """
    worst = torch.zeros(len(orders), dtype=torch.float64)
    for coef, total in zip(coefs, totals, strict=True):
        if not total.numel():
            continue
        top = min(max(orders), coef.shape[0] - 1)
        at = torch.tensor([min(k, top) for k in orders], device=coef.device)
        tails = total.detach() - torch.cumsum(coef[: top + 1].detach() ** 2, 0)[at]
        ratios = (tails / total.detach().clamp_min(1e-300)).reshape(len(orders), -1).amax(-1)
        worst = torch.maximum(worst, ratios.cpu().to(torch.float64))
    powers = torch.tensor([cover ** (k + 1) for k in orders], dtype=torch.float64)
    good = (worst * powers <= tol).nonzero()
    return orders[int(good[0])] if good.numel() else None


def pair_index(coef: Tensor, shape: torch.Size, mask: Tensor) -> Tensor:
    """Flat indices into a broadcast coefficient stack's point dims for the pairs in ``mask``."""
    points = coef[0]
    flat = torch.arange(points.numel(), device=coef.device).reshape(points.shape)
    return flat.expand(shape)[mask]


def max_or_zero(t: Tensor) -> float:
    return float(t.detach().max()) if t.numel() else 0.0


def series_tolerance(dtype: torch.dtype) -> float:
    # Relative truncation error allowed in the Hermite series: below the accuracy the
    # kernel promises (1e-10 in float64), and below float32 rounding.
    return 1e-12 if dtype == torch.float64 else 1e-8
