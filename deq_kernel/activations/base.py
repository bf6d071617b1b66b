r"""The :class:`Activation` interface, what an activation offers the engine, and shared helpers."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .hermite import hermite_expansion

_PI = math.pi
_TWO_PI = 2.0 * math.pi

State = tuple[Tensor, ...]


def safe_sqrt(x: Tensor) -> Tensor:
    """Square root of a non-negative tensor whose derivative at 0 is 0 instead of inf.

    A zero variance arises only for a zero input without bias; the kernel is then
    identically 0 near that point in the directions the optimiser can move (variances
    stay >= 0), and a 0 derivative keeps ``inf * 0`` from turning into NaN downstream.
    Written with ``where`` (not a custom autograd function), so that it is cheap and
    differentiable any number of times.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


def safe_divide(num: Tensor | float, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0 (a zero-variance point: every covariance with it is 0).

    Written with ``where`` on both sides, so that neither the value nor the gradient sees ``x / 0``.
    """
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, 1.0), 0.0)


def _sin_from_cos(rho: Tensor) -> Tensor:
    return torch.sqrt(torch.clamp(1.0 - rho * rho, min=0.0))


def _orthant(rho: Tensor) -> Tensor:
    r"""``(pi - arccos rho) / (2 pi)``, the orthant probability, with a finite gradient at ``|rho| = 1``.

    Its derivative ``1 / (2 pi sqrt(1 - rho^2))`` is infinite at ``rho = +-1``, where
    ``rho`` is at an extreme and its own derivative with respect to the inputs vanishes:
    the chain rule's ``inf * 0`` would give NaN. There the (one-sided) derivative is
    replaced by 0, the limit of the product; elsewhere it is exact.
    """
    r = rho.detach()
    sin = _sin_from_cos(r)
    slope = torch.where(sin > 0, 1.0 / (_TWO_PI * torch.where(sin > 0, sin, 1.0)), 0.0)
    return (_PI - torch.arccos(r)) / _TWO_PI + slope * (rho - r)


@dataclass(frozen=True)
class Offers:
    """What an activation offers the engine, as data: the engine's plan reads it to choose a solver.

    Every activation has a pair dual (:meth:`Activation.pair_dual`) and a diagonal dual, which
    the general solver needs and nothing else. Beyond that:

    Attributes
    ----------
    pair_equation : {"correlation_table", "arcsine"} or None
        The pair equation reads one number per pair off one matrix product.
        ``"correlation_table"``: positively homogeneous of degree 1, ``V = sqrt(q1 q2) kappa(rho)``
        with ``kappa`` from :meth:`kappa` (the relu family); the root ``rho*(c~)`` depends on
        ``c~ = s12 / sqrt(q1 q2)`` alone. ``"arcsine"``: erf, whose equation is
        ``t - alpha asin t = beta`` in the arcsine variable.
    linear_diagonal : bool
        ``D(q) = variance_gain * q``: the diagonal fixed point has a closed form.
    hermite_series : bool
        :meth:`Activation.hermite_expansion` and :meth:`Activation.hermite_slopes` give the
        per-point coefficients of Mehler's series (smooth activations).
    series_states : bool
        :meth:`Activation.prepare` returns Hermite coefficient states whose order
        ``narrow(state1, state2, coverage)`` can lower for the correlations a call reaches.
    monotone_diagonal : bool
        ``D`` is concave or convex on ``q >= 0`` (erf, sin: concave; cos: convex), so Newton's
        method on the diagonal equation converges from ``q = s`` without a bracket
        (:func:`deq_kernel.equilibrium.diagonal.monotone_diagonal`), and ``D`` is cheap
        enough to solve every point of a diagonal directly.
    near_one : {"angle", "distance", "arcsine", "step", "gram"} or None
        The pairs near correlation one can be re-solved in a complement of the correlation
        (:mod:`deq_kernel.equilibrium.complement`): ``"angle"`` for the relu family and
        ``"distance"`` (``q1 + q2 - 2 K*``) for cos (the tangent kernel), ``"arcsine"``
        (``1 - t``) for erf and ``"step"`` (the angle) for the step (every output);
        ``"gram"`` (gelu's tangent kernel) only at ``weight_variance = 0``, where ``K*`` is the
        input covariance and ``q1 q2 - K*^2`` the inputs' Gram complement.
    """

    pair_equation: str | None = None
    linear_diagonal: bool = False
    hermite_series: bool = False
    series_states: bool = False
    monotone_diagonal: bool = False
    near_one: str | None = None


class Activation(abc.ABC):
    """An elementwise activation together with its Gaussian dual.

    Subclasses implement :meth:`__call__`, :meth:`derivative`, :meth:`diag_dual` and
    :meth:`pair_dual`, and set :attr:`name` and :attr:`weight_variance_bound`.
    """

    #: Short name, as accepted by :func:`get_activation`.
    name: str = "activation"
    #: Strict upper bound on ``weight_variance`` for a well-posed equilibrium.
    weight_variance_bound: float = math.inf
    #: What the activation offers the engine beyond its dual (see :class:`Offers`).
    offers: Offers = Offers()

    @property
    def default_weight_variance(self) -> float:
        """Half of :attr:`weight_variance_bound`, or 1 without a bound: the default of every entry point.

        (:func:`~deq_kernel.equilibrium_covariance`, :class:`~deq_kernel.DEQKernel`, the
        scikit-learn kernel and estimators, the command line.) Relu: 1; tanh: 0.5; erf: pi/8.
        """
        bound = self.weight_variance_bound
        return 0.5 * bound if math.isfinite(bound) else 1.0

    @abc.abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """The activation, elementwise."""

    @abc.abstractmethod
    def derivative(self, x: Tensor) -> Tensor:
        """The activation's derivative, elementwise (almost everywhere)."""

    @abc.abstractmethod
    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(D(q), D'(q))`` with ``D(q) = E[phi(u)^2]``, ``u ~ N(0, q)``."""

    @abc.abstractmethod
    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(V, V_c)`` at correlation ``rho`` for two broadcast point states.

        ``V = E[phi(u) phi(v)]`` and ``V_c = E[phi'(u) phi'(v)]``, where ``u`` and ``v`` have
        variances ``state1[0]``, ``state2[0]`` and correlation ``rho``. ``V`` is
        differentiable in the states (``rho`` held fixed); ``V_c`` is a plain value.
        """

    def derivative_activation(self) -> Activation:
        """The activation ``phi'``, whose dual ``E[phi'(u) phi'(v)]`` the neural tangent kernel needs.

        Its :meth:`pair_dual` value is differentiable in the states and in ``rho``.
        """
        raise ValueError(f"activation {self.name!r} has no derivative dual")

    def bulk_pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`pair_dual` for the bulk of the pairs, as pure elementwise tensor code (fusable).

        Exact unless :meth:`inexact_pairs` says otherwise; the default is :meth:`pair_dual`.
        """
        return self.pair_dual(state1, state2, rho)

    def inexact_pairs(self, state1: State, state2: State, rho: Tensor) -> Tensor | None:
        """Pairs at which :meth:`bulk_pair_dual` is not accurate (``None``: none)."""
        return None

    def prepare(
        self, q1: Tensor, q2: Tensor | None = None, *, coverage: float | None = None
    ) -> tuple[State, State | None]:
        """Per-point state for :meth:`pair_dual`; a tuple whose first entry is ``q``.

        The last dimension of every tensor of a state indexes the points. ``coverage`` is
        a correlation below which most pairs are expected to lie (a hint for series
        activations; pairs beyond it stay exact, through :meth:`inexact_pairs`).
        """
        return (q1,), (None if q2 is None else (q2,))

    def pair_start(self, state1: State, state2: State, c_tilde: Tensor, inv_root: Tensor, w: Tensor) -> Tensor:
        """A starting correlation for the pair equation ``rho = c_tilde + w V(rho) / sqrt(q1 q2)``."""
        return c_tilde

    def hermite_expansion(self, q: Tensor, order: int) -> tuple[Tensor, Tensor] | None:
        r"""``(a, D)``: Hermite coefficients of ``phi(sqrt(q) Z)`` and ``D(q)``, or ``None``.

        ``a[k] = E[phi(sqrt(q) Z) He_k(Z)] / sqrt(k!)`` for ``k <= order``, shape
        ``(order + 1, *q.shape)``, float64 and without gradient; then
        :math:`V = \sum_k a_k(q_1) a_k(q_2) \rho^k` (Mehler's formula), and
        ``D(q) - sum_{k <= K} a_k(q)^2`` bounds the tail. Activations with such a series
        (smooth ones) return it; the engine's series solver
        (:mod:`deq_kernel.equilibrium.series`) then solves their pairs in one fused pass.
        """
        return None

    def hermite_slopes(self, q: Tensor, order: int) -> tuple[Tensor, Tensor, Tensor]:
        r"""``(d a_k / dq for k <= order, S(q), W(q))`` (float64), for activations with :meth:`hermite_expansion`.

        From :math:`d a_k/dq = E[\phi'(\sqrt q Z)\, Z h_k(Z)]/(2\sqrt q)` and
        :math:`Z h_k = \sqrt{k+1}\,h_{k+1} + \sqrt k\,h_{k-1}` (``h_k`` the orthonormal Hermite
        polynomials): the coefficients ``b`` of ``phi'`` to order ``order + 1`` give
        ``(sqrt(k+1) b[k+1] + sqrt(k) b[k-1]) / (2 sqrt(q))``. ``q`` must be positive.

        The two totals bound the truncation of the series the gradients read:
        :math:`S = \sum_k (d a_k/dq)^2 = E[\phi'(\sqrt q Z)^2 Z^2]/(4q)` (the series of
        :math:`\partial V/\partial q`) and :math:`W = \sum_k k\,a_k^2 = q\,E[\phi'(\sqrt q Z)^2]`
        (that of :math:`\partial V/\partial\rho`), both by quadrature.
        """
        q64 = q.detach().to(torch.float64)
        spacing = self._series_spacing(order + 1)
        b, second_moment, weighted_moment = hermite_expansion(self.derivative, q64, order + 1, spacing, moment=True)
        k = torch.arange(order + 1, dtype=torch.float64, device=q.device).reshape(-1, *([1] * q.dim()))
        up = torch.sqrt(k + 1.0) * b[1:]
        down = torch.sqrt(k[1:]) * b[:order]
        slopes = up.clone()
        slopes[1:] += down
        return slopes / (2.0 * torch.sqrt(q64)), weighted_moment / (4.0 * q64 * q64), q64 * second_moment

    def _series_spacing(self, order: int = 65) -> float:
        # Resolves Hermite polynomials to order 65 and an integrand analytic in |Im z| < pi/2
        # to rounding; higher orders oscillate faster and take proportionally finer nodes
        # (the order-256 coefficients of QuadratureActivation.prepare use 0.04).
        return min(0.1, 6.5 / max(order, 1))

    def check_weight_variance(self, weight_variance: Tensor) -> None:
        """Raise ``ValueError`` if any weight variance is outside the well-posed range."""
        bad = ~(weight_variance < self.weight_variance_bound)
        if bool(bad.any()):
            worst = float(weight_variance.detach().max())
            raise ValueError(
                f"weight_variance must be < {self.weight_variance_bound:.6g} for activation "
                f"{self.name!r} (the equilibrium map is a contraction only below it), got {worst:.6g}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
