r"""Smooth activations: the pair equation as a power series, solved in one fused pass.

For an activation with a Hermite expansion (tanh, sigmoid, softplus, silu, gelu, smooth
callables: :meth:`~deq_kernel.activations.Activation.hermite_expansion`), Mehler's formula
writes the dual of a pair as a power series in the correlation,

.. math:: V = h(\rho) = \sum_{k \in E} P_k \rho^k,\qquad P_k = a_k(q_1)\,a_k(q_2),

with per-point coefficients :math:`a_k(q)`; the exponents :math:`E \subseteq \{0..K\}` are those
whose coefficients are not zero for every point (odd activations, and ``x/2`` plus an even
function such as softplus, gelu and silu, have half of them zero). The pair equation is
then :math:`\rho - \alpha h(\rho) = \tilde c` with :math:`\alpha = w/\sqrt{q_1 q_2}` and
:math:`\tilde c = s_{12}/\sqrt{q_1 q_2}`, which one matrix product gives with :math:`1/\sqrt q`
folded into its operands. Its left side is increasing on ``[-1, 1]`` (the equilibrium map is
a contraction).

Each block of pairs takes up to :data:`NEWTON_STEPS` Newton steps from the root of the series cut
after its quadratic term, then one more evaluation gives the Newton correction :math:`\delta` and its bound
:math:`|\alpha h''|\,\delta^2 / (2 r')`, :math:`r' = 1 - \alpha h'`. A pair is handed to the general
solver of :mod:`.general` (exact dual, bracketed Newton) when that bound exceeds
eight machine epsilons or when the series' truncation bound
:math:`|\rho|^{K+1}\sqrt{T(q_1)T(q_2)} \le \epsilon\sqrt{D(q_1)D(q_2)}` fails
(:math:`T = D - \sum_{k \in E} a_k^2`), amplified by :math:`1/r'` as the error of :math:`h`
reaches the root: strongly correlated pairs beyond the order chosen for the bulk, and
identical points. The order ``K`` is the smallest that covers the correlations
of a fixed sample of pairs (99.9% quantile plus 0.05), as for the general solver.

The backward pass recomputes each block and applies the implicit function theorem:
with :math:`\lambda = (\bar\rho + \bar V h')/r'` and :math:`\mu = \bar V + \lambda\alpha`,
:math:`d\tilde c` gets :math:`\lambda`, :math:`d\alpha` gets :math:`\lambda h`, and the coefficients
:math:`\mu\rho^k`, which reach the variances through
:math:`\sum_k \rho^k\, a_k'(q_1) a_k(q_2)`: two more series per pair, with the coefficients'
derivatives in ``q`` (:meth:`~deq_kernel.activations.Activation.hermite_slopes`).
Their coefficients, and those of :math:`h'` (:math:`k P_k`), decay more slowly than
:math:`P_k`, so each has its own truncation bound, from the totals
:math:`S = \sum_k a_k'(q)^2` and :math:`W = \sum_k k\,a_k(q)^2`; a pair that meets its value's
bound but not these is summed again to a higher order, and handed to the general solver
only if that does not meet them either.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._autograd import first_derivatives_only
from ..activations import Activation
from ..activations.hermite import horner, series_tolerance, smallest_order
from . import backend
from .blocks import _accumulate_product_grads, _c_block, _folded_square, _pieces, _row_blocks, _symmetrise_square
from .newton import newton

__all__ = ["NEWTON_STEPS", "SeriesPlan", "series_kernel", "series_plan"]

#: Most Newton steps per block before the final, checked correction (fewer where a sample
#: of the pairs shows them enough).
NEWTON_STEPS = 3
#: A pair is accepted when its Newton error bound is at most this many machine epsilons.
_BOUND_EPS = 8.0
#: Orders tried (each is one compiled kernel per pattern of exponents).
ORDERS = (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)
#: Largest pair array whose blocks' solutions the forward pass keeps for the backward pass
#: (three arrays of its size).
SAVE_ELEMENTS = 1 << 21
#: Largest ``terms x pairs`` whose series coefficients are formed at once (:func:`_terms`).
STACK_ELEMENTS = 1 << 18
#: Pairs sampled to choose the order.
SAMPLE = 2048
#: A coefficient is dropped when it is this small, relative to ``sqrt(D)``, at every point.
_ZERO = 1e-15


# --------------------------------------------------------------------------- block code


def _int_power(r: Tensor, e: int) -> Tensor:
    """``r ** e`` for a positive integer ``e``, by repeated squaring."""
    out = None
    base = r
    while True:
        if e & 1:
            out = base if out is None else out * base
        e >>= 1
        if not e:
            return out
        base = base * base


def _terms(a1: Tensor, a2: Tensor, stacked: bool) -> Callable[[int], Tensor]:
    """The coefficients ``P_k`` of a block's series, by position: ``a1`` is ``(rows, terms)``, ``a2`` ``(terms, cols)``.

    With ``stacked``, all products are formed at once, in one array ``(terms, rows, cols)``, and
    read as views: for small eager blocks, where each operation's fixed cost dominates, that
    saves one operation per term and evaluation. Otherwise each is formed where it is used
    (in a compiled loop, for free).
    """
    if stacked:
        return (a1.T.unsqueeze(-1) * a2.unsqueeze(1)).unbind(0).__getitem__
    return lambda i: a1[:, i : i + 1] * a2[i : i + 1, :]


def _series(
    rho: Tensor, term: Callable[[int], Tensor], exps: tuple[int, ...], derivatives: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Mehler's series of a block and its derivatives, with the coefficients of :func:`_terms`."""
    return horner(rho, term, exps, derivatives)


def _solve(
    c: Tensor,
    q1: Tensor,
    q2: Tensor,
    a1: Tensor,
    a2: Tensor,
    tau1: Tensor,
    tau2: Tensor,
    params: Tensor,
    exps: tuple[int, ...],
    low: tuple[int | None, int | None],
    order: int,
    steps: int,
    eps: float,
    stacked: bool = False,
    adaptive: bool = False,
) -> tuple[Tensor, ...]:
    """``(rho, h, h', alpha, flag)`` at the root: ``flag`` marks pairs left to the general solver.

    ``low`` holds the positions of the exponents 1 and 2 in ``exps`` (or ``None``), found by the
    caller: under ``torch.compile``, ``1 in exps`` on a closure's tuple evaluated to False.
    ``adaptive`` (eager code only) stops the Newton steps early once every pair is
    :func:`_converging`: the final, checked correction then meets its bound with room to spare.
    """
    alpha = params[0] / torch.sqrt(q1 * q2)
    term = _terms(a1, a2, stacked)
    rho = _start(c, alpha, term, exps, low)
    step = None
    for _ in range(steps):
        h, dh, _ = _series(rho, term, exps, 1)
        previous, rho = rho, _newton_step(rho, h, dh, alpha, c)
        if adaptive:
            step, last = (rho - previous).abs(), step
            if bool(_converging(step, last, eps).all()):
                break
    h, dh, d2h = _series(rho, term, exps, 2)
    rho_new, value, slope, flag = _checked(rho, h, dh, d2h, alpha, c, tau1, tau2, order, eps)
    return rho_new, value, slope, alpha, flag


