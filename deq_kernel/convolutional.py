r"""``conv_equilibrium_covariance``: the kernel of an infinitely wide convolutional deep equilibrium model.

**The model.** An image :math:`x` has :math:`C` channels on an :math:`H \times W` grid
(:math:`P = HW` pixels); the hidden state :math:`h` has :math:`n` channels on the same grid;
convolutions are :math:`k \times k` (``k`` odd), stride 1, zero padding ("same"):

.. math::
    h^* = \phi(W \ast h^* + U \ast x + b),\qquad
    W \sim N\!\left(0, \tfrac{\sigma_w^2}{n k^2}\right),\;
    U \sim N\!\left(0, \tfrac{\sigma_u^2}{C k^2}\right),\;
    b_c \sim N(0, \sigma_b^2),

read out by ``"flatten"``, :math:`f(x) = \sum_{c,p} v_{cp} h^*_{cp}` with
:math:`v \sim N(0, \sigma_v^2 / (nP))`, or by global average pooling, ``"gap"``,
:math:`f(x) = \sum_c v_c \frac1P \sum_p h^*_{cp}` with :math:`v \sim N(0, \sigma_v^2 / n)`.

**The limit.** As :math:`n \to \infty` the pre-activations of a channel are jointly Gaussian
across pixels and images. With :math:`\Sigma(p, p')` their covariance between pixel ``p`` of
``x`` and pixel ``p'`` of ``x'``, and ``A`` the patch average
:math:`(AM)(p, p') = k^{-2} \sum_{\delta} M(p + \delta, p' + \delta)` over the offsets
:math:`\delta` of the patch (zero outside the grid),

.. math:: \Sigma = \sigma_w^2 A[E\,\phi(u)\phi(v)] + \sigma_u^2 A[\langle x_p, x'_{p'}\rangle / C] + \sigma_b^2,

with :math:`(u, v)` the two pixels' pre-activations (each variance from its own image's fixed
point). The flatten readout's kernel is the average over pixels of the same-pixel dual,

.. math:: k(x, x') = \sigma_v^2 \frac1P \sum_p E[\phi(u_p)\phi(v_p)],

and since ``A`` keeps the offset :math:`p' - p`, the same-pixel entries solve a closed system
of ``P`` unknowns per pair of images (:mod:`deq_kernel.equilibrium.conv`). The pooled
readout's kernel averages over all pixel pairs,
:math:`k(x, x') = \sigma_v^2 P^{-2} \sum_{p, p'} E[\phi(u_p)\phi(v_{p'})]`, and needs all
:math:`P^2` of them: a system of :math:`P^2` unknowns per pair of images. With
``kernel_size=1`` every pixel is an independent fully connected DEQ of its ``C`` channels, and
the kernel is the pixel average of :func:`~deq_kernel.equilibrium_covariance`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._autograd import refuse_function_transforms
from .activations import Activation, get_activation
from .activations.registry import check_keywords
from .equilibrium.backend import check_output_fits
from .equilibrium.conv import conv_kernel
from .equilibrium.plan import as_hyper, as_input, check_hypers

__all__ = ["READOUTS", "check_conv_options", "conv_equilibrium_covariance"]

ArrayLike = Any

#: The readouts :func:`conv_equilibrium_covariance` computes.
READOUTS = ("flatten", "gap")

_ARGUMENTS = (
    "image_shape",
    "kernel_size",
    "readout",
    "activation",
    "weight_variance",
    "input_variance",
    "bias_variance",
    "output_variance",
    "output",
    "diag",
)


def conv_equilibrium_covariance(
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    image_shape: Sequence[int] | None = None,
    kernel_size: int = 3,
    readout: str = "flatten",
    activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
    weight_variance: float | Tensor | None = None,
    input_variance: float | Tensor = 1.0,
    bias_variance: float | Tensor = 0.0,
    output_variance: float | Tensor = 1.0,
    output: str = "nngp",
    diag: bool = False,
    **activation_kwargs: Any,
) -> Tensor:
    r"""Kernel of an infinitely wide convolutional deep equilibrium model (see the module docstring).

    Parameters
    ----------
    x1 : tensor or array-like
        Images, shape ``(n, C, H, W)``, or flat rows ``(n, C*H*W)`` (channel first, then rows
        of pixels, as ``images.reshape(n, -1)``) with ``image_shape``.
    x2 : tensor or array-like, optional
        Second images, in the same layout; ``None`` means ``x1`` (a symmetric matrix).
    image_shape : (C, H, W) or (H, W), optional
        The shape of one image; required for flat rows, checked against 4-dimensional input.
        ``(H, W)`` means one channel.
    kernel_size : int
        The convolutions' size ``k``, odd and positive (3 by default).
    readout : {"flatten", "gap"}
        ``"flatten"``: a linear readout of every channel at every pixel; ``"gap"``: of every
        channel's average over the pixels (``P`` times the work per pair).
    activation, weight_variance, input_variance, bias_variance, output_variance
        As for :func:`~deq_kernel.equilibrium_covariance`; the variances are scalars here.
        ``weight_variance`` must be below the activation's bound, which makes every fixed
        point of the model a contraction; its default is half the bound.
    output : {"nngp", "ntk"}
        The output kernel, or the neural tangent kernel of the same network with all of
        ``U, W, b, v`` trained (derived in :func:`deq_kernel.equilibrium.conv.conv_kernel`).
    diag : bool
        Return only ``k(x1_i, x2_i)``, shape ``(n,)``, in O(n).
    **activation_kwargs
        Activation options, e.g. ``negative_slope`` for ``leaky_relu``.

    Returns
    -------
    Tensor
        Shape ``(n, m)`` (``(n,)`` with ``diag``), differentiable in the images and every variance (implicit function
        theorem).

    Raises
    ------
    ValueError, TypeError
        For malformed images, shapes or hyperparameters, naming the argument.
    deq_kernel.ConvergenceError
        If a fixed point is not found to tolerance.

    Examples
    --------
    >>> import torch, deq_kernel
    >>> x = torch.linspace(-1.0, 1.0, 2 * 16, dtype=torch.float64).reshape(2, 1, 4, 4)
    >>> k = deq_kernel.conv_equilibrium_covariance(x, kernel_size=3, bias_variance=0.1)
    >>> k.shape, bool(torch.allclose(k, k.mT))
    (torch.Size([2, 2]), True)
    """
    refuse_function_transforms("conv_equilibrium_covariance")
    shape, kernel_size, readout = check_conv_options(image_shape, kernel_size, readout)
    if output not in ("nngp", "ntk"):
        raise ValueError(f"output must be 'nngp' or 'ntk' for the convolutional kernel, got {output!r}")
    if not isinstance(diag, bool):
        raise TypeError(f"diag must be a bool, got {diag!r}")
    if activation_kwargs:
        check_keywords(activation_kwargs, activation, where="conv_equilibrium_covariance", own=_ARGUMENTS)
    act = get_activation(activation, **activation_kwargs)
    if output == "ntk":
        act.derivative_activation()  # raises for an activation without one (the step)
    x1 = _images(x1, "x1", shape)
    symmetric = x2 is None or x2 is x1
    x2 = None if symmetric else _images(x2, "x2", tuple(x1.shape[1:]), like=x1)
    if x2 is not None and x2.dtype != x1.dtype:
        dtype = torch.promote_types(x1.dtype, x2.dtype)
        x1, x2 = x1.to(dtype), x2.to(dtype)

    if weight_variance is None:
        weight_variance = act.default_weight_variance
    hypers = {}
    for name, value in (
        ("weight_variance", weight_variance),
        ("input_variance", input_variance),
        ("bias_variance", bias_variance),
        ("output_variance", output_variance),
    ):
        t = as_hyper(value, name, x1, check=False)
        if t.numel() != 1:
            raise ValueError(f"{name} must be a scalar for the convolutional kernel, got shape {tuple(t.shape)}")
        hypers[name] = t.reshape(())
    check_hypers(**hypers)
    act.check_weight_variance(hypers["weight_variance"])
    m = x1.shape[0] if x2 is None else x2.shape[0]
    if diag and m != x1.shape[0]:
        raise ValueError(f"with diag=True, x2 must have as many images as x1 ({x1.shape[0]}), got {m}")
    if not diag:
        check_output_fits((x1.shape[0], m), x1.dtype, x1.device)
    wide = x1.dtype == torch.float32
    if wide:
        # As for the fully connected kernel: float32 images are solved in float64.
        x1, x2 = x1.double(), (None if x2 is None else x2.double())
        hypers = {k: v.double() for k, v in hypers.items()}
    out = conv_kernel(
        act,
        x1,
        x2,
        hypers["weight_variance"],
        hypers["input_variance"],
        hypers["bias_variance"],
        hypers["output_variance"],
        kernel_size,
        readout,
        diag,
        output,
    )
    return out.float() if wide else out


def check_conv_options(
    image_shape: Sequence[int] | None, kernel_size: int, readout: str
) -> tuple[tuple[int, int, int] | None, int, str]:
    """``(image_shape as (C, H, W) or None, kernel_size, readout)``, validated, naming the bad argument."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {', '.join(map(repr, READOUTS))}, got {readout!r}")
    integer = isinstance(kernel_size, Integral) and not isinstance(kernel_size, (bool, np.bool_))
    if not integer or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    return _image_shape(image_shape), int(kernel_size), readout


