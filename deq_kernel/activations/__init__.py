r"""Dual activations: :math:`E[\phi(u)\phi(v)]` for a centred Gaussian pair, its derivatives, bounds.

For an elementwise activation :math:`\phi` and :math:`(u, v) \sim N(0, [[q_1, c], [c, q_2]])`
every activation here provides

* the *dual* :math:`V(q_1, q_2, c) = E[\phi(u)\phi(v)]`, written in terms of the
  correlation :math:`\rho = c / \sqrt{q_1 q_2}`;
* its derivative in the covariance, :math:`V_c = \partial V / \partial c = E[\phi'(u)\phi'(v)]`
  (Price's theorem), which is also the derivative dual that the neural tangent kernel needs;
* the diagonal :math:`D(q) = E[\phi(u)^2]`, :math:`u \sim N(0, q)`, and :math:`D'(q)`;
* ``weight_variance_bound``: the weight variance below which the equilibrium map is a
  contraction for every input, so that its fixed point exists, is unique and is found.

The bounds follow from one argument. Write :math:`t = \sqrt{q}`. The diagonal map is
:math:`t \mapsto \sqrt{w\,\|\phi(tZ)\|^2 + s}`, whose Lipschitz constant is at most
:math:`\sqrt{w}\,\sup_t \|\phi'(tZ) Z\|` (the derivative of a norm is at most the norm of
the derivative). The pair map is :math:`c \mapsto w V(q_1, q_2, c) + s_{12}`, with slope
:math:`w E[\phi'(u)\phi'(v)] \le w \sup_q E[\phi'(\sqrt{q} Z)^2]` (Cauchy-Schwarz). Both are
contractions when

.. math:: w < 1 / \max(\sup_t E[\phi'(tZ)^2],\ \sup_t E[\phi'(tZ)^2 Z^2]),

which each activation states, exactly where the supremum has a closed form. The
bound is sharp wherever the supremum sits at :math:`t = 0` (tanh, erf, sin): a zero input
without bias then has the fixed point :math:`q = 0`, which loses uniqueness at the bound.

Closed forms are used for relu, leaky_relu, abs, identity (the arc-cosine family), step,
erf (the arcsine kernel), sin, cos and gelu. tanh, sigmoid, softplus, silu and any
user callable are integrated numerically (:class:`QuadratureActivation`).

This package is mathematics only, one module per family: :mod:`.relu` (the arc-cosine
family and the step), :mod:`.erf`, :mod:`.trig` (sin, cos), :mod:`.gelu`,
:mod:`.quadrature` (any smooth function) with the series numerics of :mod:`.hermite`;
:mod:`.base` holds the interface and :class:`Offers`, the data by which an activation
tells the engine (:mod:`deq_kernel.equilibrium`) which solvers it admits; :mod:`.registry`
the names.
"""

from __future__ import annotations

from .base import Activation, Offers, State, safe_divide, safe_sqrt
from .erf import Erf, Gaussian
from .gelu import Gelu
from .quadrature import QuadratureActivation, estimate_weight_variance_bound
from .registry import ACTIVATIONS, activation_spec, get_activation
from .relu import PiecewiseLinear, Step, StepMixture, kappa_from_angle
from .trig import Cos, Sin

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Cos",
    "Erf",
    "Gaussian",
    "Gelu",
    "Offers",
    "PiecewiseLinear",
    "QuadratureActivation",
    "Sin",
    "State",
    "Step",
    "StepMixture",
    "activation_spec",
    "estimate_weight_variance_bound",
    "get_activation",
    "kappa_from_angle",
    "safe_divide",
    "safe_sqrt",
]