def _start(
    c: Tensor, alpha: Tensor, term: Callable[[int], Tensor], exps: tuple[int, ...], low: tuple[int | None, int | None]
) -> Tensor:
    """The root of the series cut after its quadratic term (exact for small ``rho``), in [-1, 1].

    ``alpha P2 rho^2 - (1 - alpha P1) rho + (c + alpha P0) = 0``, in its cancellation-free form.
    """
    one, two = low
    const = c + alpha * term(0) if exps[0] == 0 else c
    lin = 1.0 - alpha * term(one) if one is not None else None
    if two is not None:
        quad = alpha * term(two)
        b = lin if lin is not None else torch.ones_like(quad)
        root = torch.sqrt((b * b - 4.0 * quad * const).clamp_min(0.0))
        rho = torch.where(b > 0, 2.0 * const / (b + root), const)
    elif lin is not None:
        rho = torch.where(lin > 0, const / lin, const)
    else:
        rho = const
    return rho.clamp(-1.0, 1.0)


def _converging(step: Tensor, last: Tensor | None, eps: float) -> Tensor:
    """Pairs whose Newton step ``step`` (after ``last``) makes the final, checked correction meet its bound.

    Newton's corrections shrink as ``delta' ~ C delta^2`` with ``C = |alpha h''| / (2 r')``, and
    the final check bounds the error by ``C delta'^2 ~ C^3 step^4``. ``C`` is estimated from the
    last two steps as ``step / last^2``, so the test is ``step^7 <= eps last^6`` (written without
    a division: a pair with both steps zero passes, a NaN fails); without a previous step,
    ``step <= 0.1 eps^(1/4)``, which keeps the bound below the check's ``8 eps`` for ``C`` up to
    about 40. Only a guess of when to stop: a pair it misjudges fails the check and is solved
    again, never accepted unchecked.
    """
    small = step <= 0.1 * eps**0.25
    if last is None:
        return small
    sq = step * step
    return small | (sq * sq * sq * step <= eps * (last * last * last) ** 2)


def _newton_step(rho: Tensor, h: Tensor, dh: Tensor, alpha: Tensor, c: Tensor) -> Tensor:
    return (rho - (rho - alpha * h - c) / (1.0 - alpha * dh)).clamp(-1.0, 1.0)


