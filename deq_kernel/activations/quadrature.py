"""Any smooth activation, integrated numerically: Hermite coefficients and Mehler's series."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import Activation, Offers, State, _sin_from_cos, safe_divide, safe_sqrt
from .hermite import (
    HermiteSeries,
    hermite_expansion,
    horner,
    mapped_nodes,
    max_or_zero,
    pair_index,
    series_tolerance,
    smallest_order,
    trapezoid_nodes,
    weighted_hermite_table,
)

#: Half-width, in standard deviations, of the window of the Gaussian integrals' rules.
_WINDOW = 9.0


class QuadratureActivation(Activation):
    r"""Any smooth elementwise activation, integrated numerically.

    Per point, the Hermite coefficients :math:`a_k(q) = E[\phi(\sqrt{q}Z) He_k(Z)]/\sqrt{k!}` are
    computed by the trapezoid rule on a fine grid (exponentially accurate for integrands
    analytic in a strip; the spacing follows the activation's strip of analyticity and the
    largest variance). Pairs then use Mehler's formula

    .. math:: V = \sum_{k=0}^{K} a_k(q_1) a_k(q_2) \rho^k + R_K,\qquad
              |R_K| \le |\rho|^{K+1}\sqrt{T_K(q_1) T_K(q_2)},

    where :math:`T_K(q) = D(q) - \sum_{k \le K} a_k(q)^2` is the coefficient tail (Cauchy-Schwarz).
    The main order ``K`` is the smallest of 8, 16, ..., 64 whose bound holds for every point
    at ``|rho| <= 0.9``. Pairs whose bound fails (strongly correlated pairs) are evaluated
    again at order 256, gathered; the few whose bound fails even there (strongly
    correlated pairs of large-variance points) are integrated directly by a
    two-dimensional trapezoid rule. The truncation error is kept below 1e-12 of
    ``sqrt(D(q1) D(q2))`` in float64 (1e-8 in float32).

    Parameters
    ----------
    fn : callable
        Elementwise torch function, differentiable by autograd unless ``derivative`` and
        ``second_derivative`` are given.
    name : str, optional
    derivative, second_derivative : callable, optional
        ``phi'`` and ``phi''``; by default obtained from ``fn`` by autograd.
    weight_variance_bound : float, optional
        Strict bound on ``weight_variance``. By default estimated numerically from the
        suprema in the module docstring, on a grid of scales (an estimate, not a proof:
        pass the bound if it is known).
    analytic_strip : float, optional
        Half-width of the strip ``|Im x| < tau`` in which ``fn`` is analytic, which sets the
        quadrature spacing; default 0.5 (conservative). tanh: pi/2; sigmoid, softplus,
        silu: pi. Non-smooth callables converge only algebraically; use the named
        closed forms for relu-like activations.
    """

    _ORDERS = (8, 16, 24, 32, 48, 64, 256)
    offers = Offers(hermite_series=True, series_states=True)

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        *,
        name: str | None = None,
        derivative: Callable[[Tensor], Tensor] | None = None,
        second_derivative: Callable[[Tensor], Tensor] | None = None,
        weight_variance_bound: float | None = None,
        analytic_strip: float | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"activation must be a name or a callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        self._derivative = derivative
        self._second_derivative = second_derivative
        if analytic_strip is None:
            analytic_strip = 0.5
        if not analytic_strip > 0:
            raise ValueError(f"analytic_strip must be > 0, got {analytic_strip!r}")
        self.analytic_strip = float(analytic_strip)
        self._check_callable()
        if weight_variance_bound is None:
            weight_variance_bound = estimate_weight_variance_bound(self)
        elif not weight_variance_bound > 0:
            raise ValueError(f"weight_variance_bound must be > 0, got {weight_variance_bound!r}")
        self.weight_variance_bound = float(weight_variance_bound)

    def _check_callable(self) -> None:
        probe = torch.linspace(-3.0, 3.0, 7, dtype=torch.float64)
        try:
            out = self.fn(probe)
        except Exception as exc:  # the user's function failed on a plain tensor
            raise TypeError(f"activation callable {self.name!r} must map a float64 tensor elementwise: {exc}") from exc
        if not isinstance(out, Tensor) or out.shape != probe.shape:
            raise TypeError(f"activation callable {self.name!r} must return a tensor of its input's shape")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"activation callable {self.name!r} returned non-finite values")
        pointwise = torch.cat([self.fn(probe[i : i + 1]) for i in range(len(probe))])
        if not torch.allclose(pointwise, out, rtol=1e-12, atol=1e-12):
            raise TypeError(
                f"activation callable {self.name!r} must act elementwise: its value at a point depends on the others"
            )
        if self._derivative is not None:
            return
        # Derivatives come from autograd: the function must be written with torch operations.
        needs = probe.clone().requires_grad_(True)
        try:
            traced = self.fn(needs)
            ok = isinstance(traced, Tensor) and traced.requires_grad
            slope = torch.autograd.grad(traced.sum(), needs, allow_unused=True)[0] if ok else None
        except Exception:  # e.g. numpy functions: "Can't call numpy() on Tensor that requires grad"
            ok, slope = False, None
        if not ok:
            raise TypeError(
                f"activation callable {self.name!r} must be differentiable by torch autograd: write it with torch "
                "operations (torch.tanh, not numpy.tanh), or pass derivative= and second_derivative="
            )
        if slope is None or not bool((slope != 0).any()):
            raise ValueError(
                f"activation callable {self.name!r} has a zero derivative everywhere it was probed: a sign- or "
                "step-like function has no smooth dual here; use activation='step' (the Heaviside step, whose dual is "
                "in closed form)"
            )

    # -- the function and its derivatives ------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def derivative(self, x: Tensor) -> Tensor:
        if self._derivative is not None:
            return self._derivative(x)
        return self._autograd_derivatives(x, second=False)[0]

    def derivative_activation(self) -> Activation:
        return QuadratureActivation(
            self.derivative,
            name=f"{self.name}'",
            derivative=self.second_derivative,
            weight_variance_bound=math.inf,
            analytic_strip=self.analytic_strip,
        )

    def second_derivative(self, x: Tensor) -> Tensor:
        if self._second_derivative is not None:
            return self._second_derivative(x)
        return self._autograd_derivatives(x, second=True)[1]

    def _autograd_derivatives(self, x: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (d1,) = torch.autograd.grad(self.fn(xd).sum(), xd, create_graph=second)
            d2 = None
            if second:
                (d2,) = torch.autograd.grad(d1.sum(), xd, allow_unused=True)
                if d2 is None:
                    d2 = torch.zeros_like(xd)
        return d1.detach(), (None if d2 is None else d2.detach())

    # -- quadrature ------------------------------------------------------------------------
    def hermite_expansion(self, q: Tensor, order: int) -> tuple[Tensor, Tensor]:
        return hermite_expansion(self.fn, q.detach().to(torch.float64), order, self._series_spacing(order))

    def _series_spacing(self, order: int = 65) -> float:
        return min(super()._series_spacing(order), self.analytic_strip / 6.0)

    def _nodes(self, q_max: float, hermite: bool, half_width: float = _WINDOW) -> tuple[Tensor, Tensor]:
        # Hermite products grow like e^{z^2/4}, so the coefficient integrals need a wider
        # window than the plain Gaussian tail.
        if hermite:
            return mapped_nodes(q_max, self._node_spacing(), 14.0)
        return mapped_nodes(q_max, self._gaussian_spacing(), half_width)

    def _node_spacing(self) -> float:
        return min(0.04, self.analytic_strip / 6.0)

    def _gaussian_spacing(self) -> float:
        # Plain Gaussian integrals of the activation (no Hermite polynomials to resolve): the
        # trapezoid rule errs like exp(-2 pi tau / h) for an integrand analytic in the strip
        # |Im t| < tau, the smaller of the activation's and the node map's (pi / 2), so h = tau / 6
        # is at rounding level. Against a rule of spacing 0.005 this one agrees to 3e-15 in
        # D and D' for tanh, sigmoid, softplus and silu at q in [1e-2, 1e2], as the 0.04 rule
        # does, with a fifth of the nodes.
        return min(0.2, self.analytic_strip / 6.0)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        q64 = q.to(torch.float64)
        z, weights = self._nodes(max_or_zero(q64), hermite=False)
        z, weights = z.to(q.device), weights.to(q.device)
        u = safe_sqrt(q64).unsqueeze(-1) * z
        phi = self.fn(u)
        value = (phi * phi * weights).sum(-1)
        ud = u.detach()
        slope = ((self.derivative(ud) ** 2 + phi.detach() * self.second_derivative(ud)) * weights).sum(-1)
        return value.to(q.dtype), slope.to(q.dtype)

    def prepare(
        self, q1: Tensor, q2: Tensor | None = None, *, coverage: float | None = None
    ) -> tuple[State, State | None]:
        qs = [q1] if q2 is None else [q1, q2]
        q_max = max(max_or_zero(q.detach().to(torch.float64)) for q in qs)
        z, weights = self._nodes(q_max, hermite=True)
        _, weighted = weighted_hermite_table(q_max, self._node_spacing(), 14.0, self._ORDERS[-1])
        weighted = weighted.to(q1.device)  # (nodes, K+1)
        raw = []
        for q in qs:
            q64 = q.to(torch.float64)
            u = safe_sqrt(q64).unsqueeze(-1) * z.to(q.device)
            phi = self.fn(u)
            coef = torch.movedim(phi @ weighted, -1, 0)  # (K+1, ..., n)
            total = (phi * phi * weights.to(q.device)).sum(-1)
            # sum_k k a_k^2 = q E[phi'(sqrt(q) Z)^2]: the total of the series of dV/drho.
            weighted_total = q64 * (self.derivative(u.detach()) ** 2 * weights.to(q.device)).sum(-1)
            raw.append((q, coef, total, weighted_total))
        states = self._states(raw, coverage)
        return states[0], (states[1] if q2 is not None else None)

    def narrow(self, state1: State, state2: State | None, coverage: float) -> tuple[State, State | None]:
        """The states of :meth:`prepare` with the main order chosen for ``coverage`` instead."""
        given = [state1] if state2 is None else [state1, state2]
        raw = [(st[0], st[2].to(torch.float64), st[3].to(torch.float64), st[6].to(torch.float64)) for st in given]
        states = self._states(raw, coverage)
        return states[0], (states[1] if state2 is not None else None)

    def _states(self, raw: list[tuple[Tensor, ...]], coverage: float | None) -> list[State]:
        """States from ``(q, float64 coefficients to the top order, D(q), W(q) = sum k a_k^2)`` per point set.

        The main order is the smallest whose bound holds at ``|rho| <= coverage`` (default
        and at most 0.9) for every point; pairs beyond it are re-evaluated at the top order,
        and beyond that integrated. A state is ``(q, main coefficients, top coefficients, D,
        tail of D beyond main, beyond top, W, tail of W beyond main, beyond top)``.
        """
        tol = series_tolerance(raw[0][0].dtype)
        cover = 0.9 if coverage is None else min(max(float(coverage), 0.0), 0.9)
        main = smallest_order([r[1] for r in raw], [r[2] for r in raw], self._ORDERS[:-1], cover, tol)
        main = self._ORDERS[-2] if main is None else main
        states = []
        for q, coef, total, weighted in raw:
            tail_main = (total - (coef[: main + 1] ** 2).sum(0)).clamp_min(0.0)
            tail_top = (total - (coef * coef).sum(0)).clamp_min(0.0)
            k = torch.arange(coef.shape[0], dtype=coef.dtype, device=coef.device).reshape(-1, *[1] * (coef.dim() - 1))
            square = k * coef * coef
            wtail_main = (weighted - square[: main + 1].sum(0)).clamp_min(0.0)
            wtail_top = (weighted - square.sum(0)).clamp_min(0.0)
            parts = (coef[: main + 1], coef, total, tail_main, tail_top, weighted, wtail_main, wtail_top)
            states.append((q, *(part.to(q.dtype) for part in parts)))
        return states

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        q1, a1, b1, total1, tail1, top1, w1, wtail1, wtop1 = state1
        q2, a2, b2, total2, tail2, top2, w2, wtail2, wtop2 = state2
        main = a1.shape[0] - 1
        value, slope_rho = HermiteSeries.apply(rho, a1, a2)
        tol = series_tolerance(rho.dtype)
        scale = torch.sqrt(total1.detach() * total2.detach())
        w_scale = torch.sqrt(w1.detach() * w2.detach())
        abs_rho = rho.detach().abs()

        def misses(order: int, t1: Tensor, t2: Tensor, u1: Tensor, u2: Tensor) -> Tensor:
            # The truncation bounds after the term rho^order: of V, |rho|^(order+1) sqrt(T1 T2),
            # and of dV/drho (whose coefficients k a_k b_k decay more slowly), |rho|^order sqrt(U1 U2).
            power = abs_rho**order
            value_miss = power * abs_rho * torch.sqrt(t1.detach() * t2.detach()) > tol * scale
            return value_miss | (power * torch.sqrt(u1.detach() * u2.detach()) > tol * w_scale)

        inexact = misses(main, tail1, tail2, wtail1, wtail2)
        if bool(inexact.any()):
            # Top order on the gathered pairs only.
            shape = inexact.shape
            i1 = pair_index(b1, shape, inexact)
            i2 = pair_index(b2, shape, inexact)
            sub_value, sub_slope = HermiteSeries.apply(
                rho.expand(shape)[inexact], b1.flatten(1)[:, i1], b2.flatten(1)[:, i2]
            )
            value = value.expand(shape).masked_scatter(inexact, sub_value)
            slope_rho = slope_rho.expand(shape).masked_scatter(inexact, sub_slope)
            still = inexact & misses(b1.shape[0] - 1, top1, top2, wtop1, wtop2)
        else:
            still = inexact
        root = torch.sqrt(q1 * q2).detach()
        slope = safe_divide(slope_rho, root)
        if bool(still.any()):
            value, slope = self._direct_pairs(q1, q2, rho, still, value, slope)
        return value, slope

    def pair_start(self, state1: State, state2: State, c_tilde: Tensor, inv_root: Tensor, w: Tensor) -> Tensor:
        """The root of the equation with ``V`` cut after its linear term (exact for small ``rho``)."""
        a1, a2 = state1[1], state2[1]
        slope = w * (a1[1] * a2[1]) * inv_root
        start = (c_tilde + w * (a1[0] * a2[0]) * inv_root) / torch.where(slope < 1.0, 1.0 - slope, 1.0)
        return start.clamp(-1.0, 1.0)

    def bulk_pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        """The main-order series alone (Horner's rule), exact where :meth:`inexact_pairs` is False."""
        a1, a2 = state1[1], state2[1]
        value, slope, _ = horner(rho, lambda k: a1[k] * a2[k], range(a1.shape[0]), 1)
        root = torch.sqrt(state1[0] * state2[0])
        return value, safe_divide(slope, root)

    def inexact_pairs(self, state1: State, state2: State, rho: Tensor) -> Tensor:
        _, a1, _, total1, tail1, *_ = state1
        _, _, _, total2, tail2, *_ = state2
        bound = rho.abs() ** a1.shape[0] * torch.sqrt(tail1 * tail2)
        return bound > series_tolerance(rho.dtype) * torch.sqrt(total1 * total2)

    def _direct_pairs(
        self, q1: Tensor, q2: Tensor, rho: Tensor, mask: Tensor, value: Tensor, slope: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Two-dimensional trapezoid rule for the pairs in ``mask``, conditioned on the first variable.

        With ``u = sqrt(q1) z1`` and ``v = sqrt(q2) y``, ``y = rho z1 + s t``, ``s = sqrt(1 - rho^2)``,
        the outer rule is over ``z1`` (:meth:`_nodes`: dense where ``u`` crosses 0). For each
        outer node, the inner rule over ``t`` is the same kind of rule centred where ``v``
        crosses 0, ``t* = -rho z1 / s`` (clamped to the Gaussian's window, beyond which the
        crossing carries no weight), with the Gaussian density at the shifted nodes. A rule on
        the ``(z1, z2)`` grid itself resolves ``phi(v)``'s steep part only along the axes, so
        for large variances and correlations away from 0 and +-1 it erred by 1e-3 (tanh at
        inputs of scale 1e5).

        The integrals are taken without a graph, in chunks of about a million nodes, and the
        value re-enters the graph to first order through its three partial derivatives, each
        an integral over the same nodes:

        * ``dV/dq1 = E[phi'(u) phi(v) z1] / (2 sqrt(q1))``, ``dV/dq2 = E[phi(u) phi'(v) y] / (2 sqrt(q2))``,
        * ``dV/drho = sqrt(q1 q2) E[phi'(u) phi'(v)]`` (Price's theorem).

        Autograd through the integrand would keep every chunk's nodes for the backward pass:
        gigabytes for a few thousand pairs.
        """
        shape = mask.shape
        q1m = q1.expand(shape)[mask].to(torch.float64)
        q2m = q2.expand(shape)[mask].to(torch.float64)
        moved_rho = rho.expand(shape)[mask].to(torch.float64)
        with torch.no_grad():
            a1, a2 = safe_sqrt(q1m), safe_sqrt(q2m)
            rhom = moved_rho.clamp(-1.0, 1.0)
            sm = _sin_from_cos(rhom)
            z, weights = self._nodes(max_or_zero(q1m), hermite=False)
            z, weights = z.to(rho.device), weights.to(rho.device)
            # The inner rule: nodes tau about the crossing, over twice the Gaussian window (so
            # that [-9, 9] stays inside for any centre in it); its N(0, 1) weights are moved to
            # the shifted nodes t = centre + tau by the ratio of the densities.
            tau, tau_weights = self._nodes(max_or_zero(q2m * sm * sm), hermite=False, half_width=2.0 * _WINDOW)
            tau, tau_weights = tau.to(rho.device), tau_weights.to(rho.device)
            z1 = z[None, :, None]
            w1 = weights[None, :, None]
            sums: list[list[Tensor]] = [[], [], [], []]
            chunk = max(1, 2**20 // (z.numel() * tau.numel()))
            for start in range(0, q1m.numel(), chunk):
                sl = slice(start, start + chunk)
                r, sr = rhom[sl, None, None], sm[sl, None, None]
                centre = safe_divide(-r * z1, sr).clamp(-_WINDOW, _WINDOW)
                t = centre + tau[None, None, :]
                inner = tau_weights * torch.exp(0.5 * (tau * tau - t * t))
                # Normalised: the inner rule integrates a constant exactly, so that a pair at
                # correlation 1 (s = 0) is the diagonal's one-dimensional rule to rounding; near
                # the weight variance's bound the equilibrium amplifies a mismatch of 1e-14.
                w = w1 * (inner / inner.sum(-1, keepdim=True))
                y = r * z1 + sr * t
                u, v = a1[sl, None, None] * z1, a2[sl, None, None] * y
                fu, fv, du, dv = self.fn(u), self.fn(v), self.derivative(u), self.derivative(v)
                for part, integrand in zip(sums, (fu * fv, du * dv, du * fv * z1, fu * dv * y), strict=True):
                    part.append((integrand * w).sum((-1, -2)))
            integral, prime, along1, along2 = (torch.cat(part) for part in sums)
            d_q1 = safe_divide(along1, 2.0 * a1)
            d_q2 = safe_divide(along2, 2.0 * a2)
            d_rho = a1 * a2 * prime
        direct_value = (
            integral
            + d_q1 * (q1m - q1m.detach())
            + d_q2 * (q2m - q2m.detach())
            + d_rho * (moved_rho - moved_rho.detach())
        )
        value = value.masked_scatter(mask, direct_value.to(value.dtype))
        slope = slope.masked_scatter(mask, prime.to(slope.dtype))
        return value, slope

    def __repr__(self) -> str:
        return f"QuadratureActivation(name={self.name!r}, weight_variance_bound={self.weight_variance_bound:.6g})"


def estimate_weight_variance_bound(activation: Activation) -> float:
    r"""Numerical estimate of ``1 / max(sup_t E[phi'(tZ)^2], sup_t E[phi'(tZ)^2 Z^2])``.

    The suprema are taken over a logarithmic grid of scales ``t`` from 1e-3 to 1e3 (and
    ``t = 0``), each expectation by the trapezoid rule. Returns ``inf`` for an activation
    with zero derivative.
    """
    z, weights = trapezoid_nodes(0.005, 12.0)
    scales = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-3, 3, 601, dtype=torch.float64)])
    best = 0.0
    for t in scales:
        d = activation.derivative(t * z) ** 2
        best = max(best, float((d * weights).sum()), float((d * z * z * weights).sum()))
    if not math.isfinite(best):
        raise ValueError(f"activation {activation.name!r} has an unbounded derivative; pass weight_variance_bound")
    return math.inf if best == 0.0 else 1.0 / best
