r"""``equilibrium_covariance``: the public function; the engine (:mod:`deq_kernel.equilibrium`) computes it.

For inputs :math:`x, x' \in \mathbb{R}^d` the infinitely wide deep equilibrium model
:math:`h^* = \phi(W h^* + U x + b)`, :math:`f = v \cdot h^*` (Gao et al., NeurIPS 2023) has

.. math::
    s(x, x') &= \sum_i \sigma_{u,i}^2 x_i x'_i / d + \sigma_b^2, \\
    K^*(x, x') &= \sigma_w^2\, E[\phi(u)\phi(v)] + s(x, x'), \\
    k(x, x') &= \sigma_v^2\, E[\phi(u)\phi(v)],

with :math:`(u, v)` centred Gaussian with covariance
:math:`[[K^*(x,x), K^*(x,x')], [K^*(x,x'), K^*(x',x')]]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._autograd import refuse_function_transforms
from .activations import Activation, get_activation
from .activations.registry import check_keywords
from .equilibrium.backend import check_output_fits
from .equilibrium.plan import OUTPUTS, as_hyper, as_input, batch_shape, check_hypers
from .equilibrium.solve import solve

__all__ = ["OUTPUTS", "checked_covariance", "equilibrium_covariance"]

ArrayLike = Any


#: equilibrium_covariance's own keyword arguments (for the message about a misspelled one).
_ARGUMENTS = ("activation", "weight_variance", "input_variance", "bias_variance", "output_variance", "diag", "output")


def equilibrium_covariance(
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
    weight_variance: float | Tensor | None = None,
    input_variance: float | Tensor = 1.0,
    bias_variance: float | Tensor = 0.0,
    output_variance: float | Tensor = 1.0,
    diag: bool = False,
    output: str = "nngp",
    **activation_kwargs: Any,
) -> Tensor:
    r"""Covariance of an infinitely wide deep equilibrium model.

    Parameters
    ----------
    x1 : tensor or array-like, shape ``(..., n, d)``
        Inputs. Array-likes become float64 tensors; tensors keep their dtype
        (float32 or float64) and device. float32 inputs are solved in float64 and the
        result is rounded to float32 (float32 alone resolves a correlation near +-1 only to
        ``sqrt(eps32)`` in angle), so float32 saves memory in the result, not time.
    x2 : tensor or array-like, shape ``(..., m, d)``, optional
        Second inputs; ``None`` means ``x1`` (a symmetric matrix whose diagonal is
        computed by the O(n) diagonal path).
    activation : str, Activation or callable
        One of :data:`deq_kernel.activations.ACTIVATIONS` or any smooth elementwise torch
        function.
    weight_variance, input_variance, bias_variance, output_variance : float or tensor
        :math:`\sigma_w^2, \sigma_u^2, \sigma_b^2, \sigma_v^2`, non-negative; tensors broadcast
        against the batch shape. ``input_variance`` may have a last dimension of size ``d``
        (one variance per input dimension, ARD): its last dimension is always the feature
        dimension, so a per-batch scalar has shape ``(*batch, 1)``. ``weight_variance`` must
        be below the activation's bound (``activation.weight_variance_bound``; relu: 2); its
        default, ``None``, is half the bound, or 1 without one
        (:attr:`~deq_kernel.Activation.default_weight_variance`: relu 1, tanh 0.5).
    diag : bool
        Return only the diagonal ``k(x1_i, x2_i)``, shape ``(..., n)``, in O(n).
    output : {"nngp", "preactivation", "ntk"}
        ``"nngp"``: the output kernel :math:`k`; ``"preactivation"``: the equilibrium
        pre-activation covariance :math:`K^*` (``output_variance`` is then unused);
        ``"ntk"``: the neural tangent kernel of the weight-tied DEQ with all parameters
        trained, :math:`k + \sigma_v^2 \dot E K^* / (1 - \sigma_w^2 \dot E)`, where
        :math:`\dot E = E[\phi'(u)\phi'(v)]` (see :mod:`deq_kernel.equilibrium.ntk`; not defined for
        the step activation).
    **activation_kwargs
        Activation options, e.g. ``negative_slope`` for ``leaky_relu``.

    Returns
    -------
    Tensor
        Shape ``(..., n, m)``, or ``(..., n)`` with ``diag=True``. Differentiable in the
        inputs and every hyperparameter (implicit function theorem).

    Raises
    ------
    ValueError, TypeError
        For malformed inputs or hyperparameters, naming the argument.
    deq_kernel.ConvergenceError
        If a fixed point is not found to tolerance (never returns unconverged values).

    Examples
    --------
    >>> import torch, deq_kernel
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> deq_kernel.equilibrium_covariance(x, weight_variance=1.0)  # relu
    tensor([[0.5000, 0.2172],
            [0.2172, 0.5000]], dtype=torch.float64)
    >>> deq_kernel.equilibrium_covariance(x, weight_variance=1.0, output="preactivation")
    tensor([[1.0000, 0.2172],
            [0.2172, 1.0000]], dtype=torch.float64)
    """
    refuse_function_transforms("equilibrium_covariance")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    if not isinstance(diag, bool):
        raise TypeError(f"diag must be a bool, got {diag!r}")
    if activation_kwargs:
        check_keywords(activation_kwargs, activation, where="equilibrium_covariance", own=_ARGUMENTS)
    act = get_activation(activation, **activation_kwargs)
    x1, x2, symmetric = _inputs(x1, x2, diag)
    d = x1.shape[-1]
    if weight_variance is None:
        weight_variance = act.default_weight_variance
    w = as_hyper(weight_variance, "weight_variance", x1, check=False)
    iv = as_hyper(input_variance, "input_variance", x1, check=False)
    b = as_hyper(bias_variance, "bias_variance", x1, check=False)
    ov = as_hyper(output_variance, "output_variance", x1, check=False)
    check_hypers(weight_variance=w, input_variance=iv, bias_variance=b, output_variance=ov)
    if iv.dim() >= 1 and iv.shape[-1] not in (1, d):
        raise ValueError(
            f"input_variance must be a scalar or have last dimension 1 or d={d} "
            f"(one variance per input dimension), got shape {tuple(iv.shape)}"
        )
    act.check_weight_variance(w)
    return _covariance(act, x1, x2, symmetric, w, iv, b, ov, diag, output)


def checked_covariance(
    act: Activation,
    x1: Tensor,
    x2: Tensor | None,
    w: Tensor,
    iv: Tensor,
    b: Tensor,
    *,
    diag: bool,
    output: str,
) -> Tensor:
    """:func:`equilibrium_covariance` for a caller that has checked the hyperparameters itself.

    For the GPyTorch kernel, whose hyperparameters are tensors of the inputs' dtype that it
    checks once per call (finite, non-negative, ``w`` below the bound, ``iv`` of last dimension
    1 or ``d``); the inputs are validated here as by :func:`equilibrium_covariance`, and the
    output variance is 1.
    """
    refuse_function_transforms("DEQKernel")
    x1, x2, symmetric = _inputs(x1, x2, diag)
    w, iv, b = (t.to(device=x1.device, dtype=x1.dtype) for t in (w, iv, b))
    ov = torch.ones((), dtype=x1.dtype, device=x1.device)
    return _covariance(act, x1, x2, symmetric, w, iv, b, ov, diag, output)


def _inputs(x1: ArrayLike, x2: ArrayLike | None, diag: bool) -> tuple[Tensor, Tensor, bool]:
    """``(x1, x2, symmetric)``: validated tensors of one dtype, ``x2`` is ``x1`` for a symmetric matrix."""
    x1 = as_input(x1, "x1")
    symmetric = x2 is None or x2 is x1
    x2 = x1 if symmetric else as_input(x2, "x2", like=x1)
    if x1.dtype != x2.dtype:
        dtype = torch.promote_types(x1.dtype, x2.dtype)
        x1, x2 = x1.to(dtype), x2.to(dtype)
    d = x1.shape[-1]
    if x2.shape[-1] != d:
        raise ValueError(f"x2 must have the same number of features as x1 (d={d}), got x2 of shape {tuple(x2.shape)}")
    if diag and not symmetric and x2.shape[-2] != x1.shape[-2]:
        raise ValueError(f"with diag=True, x2 must have as many points as x1 ({x1.shape[-2]}), got {x2.shape[-2]}")
    return x1, x2, symmetric


def _covariance(
    act: Activation,
    x1: Tensor,
    x2: Tensor,
    symmetric: bool,
    w: Tensor,
    iv: Tensor,
    b: Tensor,
    ov: Tensor,
    diag: bool,
    output: str,
) -> Tensor:
    """The kernel of validated arguments: the batch shape, the output's memory, float32 solved in float64."""
    batch = batch_shape(x1, x2, w=w, iv=iv, b=b, ov=ov)
    if x1.dtype == torch.float32:
        # float32 resolves a correlation near +-1 only to sqrt(eps32) in angle (collinear or
        # nearly equal inputs: 2.5e-3 errors and eigenvalues of -2e-3 of the largest entry
        # were seen), and the tangent kernel's 1 - rho^2 only to eps32 * q. The fixed points
        # are solved in float64 and the result rounded to float32 (differentiably).
        if not diag:
            check_output_fits((*batch, x1.shape[-2], x2.shape[-2]), x1.dtype, x1.device, working=torch.float64)
        wide = [t.double() for t in (x1, x2, w, iv, b, ov)]
        out = solve(act, wide[0], wide[1], symmetric, *wide[2:], diag=diag, output=output, batch=batch)
        return out.to(torch.float32)
    if not diag:
        check_output_fits((*batch, x1.shape[-2], x2.shape[-2]), x1.dtype, x1.device)
    return solve(act, x1, x2, symmetric, w, iv, b, ov, diag=diag, output=output, batch=batch)