def _checked(
    rho: Tensor,
    h: Tensor,
    dh: Tensor,
    d2h: Tensor,
    alpha: Tensor,
    c: Tensor,
    tau1: Tensor,
    tau2: Tensor,
    order: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The final Newton correction and its checks: ``(rho, h, h', flag)`` at the corrected root.

    ``flag`` marks the pairs left to the general solver.
    """
    slope = 1.0 - alpha * dh
    delta = (rho - alpha * h - c) / slope
    miss = (alpha * d2h).abs() * delta * delta / (2.0 * slope)
    rho_new = rho - delta
    # The truncation error of h, at most |rho|^(K+1) sqrt(T1 T2), reaches the root and the
    # output amplified by 1 / r': |rho|^(K+1) sqrt(T1 T2) <= r' tol sqrt(D1 D2), with
    # tau = sqrt(T / (tol D)). (Without r', a gelu pair at rho = 0.945 passed with r' = 0.65
    # and came out 1.4e-12 off the exact solve.)
    r = rho_new.abs()
    power = _int_power(r, order + 1)
    flag = ~((slope > 0) & (miss <= _BOUND_EPS * eps) & (power * (tau1 * tau2) <= slope) & (r <= 1.0))
    # h and h' at the corrected root, to first order in the correction (h' at the iterate
    # would be off by h'' delta, up to 1e-8: the gradients read it).
    return rho_new, h - dh * delta, dh - d2h * delta, flag


def _low_positions(exps: tuple[int, ...]) -> tuple[int | None, int | None]:
    """Positions of the exponents 1 and 2 in ``exps`` (``None`` where absent)."""
    return tuple(exps.index(k) if k in exps else None for k in (1, 2))  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def _forward_function(
    exps: tuple[int, ...],
    order: int,
    steps: int,
    value: bool,
    eps: float,
    save: bool = False,
    stacked: bool = False,
    adaptive: bool = False,
) -> Callable[..., tuple[Tensor, ...] | None]:
    """The block function of the forward pass; with ``save``, it also returns ``(rho, h, h')`` for the backward pass.

    ``stacked``: the series' coefficients of a block formed at once (:func:`_terms`); ``adaptive``:
    Newton's steps stop early (eager code only, :func:`_solve`).
    """
    low = _low_positions(exps)

    def forward_block(
        out: Tensor, flag: Tensor, scale: Tensor, params: Tensor, *block: Tensor
    ) -> tuple[Tensor, ...] | None:
        c, q1, q2, a1, a2, tau1, tau2 = block
        pairs = (c, q1, q2, a1, a2, tau1, tau2, params)
        rho, v, dh, _, miss = _solve(*pairs, exps, low, order, steps, eps, stacked, adaptive)
        out.copy_((v if value else torch.sqrt(q1) * torch.sqrt(q2) * rho) * scale)
        flag.copy_(miss)
        return (rho, v, dh) if save else None

    return forward_block


def _gradient_terms(
    rho: Tensor,
    h: Tensor,
    dh: Tensor,
    alpha: Tensor,
    flag: Tensor,
    grad: Tensor,
    scale: Tensor,
    q1: Tensor,
    q2: Tensor,
    a1: Tensor,
    a2: Tensor,
    da1: Tensor,
    da2: Tensor,
    tails: tuple[Tensor, ...] | None,
    exps: tuple[int, ...],
    order: int,
    value: bool,
    stacked: bool = False,
) -> tuple[Tensor, ...]:
    """The backward pass of a block at its solution: ``(lambda, e1, e2, flag, dL/dalpha terms, dL/dscale terms)``.

    ``tails = (tau1, tau2, sigma1, sigma2, omega1, omega2)`` (see :meth:`SeriesPlan.slopes`). The
    series of ``dV/dq`` and ``dV/drho`` are cut where ``V``'s is, but their coefficients decay
    more slowly; a pair whose truncation bound for them, amplified by ``1 / r'`` as ``V``'s is,
    exceeds the tolerance is flagged for the general solver too. ``tails=None``: ``flag``
    already holds those pairs (the forward pass found them).
    """
    if tails is not None:
        flag = flag | _gradient_series_miss(rho.abs(), order, 1.0 - alpha * dh, tails)
    h1, _, _ = _series(rho, _terms(da1, a2, stacked), exps, 0)
    h2, _, _ = _series(rho, _terms(a1, da2, stacked), exps, 0)
    return _gradient_from(rho, h, dh, h1, h2, alpha, flag, grad, scale, q1, q2, value)


def _gradient_series_miss(r: Tensor, order: int, slope: Tensor, tails: tuple[Tensor, ...]) -> Tensor:
    """Pairs at ``|rho| = r`` whose series of ``dV/dq`` or ``dV/drho``, cut after ``rho^order``, miss their bound.

    ``tails = (tau1, tau2, sigma1, sigma2, omega1, omega2)``: ``dV/dq1`` errs by at most
    ``|rho|^(order+1) sqrt(S_tail1 T2)``, ``dV/drho`` by ``|rho|^order sqrt(W_tail1 W_tail2)``; each
    relative to its scale and amplified by ``1 / r'``, as ``V``'s bound is.
    """
    tau1, tau2, sigma1, sigma2, omega1, omega2 = tails
    power_k = _int_power(r, order)
    power = power_k * r
    # Written as "not within the bound", so that a NaN bound counts as a miss.
    within = (power * (sigma1 * tau2) <= slope) & (power * (tau1 * sigma2) <= slope)
    return ~(within & (power_k * (omega1 * omega2) <= slope))


def _relative_tail(tail: Tensor, total: Tensor, tol: float) -> Tensor:
    """``sqrt(tail / (tol total))``: a series' truncation bound relative to the tolerance."""
    return torch.sqrt(tail.clamp_min(0.0) / (tol * total.clamp_min(1e-300)))


def _gradient_tails(
    k: Tensor, a: Tensor, slopes: Tensor, slope_total: Tensor, weighted_total: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """``(sigma, omega)`` of points whose coefficients ``a`` and their ``q`` slopes, ``(terms, points)``, are kept.

    ``k`` holds the kept exponents ``(terms, 1)``; the totals are those of
    :meth:`~deq_kernel.activations.Activation.hermite_slopes`.
    """
    sigma = _relative_tail(slope_total - (slopes * slopes).sum(0), slope_total, tol)
    omega = _relative_tail(weighted_total - (k * a * a).sum(0), weighted_total, tol)
    return sigma, omega


def _gradient_from(
    rho: Tensor,
    h: Tensor,
    dh: Tensor,
    h1: Tensor,
    h2: Tensor,
    alpha: Tensor,
    flag: Tensor,
    grad: Tensor,
    scale: Tensor,
    q1: Tensor,
    q2: Tensor,
    value: bool,
) -> tuple[Tensor, ...]:
    """:func:`_gradient_terms` from the series ``h, h'`` and ``h1 = dh/dq1, h2 = dh/dq2`` at the solution."""
    g = torch.where(flag, 0.0, grad * scale)
    root = torch.sqrt(q1) * torch.sqrt(q2)
    # lambda = (g_rho + g_V h') / r';  mu = g_V + lambda alpha.
    if value:
        lam = g * dh / (1.0 - alpha * dh)
        mu = g + lam * alpha
        direct1 = direct2 = None
        g_scale = torch.where(flag, 0.0, grad * h)
    else:
        lam = g * root / (1.0 - alpha * dh)
        mu = lam * alpha
        out = root * rho
        direct1, direct2 = g * out / (2.0 * q1), g * out / (2.0 * q2)
        g_scale = torch.where(flag, 0.0, grad * out)
    lam = torch.where(flag, 0.0, lam)
    lam_h = lam * h
    shared = lam_h * alpha * 0.5
    e1 = mu * h1 - shared / q1
    e2 = mu * h2 - shared / q2
    if direct1 is not None:
        e1, e2 = e1 + direct1, e2 + direct2
    e1 = torch.where(flag, 0.0, e1)
    e2 = torch.where(flag, 0.0, e2)
    # Elementwise outputs only: with reductions inside, the compiled kernel stored ten
    # intermediates per pair for a second loop; the sums are taken outside.
    return lam, e1, e2, flag, lam_h / root, g_scale


@functools.lru_cache(maxsize=64)
def _backward_function(
    exps: tuple[int, ...],
    order: int,
    steps: int,
    value: bool,
    eps: float,
    stacked: bool = False,
    adaptive: bool = False,
) -> Callable[..., Any]:
    low = _low_positions(exps)

    def backward_block(
        grad: Tensor,
        scale: Tensor,
        params: Tensor,
        da1: Tensor,
        da2: Tensor,
        sigma1: Tensor,
        sigma2: Tensor,
        omega1: Tensor,
        omega2: Tensor,
        *block: Tensor,
    ) -> tuple[Tensor, ...]:
        c, q1, q2, a1, a2, tau1, tau2 = block
        pairs = (c, q1, q2, a1, a2, tau1, tau2, params)
        rho, h, dh, alpha, flag = _solve(*pairs, exps, low, order, steps, eps, stacked, adaptive)
        tails = (tau1, tau2, sigma1, sigma2, omega1, omega2)
        series = (a1, a2, da1, da2)
        return _gradient_terms(
            rho, h, dh, alpha, flag, grad, scale, q1, q2, *series, tails, exps, order, value, stacked
        )

    return backward_block


@functools.lru_cache(maxsize=64)
def _backward_saved_function(
    exps: tuple[int, ...], order: int, value: bool, stacked: bool = False
) -> Callable[..., Any]:
    def backward_block(
        grad: Tensor,
        scale: Tensor,
        params: Tensor,
        da1: Tensor,
        da2: Tensor,
        rho: Tensor,
        h: Tensor,
        dh: Tensor,
        flag: Tensor,
        q1: Tensor,
        q2: Tensor,
        a1: Tensor,
        a2: Tensor,
        tau1: Tensor,
        tau2: Tensor,
    ) -> tuple[Tensor, ...]:
        # flag: the forward pass's, the gradient series' misses included.
        alpha = params[0] / torch.sqrt(q1 * q2)
        series = (a1, a2, da1, da2)
        return _gradient_terms(rho, h, dh, alpha, flag, grad, scale, q1, q2, *series, None, exps, order, value, stacked)

    return backward_block


# --------------------------------------------------------------------------- per-call plan


class SeriesPlan:
    """The series of one call: kept exponents, order, and per-point coefficient stacks.

    ``rows`` is ``(a, tau)`` with ``a`` of shape ``(n, terms)`` and ``tau`` of shape ``(n, 1)``,
    ``cols`` the same transposed, ``(terms, m)`` and ``(1, m)``, in the working dtype;
    ``tau = sqrt(T / (tol D))`` turns the truncation bound into ``|rho|^(K+1) tau1 tau2 <= 1``.
    """

    def __init__(
        self,
        act: Activation,
        exps: tuple[int, ...],
        order: int,
        steps: int,
        rows: tuple[Tensor, Tensor],
        cols: tuple[Tensor, Tensor],
        exact: Callable[..., Tensor],
    ) -> None:
        self.act = act
        self.exps = exps
        self.order = order
        self.steps = steps
        self.rows = rows
        self.cols = cols
        self.exact = exact

    def slopes(self, q: Tensor, a: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(d a_k / dq, sigma, omega)`` of the kept exponents: ``(terms, n)``, ``(n,)``, ``(n,)``.

        ``a`` is the points' kept coefficients ``(terms, n)``. ``sigma = sqrt(S_tail / (tol S))``
        and ``omega = sqrt(W_tail / (tol W))`` are the relative tails, beyond the kept terms, of
        :meth:`~deq_kernel.activations.Activation.hermite_slopes`'s ``S = sum (d a_k/dq)^2`` and
        ``W = sum k a_k^2``: the truncation bounds of the series of ``dV/dq`` and ``dV/drho``
        that the backward pass reads, as ``tau`` is that of ``V``.
        """
        full, slope_total, weighted_total = self.act.hermite_slopes(q, self.order)
        kept = full[list(self.exps)]
        k = torch.tensor(self.exps, dtype=torch.float64, device=kept.device).unsqueeze(-1)
        tol = series_tolerance(dtype)
        sigma, omega = _gradient_tails(k, a.to(torch.float64), kept, slope_total, weighted_total, tol)
        return kept.to(dtype), sigma.to(dtype), omega.to(dtype)


def _main_order(coefs: list[Tensor], totals: list[Tensor], cover: float, tol: float) -> int:
    order = smallest_order(coefs, totals, ORDERS, cover, tol)
    return ORDERS[-1] if order is None else order


def series_plan(
    act: Activation,
    q1: Tensor,
    q2: Tensor,
    lhs: Tensor,
    rhs: Tensor,
    w: float,
    two_sided: bool,
    symmetric: bool,
    exact: Callable[..., Tensor],
) -> SeriesPlan | None:
    """Coefficients, order and Newton steps for :func:`series_kernel`; ``None`` without a series.

    ``q1``, ``q2``: the points' variances ``(n,)`` and ``(m,)``, all positive; ``lhs @ rhs^T``
    is the normalised covariance. ``exact(i, j, c, q1, q2, w, value)`` returns the output of
    the pairs ``(i, j)`` by the general solver, differentiably in ``c``, ``q1``, ``q2``, ``w``.

    A fixed sample of pairs, solved with the series at the top order, sets the order (its
    correlations' 99.9% quantile plus 0.05, at most 0.9) and then the Newton steps: the
    fewest, up to :data:`NEWTON_STEPS`, after which no sampled pair misses the error bound.
    Arrays whose blocks always run eagerly stop their steps by themselves (:func:`_solve`'s
    ``adaptive``) and skip that count.
    """
    top = ORDERS[-1]
    first = act.hermite_expansion(q1, top)
    if first is None:
        return None
    second = first if symmetric else act.hermite_expansion(q2, top)
    dtype = q1.dtype
    tol = series_tolerance(dtype)
    (coef1, total1), (coef2, total2) = first, second
    sample = _sample(coef1, coef2, q1, q2, lhs, rhs, w, two_sided, symmetric)
    cover, steps = 0.9, NEWTON_STEPS
    if sample is not None:
        rho, flag = _solve_sample(sample, _kept([coef1, coef2], [total1, total2], top), NEWTON_STEPS + 2)
        r = torch.where(flag, 1.0, rho.abs()).flatten()
        cover = min(float(torch.quantile(r, 0.999)) + 0.05, 0.9)
    order = _main_order([coef1, coef2], [total1, total2], cover, tol)
    exps = _kept([coef1[: order + 1], coef2[: order + 1]], [total1, total2], order)
    if sample is not None and backend.may_compile(lhs.shape[-2] * rhs.shape[-2], lhs.device):
        steps = _fewest_steps(sample, exps)

    def stack(coef: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
        kept = coef[list(exps)]
        tail = (total - (kept * kept).sum(0)).clamp_min(0.0)
        return kept.to(dtype), torch.sqrt(tail / (tol * total)).to(dtype)

    a1, tau1 = stack(coef1, total1)
    a2, tau2 = (a1, tau1) if symmetric else stack(coef2, total2)
    rows = (a1.T.contiguous(), tau1.reshape(-1, 1))
    return SeriesPlan(act, exps, order, steps, rows, (a2.contiguous(), tau2.reshape(1, -1)), exact)


def _sample(
    coef1: Tensor,
    coef2: Tensor,
    q1: Tensor,
    q2: Tensor,
    lhs: Tensor,
    rhs: Tensor,
    w: float,
    two_sided: bool,
    symmetric: bool,
) -> tuple[Tensor, ...] | None:
    """A fixed sample of the pairs, as the arguments of :func:`_solve` (``None`` for small problems).

    Each sampled pair is one row, with its coefficient products as the row's coefficients.
    """
    n, m = lhs.shape[-2], rhs.shape[-2]
    if n * m < 16 * SAMPLE:
        return None
    # A fixed generator: the same pairs (and so the same result) on every call.
    flat = torch.randint(0, n * m, (SAMPLE,), generator=torch.Generator().manual_seed(0))
    i, j = (flat // m).to(lhs.device), (flat % m).to(lhs.device)
    if symmetric:
        i, j = i[i != j], j[i != j]
    if not i.numel():
        return None
    f64 = torch.float64
    with torch.no_grad():
        c = (lhs[i] * rhs[j]).sum(-1)
        if two_sided:
            c = 0.5 * (c + (rhs[i] * lhs[j]).sum(-1))
        products = (coef1[:, i] * coef2[:, j]).T.contiguous()
    qi, qj = q1.detach().to(f64)[i].unsqueeze(-1), q2.detach().to(f64)[j].unsqueeze(-1)
    params = torch.tensor([w], dtype=f64, device=lhs.device)
    return c.detach().to(f64).unsqueeze(-1), qi, qj, products, params


def _solve_sample(sample: tuple[Tensor, ...], exps: tuple[int, ...], steps: int) -> tuple[Tensor, Tensor]:
    """``(rho, flag)`` of the sampled pairs with the series of exponents ``exps`` (no truncation test)."""
    c, qi, qj, products, params = sample
    f64 = torch.float64
    ones = torch.ones(len(exps), 1, dtype=f64, device=c.device)
    tau = torch.zeros(1, 1, dtype=f64, device=c.device)
    with torch.no_grad():
        rho, _, _, _, flag = _solve(
            c,
            qi,
            qj,
            products[:, list(exps)],
            ones,
            tau,
            tau,
            params,
            exps,
            _low_positions(exps),
            exps[-1],
            steps,
            torch.finfo(f64).eps,
            adaptive=True,
        )
    return rho, flag


def _fewest_steps(sample: tuple[Tensor, ...], exps: tuple[int, ...]) -> int:
    """The fewest Newton steps, 1 to :data:`NEWTON_STEPS`, after which no sampled pair is flagged.

    The iterates of :func:`_solve` taken one after the other, each checked as its final
    correction would be (no truncation test): one series evaluation per step.
    """
    c, qi, qj, products, params = sample
    f64 = torch.float64
    a1, a2 = products[:, list(exps)], torch.ones(len(exps), 1, dtype=f64, device=c.device)
    tau = torch.zeros(1, 1, dtype=f64, device=c.device)
    eps = torch.finfo(f64).eps
    with torch.no_grad():
        alpha = params[0] / torch.sqrt(qi * qj)
        term = _terms(a1, a2, False)
        rho = _start(c, alpha, term, exps, _low_positions(exps))
        h, dh, _ = _series(rho, term, exps, 1)
        for steps in range(1, NEWTON_STEPS + 1):
            rho = _newton_step(rho, h, dh, alpha, c)
            h, dh, d2h = _series(rho, term, exps, 2)
            if not bool(_checked(rho, h, dh, d2h, alpha, c, tau, tau, exps[-1], eps)[3].any()):
                return steps
    return NEWTON_STEPS


def _kept(coefs: list[Tensor], totals: list[Tensor], order: int) -> tuple[int, ...]:
    """Exponents up to ``order`` whose coefficient is not zero (to rounding) at every point."""
    nonzero = torch.zeros(order + 1, dtype=torch.bool)
    for coef, total in zip(coefs, totals, strict=True):
        if coef.numel():
            nonzero |= (coef[: order + 1].abs() > _ZERO * torch.sqrt(total)).any(-1).cpu()
    return tuple(int(k) for k in nonzero.nonzero().flatten()) or (0,)


# --------------------------------------------------------------------------- the kernel


class _SeriesKernel(torch.autograd.Function):
    """``(lhs, rhs, w, q1, q2, scale[, diagonal]) -> scale * V`` (or ``K*``) for a series plan."""

    @staticmethod
    def forward(
        ctx: Any,
        plan: SeriesPlan,
        value: bool,
        two_sided: bool,
        symmetric: bool,
        lhs: Tensor,
        rhs: Tensor,
        w: Tensor,
        q1: Tensor,
        q2: Tensor,
        scale: Tensor,
        diagonal: Tensor | None,
    ) -> Tensor:
        n, m = lhs.shape[-2], rhs.shape[-2]
        dtype, device = lhs.dtype, lhs.device
        eps = torch.finfo(dtype).eps
        result = lhs.new_empty(n, m)
        params = w.detach().reshape(1).to(dtype)
        # Small arrays whose gradient will be asked for keep each block's solution for the
        # backward pass, which then evaluates two series per pair instead of solving again.
        saving = any(ctx.needs_input_grad[4:10]) and n * m <= SAVE_ELEMENTS
        stacked, adaptive = _block_variant(plan, n * m, device)
        forward_block = _forward_function(plan.exps, plan.order, plan.steps, value, eps, saving, stacked, adaptive)
        kernel = backend.fused(forward_block, n * m, device)
        q1c, q2r = q1.detach().reshape(n, 1), q2.detach().reshape(1, m)
        scale_d = scale.detach().reshape(1, 1)
        handed = []
        ctx.solutions = [] if saving else None
        # With saved solutions, the pairs whose gradient series will miss their bound are found
        # here too, so that one longer-series solve (_refined) serves both passes.
        ctx.slopes = _slope_data(plan, q1, q2, symmetric, dtype) if saving else None
        for rows in _row_blocks(torch.Size((n, m)), True, n * m, device, symmetric):
            for cols, mirrored in _pieces(rows, n, symmetric):
                dest = result[rows, cols]
                c = _c_block(lhs, rhs, rows, cols, True, two_sided)
                flag = torch.empty(c.shape, dtype=torch.bool, device=device)
                point = _point_blocks(plan, q1c, q2r, rows, cols)
                solution = kernel(dest, flag, scale_d, params, c, *point)
                both = flag
                if saving:
                    rho, _, dh = solution
                    slope = 1.0 - params[0] / torch.sqrt(point[0] * point[1]) * dh
                    tails = (*point[4:], *_block_tails(ctx.slopes, rows, cols))
                    both = flag | _gradient_series_miss(rho.abs(), plan.order, slope, tails)
                    # The backward pass reads these flags instead of testing the bounds again.
                    ctx.solutions.append((rows, cols, mirrored, *solution, both))
                if symmetric and not mirrored:
                    flag, both = _upper(flag, diagonal is not None), _upper(both, diagonal is not None)
                if bool(both.any()):
                    i, j = both.nonzero(as_tuple=True)
                    handed.append((i + rows.start, j + (cols.start or 0), c[i, j], flag[i, j]))
                if mirrored:
                    # A transposed store inside the fused loop is several times slower.
                    result[cols, rows] = dest.mT
            if symmetric:
                _symmetrise_square(result, rows)
        ctx.exact = ctx.refined = None
        if handed:
            gi, gj, c_vals, missed = (torch.cat(parts) for parts in zip(*handed, strict=True))
            # A longer series first (for tanh it takes almost all of them), then the general solver.
            r = _refined(plan, gi, gj, c_vals, q1, q2, w, symmetric)
            if saving:
                # The gradients' bounds too: the pairs that the longer series leaves open for
                # either pass go to the general solver once, here, with their graph kept.
                r = _with_slopes(plan, r, gi, gj, q1, q2, dtype, symmetric)
                ctx.refined = (gi * m + gj, r)
                left = ~r.resolved
            else:
                left = missed & ~r.value_resolved
            # The values of the pairs whose value missed its bound (the others' met it).
            ri, rj, rr = gi[missed], gj[missed], _take(r, missed)
            refined = (rr.h if value else rr.x * torch.sqrt(rr.qa * rr.qb)).to(dtype)
            result[ri, rj] = refined * scale_d.reshape(())  # the unresolved ones are overwritten below
            if symmetric:
                result[rj, ri] = result[ri, rj]
            handed = bool(left.any())
            gi, gj, c_vals = gi[left], gj[left], c_vals[left]
        if handed:
            # All pairs for the general solver at once: it prepares its states per call. Where a
            # gradient will be asked for, its graph is kept for the backward pass (a handful of
            # pairs), which then need not solve them again.
            keep = any(ctx.needs_input_grad[4:10])
            with torch.enable_grad() if keep else contextlib.nullcontext():
                leaves = tuple(t.detach().requires_grad_(keep) for t in (c_vals, q1.detach()[gi], q2.detach()[gj], w))
                exact = plan.exact(gi, gj, *leaves, value)
            if keep:
                ctx.exact = (gi * m + gj, leaves, exact)
            result[gi, gj] = exact.detach() * scale_d.reshape(())
            if symmetric:
                result[gj, gi] = result[gi, gj]
        if diagonal is not None:
            result.diagonal().copy_(diagonal)
        ctx.plan, ctx.flags = plan, (value, two_sided, symmetric, diagonal is not None)
        ctx.save_for_backward(lhs, rhs, w, q1, q2, scale)
        return result

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        lhs, rhs, w, q1, q2, scale = ctx.saved_tensors
        plan = ctx.plan
        value, two_sided, symmetric, has_diagonal = ctx.flags
        n, m = lhs.shape[-2], rhs.shape[-2]
        dtype, device = lhs.dtype, lhs.device
        eps = torch.finfo(dtype).eps
        need_diag = ctx.needs_input_grad[10]
        grad_diag = grad.diagonal().clone() if has_diagonal and need_diag else None
        if has_diagonal and not symmetric:
            grad = grad.clone()
            grad.diagonal().zero_()  # the overridden entries do not depend on the rest
        params = w.detach().reshape(1).to(dtype)
        saved = None if ctx.solutions is None else list(ctx.solutions)
        stacked, adaptive = _block_variant(plan, n * m, device)
        if saved is not None:
            backward_block = _backward_saved_function(plan.exps, plan.order, value, stacked)
        else:
            backward_block = _backward_function(plan.exps, plan.order, plan.steps + 1, value, eps, stacked, adaptive)
        kernel = backend.fused(backward_block, n * m, device)
        q1c, q2r = q1.detach().reshape(n, 1), q2.detach().reshape(1, m)
        slopes = ctx.slopes if ctx.slopes is not None else _slope_data(plan, q1, q2, symmetric, dtype)
        scale_d = scale.detach().reshape(1, 1)
        g_lhs, g_rhs = torch.zeros_like(lhs), torch.zeros_like(rhs)
        g_q1, g_q2 = torch.zeros(n, 1, dtype=dtype, device=device), torch.zeros(1, m, dtype=dtype, device=device)
        g_w = torch.zeros((), dtype=dtype, device=device)
        g_scale = torch.zeros((), dtype=dtype, device=device)
        handed = []
        # With saved solutions, the forward pass's blocks (settings.max_block_size may differ now).
        if saved is not None:
            blocks = [(rows, cols, mirrored) for rows, cols, mirrored, *_ in saved]
        else:
            blocks = [
                (rows, cols, mirrored)
                for rows in _row_blocks(torch.Size((n, m)), True, n * m, device, symmetric)
                for cols, mirrored in _pieces(rows, n, symmetric)
            ]
        for k, (rows, cols, mirrored) in enumerate(blocks):
            if symmetric and not mirrored:
                g = _folded_square(grad, rows, has_diagonal)
            else:
                g = grad[rows, cols]
                if mirrored:
                    g = g + grad[cols, rows].mT
            c = _c_block(lhs, rhs, rows, cols, True, two_sided)
            point = _point_blocks(plan, q1c, q2r, rows, cols)
            da1, da2 = slopes[0][rows], slopes[1][:, cols]
            if saved is not None:
                rho, h, dh, flag = saved[k][3:]
                lam, e1, e2, flag, gw_b, gs_b = kernel(g, scale_d, params, da1, da2, rho, h, dh, flag, *point)
            else:
                tails = (da1, da2, *_block_tails(slopes, rows, cols))
                lam, e1, e2, flag, gw_b, gs_b = kernel(g, scale_d, params, *tails, c, *point)
            g_w += gw_b.sum()
            g_scale += gs_b.sum()
            g_q1[rows] += e1.sum(1, keepdim=True)
            g_q2[:, cols] += e2.sum(0, keepdim=True)
            flag = flag & (g != 0)
            if bool(flag.any()):
                i, j = flag.nonzero(as_tuple=True)
                handed.append((i + rows.start, j + (cols.start or 0), c[i, j], g[i, j]))
            _accumulate_product_grads(lam, lhs, rhs, g_lhs, g_rhs, rows, cols, two_sided)
        if handed:
            gi, gj, c_vals, g_vals = (torch.cat(parts) for parts in zip(*handed, strict=True))
            saved_pairs = (ctx.exact, ctx.refined)
            g_c, g1, g2, gw, gs = _exact_gradient(
                plan, gi, gj, c_vals, q1, q2, w, g_vals, scale_d.reshape(()), value, *saved_pairs, m, symmetric
            )
            g_q1.index_add_(0, gi, g1.unsqueeze(-1))
            g_q2.index_add_(1, gj, g2.unsqueeze(0))
            g_w += gw
            g_scale += gs
            # c_ij = lhs_i . rhs_j (symmetrised with two_sided), entry by entry.
            half = 0.5 if two_sided else 1.0
            g_lhs.index_add_(0, gi, half * g_c.unsqueeze(-1) * rhs[gj])
            g_rhs.index_add_(0, gj, half * g_c.unsqueeze(-1) * lhs[gi])
            if two_sided:
                g_rhs.index_add_(0, gi, half * g_c.unsqueeze(-1) * lhs[gj])
                g_lhs.index_add_(0, gj, half * g_c.unsqueeze(-1) * rhs[gi])
        needs = ctx.needs_input_grad
        return (
            None,
            None,
            None,
            None,
            g_lhs if needs[4] else None,
            g_rhs if needs[5] else None,
            g_w.reshape(w.shape) if needs[6] else None,
            g_q1.reshape(q1.shape) if needs[7] else None,
            g_q2.reshape(q2.shape) if needs[8] else None,
            g_scale.reshape(scale.shape) if needs[9] else None,
            grad_diag,
        )


def _block_variant(plan: SeriesPlan, pairs: int, device: torch.device) -> tuple[bool, bool]:
    """``(stacked, adaptive)`` of the block functions of a call with ``pairs`` entries, the same for both passes.

    ``stacked``: the coefficients formed at once (:func:`_terms`), for small arrays;
    ``adaptive``: Newton's steps stop early (:func:`_solve`), where the blocks always run eagerly.
    """
    return len(plan.exps) * pairs <= STACK_ELEMENTS, not backend.may_compile(pairs, device)


def _slope_data(plan: SeriesPlan, q1: Tensor, q2: Tensor, symmetric: bool, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``(da1, da2, sigma1, sigma2, omega1, omega2)`` of :meth:`SeriesPlan.slopes`, shaped as the blocks read them.

    ``da1`` is ``(n, terms)``, ``da2`` ``(terms, m)``; the tails ``(n, 1)`` and ``(1, m)``.
    """
    n, m = q1.shape[-1], q2.shape[-1]
    da1, sigma1, omega1 = plan.slopes(q1, plan.rows[0].T, dtype)
    if symmetric:
        da2, sigma2, omega2 = da1, sigma1, omega1
    else:
        da2, sigma2, omega2 = plan.slopes(q2, plan.cols[0], dtype)
    return (
        da1.T.contiguous(),
        da2.contiguous(),
        sigma1.reshape(n, 1),
        sigma2.reshape(1, m),
        omega1.reshape(n, 1),
        omega2.reshape(1, m),
    )


def _block_tails(slopes: tuple[Tensor, ...], rows: slice, cols: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sigma1, sigma2, omega1, omega2)`` of a block, from :func:`_slope_data`."""
    _, _, sigma1, sigma2, omega1, omega2 = slopes
    return sigma1[rows], sigma2[:, cols], omega1[rows], omega2[:, cols]


def _lookup(keys: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """``(position, found)``: where each of ``query`` sits in the unsorted, distinct ``keys``."""
    order = torch.argsort(keys)
    position = order[torch.searchsorted(keys[order], query).clamp_max(keys.numel() - 1)]
    return position, keys[position] == query


def _point_blocks(plan: SeriesPlan, q1: Tensor, q2: Tensor, rows: slice, cols: slice) -> tuple[Tensor, ...]:
    """``(q1, q2, a1, a2, tau1, tau2)`` of a block: the rows' and the columns' per-point data."""
    (a1, tau1), (a2, tau2) = plan.rows, plan.cols
    return q1[rows], q2[:, cols], a1[rows], a2[:, cols], tau1[rows], tau2[:, cols]


def _upper(flag: Tensor, skip_diagonal: bool) -> Tensor:
    """A square block's flags on and above (or only above) its diagonal: the rest is mirrored."""
    return flag.triu(1 if skip_diagonal else 0)


def _exact_gradient(
    plan: SeriesPlan,
    i: Tensor,
    j: Tensor,
    c: Tensor,
    q1: Tensor,
    q2: Tensor,
    w: Tensor,
    g: Tensor,
    scale: Tensor,
    value: bool,
    saved: tuple[Tensor, tuple[Tensor, ...], Tensor] | None,
    refined: tuple[Tensor, _Refined] | None,
    m: int,
    symmetric: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dL/dc, dL/dq1, dL/dq2, dL/dw, dL/dscale)`` of the pairs ``(i, j)``, by the general solver.

    ``saved`` is the forward pass's ``(i m + j, leaves, output)`` of the pairs it handed to the
    general solver, with their graph: the pairs it holds get their gradients from one backward
    pass through it (the others a zero weight); the rest (pairs whose gradient series alone
    missed its bound) are solved here, from ``refined`` (the forward pass's
    ``(i m + j, _Refined)``) where it holds them all.
    """
    g_c, g_q1, g_q2 = torch.zeros_like(c), torch.zeros_like(c), torch.zeros_like(c)
    g_w = torch.zeros((), dtype=c.dtype, device=c.device)
    g_scale = torch.zeros((), dtype=c.dtype, device=c.device)
    missing = torch.ones_like(i, dtype=torch.bool)
    if saved is not None:
        keys, leaves, out = saved
        position, found = _lookup(keys, i * m + j)
        if bool(found.any()):
            at = position[found]
            weights = torch.zeros_like(out).index_put_((at,), (g * scale)[found], accumulate=True)
            grads = _leaf_gradients(out, leaves, weights, keep=True)
            g_c[found], g_q1[found], g_q2[found] = grads[0][at], grads[1][at], grads[2][at]
            g_w = g_w + grads[3].reshape(())
            g_scale = g_scale + (g[found] * out.detach()[at]).sum()
            missing = ~found
    if bool(missing.any()):
        # Pairs whose value met its bound but whose gradient series did not: the series to a
        # higher order first, the general solver for those it does not resolve either.
        at = missing.nonzero().squeeze(-1)
        r = None
        if refined is not None:
            position, found = _lookup(refined[0], i[at] * m + j[at])
            r = _take(refined[1], position) if bool(found.all()) else None
        if r is None:
            r = _refined(plan, i[at], j[at], c[at], q1, q2, w, symmetric)
            r = _with_slopes(plan, r, i[at], j[at], q1, q2, c.dtype, symmetric)
        resolved, lam, e1, e2, gw, gs = _refined_gradient(r, g[at], scale, value, c.dtype)
        done = at[resolved]
        g_c[done], g_q1[done], g_q2[done] = lam[resolved], e1[resolved], e2[resolved]
        g_w, g_scale = g_w + gw, g_scale + gs
        missing[done] = False
    if bool(missing.any()):
        im, jm, gm = i[missing], j[missing], g[missing]
        with torch.enable_grad():
            c_ = c[missing].detach().requires_grad_(True)
            q1_ = q1.detach()[im].requires_grad_(True)
            q2_ = q2.detach()[jm].requires_grad_(True)
            w_ = w.detach().requires_grad_(True)
            out = plan.exact(im, jm, c_, q1_, q2_, w_, value)
        grads = _leaf_gradients(out, (c_, q1_, q2_, w_), gm * scale, keep=False)
        g_c[missing], g_q1[missing], g_q2[missing] = grads[0], grads[1], grads[2]
        g_w = g_w + grads[3].reshape(())
        g_scale = g_scale + (gm * out.detach()).sum()
    return g_c, g_q1, g_q2, g_w, g_scale


def _leaf_gradients(out: Tensor, leaves: tuple[Tensor, ...], weights: Tensor, keep: bool) -> tuple[Tensor, ...]:
    """The gradients of ``<weights, out>`` with respect to ``leaves`` (zeros for an unused one)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(out, leaves, grad_outputs=weights, allow_unused=True, retain_graph=keep)
    return tuple(torch.zeros_like(leaf) if gr is None else gr for gr, leaf in zip(grads, leaves, strict=True))


#: Order of the series that :func:`_refined` sums.
REFINED_ORDER = 128
#: Factor on :func:`series_tolerance` for the value bound of the order-128 series. Near
#: correlation 1 the bound is read through ``1/r'`` of a root that is itself a sum of
#: many terms of one sign, so the bulk tolerance (1e-12 in float64) let values through
#: that were up to 4e-13 off an independent two-dimensional quadrature (silu, sigmoid);
#: a hundred times tighter, every checked pair agreed to 6e-15.
REFINED_TIGHTER = 1e-2


class _Refined(NamedTuple):
    """The pairs of :func:`_refined`, in float64: root, series, its slope, and the value bound's verdict."""

    x: Tensor
    h: Tensor
    dh: Tensor
    slope: Tensor
    alpha: Tensor
    qa: Tensor
    qb: Tensor
    powers: Tensor
    coefs: tuple[Tensor, Tensor]
    tails: tuple[Tensor, Tensor]
    value_resolved: Tensor
    #: Filled by :func:`_with_slopes`: ``dh/dq1``, ``dh/dq2``, and the verdict of all four bounds.
    h1: Tensor | None = None
    h2: Tensor | None = None
    resolved: Tensor | None = None


def _per_point(fn: Callable[[Tensor], tuple[Tensor, ...]], q: Tensor, *indices: Tensor) -> list[tuple[Tensor, ...]]:
    """``fn`` of the float64 variances ``q[index]`` for each of ``indices``: once per distinct point of them all.

    ``fn`` returns arrays whose last dimension indexes the points; each is read back per entry.
    """
    points, back = torch.unique(torch.cat(indices), return_inverse=True)
    out = fn(q.detach().to(torch.float64)[points])
    return [tuple(t[..., b] for t in out) for b in back.split([index.numel() for index in indices])]


def _refined(
    plan: SeriesPlan, i: Tensor, j: Tensor, c: Tensor, q1: Tensor, q2: Tensor, w: Tensor, symmetric: bool
) -> _Refined:
    """The pairs ``(i, j)`` solved again by the checked Newton method on the series to :data:`REFINED_ORDER`.

    The series is summed from a table of powers, with coefficients computed once per point
    (once for the rows and columns together where ``symmetric``: ``q1`` and ``q2`` are the
    same points). ``value_resolved`` marks the pairs whose truncation bound (with the ``1/r'``
    of the root) holds at that order: strongly correlated pairs that the bulk order cannot
    take but a longer series can, without the general solver's quadrature (for tanh at
    moderate variance the coefficients beyond 128 are below rounding even at correlation 1).
    """
    f64 = torch.float64
    order = REFINED_ORDER
    qa, qb = q1.detach().to(f64)[i], q2.detach().to(f64)[j]
    k = torch.arange(order + 1, dtype=f64, device=c.device)
    tol = series_tolerance(c.dtype) * REFINED_TIGHTER

    def expansion(q: Tensor) -> tuple[Tensor, Tensor]:
        a, d = plan.act.hermite_expansion(q, order)
        return a, _relative_tail(d - (a * a).sum(0), d, tol)

    if symmetric:
        (a1, tau1), (a2, tau2) = _per_point(expansion, q1, i, j)
    else:
        ((a1, tau1),), ((a2, tau2),) = _per_point(expansion, q1, i), _per_point(expansion, q2, j)
    a1, a2 = a1.T, a2.T
    products = a1 * a2
    alpha = w.detach().to(f64) / torch.sqrt(qa * qb)
    c64 = c.detach().to(f64)

    def powers(x: Tensor) -> Tensor:
        ones = torch.ones_like(x).unsqueeze(-1)
        return torch.cat([ones, x.unsqueeze(-1).expand(-1, order).cumprod(-1)], -1)

    def residual(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pw = powers(x)
        mapped = alpha * (products * pw).sum(-1) + c64
        slope = (k[1:] * products[:, 1:] * pw[:, :-1]).sum(-1)
        return x - mapped, 1.0 - alpha * slope, 1.0 + mapped.abs()

    ones = torch.ones_like(c64)
    x = newton(residual, c64.clamp(-1.0, 1.0), -ones, ones, what="pair").clamp(-1.0, 1.0)
    pw = powers(x)
    h = (products * pw).sum(-1)
    dh = (k[1:] * products[:, 1:] * pw[:, :-1]).sum(-1)
    slope = 1.0 - alpha * dh
    value_resolved = (slope > 0) & (_int_power(x.abs(), order + 1) * (tau1 * tau2) <= slope)
    return _Refined(x, h, dh, slope, alpha, qa, qb, pw, (a1, a2), (tau1, tau2), value_resolved)


def _take(r: _Refined, at: Tensor) -> _Refined:
    """The pairs ``at`` (an index or a mask) of ``r``."""
    return _Refined(*(tuple(t[at] for t in f) if isinstance(f, tuple) else f if f is None else f[at] for f in r))


def _with_slopes(
    plan: SeriesPlan, r: _Refined, i: Tensor, j: Tensor, q1: Tensor, q2: Tensor, dtype: torch.dtype, symmetric: bool
) -> _Refined:
    """``r`` with the series of ``dh/dq1`` and ``dh/dq2`` at its roots, and ``resolved``: the pairs whose
    truncation bounds of all four series (``h``, ``h'`` and the two slopes) hold at :data:`REFINED_ORDER`.

    The coefficients' ``q`` slopes are computed once per point (once for rows and columns
    together where ``symmetric``).
    """
    f64 = torch.float64
    order = REFINED_ORDER
    k = torch.arange(order + 1, dtype=f64, device=r.x.device)
    tol = series_tolerance(dtype)

    def slopes(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return plan.act.hermite_slopes(q, order)

    if symmetric:
        (s1, total1, weighted1), (s2, total2, weighted2) = _per_point(slopes, q1, i, j)
    else:
        ((s1, total1, weighted1),), ((s2, total2, weighted2),) = _per_point(slopes, q1, i), _per_point(slopes, q2, j)
    (a1, a2), (tau1, tau2) = r.coefs, r.tails
    sigma1, omega1 = _gradient_tails(k.unsqueeze(-1), a1.T, s1, total1, weighted1, tol)
    sigma2, omega2 = _gradient_tails(k.unsqueeze(-1), a2.T, s2, total2, weighted2, tol)
    s1, s2 = s1.T, s2.T
    h1, h2 = (s1 * a2 * r.powers).sum(-1), (a1 * s2 * r.powers).sum(-1)
    tails = (tau1, tau2, sigma1, sigma2, omega1, omega2)
    resolved = r.value_resolved & ~_gradient_series_miss(r.x.abs(), order, r.slope, tails)
    return r._replace(h1=h1, h2=h2, resolved=resolved)


def _refined_gradient(
    r: _Refined, g: Tensor, scale: Tensor, value: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(resolved, dL/dc, dL/dq1, dL/dq2, dL/dw, dL/dscale)`` of pairs that :func:`_with_slopes` completed as ``r``.

    The gradient terms read ``h, h'`` and the ``q`` slopes at the refined root; the pairs not
    ``resolved``, and their contributions, are left at zero.
    """
    f64 = torch.float64
    lam, e1, e2, _, gw, gs = _gradient_from(
        r.x, r.h, r.dh, r.h1, r.h2, r.alpha, ~r.resolved, g.to(f64), scale.to(f64), r.qa, r.qb, value
    )
    return r.resolved, lam.to(dtype), e1.to(dtype), e2.to(dtype), gw.sum().to(dtype), gs.sum().to(dtype)


def series_kernel(
    plan: SeriesPlan,
    lhs: Tensor,
    rhs: Tensor,
    w: Tensor,
    q1: Tensor,
    q2: Tensor,
    *,
    want: str,
    two_sided: bool = False,
    symmetric: bool = False,
    scale: Tensor | None = None,
    diagonal: Tensor | None = None,
) -> Tensor:
    """The ``(n, m)`` matrix of pairs for a :class:`SeriesPlan`: ``scale * V`` (``want="value"``) or ``K*``.

    ``lhs @ rhs^T`` (symmetrised with ``two_sided``) is ``s12 / sqrt(q1 q2)``; ``w`` is a scalar
    tensor, ``q1``, ``q2`` the variances ``(n,)``, ``(m,)``; ``diagonal`` replaces the diagonal
    of a symmetric result. Differentiable in every tensor.
    """
    if want not in ("cov", "value"):
        raise ValueError(f"want must be 'cov' or 'value', got {want!r}")
    scale = torch.ones((), dtype=lhs.dtype, device=lhs.device) if scale is None else scale
    return _SeriesKernel.apply(plan, want == "value", two_sided, symmetric, lhs, rhs, w, q1, q2, scale, diagonal)