def _image_shape(image_shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    if image_shape is None:
        return None
    try:
        shape = tuple(image_shape)
    except TypeError:
        raise TypeError(f"image_shape must be a tuple (C, H, W) or (H, W), got {image_shape!r}") from None
    if len(shape) == 2:
        shape = (1, *shape)
    # numpy integers count as integers (a shape read from an array, or a saved model's).
    valid = all(isinstance(v, Integral) and not isinstance(v, (bool, np.bool_)) and v >= 1 for v in shape)
    if len(shape) != 3 or not valid:
        raise ValueError(f"image_shape must be (C, H, W) or (H, W) of positive integers, got {image_shape!r}")
    return tuple(int(v) for v in shape)


def _images(x: ArrayLike, name: str, shape: tuple[int, ...] | None, like: Tensor | None = None) -> Tensor:
    """``x`` as a tensor of images ``(n, C, H, W)``, from flat rows with ``shape`` or as given."""
    t = as_input(x, name, like=like)
    if t.dim() == 4:
        if shape is not None and tuple(t.shape[1:]) != shape:
            raise ValueError(f"{name} has images of shape {tuple(t.shape[1:])}, but image_shape is {shape}")
        return t
    if t.dim() != 2:
        raise ValueError(f"{name} must be images (n, C, H, W) or flat rows (n, C*H*W), got shape {tuple(t.shape)}")
    if shape is None:
        raise ValueError(f"{name} is flat rows of shape {tuple(t.shape)}: pass image_shape=(C, H, W) or (H, W)")
    size = shape[0] * shape[1] * shape[2]
    if t.shape[1] != size:
        raise ValueError(
            f"image_shape {shape} has {size} values per image, but {name} has {t.shape[1]} features per row"
        )
    return t.reshape(t.shape[0], *shape)
