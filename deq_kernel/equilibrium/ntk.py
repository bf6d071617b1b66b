r"""The neural tangent kernel of the infinitely wide, weight-tied deep equilibrium model.

Parameterisation (NTK, all of ``U, W, b, v`` trained): the trained parameters are standard
normal and scaled by their fan-in,

.. math::
    z^* = \frac{\sigma_w}{\sqrt n} \tilde W \phi(z^*) + \frac{\sigma_u}{\sqrt d} \tilde U x + \sigma_b \tilde b,
    \qquad f(x) = \frac{\sigma_v}{\sqrt n} \tilde v \cdot \phi(z^*),

which at initialisation is the network of :func:`deq_kernel.equilibrium_covariance` (with
``h* = phi(z*)``); the kernel is
:math:`\Theta(x, x') = \sum_\vartheta \partial_\vartheta f(x)\,\partial_\vartheta f(x')` over
:math:`\vartheta \in \{\tilde W, \tilde U, \tilde b, \tilde v\}`.

Derivation. ``v`` enters linearly: its part is :math:`\sigma_v^2 \phi(z^*)\cdot\phi(z'^*)/n \to k(x, x')`,
the NNGP kernel. For the others, differentiating the equilibrium (the weight is *tied*:
the same ``W`` acts at every depth, so its gradient is the sum over all depths, which the
implicit function theorem collects) gives
:math:`dz^* = (I - W D)^{-1}(dW\,h^* + dU\,x + db)`, ``D = diag(phi'(z*))``, hence
:math:`\partial f = g^\top(dW\,h^* + dU\,x + db)` with the adjoint
:math:`g = D(W^\top g + \sigma_v \tilde v/\sqrt n)`. Collecting the three parameters,

.. math::
    \sum_{\vartheta \in \{W, U, b\}} \partial_\vartheta f\,\partial_\vartheta f'
    = (g\cdot g')\,\Big(\sigma_w^2 \frac{h^*\cdot h'^*}{n} + \sigma_u^2\frac{x\cdot x'}{d} + \sigma_b^2\Big)
    \to G(x, x')\,K^*(x, x').

As the width grows, the coordinates of :math:`W^\top g` are Gaussian with covariance
:math:`\sigma_w^2\,g\cdot g'/n` (the readout ``v`` is independent and centred, so the
backward pass may be treated as using an independent copy of ``W``; Yang, Tensor
Programs II), which turns the adjoint's fixed point into a scalar one per pair,
:math:`G = \sigma_w^2 \dot E\, G + \sigma_v^2 \dot E` with
:math:`\dot E = E[\phi'(u)\phi'(v)]` under :math:`K^*`, so

.. math::
    \Theta(x, x') = k(x, x') + \frac{\sigma_v^2\,\dot E(x, x')}{1 - \sigma_w^2\,\dot E(x, x')}\,K^*(x, x').

The denominator is positive exactly where the equilibrium map is a contraction
(:math:`\sigma_w^2 \dot E` is its slope), so every activation's bound applies unchanged;
``weight_variance -> 0`` gives the one-hidden-layer NTK :math:`k + \sigma_v^2 \dot E\,s`.
Weight tying matters here, not in the NNGP: each depth's copy of ``W`` would
contribute its own term with its own adjoint, whereas the tied ``W`` is differentiated
once, at the equilibrium, with the full adjoint ``g``. :math:`\dot E` is the dual of
:meth:`deq_kernel.activations.Activation.derivative_activation` (relu: the arc-cosine
kernel of degree 0; erf: a Gaussian kernel; others by quadrature); the step activation,
whose derivative is a Dirac delta, has no NTK.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["tangent_kernel"]


def tangent_kernel(
    value: Tensor, cov: Tensor, slope: Tensor, weight_variance: Tensor, output_variance: Tensor
) -> Tensor:
    """Combine the equilibrium quantities into the NTK, elementwise.

    ``value`` is ``E[phi(u) phi(v)]``, ``cov`` is ``K*`` and ``slope`` is ``E[phi'(u) phi'(v)]``,
    all at the fixed point; the hyperparameters broadcast against them.
    """
    return output_variance * (value + slope * cov / (1.0 - weight_variance * slope))
