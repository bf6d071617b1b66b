r"""GPyTorch: :class:`DEQKernel`, and the exact-GP model and fitting routine built on it.

:class:`DEQKernel` is a :class:`gpytorch.kernels.Kernel` whose covariance is
:func:`deq_kernel.equilibrium_covariance`; it holds the hyperparameters and routes shapes, and
nothing else. :class:`ExactGPModel` (a constant mean and ``ScaleKernel(DEQKernel(...))``) and
:func:`fit_exact_gp` (type-II maximum likelihood with early stopping) are the pieces that
:mod:`deq_kernel.model_selection` and the scikit-learn estimators in :mod:`deq_kernel.sklearn`
share.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gpytorch
import torch
from gpytorch.constraints import Interval, Positive
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.likelihoods import Likelihood
from gpytorch.means import ConstantMean, Mean
from gpytorch.priors import Prior
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from ._autograd import first_derivatives_only
from .activations import Activation, get_activation
from .activations.registry import check_keywords
from .convolutional import check_conv_options, conv_equilibrium_covariance
from .equilibrium.newton import ConvergenceError
from .equilibrium.plan import check_hypers
from .functional import checked_covariance
from .settings import positive_int

__all__ = [
    "KERNELS",
    "WEIGHT_VARIANCE_MARGIN",
    "CholeskyMarginalLogLikelihood",
    "ConvDEQKernel",
    "DEQKernel",
    "ExactGPModel",
    "ExactPosterior",
    "FitResult",
    "FitWarning",
    "NonFiniteHyperparameterError",
    "fit_exact_gp",
]

#: The default ``weight_variance`` constraint stops this far (relatively) below the
#: activation's bound. The pair equation's conditioning is ``1 / (1 - w / bound)`` (relu), so
#: rounding errors grow as ``w`` nears the bound; at 1e-4 below it a float64 kernel matrix
#: already has negative eigenvalues of 1e-7 of its largest, and the kernel itself tends to
#: the degenerate "every correlation 1". One percent keeps it accurate and loses nothing.
WEIGHT_VARIANCE_MARGIN = 1e-2

#: Values accepted for ``kernel``: the network's Gaussian-process kernel or its neural tangent kernel.
KERNELS = ("nngp", "ntk")


class DEQKernel(Kernel):
    r"""The kernel of an infinitely wide deep equilibrium model (DEQ).

    A DEQ maps an input :math:`x \in \mathbb{R}^d` to the equilibrium
    :math:`h^* = \phi(W h^* + U x + b)` and outputs :math:`f = v \cdot h^*`. As its width goes to
    infinity, :math:`f` is a Gaussian process (Gao, Huo, Liu and Gao, *Wide Neural Networks as
    Gaussian Processes: Lessons from Deep Equilibrium Models*, NeurIPS 2023,
    arXiv:2310.10767) with covariance

    .. math::
        s(\mathbf{x}, \mathbf{x'}) &= \frac{1}{d} \sum_{i=1}^d \sigma_{u,i}^2 x_i x'_i + \sigma_b^2, \\
        K^*(\mathbf{x}, \mathbf{x'}) &= \sigma_w^2\, \mathbb{E}[\phi(u)\phi(v)] + s(\mathbf{x}, \mathbf{x'}), \\
        k_\text{DEQ}(\mathbf{x}, \mathbf{x'}) &= \mathbb{E}[\phi(u)\phi(v)],

    where :math:`(u, v)` is centred Gaussian with covariance
    :math:`[[K^*(\mathbf{x},\mathbf{x}), K^*(\mathbf{x},\mathbf{x'})], [K^*(\mathbf{x},\mathbf{x'}),
    K^*(\mathbf{x'},\mathbf{x'})]]`: :math:`K^*` is the fixed point of the layer map, found by
    :func:`deq_kernel.equilibrium_covariance` (with gradients by the implicit function theorem).

    The weight variance :math:`\sigma_w^2` (``weight_variance``), the input variances
    :math:`\sigma_{u,i}^2` (``input_variance``, one per dimension with ``ard_num_dims``) and the
    bias variance :math:`\sigma_b^2` (``bias_variance``) are hyperparameters. There is no output
    scale: wrap the kernel in :class:`gpytorch.kernels.ScaleKernel`, as with any other kernel.

    With ``kernel="ntk"`` the covariance is instead the neural tangent kernel of the same
    network with all of :math:`U, W, b, v` trained (Feng and Kolter, arXiv:2310.14062; derived in
    :mod:`deq_kernel.equilibrium.ntk`),

    .. math::
        \Theta(\mathbf{x}, \mathbf{x'}) = k_\text{DEQ}(\mathbf{x}, \mathbf{x'})
        + \frac{\dot E(\mathbf{x}, \mathbf{x'})}{1 - \sigma_w^2 \dot E(\mathbf{x}, \mathbf{x'})}
        K^*(\mathbf{x}, \mathbf{x'}),
        \qquad \dot E = \mathbb{E}[\phi'(u)\phi'(v)],

    the kernel of gradient-descent training of the infinitely wide DEQ. Both kernels are
    proportional to the output variance :math:`\sigma_v^2`, so both are computed with
    :math:`\sigma_v^2 = 1` and the ``ScaleKernel``'s ``outputscale`` is :math:`\sigma_v^2`.

    Parameters
    ----------
    activation : str, Activation or callable, default "relu"
        One of :data:`deq_kernel.ACTIVATIONS`, an :class:`~deq_kernel.Activation`, or a smooth
        elementwise torch function.
    kernel : {"nngp", "ntk"}, default "nngp"
        The Gaussian-process kernel of the randomly initialised network (``"nngp"``) or its
        neural tangent kernel (``"ntk"``; not for the ``"step"`` activation).
    ard_num_dims : int, optional
        Give each of this many input dimensions its own input variance.
    batch_shape : torch.Size, optional
        Give each batch of inputs its own hyperparameters.
    active_dims : sequence of int, optional
        Compute the covariance of these input dimensions only.
    weight_variance_prior, input_variance_prior, bias_variance_prior : gpytorch.priors.Prior, optional
        Priors on the (constrained) hyperparameters.
    weight_variance_constraint : gpytorch.constraints.Interval, optional
        Default: ``Interval(0, bound * (1 - 1e-2))`` with ``bound`` the activation's
        :attr:`~deq_kernel.Activation.weight_variance_bound` (``Positive()`` for an activation
        without one), so that no optimiser can leave the range where the equilibrium exists.
        A constraint that reaches the bound is refused.
    input_variance_constraint, bias_variance_constraint : gpytorch.constraints.Interval, optional
        Default: ``Positive()``.
    **activation_kwargs
        Activation options, e.g. ``negative_slope`` for ``"leaky_relu"``.

    Attributes
    ----------
    weight_variance : Tensor, shape ``(*batch_shape, 1)``
        Initially half the activation's bound (relu: 1), or 1 without a bound.
    input_variance : Tensor, shape ``(*batch_shape, 1, ard_num_dims or 1)``
        Initially 1.
    bias_variance : Tensor, shape ``(*batch_shape, 1)``
        Initially 0.1.
    activation : deq_kernel.Activation
        The activation with its dual.

    Raises
    ------
    ValueError
        From the setters, for a value outside the hyperparameter's constraint; from
        :meth:`forward`, for ``last_dim_is_batch=True``, inputs whose number of features does
        not match ``ard_num_dims``, or malformed inputs (as :func:`~deq_kernel.equilibrium_covariance`).

    Examples
    --------
    >>> import torch, gpytorch
    >>> from deq_kernel import DEQKernel
    >>> covar_module = gpytorch.kernels.ScaleKernel(DEQKernel("relu", ard_num_dims=3))
    >>> x = torch.randn(10, 3)
    >>> covar_module(x).shape
    torch.Size([10, 10])
    >>> covar_module.base_kernel.weight_variance = 1.5
    >>> covar_module.base_kernel.weight_variance
    tensor([1.5000], grad_fn=<AddBackward0>)
    """

    has_lengthscale = False

    def __init__(
        self,
        activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
        *,
        kernel: str = "nngp",
        ard_num_dims: int | None = None,
        batch_shape: torch.Size | None = None,
        active_dims: tuple[int, ...] | None = None,
        weight_variance_prior: Prior | None = None,
        weight_variance_constraint: Interval | None = None,
        input_variance_prior: Prior | None = None,
        input_variance_constraint: Interval | None = None,
        bias_variance_prior: Prior | None = None,
        bias_variance_constraint: Interval | None = None,
        **activation_kwargs: Any,
    ) -> None:
        if ard_num_dims is not None and (isinstance(ard_num_dims, bool) or not isinstance(ard_num_dims, int)):
            raise TypeError(f"ard_num_dims must be a positive integer or None, got {ard_num_dims!r}")
        if ard_num_dims is not None and ard_num_dims < 1:
            raise ValueError(f"ard_num_dims must be a positive integer or None, got {ard_num_dims!r}")
        super().__init__(ard_num_dims=ard_num_dims, batch_shape=batch_shape, active_dims=active_dims)
        if activation_kwargs:
            own = tuple(inspect.signature(DEQKernel.__init__).parameters)[1:-1]
            hints = {name: f"set it after construction: kernel.{name} = value" for name in _HYPERPARAMETERS}
            check_keywords(activation_kwargs, activation, where="DEQKernel", own=own, hints=hints)
        self._activation_spec = (activation, dict(activation_kwargs))
        self._activation = get_activation(activation, **activation_kwargs)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
        if kernel == "ntk":
            self._activation.derivative_activation()  # raises at once for an activation without an NTK
        self.kernel = kernel
        bound = self._activation.weight_variance_bound

        if weight_variance_constraint is None:
            if math.isfinite(bound):
                weight_variance_constraint = Interval(0.0, bound * (1.0 - WEIGHT_VARIANCE_MARGIN))
            else:
                weight_variance_constraint = Positive()
        _check_constraint(
            weight_variance_constraint, "weight_variance_constraint", upper=bound, name=self.activation.name
        )
        if input_variance_constraint is None:
            input_variance_constraint = Positive()
        _check_constraint(input_variance_constraint, "input_variance_constraint")
        if bias_variance_constraint is None:
            bias_variance_constraint = Positive()
        _check_constraint(bias_variance_constraint, "bias_variance_constraint")

        num_dims = 1 if ard_num_dims is None else ard_num_dims
        self.register_parameter("raw_weight_variance", torch.nn.Parameter(torch.zeros(*self.batch_shape, 1)))
        self.register_parameter("raw_input_variance", torch.nn.Parameter(torch.zeros(*self.batch_shape, 1, num_dims)))
        self.register_parameter("raw_bias_variance", torch.nn.Parameter(torch.zeros(*self.batch_shape, 1)))
        self.register_constraint("raw_weight_variance", weight_variance_constraint)
        self.register_constraint("raw_input_variance", input_variance_constraint)
        self.register_constraint("raw_bias_variance", bias_variance_constraint)
        for name, prior in (
            ("weight_variance", weight_variance_prior),
            ("input_variance", input_variance_prior),
            ("bias_variance", bias_variance_prior),
        ):
            if prior is not None:
                if not isinstance(prior, Prior):
                    raise TypeError(f"{name}_prior must be a gpytorch.priors.Prior, got {type(prior).__name__}")
                # Module-level functions (not lambdas) keep the kernel picklable.
                getter, setter = partial(_get_hyperparameter, name=name), partial(_set_hyperparameter, name=name)
                self.register_prior(f"{name}_prior", prior, getter, setter)

        self.weight_variance = self._activation.default_weight_variance
        self.input_variance = 1.0
        self.bias_variance = 0.1

    # ------------------------------------------------------------------ hyperparameters

    @property
    def activation(self) -> Activation:
        if self._activation is None:  # dropped for pickling (see __getstate__)
            activation, kwargs = self._activation_spec
            self._activation = get_activation(activation, **kwargs)
        return self._activation

    @property
    def weight_variance(self) -> Tensor:
        return self.raw_weight_variance_constraint.transform(self.raw_weight_variance)

    @weight_variance.setter
    def weight_variance(self, value: float | Tensor) -> None:
        self._set("weight_variance", value)

    @property
    def input_variance(self) -> Tensor:
        return self.raw_input_variance_constraint.transform(self.raw_input_variance)

    @input_variance.setter
    def input_variance(self, value: float | Tensor) -> None:
        self._set("input_variance", value)

    @property
    def bias_variance(self) -> Tensor:
        return self.raw_bias_variance_constraint.transform(self.raw_bias_variance)

    @bias_variance.setter
    def bias_variance(self, value: float | Tensor) -> None:
        self._set("bias_variance", value)

    def _set(self, name: str, value: float | Tensor) -> None:
        raw = getattr(self, f"raw_{name}")
        constraint = getattr(self, f"raw_{name}_constraint")
        value = torch.as_tensor(value, dtype=raw.dtype, device=raw.device)
        lower, upper = constraint.lower_bound.to(value), constraint.upper_bound.to(value)
        # The transforms reach neither end (sigmoid, softplus), so the range is open.
        if not bool(torch.all((value > lower) & (value < upper))):
            hint = ""
            if name == "weight_variance" and math.isfinite(self.activation.weight_variance_bound):
                hint = (
                    f" (activation {self.activation.name!r} has a well-posed equilibrium only for "
                    f"weight_variance < {self.activation.weight_variance_bound:.6g})"
                )
            raise ValueError(
                f"{name} must lie in the open interval ({float(lower.min()):.6g}, {float(upper.max()):.6g}) "
                f"of its constraint{hint}, got {_describe(value)}"
            )
        self.initialize(**{f"raw_{name}": constraint.inverse_transform(value)})

    @property
    def is_stationary(self) -> bool:
        return False

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self._activation_spec[1].items())
        tangent = "" if self.kernel == "nngp" else f", kernel={self.kernel!r}"
        ard = "" if self.ard_num_dims is None else f", ard_num_dims={self.ard_num_dims}"
        return f"activation={self.activation.name!r}{options}{tangent}{ard}"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__().copy()
        if isinstance(self._activation_spec[0], str):
            # Activations built from a name are rebuilt on demand: some hold local functions
            # that do not pickle.
            state["_activation"] = None
        return state

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing: list,
        unexpected: list,
        error_msgs: list[str],
    ) -> None:
        # A state saved from a kernel with another activation would bring that activation's
        # weight-variance constraint with it (an erf state made a relu kernel's bound 0.78):
        # the constraint's bounds must be this kernel's own.
        for end in ("lower_bound", "upper_bound"):
            key = f"{prefix}raw_weight_variance_constraint.{end}"
            own = getattr(self.raw_weight_variance_constraint, end)
            incoming = state_dict.get(key)
            if isinstance(incoming, Tensor) and incoming.shape == own.shape and not torch.equal(incoming.to(own), own):
                error_msgs.append(
                    f"{type(self).__name__}(activation={self.activation.name!r}) has a weight_variance constraint with "
                    f"{end.replace('_', ' ')} {float(own):.6g}, the saved state {float(incoming):.6g}: it was saved "
                    "from a kernel with another activation (or constraint); build the kernel as the saved one was"
                )
                # Nothing of it is loaded, this kernel's children (the constraints) included.
                for name in [k for k in state_dict if k.startswith(prefix)]:
                    del state_dict[name]
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)

    # ------------------------------------------------------------------ covariance

    def __call__(
        self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Any:
        if last_dim_is_batch:  # refused here, before GPyTorch defers the evaluation
            raise ValueError(_NO_LAST_DIM_IS_BATCH)
        self._check_batch(x1, x2)
        return super().__call__(x1, x2, diag=diag, **params)

    @property
    def batch_shape(self) -> torch.Size:
        """The kernel's batch shape. It holds no sub-kernels, so GPyTorch's search for them (a walk
        over every submodule on every read, several reads per call) is not needed."""
        return self._batch_shape

    @batch_shape.setter
    def batch_shape(self, value: torch.Size) -> None:
        self._batch_shape = value

    def _check_batch(self, x1: Any, x2: Any) -> None:
        """Inputs whose batch dimensions broadcast with :attr:`batch_shape` (BoTorch's commonest shape error)."""
        if not self._batch_shape:  # every batch shape broadcasts with ()
            return
        for name, x in (("x1", x1), ("x2", x2)):
            if isinstance(x, Tensor) and x.dim() >= 2:
                try:
                    torch.broadcast_shapes(x.shape[:-2], self.batch_shape)
                except RuntimeError:
                    raise ValueError(
                        f"DEQKernel has batch_shape={tuple(self.batch_shape)}, which the batch dimensions "
                        f"{tuple(x.shape[:-2])} of {name} (shape {tuple(x.shape)}) do not broadcast with; build "
                        "the kernel with the training data's batch shape"
                    ) from None

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor:
        w, iv, b = self._checked(x1, x2, last_dim_is_batch)
        # Parameters are (*batch, 1) and (*batch, 1, d); the core wants (*batch) and (*batch, d).
        return checked_covariance(
            self.activation,
            x1,
            None if _same_points(x1, x2) else x2,
            w.squeeze(-1),
            iv.squeeze(-2),
            b.squeeze(-1),
            diag=diag,
            output=self.kernel,
        )

    def _checked(self, x1: Tensor, x2: Tensor, last_dim_is_batch: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(weight_variance, input_variance, bias_variance)`` for :meth:`forward`, after its checks.

        ``last_dim_is_batch`` is refused, the inputs' batch dimensions must broadcast with
        :attr:`batch_shape`, an ARD kernel's inputs must have its ``ard_num_dims`` features,
        non-finite hyperparameters raise :class:`NonFiniteHyperparameterError`, and negative ones
        or a weight variance at the activation's bound the core's ``ValueError`` (a constraint of
        the user's own may allow them). :meth:`forward` then hands them to the core unchecked.
        """
        if last_dim_is_batch:
            raise ValueError(_NO_LAST_DIM_IS_BATCH)
        if self.ard_num_dims is not None and x1.shape[-1] != self.ard_num_dims:
            raise ValueError(
                f"{type(self).__name__} was built with ard_num_dims={self.ard_num_dims}, got inputs with "
                f"{x1.shape[-1]} features (after active_dims)"
            )
        self._check_batch(x1, x2)
        w, iv, b = self.weight_variance, self.input_variance, self.bias_variance
        # One synchronisation for every check; the messages are worked out only when one fails.
        values = torch.cat([t.detach().reshape(-1) for t in (w, iv, b)])
        fine = torch.isfinite(values).all() & (values >= 0).all()
        bound = self.activation.weight_variance_bound
        if math.isfinite(bound):
            fine = fine & (w.detach() < bound).all()
        if bool(fine):
            return w, iv, b
        if not all(bool(torch.isfinite(t).all()) for t in (w, iv, b)):
            raise NonFiniteHyperparameterError(
                f"{type(self).__name__}'s hyperparameters must be finite: weight_variance={_describe(w.detach())}, "
                f"input_variance={_describe(iv.detach())}, bias_variance={_describe(b.detach())} "
                "(an optimiser step left the range; fitting routines such as BoTorch's fit_gpytorch_mll catch this "
                "error and retry)"
            )
        check_hypers(weight_variance=w, input_variance=iv, bias_variance=b)
        self.activation.check_weight_variance(w)
        raise AssertionError("unreachable: a check above failed")  # pragma: no cover


class ConvDEQKernel(DEQKernel):
    r"""The kernel of an infinitely wide convolutional DEQ (flatten readout), for GPyTorch.

    The model and its limit are those of :func:`deq_kernel.conv_equilibrium_covariance`:
    :math:`h^* = \phi(W \ast h^* + U \ast x + b)` with ``kernel_size x kernel_size``
    convolutions and a linear readout of every channel at every pixel. Inputs are images as
    flat rows, ``(..., n, C*H*W)`` (``images.reshape(n, -1)``), of shape ``image_shape``. The
    hyperparameters are :class:`DEQKernel`'s, with one input variance (no ARD) and no output
    scale (wrap it in :class:`gpytorch.kernels.ScaleKernel`); batches of inputs or of
    hyperparameters are computed entry by entry.

    Parameters
    ----------
    activation : str, Activation or callable, default "relu"
        As for :class:`DEQKernel`.
    image_shape : (C, H, W) or (H, W)
        The shape of one image; ``(H, W)`` means one channel.
    kernel_size : int, default 3
        The convolutions' size, odd and positive.
    readout : {"flatten", "gap"}, default "flatten"
    **kwargs
        :class:`DEQKernel`'s other arguments (``kernel``: ``"nngp"`` or ``"ntk"``,
        ``batch_shape``, ``active_dims``, priors, constraints, activation options);
        ``ard_num_dims`` must be ``None``.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from deq_kernel.gpytorch import ConvDEQKernel
    >>> covar_module = gpytorch.kernels.ScaleKernel(ConvDEQKernel("relu", image_shape=(4, 4)))
    >>> x = torch.rand(6, 16, dtype=torch.float64)
    >>> covar_module.double()(x).shape
    torch.Size([6, 6])
    """

    def __init__(
        self,
        activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
        *,
        image_shape: tuple[int, ...],
        kernel_size: int = 3,
        readout: str = "flatten",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("ard_num_dims") is not None:
            raise ValueError("ConvDEQKernel has one input variance; ard_num_dims must be None")
        if image_shape is None:
            raise ValueError("ConvDEQKernel needs image_shape=(C, H, W) or (H, W): its inputs are images as flat rows")
        super().__init__(activation, **kwargs)
        self.image_shape, self.kernel_size, self.readout = check_conv_options(image_shape, kernel_size, readout)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, image_shape={self.image_shape}, kernel_size={self.kernel_size}, "
            f"readout={self.readout!r}"
        )

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor:
        w, iv, b = self._checked(x1, x2, last_dim_is_batch)
        same = _same_points(x1, x2)
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
        options = dict(
            image_shape=self.image_shape,
            kernel_size=self.kernel_size,
            readout=self.readout,
            diag=diag,
            output=self.kernel,
        )
        if not batch:
            return conv_equilibrium_covariance(
                x1,
                None if same else x2,
                activation=self.activation,
                weight_variance=w.reshape(()),
                input_variance=iv.reshape(()),
                bias_variance=b.reshape(()),
                **options,
            )
        entries = []
        x1s, x2s = x1.expand(*batch, *x1.shape[-2:]), x2.expand(*batch, *x2.shape[-2:])
        ws, ivs, bs = w.expand(*batch, 1), iv.expand(*batch, 1, 1), b.expand(*batch, 1)
        for index in itertools.product(*(range(size) for size in batch)):
            entries.append(
                conv_equilibrium_covariance(
                    x1s[index],
                    None if same else x2s[index],
                    activation=self.activation,
                    weight_variance=ws[index].reshape(()),
                    input_variance=ivs[index].reshape(()),
                    bias_variance=bs[index].reshape(()),
                    **options,
                )
            )
        return torch.stack(entries).reshape(*batch, *entries[0].shape)


class NonFiniteHyperparameterError(ValueError, NotPSDError):
    """A kernel hyperparameter is NaN or infinite (typically after a failed optimiser step).

    A ``ValueError`` (the kernel cannot be evaluated at these arguments) and linear_operator's
    ``NotPSDError``, the numerical failure that GPyTorch's and BoTorch's fitting routines
    (``fit_gpytorch_mll``, :func:`fit_exact_gp`) catch: they retry or back off instead of
    stopping the whole optimisation loop.
    """


#: DEQKernel's hyperparameters (attributes, not constructor arguments).
_HYPERPARAMETERS = ("weight_variance", "input_variance", "bias_variance")

_NO_LAST_DIM_IS_BATCH = (
    "DEQKernel does not support last_dim_is_batch=True: the equilibrium couples all input "
    "dimensions, so they cannot be treated as independent batches"
)


def _same_points(x1: Tensor, x2: Tensor) -> bool:
    """Whether ``K(x1, x2)`` may be computed as the symmetric ``K(x1)``.

    The symmetric path is exactly symmetric and positive semi-definite and costs half. Equal
    values suffice unless gradients are wanted: then ``x1`` and ``x2`` must be the same memory
    (as the slices of one tensor that GPyTorch's lazy kernel evaluation passes), since the
    symmetric path sends the gradient of both arguments to ``x1``.
    """
    if x1 is x2:
        return True
    if x1.shape != x2.shape or x1.dtype != x2.dtype or x1.device != x2.device:
        return False
    if x1.requires_grad or x2.requires_grad:
        same_memory = x1.data_ptr() == x2.data_ptr() and x1.stride() == x2.stride()
        if not (same_memory and x1.requires_grad and x2.requires_grad):
            return False
    return torch.equal(x1, x2)


def _check_constraint(constraint: Any, argument: str, upper: float = math.inf, name: str = "") -> None:
    if not isinstance(constraint, Interval):
        raise TypeError(f"{argument} must be a gpytorch.constraints.Interval, got {type(constraint).__name__}")
    if bool((constraint.lower_bound < 0).any()):
        raise ValueError(f"{argument} must not allow negative values, got lower bound {constraint.lower_bound}")
    if math.isfinite(upper) and not bool((constraint.upper_bound < upper).all()):
        raise ValueError(
            f"{argument} must keep weight_variance below {upper:.6g}, the bound of activation {name!r} "
            f"(the equilibrium map is a contraction only below it), got upper bound {constraint.upper_bound}"
        )


def _get_hyperparameter(module: DEQKernel, *, name: str) -> Tensor:
    return getattr(module, name)


def _set_hyperparameter(module: DEQKernel, value: Tensor, *, name: str) -> None:
    module._set(name, value)


def _describe(value: Tensor) -> str:
    return (
        repr(float(value)) if value.numel() == 1 else f"values in [{float(value.min()):.6g}, {float(value.max()):.6g}]"
    )


# --------------------------------------------------------------------------- exact GP


class ExactGPModel(gpytorch.models.ExactGP):
    r"""Exact GP with a constant mean and, by default, ``ScaleKernel(DEQKernel(...))``.

    Parameters
    ----------
    train_inputs : Tensor, shape ``(n, d)``
    train_targets : Tensor, shape ``(*batch_shape, n)``
    likelihood : gpytorch.likelihoods.Likelihood
        E.g. ``GaussianLikelihood()`` for regression or ``DirichletClassificationLikelihood``
        for classification (then ``batch_shape`` is ``(num_classes,)``).
    covar_module : gpytorch.kernels.Kernel, optional
        Default: ``ScaleKernel(DEQKernel(activation, ard_num_dims=..., **activation_kwargs),
        batch_shape=batch_shape)``. The DEQ kernel's hyperparameters are shared across the
        batch (one kernel matrix), the output scale is one per batch entry.
    mean_module : gpytorch.means.Mean, optional
        Default: ``ConstantMean(batch_shape=batch_shape)``.
    activation : str, default "relu"
        Activation of the default DEQ kernel.
    kernel : {"nngp", "ntk"}, default "nngp"
        The default DEQ kernel's ``kernel`` (see :class:`DEQKernel`).
    ard : bool, default False
        Give the default DEQ kernel one input variance per input dimension.
    batch_shape : torch.Size, default ``torch.Size()``
        Batch shape of the mean and output scale.
    **activation_kwargs
        Options of the default DEQ kernel's activation.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from deq_kernel.gpytorch import ExactGPModel, fit_exact_gp
    >>> x = torch.linspace(-1, 1, 30, dtype=torch.float64).unsqueeze(-1)
    >>> y = torch.sin(3 * x).squeeze(-1)
    >>> model = ExactGPModel(x, y, gpytorch.likelihoods.GaussianLikelihood()).double()
    >>> result = fit_exact_gp(model, max_iter=50)
    >>> result.log_marginal_likelihood > 0
    True
    """

    def __init__(
        self,
        train_inputs: Tensor,
        train_targets: Tensor,
        likelihood: Likelihood,
        *,
        covar_module: Kernel | None = None,
        mean_module: Mean | None = None,
        activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
        kernel: str = "nngp",
        ard: bool = False,
        batch_shape: torch.Size = torch.Size(),  # noqa: B008 - immutable
        **activation_kwargs: Any,
    ) -> None:
        super().__init__(train_inputs, train_targets, likelihood)
        batch_shape = torch.Size(batch_shape)
        if covar_module is None:
            ard_num_dims = train_inputs.shape[-1] if ard else None
            base = DEQKernel(activation, kernel=kernel, ard_num_dims=ard_num_dims, **activation_kwargs)
            covar_module = ScaleKernel(base, batch_shape=batch_shape)
        self.covar_module = covar_module
        self.mean_module = ConstantMean(batch_shape=batch_shape) if mean_module is None else mean_module

    def forward(self, x: Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


class ExactPosterior:
    r"""The exact posterior of a conditioned :class:`gpytorch.models.ExactGP`, by one Cholesky factorisation.

    Built once from the model's training data, likelihood and hyperparameters, it answers
    every later prediction with a cross-covariance, a triangular solve and the model's own
    kernel: exact at any number of training points (memory permitting), with no
    dependence on GPyTorch's process-wide settings (``max_cholesky_size``, the conjugate-gradient
    tolerances) and no warnings filtered, so predictions from several threads equal the
    serial ones. Training covariance :math:`A = K + \Sigma` (the likelihood's noise), factor
    :math:`A = LL^\top`, :math:`\alpha = A^{-1}(y - m)`; at test inputs, mean
    :math:`m_* + K_{*x}\alpha` and covariance :math:`K_{**} - V^\top V`, :math:`V = L^{-1}K_{x*}`.

    Parameters
    ----------
    model : gpytorch.models.ExactGP
        With ``model.forward(x)`` the prior and ``model.likelihood(prior)`` its marginal at the
        training inputs (e.g. :class:`ExactGPModel` with a Gaussian or Dirichlet likelihood);
        batched models give batched predictions.
    """

    #: Test points handled at once (a block of the cross-covariance is ``block x n``).
    BLOCK = 4096

    def __init__(self, model: gpytorch.models.ExactGP) -> None:
        self.model = model
        x = model.train_inputs[0]
        with torch.no_grad():
            prior = model.forward(x)
            marginal = model.likelihood(prior)
            self.chol = psd_safe_cholesky(marginal.covariance_matrix)
            residual = (model.train_targets - marginal.mean).unsqueeze(-1)
            self.alpha = torch.cholesky_solve(residual, self.chol)

    def predict(self, x: Tensor, *, want: str = "var", noise: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """``(mean, variance)`` (``want="var"``) or ``(mean, covariance)`` (``want="cov"``) at ``x``.

        The latent function's, plus ``noise`` (a variance added to the diagonal) where given.
        """
        if want not in ("var", "cov"):
            raise ValueError(f"want must be 'var' or 'cov', got {want!r}")
        covar = self.model.covar_module
        with torch.no_grad():
            if want == "cov":
                mean, v = self._conditioned(x)
                cov = covar(x).to_dense() - v.mT @ v
                if noise is not None:
                    cov = cov + torch.diag_embed(torch.as_tensor(noise, dtype=cov.dtype).expand(cov.shape[:-1]))
                return mean, cov
            means, variances = [], []
            for start in range(0, x.shape[-2], self.BLOCK):
                xb = x[..., start : start + self.BLOCK, :]
                mean, v = self._conditioned(xb)
                means.append(mean)
                variances.append((covar(xb, diag=True) - (v * v).sum(-2)).clamp_min(0.0))
            mean, var = torch.cat(means, -1), torch.cat(variances, -1)
            return mean, var if noise is None else var + noise

    def _conditioned(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior mean at ``x`` and ``V = L^{-1} K_{x*}``, from which its covariance follows."""
        model = self.model
        cross = model.covar_module(x, model.train_inputs[0]).to_dense()
        v = torch.linalg.solve_triangular(self.chol, cross.mT, upper=False)
        return model.mean_module(x) + (cross @ self.alpha).squeeze(-1), v


class _GaussianLogDensity(torch.autograd.Function):
    r"""``log N(r; 0, A)`` for a batch of dense covariances, with the closed-form gradient.

    :math:`\partial/\partial A = (\alpha\alpha^\top - A^{-1})/2` and :math:`\partial/\partial r = -\alpha`,
    :math:`\alpha = A^{-1} r` (Rasmussen and Williams, 2006, eq. 5.9): one Cholesky factorisation
    and one inverse from it, where back-propagating through the factorisation costs several
    times as much.
    """

    @staticmethod
    def forward(ctx: Any, covariance: Tensor, residual: Tensor) -> Tensor:
        chol = psd_safe_cholesky(covariance)
        alpha = torch.cholesky_solve(residual.unsqueeze(-1), chol).squeeze(-1)
        half_logdet = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        n = residual.shape[-1]
        ctx.save_for_backward(chol, alpha)
        return -0.5 * (residual * alpha).sum(-1) - half_logdet - 0.5 * n * math.log(2.0 * math.pi)

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        chol, alpha = ctx.saved_tensors
        grad_cov = grad_res = None
        if ctx.needs_input_grad[0]:
            outer = alpha.unsqueeze(-1) * alpha.unsqueeze(-2)
            grad_cov = (0.5 * grad)[..., None, None] * (outer - torch.cholesky_inverse(chol))
        if ctx.needs_input_grad[1]:
            grad_res = -grad.unsqueeze(-1) * alpha
        return grad_cov, grad_res


class CholeskyMarginalLogLikelihood(gpytorch.mlls.ExactMarginalLogLikelihood):
    r"""The exact marginal log likelihood by a dense Cholesky factorisation, with a closed-form gradient.

    Same value as :class:`gpytorch.mlls.ExactMarginalLogLikelihood` (divided by the number of
    data points, priors and added loss terms included), computed with
    :math:`\log N(y; \mu, A)` and its gradient :math:`(\alpha\alpha^\top - A^{-1})/2` in the
    covariance :math:`A`, :math:`\alpha = A^{-1}(y - \mu)`: deterministic, and on CPU a few times
    faster than back-propagating through the factorisation. For models of up to a few
    thousand points (``n^2`` memory).
    """

    def forward(self, function_dist: MultivariateNormal, target: Tensor, *params: Any, **kwargs: Any) -> Tensor:
        if not isinstance(function_dist, MultivariateNormal):
            raise TypeError("CholeskyMarginalLogLikelihood needs a MultivariateNormal (the output of an ExactGP)")
        output = self.likelihood(function_dist, *params, **kwargs)
        covariance = output.lazy_covariance_matrix.to_dense()
        res = _GaussianLogDensity.apply(covariance, target - output.mean)
        res = self._add_other_terms(res, params)
        return res.div_(function_dist.event_shape.numel())


@dataclass
class FitResult:
    """What :func:`fit_exact_gp` did.

    Attributes
    ----------
    log_marginal_likelihood : float
        Log marginal likelihood of the training targets at the returned hyperparameters, in
        nats (summed over the data and any batch; log priors included where there are priors).
    n_iter : int
        Optimiser iterations taken.
    n_evaluations : int
        Evaluations of the marginal likelihood and its gradient.
    converged : bool
        Whether the stopping rule was met before ``max_iter`` (False also when the
        optimisation stopped on a numerical failure; the best point seen is kept).
    history : list of float
        The log marginal likelihood at each evaluation (left out of the repr).
    hyperparameters : dict of str to float or list
        The fitted values by name, constrained (``covar_module.base_kernel.weight_variance``,
        ``likelihood.noise_covar.noise``, ...), as :func:`fit_exact_gp` leaves the model.
    """

    log_marginal_likelihood: float
    n_iter: int
    n_evaluations: int
    converged: bool
    history: list[float] = field(repr=False)
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={_rounded(value)}" for name, value in self.hyperparameters.items())
        return (
            f"FitResult(log_marginal_likelihood={self.log_marginal_likelihood:.6g}, n_iter={self.n_iter}, "
            f"n_evaluations={self.n_evaluations}, converged={self.converged}, hyperparameters={{{values}}})"
        )


def _rounded(value: Any) -> str:
    """A hyperparameter's value, or list of values, to four significant digits."""
    if isinstance(value, list):
        return "[" + ", ".join(_rounded(v) for v in value) + "]"
    return f"{value:.4g}"


def fitted_values(model: torch.nn.Module) -> dict[str, Any]:
    """Every parameter of ``model`` that requires a gradient, by name without ``raw_``, constrained."""
    out: dict[str, Any] = {}
    for name, parameter, constraint in model.named_parameters_and_constraints():
        if not parameter.requires_grad:
            continue
        value = parameter if constraint is None else constraint.transform(parameter)
        flat = value.detach().cpu().reshape(-1).tolist()
        head, _, last = name.rpartition(".")
        last = last.removeprefix("raw_")
        out[f"{head}.{last}" if head else last] = flat[0] if len(flat) == 1 else flat
    return out


#: Errors that make a point's marginal likelihood unavailable (read as +inf during fitting).
_NUMERICAL_ERRORS = (NotPSDError, ConvergenceError, torch.linalg.LinAlgError)
#: Failed evaluations after which fitting stops, keeping the best point seen.
_MAX_FAILURES = 20


def fit_exact_gp(
    model: gpytorch.models.ExactGP,
    *,
    optimizer: str = "lbfgs",
    max_iter: int = 100,
    learning_rate: float | None = None,
    tol: float = 1e-6,
    patience: int = 10,
    max_cholesky_size: int | None = 10_000,
) -> FitResult:
    r"""Fit an exact GP's hyperparameters by maximising the marginal likelihood (type-II ML).

    Maximises :class:`gpytorch.mlls.ExactMarginalLogLikelihood` over every parameter of
    ``model`` (and its likelihood) that requires a gradient, in place, and leaves the model in
    evaluation mode at the best point seen.

    Parameters
    ----------
    model : gpytorch.models.ExactGP
        With ``model.likelihood`` set; batched models (e.g. one GP per class) are fitted
        jointly, their marginal likelihoods summed.
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
        ``"lbfgs"``: :class:`torch.optim.LBFGS` with a strong-Wolfe line search (deterministic,
        few evaluations; stops when the change of the objective or the gradient is below
        ``tol``). ``"adam"``: :class:`torch.optim.Adam`, stopped early when the objective has
        not improved by ``tol`` (relative) for ``patience`` steps.
    max_iter : int, default 100
        Largest number of optimiser iterations.
    learning_rate : float, optional
        Default: 1 for L-BFGS, 0.1 for Adam.
    tol : float, default 1e-6
        Tolerance of the stopping rule, relative to the objective per data point.
    patience : int, default 10
        Adam steps without improvement before stopping.
    max_cholesky_size : int or None, default 10000
        Up to this many training points the objective is
        :class:`CholeskyMarginalLogLikelihood` (exact, deterministic); above it, or with
        ``None``, :class:`gpytorch.mlls.ExactMarginalLogLikelihood` under GPyTorch's settings
        as the caller has them (stochastic conjugate gradients above 800 points by default).
        No GPyTorch setting is changed (they are process-wide).

    Returns
    -------
    FitResult
    """
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    max_iter = positive_int("max_iter", max_iter)
    patience = positive_int("patience", patience)
    tol = _real(tol, "tol", minimum=0.0)
    if learning_rate is None:
        learning_rate = 1.0 if optimizer == "lbfgs" else 0.1
    learning_rate = _real(learning_rate, "learning_rate")
    if max_cholesky_size is not None and not (isinstance(max_cholesky_size, numbers.Real) and max_cholesky_size >= 0):
        raise ValueError(f"max_cholesky_size must be a non-negative number or None, got {max_cholesky_size!r}")

    likelihood = model.likelihood
    num_data = model.train_targets.shape[-1]
    dense = max_cholesky_size is not None and num_data <= max_cholesky_size
    mll = (CholeskyMarginalLogLikelihood if dense else gpytorch.mlls.ExactMarginalLogLikelihood)(likelihood, model)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = model.train_inputs
    targets = model.train_targets
    history: list[float] = []
    best = {"loss": math.inf, "state": copy.deepcopy(model.state_dict())}

    def objective() -> Tensor:
        output = model(*inputs)
        return -mll(output, targets).sum()  # per data point, summed over any batch

    failures = 0

    def closure() -> Tensor:
        # A point where the marginal likelihood cannot be evaluated (the covariance is not
        # positive definite, a solve fails) reads as +inf with a zero gradient: L-BFGS's line
        # search then backs off (it bisects), and Adam moves on; the best point is kept.
        nonlocal failures
        opt.zero_grad()
        try:
            loss = objective()
            value = loss.item()
            if math.isfinite(value):
                loss.backward()
                # A non-finite gradient would send the optimiser to NaN parameters.
                if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
                    value = math.inf
        except _NUMERICAL_ERRORS:
            value = math.inf
        if not math.isfinite(value):
            failures += 1
            if failures > _MAX_FAILURES:
                raise _NonFinite
            for p in params:
                p.grad = torch.zeros_like(p)
            return torch.tensor(math.inf)
        history.append(-value * num_data)
        if value < best["loss"]:
            best["loss"] = value
            best["state"] = copy.deepcopy(model.state_dict())
        return loss.detach()

    model.train()
    likelihood.train()
    converged = False
    n_iter = 0
    # No GPyTorch setting is changed here: they are process-wide, and another thread's model
    # would see them. The Cholesky objective needs none; ExactMarginalLogLikelihood runs under
    # the settings the caller has chosen.
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            params,
            lr=learning_rate,
            max_iter=max_iter,
            max_eval=max(2 * max_iter, max_iter + 20),
            tolerance_grad=tol,
            tolerance_change=tol,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        try:
            opt.step(closure)
        except _NonFinite as exc:
            _warn_stopped(exc)
        state = opt.state[params[0]] if params else {}
        n_iter = int(state.get("n_iter", 0))
        # Below max_iter and below the evaluation budget: L-BFGS stopped on its tolerances.
        converged = 0 < n_iter < max_iter and int(state.get("func_evals", 0)) < opt.defaults["max_eval"]
    else:
        opt = torch.optim.Adam(params, lr=learning_rate)
        stale, reference = 0, math.inf
        for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
            before = failures
            try:
                opt.step(closure)
            except _NonFinite as exc:
                _warn_stopped(exc)
                break
            if failures > before:  # a failed step says nothing about convergence
                continue
            if not math.isfinite(reference) or best["loss"] < reference - tol * max(1.0, abs(reference)):
                reference, stale = best["loss"], 0
            else:
                stale += 1
            if stale >= patience:
                converged = True
                break
    model.load_state_dict(best["state"])
    model.eval()
    likelihood.eval()
    if not math.isfinite(best["loss"]):
        raise RuntimeError("fitting failed: the marginal likelihood could not be evaluated at the initial point")
    return FitResult(
        log_marginal_likelihood=-best["loss"] * num_data,
        n_iter=max(n_iter, 1),
        n_evaluations=len(history),
        converged=converged,
        history=history,
        hyperparameters=fitted_values(model),
    )


def _real(value: Any, name: str, minimum: float | None = None) -> float:
    """``value`` as a float: a finite real number above 0 (``minimum`` None) or at least ``minimum``."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (value > 0 if minimum is None else value >= minimum)
    if not ok:
        raise ValueError(f"{name} must be a {'positive' if minimum is None else 'non-negative'} number, got {value!r}")
    return float(value)


class FitWarning(UserWarning):
    """Marginal-likelihood fitting stopped early on a numerical failure."""


class _NonFinite(ArithmeticError):
    """The marginal likelihood evaluated to NaN or infinity."""


def _warn_stopped(exc: BaseException) -> None:
    warnings.warn(
        f"marginal-likelihood optimisation stopped after {_MAX_FAILURES} points where the marginal likelihood "
        "could not be evaluated (covariance not positive definite, or a failed solve); keeping the best point seen",
        FitWarning,
        stacklevel=3,
    )
