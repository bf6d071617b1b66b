r"""scikit-learn: the :class:`DEQ` kernel, and the :class:`DEQGPRegressor` and :class:`DEQGPClassifier` estimators.

Two ways in, as scikit-learn users already know them:

* :class:`DEQ` is a :class:`sklearn.gaussian_process.kernels.Kernel`, for
  :class:`~sklearn.gaussian_process.GaussianProcessRegressor` and
  :class:`~sklearn.gaussian_process.GaussianProcessClassifier`, composable with
  ``ConstantKernel``, ``WhiteKernel``, sums and products;
* :class:`DEQGPRegressor` and :class:`DEQGPClassifier` are estimators backed by the
  GPyTorch model of :mod:`deq_kernel.gpytorch` (exact inference, hyperparameters fitted by
  marginal likelihood), for pipelines, grid searches and cross-validation.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from gpytorch.kernels import ScaleKernel
from gpytorch.likelihoods import (
    BernoulliLikelihood,
    DirichletClassificationLikelihood,
    GaussianLikelihood,
    SoftmaxLikelihood,
)
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.gaussian_process.kernels import ConstantKernel, Hyperparameter, Kernel, WhiteKernel
from sklearn.utils import check_random_state, resample
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from . import settings
from .activations import Activation, get_activation
from .convolutional import check_conv_options, conv_equilibrium_covariance
from .equilibrium.conv import conv_kernel_tangents
from .functional import equilibrium_covariance
from .gpytorch import (
    KERNELS,
    WEIGHT_VARIANCE_MARGIN,
    CholeskyMarginalLogLikelihood,
    ConvDEQKernel,
    DEQKernel,
    ExactGPModel,
    ExactPosterior,
    FitResult,
    FitWarning,
    _GaussianLogDensity,
    fit_exact_gp,
)
from .variational import SVGPModel, fit_svgp, predict_latent

__all__ = ["DEQ", "ConvDEQ", "DEQGPClassifier", "DEQGPRegressor"]

#: Pairs handled at once when the kernel's gradient is assembled pair by pair: by the dense
#: solver (a few arrays of the pairs) and by the others (which hold more per pair).
_DENSE_CHUNK, _PAIR_CHUNK = 1 << 16, 1 << 14

#: Default bounds of the input and bias variances, and the lower bound of the weight variance.
_DEFAULT_BOUNDS = (1e-5, 1e5)


class DEQ(Kernel):
    r"""The kernel of an infinitely wide deep equilibrium model, for scikit-learn.

    A deep equilibrium model maps :math:`x \in \mathbb{R}^d` to the fixed point
    :math:`h^* = \phi(W h^* + U x + b)` and outputs :math:`f = v \cdot h^*`; at infinite width
    :math:`f` is a Gaussian process (Gao, Huo, Liu and Gao, *Wide Neural Networks as Gaussian
    Processes: Lessons from Deep Equilibrium Models*, NeurIPS 2023, arXiv:2310.10767) with

    .. math::
        s(x, x') &= \frac{1}{d} \sum_{i=1}^d \sigma_{u,i}^2 x_i x'_i + \sigma_b^2, \\
        K^*(x, x') &= \sigma_w^2\, E[\phi(u)\phi(v)] + s(x, x'), \\
        k(x, x') &= E[\phi(u)\phi(v)],

    :math:`(u, v)` centred Gaussian with covariance
    :math:`[[K^*(x,x), K^*(x,x')], [K^*(x,x'), K^*(x',x')]]`. The fixed point :math:`K^*` is found
    by :func:`deq_kernel.equilibrium_covariance`. Multiply by a
    :class:`~sklearn.gaussian_process.kernels.ConstantKernel` for an output variance.

    With ``kernel="ntk"`` it is instead the neural tangent kernel of the same network with all
    of :math:`U, W, b, v` trained (Feng and Kolter, arXiv:2310.14062; see :mod:`deq_kernel.equilibrium.ntk`),
    :math:`\Theta = k + \dot E\, K^* / (1 - \sigma_w^2 \dot E)` with
    :math:`\dot E = E[\phi'(u)\phi'(v)]`: the kernel of gradient-descent training. It too is
    proportional to the output variance, which the ``ConstantKernel`` then holds.

    Parameters
    ----------
    activation : str, default "relu"
        One of :data:`deq_kernel.ACTIVATIONS` (or an :class:`~deq_kernel.Activation` or callable,
        which must then be picklable for the kernel to be).
    weight_variance : float, optional
        :math:`\sigma_w^2`, below the activation's bound (relu 2, tanh 1, erf pi/4, ...).
        Default: half the bound, or 1 without one (relu 1, tanh 0.5), as everywhere in the
        library (:attr:`deq_kernel.Activation.default_weight_variance`).
    input_variance : float or array-like of shape (n_features,), default 1.0
        :math:`\sigma_u^2`; an array gives one variance per feature (anisotropic, ARD).
    bias_variance : float, default 0.1
        :math:`\sigma_b^2`.
    weight_variance_bounds : pair of floats, "fixed" or "auto", default "auto"
        ``"auto"``: ``(1e-5, bound * (1 - 1e-2))``, ``bound`` the activation's
        ``weight_variance_bound`` (``(1e-5, 1e5)`` without one). An upper bound at or past the
        activation's bound is refused.
    input_variance_bounds, bias_variance_bounds : pair of floats or "fixed", default (1e-5, 1e5)
    activation_kwargs : dict, optional
        Activation options, e.g. ``{"negative_slope": 0.1}`` for ``"leaky_relu"``.
    kernel : {"nngp", "ntk"}, default "nngp"
        The network's Gaussian-process kernel or its neural tangent kernel (not for ``"step"``).

    Notes
    -----
    The gradient with respect to the log-hyperparameters is exact: it comes from the implicit
    gradients of :func:`deq_kernel.equilibrium_covariance` through torch autograd.

    Examples
    --------
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn.gaussian_process import GaussianProcessRegressor
    >>> from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel
    >>> from deq_kernel.sklearn import DEQ
    >>> X, y = load_diabetes(return_X_y=True)
    >>> kernel = ConstantKernel() * DEQ(input_variance=100.0) + WhiteKernel()
    >>> gpr = GaussianProcessRegressor(kernel, normalize_y=True).fit(X[:100], y[:100])
    >>> K, K_gradient = DEQ()(X[:5], eval_gradient=True)
    >>> K.shape, K_gradient.shape
    ((5, 5), (5, 5, 3))
    """

    def __init__(
        self,
        activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
        weight_variance: float | None = None,
        input_variance: float | np.ndarray = 1.0,
        bias_variance: float = 0.1,
        weight_variance_bounds: tuple[float, float] | str = "auto",
        input_variance_bounds: tuple[float, float] | str = _DEFAULT_BOUNDS,
        bias_variance_bounds: tuple[float, float] | str = _DEFAULT_BOUNDS,
        activation_kwargs: dict[str, Any] | None = None,
        kernel: str = "nngp",
    ) -> None:
        self.activation = activation
        self.weight_variance = weight_variance
        self.input_variance = input_variance
        self.bias_variance = bias_variance
        self.weight_variance_bounds = weight_variance_bounds
        self.input_variance_bounds = input_variance_bounds
        self.bias_variance_bounds = bias_variance_bounds
        self.activation_kwargs = activation_kwargs
        self.kernel = kernel

    # ------------------------------------------------------------------ hyperparameters

    def _activation(self) -> Activation:
        return get_activation(self.activation, **(self.activation_kwargs or {}))

    def _output(self) -> str:
        """The core's ``output`` for :attr:`kernel`."""
        if isinstance(self.kernel, str) and self.kernel in KERNELS:
            return self.kernel
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {self.kernel!r}")

    def _weight_variance(self) -> float:
        """``weight_variance``, its default (``None``) read as the activation's."""
        if self.weight_variance is None:
            return self._activation().default_weight_variance
        return float(self.weight_variance)

    def _theta(self) -> np.ndarray:
        # Kernel.theta, with weight_variance=None read as its value.
        params = self.get_params()
        params["weight_variance"] = self._weight_variance()
        theta = [params[h.name] for h in self.hyperparameters if not h.fixed]
        return np.log(np.hstack(theta)) if theta else np.array([])

    theta = Kernel.theta.getter(_theta)

    @property
    def anisotropic(self) -> bool:
        return np.iterable(self.input_variance) and len(self.input_variance) > 1

    @property
    def hyperparameter_weight_variance(self) -> Hyperparameter:
        bounds = self.weight_variance_bounds
        limit = self._activation().weight_variance_bound
        if isinstance(bounds, str) and bounds == "auto":
            upper = limit * (1.0 - WEIGHT_VARIANCE_MARGIN) if math.isfinite(limit) else _DEFAULT_BOUNDS[1]
            bounds = (_DEFAULT_BOUNDS[0], upper)
        elif not isinstance(bounds, str) and math.isfinite(limit) and not float(np.max(bounds)) < limit:
            raise ValueError(
                f"weight_variance_bounds must stay below {limit:.6g}, the bound of activation "
                f"{self._activation().name!r} (the equilibrium exists only below it), got {bounds!r}"
            )
        return Hyperparameter("weight_variance", "numeric", bounds)

    @property
    def hyperparameter_input_variance(self) -> Hyperparameter:
        if self.anisotropic:
            return Hyperparameter("input_variance", "numeric", self.input_variance_bounds, len(self.input_variance))
        return Hyperparameter("input_variance", "numeric", self.input_variance_bounds)

    @property
    def hyperparameter_bias_variance(self) -> Hyperparameter:
        return Hyperparameter("bias_variance", "numeric", self.bias_variance_bounds)

    # ------------------------------------------------------------------ evaluation

    def __call__(
        self, X: np.ndarray, Y: np.ndarray | None = None, eval_gradient: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Return the kernel ``k(X, Y)`` and, optionally, its gradient.

        Parameters
        ----------
        X : ndarray of shape (n_samples_X, n_features)
        Y : ndarray of shape (n_samples_Y, n_features), optional
            Default: ``X``.
        eval_gradient : bool, default False
            Also return the gradient with respect to the log of the non-fixed
            hyperparameters, in the order of :attr:`theta`. Only with ``Y=None``.

        Returns
        -------
        K : ndarray of shape (n_samples_X, n_samples_Y)
        K_gradient : ndarray of shape (n_samples_X, n_samples_X, n_dims)
            Only with ``eval_gradient=True``.
        """
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        x = torch.from_numpy(np.ascontiguousarray(X))
        if eval_gradient and Y is not None:
            raise ValueError("Gradient can only be evaluated when Y is None.")
        hypers = self._hyperparameter_tensors(x.shape[-1])
        if not eval_gradient:
            y = None if Y is None else torch.from_numpy(np.ascontiguousarray(np.atleast_2d(np.asarray(Y, np.float64))))
            with torch.no_grad():
                return self._covariance(x, y, **hypers).numpy()
        # theta's order is that of self.hyperparameters (alphabetical): bias, input, weight.
        free = [h.name for h in self.hyperparameters if not h.fixed]
        K, jacobian = self._jacobian(x, hypers, free)
        # d K / d log(theta) = theta * d K / d theta
        scale = torch.cat([hypers[name].detach().reshape(-1) for name in free]) if free else torch.zeros(0)
        return K.numpy(), (jacobian * scale).numpy()

    def diag(self, X: np.ndarray) -> np.ndarray:
        """Return the diagonal ``k(X, X)`` in O(n).

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        x = torch.from_numpy(np.ascontiguousarray(X))
        with torch.no_grad():
            return self._covariance(x, None, diag=True, **self._hyperparameter_tensors(x.shape[-1])).numpy()

    def is_stationary(self) -> bool:
        """Return False: the DEQ kernel depends on the inputs, not only on their difference."""
        return False

    @property
    def requires_vector_input(self) -> bool:
        """Return True: the kernel reads feature vectors."""
        return True

    def __repr__(self) -> str:
        if self.anisotropic:
            iv = "[{}]".format(", ".join(f"{v:.3g}" for v in np.asarray(self.input_variance, dtype=float)))
        else:
            iv = f"{float(np.ravel(self.input_variance)[0]):.3g}"
        name = self.activation if isinstance(self.activation, str) else self._activation().name
        tangent = "" if self.kernel == "nngp" else f", kernel={self.kernel!r}"
        return (
            f"DEQ(activation={name!r}, weight_variance={self._weight_variance():.3g}, input_variance={iv}, "
            f"bias_variance={self.bias_variance:.3g}{tangent})"
        )

    # ------------------------------------------------------------------ internals

    def _hyperparameter_tensors(self, num_features: int) -> dict[str, Tensor]:
        iv = np.asarray(self.input_variance, dtype=np.float64)
        if self.anisotropic and iv.shape != (num_features,):
            raise ValueError(
                f"input_variance has {iv.size} entries (one per feature) but X has {num_features} features"
            )
        return {
            "weight_variance": torch.tensor(self._weight_variance(), dtype=torch.float64),
            "input_variance": torch.from_numpy(iv.reshape(-1).copy())
            if self.anisotropic
            else torch.tensor(float(iv), dtype=torch.float64),
            "bias_variance": torch.tensor(float(self.bias_variance), dtype=torch.float64),
        }

    def _covariance(self, x: Tensor, y: Tensor | None, diag: bool = False, **hypers: Tensor) -> Tensor:
        return equilibrium_covariance(x, y, activation=self._activation(), diag=diag, output=self._output(), **hypers)

    def _jacobian(self, x: Tensor, hypers: dict[str, Tensor], free: list[str]) -> tuple[Tensor, Tensor]:
        """Entries and their gradients in the free hyperparameters, by the fastest solver that serves them.

        The relu family and erf go to the engine's dense solver, which takes a weight variance
        per pair and whose derivatives are the implicit function theorem's (for the isotropic
        kernel at n = 331 about twice, with one input variance per feature seven times, as
        fast as forward-mode differentiation, one pass per hyperparameter). Where it cannot
        serve the call (erf at variances too large for its arcsine variable) the general
        solver does, as for the relu family's other solvers (the table solver would build one
        table per pair's weight variance); other activations take the solver the plan chooses.
        """
        act = self._activation()
        if act.offers.pair_equation:
            try:
                return self._jacobian_by_pairs(x, hypers, free, "dense")
            except ValueError as exc:
                if "pair_solver('dense') cannot serve" not in str(exc):
                    raise
        return self._jacobian_by_pairs(x, hypers, free, "general" if act.offers.pair_equation else "auto")

    def _jacobian_by_pairs(
        self, x: Tensor, hypers: dict[str, Tensor], free: list[str], solver: str
    ) -> tuple[Tensor, Tensor]:
        """Entries and their gradients, pair by pair: each pair gets its own copy of the hyperparameters.

        Reverse-mode autograd gives one vector-Jacobian product per backward pass, and the
        core's backward passes are first-order only. With the pairs of the upper triangle in
        the batch dimension and one copy of each hyperparameter per pair, no two entries share
        a copy, so one backward pass of their sum gives every entry's gradient.
        """
        act, output = self._activation(), self._output()
        n = x.shape[0]
        rows, cols = torch.triu_indices(n, n)
        width = sum(hypers[name].numel() for name in free)
        K = torch.empty(n, n, dtype=x.dtype)
        jacobian = torch.zeros(n, n, width, dtype=x.dtype)
        chunk = _DENSE_CHUNK if solver == "dense" else _PAIR_CHUNK
        for start in range(0, rows.numel(), chunk):
            i, j = rows[start : start + chunk], cols[start : start + chunk]
            count = i.numel()
            leaves = {}
            for name, t in hypers.items():
                shape = (count, t.numel()) if name == "input_variance" else (count,)
                leaves[name] = t.reshape(-1).expand(shape).clone().requires_grad_(name in free)
            with settings.pair_solver(solver):
                values = equilibrium_covariance(
                    x[i].unsqueeze(-2), x[j].unsqueeze(-2), activation=act, diag=True, output=output, **leaves
                ).squeeze(-1)
            K[i, j] = K[j, i] = values.detach()
            if free:
                grads = torch.autograd.grad(values.sum(), [leaves[name] for name in free])
                block = torch.cat([gr.reshape(count, -1) for gr in grads], dim=-1)
                jacobian[i, j] = block
                jacobian[j, i] = block
        return K, jacobian


class ConvDEQ(DEQ):
    r"""The kernel of an infinitely wide convolutional DEQ, for scikit-learn.

    The model and its limit are those of :func:`deq_kernel.conv_equilibrium_covariance`:
    :math:`h^* = \phi(W \ast h^* + U \ast x + b)` with ``kernel_size x kernel_size``
    convolutions, read out at every pixel (``readout="flatten"``) or after global average
    pooling (``"gap"``). ``X`` holds images as flat rows, ``(n_samples, C*H*W)``, of shape
    ``image_shape``. The hyperparameters are :class:`DEQ`'s, with one input variance; multiply
    by a :class:`~sklearn.gaussian_process.kernels.ConstantKernel` for the output scale. The
    gradient (``eval_gradient=True``) comes from the tangent equations of the fixed points
    (:func:`deq_kernel.equilibrium.conv.conv_kernel_tangents`), exact to the solver's tolerance.

    Parameters
    ----------
    image_shape : (C, H, W) or (H, W)
        The shape of one image; ``(H, W)`` means one channel.
    kernel_size : int, default 3
        The convolutions' size, odd and positive.
    readout : {"flatten", "gap"}, default "flatten"
    activation, weight_variance, input_variance, bias_variance, *_bounds, activation_kwargs, kernel
        As for :class:`DEQ`; ``input_variance`` is a scalar. ``kernel="ntk"`` is the
        convolutional neural tangent kernel (:func:`deq_kernel.conv_equilibrium_covariance`
        with ``output="ntk"``), its gradient from the tangent equations of its fixed points too.

    Examples
    --------
    >>> import numpy as np
    >>> from deq_kernel.sklearn import ConvDEQ
    >>> X = np.random.default_rng(0).uniform(size=(5, 16))
    >>> K, K_gradient = ConvDEQ(image_shape=(4, 4))(X, eval_gradient=True)
    >>> K.shape, K_gradient.shape
    ((5, 5), (5, 5, 3))
    """

    def __init__(
        self,
        image_shape: tuple[int, ...] = (1, 1),
        kernel_size: int = 3,
        readout: str = "flatten",
        activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
        weight_variance: float | None = None,
        input_variance: float = 1.0,
        bias_variance: float = 0.1,
        weight_variance_bounds: tuple[float, float] | str = "auto",
        input_variance_bounds: tuple[float, float] | str = _DEFAULT_BOUNDS,
        bias_variance_bounds: tuple[float, float] | str = _DEFAULT_BOUNDS,
        activation_kwargs: dict[str, Any] | None = None,
        kernel: str = "nngp",
    ) -> None:
        super().__init__(
            activation=activation,
            weight_variance=weight_variance,
            input_variance=input_variance,
            bias_variance=bias_variance,
            weight_variance_bounds=weight_variance_bounds,
            input_variance_bounds=input_variance_bounds,
            bias_variance_bounds=bias_variance_bounds,
            activation_kwargs=activation_kwargs,
            kernel=kernel,
        )
        self.image_shape = image_shape
        self.kernel_size = kernel_size
        self.readout = readout

    @property
    def anisotropic(self) -> bool:
        if np.iterable(self.input_variance) and len(self.input_variance) > 1:
            raise ValueError("ConvDEQ has one input variance; input_variance must be a scalar")
        return False

    def _options(self) -> dict[str, Any]:
        shape, kernel_size, readout = check_conv_options(self.image_shape, self.kernel_size, self.readout)
        return dict(image_shape=shape, kernel_size=kernel_size, readout=readout)

    def _covariance(self, x: Tensor, y: Tensor | None, diag: bool = False, **hypers: Tensor) -> Tensor:
        return conv_equilibrium_covariance(
            x, y, activation=self._activation(), diag=diag, output=self._output(), **self._options(), **hypers
        )

    def _jacobian(self, x: Tensor, hypers: dict[str, Tensor], free: list[str]) -> tuple[Tensor, Tensor]:
        options = self._options()
        act = self._activation()
        images = x.reshape(x.shape[0], *options["image_shape"])
        w, iv, b = (hypers[name] for name in ("weight_variance", "input_variance", "bias_variance"))
        act.check_weight_variance(w)
        K, tangents = conv_kernel_tangents(
            act, images, w, iv.reshape(()), b, options["kernel_size"], options["readout"], self._output()
        )
        order = {"weight_variance": 0, "input_variance": 1, "bias_variance": 2}
        return K, tangents[..., [order[name] for name in free]]

    def __repr__(self) -> str:
        name = self.activation if isinstance(self.activation, str) else self._activation().name
        tangent = "" if self.kernel == "nngp" else f", kernel={self.kernel!r}"
        return (
            f"ConvDEQ(image_shape={tuple(self.image_shape)}, kernel_size={self.kernel_size}, "
            f"readout={self.readout!r}, activation={name!r}, weight_variance={self._weight_variance():.3g}, "
            f"input_variance={float(np.ravel(self.input_variance)[0]):.3g}, bias_variance={self.bias_variance:.3g}"
            f"{tangent})"
        )


# --------------------------------------------------------------------------- estimators


class _DEQGPBase(BaseEstimator):
    """Parameters, validation and hyperparameter set-up shared by the two estimators."""

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # dense kernel matrices
        tags.input_tags.allow_nan = False
        tags.target_tags.required = True
        tags.target_tags.single_output = True
        return tags

    #: Constraints of the shared parameters, checked by scikit-learn's own machinery
    #: (``_validate_params``): numpy scalars are accepted as numbers, so grids built with
    #: ``np.arange`` work; the errors name the parameter and what it accepts.
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "activation": [str, Activation, callable],
        "kernel": [StrOptions(set(KERNELS))],
        "weight_variance": [Interval(Real, 0, None, closed="neither"), None],
        "input_variance": [Interval(Real, 0, None, closed="neither"), "array-like"],
        "bias_variance": [Interval(Real, 0, None, closed="neither")],
        "ard": ["boolean"],
        "optimizer": [StrOptions({"lbfgs", "adam"}), None],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither"), None],
        "n_restarts_optimizer": [Interval(Integral, 0, None, closed="left")],
        "max_fit_samples": [Interval(Integral, 2, None, closed="left"), None],
        "method": [StrOptions({"exact", "svgp"})],
        "n_inducing": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
        "device": [str, torch.device, None],
        "activation_kwargs": [dict, None],
        "image_shape": ["array-like", None],
        "kernel_size": [Interval(Integral, 1, None, closed="left")],
        "readout": [StrOptions({"flatten", "gap"})],
    }

    def _check_params(self) -> None:
        self._validate_params()
        for name in ("weight_variance", "bias_variance", "tol", "learning_rate", "noise", "alpha_epsilon"):
            value = getattr(self, name, None)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        act = get_activation(self.activation, **(self.activation_kwargs or {}))  # raises for a bad name
        if self.kernel == "ntk":
            act.derivative_activation()  # raises for an activation without a neural tangent kernel
        bound = self._activation_bound()
        if self.weight_variance is not None and not self.weight_variance < bound:
            raise ValueError(
                f"weight_variance must be < {bound:.6g} for activation {self.activation!r} "
                f"(the equilibrium exists only below it), got {self.weight_variance!r}"
            )
        iv = np.asarray(self.input_variance, dtype=np.float64) if _is_numeric_array(self.input_variance) else None
        if iv is None or iv.ndim > 1 or not (np.all(np.isfinite(iv)) and np.all(iv > 0)) or iv.size == 0:
            raise ValueError(
                f"input_variance must be a positive number or a 1-D array of positive numbers, "
                f"got {self.input_variance!r}"
            )
        try:
            torch.device("cpu" if self.device is None else self.device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device must be None or a torch device such as 'cpu' or 'cuda', got {self.device!r}"
            ) from None
        if self.image_shape is None and (self.kernel_size != 3 or self.readout != "flatten"):
            raise ValueError(
                f"kernel_size={self.kernel_size!r} and readout={self.readout!r} need image_shape: without it the "
                "kernel is the fully connected one, which has neither"
            )
        if self.image_shape is not None:
            self._conv_options()  # raises for a bad image_shape, kernel_size or readout
            if self.ard:
                raise ValueError("ard=True is not available with image_shape: it has one input variance")
            if iv.size != 1:
                raise ValueError("input_variance must be a scalar with image_shape (one input variance)")

    def _conv_options(self) -> tuple[tuple[int, int, int], int, str]:
        """``image_shape`` as ``(C, H, W)``, ``kernel_size`` and ``readout``, validated."""
        return check_conv_options(self.image_shape, self.kernel_size, self.readout)

    def _check_image_features(self, num_features: int) -> None:
        if self.image_shape is None:
            return
        shape = self._conv_options()[0]
        if math.prod(shape) != num_features:
            raise ValueError(
                f"image_shape {tuple(self.image_shape)} has {math.prod(shape)} values per image, but X has "
                f"{num_features} features (images as flat rows of C*H*W values)"
            )

    def _base_kernel(self, num_features: int) -> DEQKernel:
        """The GPyTorch kernel of these settings: :class:`DEQKernel` or, with ``image_shape``, the convolutional one."""
        if self.image_shape is not None:
            shape, kernel_size, readout = self._conv_options()
            return ConvDEQKernel(
                self.activation,
                image_shape=shape,
                kernel_size=kernel_size,
                readout=readout,
                kernel=self.kernel,
                **(self.activation_kwargs or {}),
            )
        return DEQKernel(
            self.activation,
            kernel=self.kernel,
            ard_num_dims=num_features if self.ard else None,
            **(self.activation_kwargs or {}),
        )

    def _condition(self) -> None:
        """Set what follows from :attr:`model_`: :attr:`kernel_` and the exact posterior's factorisation.

        At fit time, not at the first prediction: scikit-learn's convention is that prediction
        leaves the estimator unchanged.
        """
        self.kernel_ = self._fitted_kernel()
        self._posterior = None if isinstance(self.model_, SVGPModel) else ExactPosterior(self.model_)

    def _activation_bound(self) -> float:
        return get_activation(self.activation, **(self.activation_kwargs or {})).weight_variance_bound

    def _device(self) -> torch.device:
        return torch.device("cpu" if self.device is None else self.device)

    def _initial_values(self, rng: np.random.RandomState | None, num_features: int) -> dict[str, Any]:
        """Initial hyperparameters: the given ones (``rng`` None) or random ones for a restart."""
        bound = self._activation_bound()
        iv = np.asarray(self.input_variance, dtype=np.float64)
        if iv.ndim == 1 and iv.size not in (1, num_features):
            raise ValueError(f"input_variance has {iv.size} entries, but X has {num_features} features")
        if self.ard:
            iv = np.broadcast_to(iv.reshape(-1), (num_features,)).copy()
        elif iv.size != 1:
            raise ValueError("an input_variance array (one variance per feature) requires ard=True")
        if rng is None:
            w = self.weight_variance
            if w is None:
                w = get_activation(self.activation, **(self.activation_kwargs or {})).default_weight_variance
            return {"weight_variance": w, "input_variance": iv, "bias_variance": self.bias_variance}
        top = bound if math.isfinite(bound) else 4.0
        return {
            "weight_variance": rng.uniform(0.05, 0.95) * top,
            "input_variance": np.exp(rng.uniform(math.log(0.1), math.log(10.0), size=iv.shape)),
            "bias_variance": math.exp(rng.uniform(math.log(0.01), math.log(1.0))),
        }

    def _fit_model(
        self,
        build: Callable[[dict[str, Any], np.ndarray | None], ExactGPModel],
        num_samples: int,
        num_features: int,
        stratify: np.ndarray | None = None,
    ) -> tuple[ExactGPModel, FitResult]:
        """Fit from the initial values and from each random restart, keep the best.

        ``build(initial, rows)`` returns a model on the samples ``rows`` (None: all). With more
        than ``max_fit_samples`` samples, the hyperparameters are fitted on a random subset
        (stratified by ``stratify``) and then given to a model on all samples.
        """
        rng = check_random_state(self.random_state)
        rows = None
        if self.max_fit_samples is not None and num_samples > self.max_fit_samples:
            rows = _subsample(num_samples, self.max_fit_samples, rng, stratify)
        best = None
        for restart in range(self.n_restarts_optimizer + 1):
            model = build(self._initial_values(None if restart == 0 else rng, num_features), rows)
            try:
                result = self._fit_one(model)
            except (RuntimeError, ValueError, ArithmeticError) as exc:
                if restart == 0:
                    raise
                # A random restart that cannot be fitted: the others (the first included) stand.
                message = f"random restart {restart} of the fit failed and was skipped ({exc})"
                warnings.warn(message, FitWarning, stacklevel=3)
                continue
            if best is None or result.log_marginal_likelihood > best[1].log_marginal_likelihood:
                best = (model, result)
        model, result = best
        if rows is not None:
            full = build(self._initial_values(None, num_features), None)
            fitted = dict(model.named_parameters())
            with torch.no_grad():
                for name, parameter in full.named_parameters():
                    parameter.copy_(fitted[name])
            full_value = _evaluate(full).log_marginal_likelihood
            result = FitResult(full_value, result.n_iter, result.n_evaluations, result.converged, result.history)
            model = full
        return model, result

    def _fit_one(self, model: ExactGPModel) -> FitResult:
        if self.optimizer is None:
            return _evaluate(model)
        options = {"max_iter": int(self.max_iter), "learning_rate": self.learning_rate, "tol": float(self.tol)}
        # Exact (Cholesky) at every size: an approximation is only ever the user's choice (method=).
        size = model.train_targets.shape[-1]
        return fit_exact_gp(model, optimizer=self.optimizer, max_cholesky_size=size, **options)

    def _fit_svgp(
        self,
        x: Tensor,
        targets: Tensor,
        likelihood: Any,
        num_tasks: int | None = None,
        prepare: Callable[[SVGPModel], None] | None = None,
    ) -> tuple[SVGPModel, FitResult]:
        """A sparse variational GP on all samples, inducing inputs initially a random subset of them."""
        rng = check_random_state(self.random_state)
        num_samples, num_features = x.shape
        rows = np.sort(rng.choice(num_samples, size=min(self.n_inducing, num_samples), replace=False))
        covar = ScaleKernel(self._base_kernel(num_features))
        model = SVGPModel(x[rows].clone(), likelihood, num_tasks=num_tasks, covar_module=covar)
        model = model.to(device=x.device, dtype=torch.float64)
        _initialise(model.covar_module, self._initial_values(None, num_features))
        if prepare is not None:
            prepare(model)
        seed = int(rng.randint(2**31 - 1))
        # The softmax likelihood's ELBO draws Monte Carlo samples: seeded, so fits repeat.
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(seed)
            result = fit_svgp(
                model,
                x,
                targets,
                epochs=self.epochs,
                batch_size=self.batch_size,
                learning_rate=0.01 if self.learning_rate is None else self.learning_rate,
                train_hyperparameters=self.optimizer is not None,
                generator=torch.Generator().manual_seed(seed),
                verbose=bool(self.verbose),
            )
        history = [value * num_samples for value in result.elbo_history]
        return model, FitResult(result.elbo * num_samples, result.n_steps, result.n_steps, False, history)

    def _to_tensor(self, X: np.ndarray) -> Tensor:
        return torch.tensor(np.asarray(X), dtype=torch.float64, device=self._device())  # a copy: X may be read-only


class DEQGPRegressor(RegressorMixin, _DEQGPBase):
    r"""Gaussian-process regression with the kernel of an infinitely wide deep equilibrium model.

    An exact GP (GPyTorch) with a constant mean and covariance
    ``output_variance * k_DEQ(x, x')`` plus Gaussian noise, where ``k_DEQ`` is the kernel of
    Gao, Huo, Liu and Gao (NeurIPS 2023, arXiv:2310.10767),

    .. math::
        K^*(x, x') = \sigma_w^2\, E[\phi(u)\phi(v)] + \tfrac{1}{d}\textstyle\sum_i \sigma_{u,i}^2 x_i x'_i
        + \sigma_b^2, \qquad k_\text{DEQ}(x, x') = E[\phi(u)\phi(v)],

    with :math:`(u, v)` centred Gaussian of covariance :math:`K^*` at :math:`(x, x')` (see
    :class:`deq_kernel.DEQKernel`). All hyperparameters (weight, input, bias and output
    variances, noise, mean) are fitted by maximising the exact marginal likelihood of the
    (standardised) targets.

    Parameters
    ----------
    activation : str, default "relu"
        One of :data:`deq_kernel.ACTIVATIONS`.
    kernel : {"nngp", "ntk"}, default "nngp"
        The DEQ's Gaussian-process kernel or its neural tangent kernel (see
        :class:`deq_kernel.DEQKernel`); either is scaled by the fitted output variance.
    weight_variance : float, optional
        Initial weight variance; default half the activation's bound (relu: 1).
    input_variance : float or array-like of shape (n_features,), default 1.0
        Initial input variance (an array requires ``ard=True``).
    bias_variance : float, default 0.1
        Initial bias variance.
    noise : float, default 0.1
        Initial noise variance, in units of the standardised targets.
    ard : bool, default False
        One input variance per feature.
    normalize_y : bool, default True
        Standardise the targets before fitting (predictions are in the original units).
    optimizer : {"lbfgs", "adam"} or None, default "lbfgs"
        How the marginal likelihood is maximised (see :func:`deq_kernel.gpytorch.fit_exact_gp`);
        ``None`` keeps the initial hyperparameters.
    max_iter : int, default 100
        Largest number of optimiser iterations (per restart).
    tol : float, default 1e-6
        Stopping tolerance of the optimiser (objective per data point).
    learning_rate : float, optional
        Optimiser step size; default 1 for L-BFGS, 0.1 for Adam, 0.01 for ``method="svgp"``.
    n_restarts_optimizer : int, default 0
        Further fits from random initial hyperparameters; the one of highest marginal
        likelihood is kept.
    max_fit_samples : int, optional
        Fit the hyperparameters on a random subset of at most this many samples (each
        evaluation of the marginal likelihood costs O(n^3)); the model then conditions on all
        samples. Default: all samples.
    method : {"exact", "svgp"}, default "exact"
        ``"exact"``: an exact GP. ``"svgp"``: a sparse variational GP
        (:class:`deq_kernel.variational.SVGPModel`, :func:`~deq_kernel.variational.fit_svgp`) on all
        samples, with ``n_inducing`` learned inducing points and the hyperparameters fitted by Adam
        on the evidence lower bound over minibatches: O(n m^2) per epoch and O(batch_size m + m^2)
        memory, for data too large for an exact GP. ``optimizer=None`` then holds the
        hyperparameters at their initial values (only the variational distribution and the
        inducing inputs are learned); ``max_iter``, ``tol``, ``n_restarts_optimizer`` and
        ``max_fit_samples`` are unused.
    n_inducing : int, default 512
        Inducing points of ``method="svgp"``, initially a random subset of the samples (all of
        them when there are fewer).
    batch_size : int, default 1024
        Minibatch size of ``method="svgp"``, and its block size in prediction.
    epochs : int, default 20
        Passes over the data of ``method="svgp"``.
    verbose : bool, default False
        Report the progress of ``method="svgp"`` on standard error: a progress bar per epoch, or
        one line per epoch when standard error is not a terminal.
    random_state : int, RandomState instance or None, default None
        Draws the restarts' initial hyperparameters and the subset of ``max_fit_samples``.
    device : str or torch.device, optional
        Where the model lives (default CPU). Computation is in float64.
    activation_kwargs : dict, optional
        Activation options, e.g. ``{"negative_slope": 0.1}``.
    image_shape : (C, H, W) or (H, W), optional
        Treat each row of ``X`` as an image of this shape (``images.reshape(n, -1)``) and use
        the kernel of an infinitely wide convolutional DEQ
        (:class:`deq_kernel.gpytorch.ConvDEQKernel`, :func:`deq_kernel.conv_equilibrium_covariance`)
        instead of the fully connected one; one input variance (no ``ard``).
    kernel_size : int, default 3
        With ``image_shape``: the convolutions' size, odd and positive.
    readout : {"flatten", "gap"}, default "flatten"
        With ``image_shape``: a linear readout of every pixel, or global average pooling first.

    Attributes
    ----------
    model_ : deq_kernel.gpytorch.ExactGPModel or deq_kernel.variational.SVGPModel
        The fitted GPyTorch model (on standardised targets).
    kernel_ : sklearn.gaussian_process.kernels.Kernel
        The fitted covariance of the standardised targets as a scikit-learn kernel,
        ``ConstantKernel * DEQ + WhiteKernel``.
    log_marginal_likelihood_value_ : float
        Log marginal likelihood of the standardised training targets at ``kernel_`` (with
        ``method="svgp"``: its evidence lower bound, the last epoch's average).
    n_iter_ : int
        Optimiser iterations of the kept fit.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` has string feature names.

    See Also
    --------
    deq_kernel.sklearn.DEQ : the kernel, for :class:`sklearn.gaussian_process.GaussianProcessRegressor`.

    Examples
    --------
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn.model_selection import train_test_split
    >>> from deq_kernel.sklearn import DEQGPRegressor
    >>> X, y = load_diabetes(return_X_y=True)
    >>> X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=1)
    >>> reg = DEQGPRegressor().fit(X_train, y_train)
    >>> mean, std = reg.predict(X_test, return_std=True)
    >>> reg.score(X_test, y_test) > 0.4
    True
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_DEQGPBase._parameter_constraints,
        "noise": [Interval(Real, 0, None, closed="neither")],
        "normalize_y": ["boolean"],
    }

    def __init__(
        self,
        activation: str = "relu",
        *,
        kernel: str = "nngp",
        weight_variance: float | None = None,
        input_variance: float | np.ndarray = 1.0,
        bias_variance: float = 0.1,
        noise: float = 0.1,
        ard: bool = False,
        normalize_y: bool = True,
        optimizer: str | None = "lbfgs",
        max_iter: int = 100,
        tol: float = 1e-6,
        learning_rate: float | None = None,
        n_restarts_optimizer: int = 0,
        max_fit_samples: int | None = None,
        method: str = "exact",
        n_inducing: int = 512,
        batch_size: int = 1024,
        epochs: int = 20,
        verbose: bool = False,
        random_state: int | np.random.RandomState | None = None,
        device: str | torch.device | None = None,
        activation_kwargs: dict[str, Any] | None = None,
        image_shape: tuple[int, ...] | None = None,
        kernel_size: int = 3,
        readout: str = "flatten",
    ) -> None:
        self.activation = activation
        self.kernel = kernel
        self.weight_variance = weight_variance
        self.input_variance = input_variance
        self.bias_variance = bias_variance
        self.noise = noise
        self.ard = ard
        self.normalize_y = normalize_y
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.n_restarts_optimizer = n_restarts_optimizer
        self.max_fit_samples = max_fit_samples
        self.method = method
        self.n_inducing = n_inducing
        self.batch_size = batch_size
        self.epochs = epochs
        self.verbose = verbose
        self.random_state = random_state
        self.device = device
        self.activation_kwargs = activation_kwargs
        self.image_shape = image_shape
        self.kernel_size = kernel_size
        self.readout = readout

    def fit(self, X: Any, y: Any) -> DEQGPRegressor:
        """Fit the hyperparameters by marginal likelihood and condition on the data.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)

        Returns
        -------
        self : DEQGPRegressor
        """
        self._check_params()
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        self._check_image_features(X.shape[1])
        if X.shape[0] < 2:
            raise ValueError(f"DEQGPRegressor needs at least 2 samples, got {X.shape[0]} sample")
        if self.normalize_y:
            self._y_mean, self._y_scale = float(np.mean(y)), float(np.std(y))
            if not self._y_scale > 0:
                self._y_scale = 1.0
        else:
            self._y_mean, self._y_scale = 0.0, 1.0
        x = self._to_tensor(X)
        targets = self._to_tensor((y - self._y_mean) / self._y_scale)

        def build(initial: dict[str, Any], rows: np.ndarray | None) -> ExactGPModel:
            inputs, outputs = (x, targets) if rows is None else (x[rows], targets[rows])
            likelihood = GaussianLikelihood()
            covar = ScaleKernel(self._base_kernel(X.shape[1]))
            model = ExactGPModel(inputs, outputs, likelihood, covar_module=covar)
            model = model.to(device=x.device, dtype=torch.float64)
            _initialise(model.covar_module, initial)
            model.likelihood.noise = _float64(self.noise, model.likelihood.noise.device)
            model.mean_module.constant = 0.0
            return model

        if self.method == "svgp":

            def prepare(model: SVGPModel) -> None:
                model.likelihood.noise = _float64(self.noise, model.likelihood.noise.device)
                model.mean_module.constant = 0.0

            self.model_, result = self._fit_svgp(x, targets, GaussianLikelihood(), prepare=prepare)
        else:
            self.model_, result = self._fit_model(build, X.shape[0], X.shape[1])
        self.log_marginal_likelihood_value_ = result.log_marginal_likelihood
        self.n_iter_ = result.n_iter
        self._condition()
        return self

    def _fitted_kernel(self) -> Kernel:
        covar = self.model_.covar_module
        deq = _to_sklearn_kernel(covar.base_kernel, self.activation, self.activation_kwargs)
        return ConstantKernel(covar.outputscale.item()) * deq + WhiteKernel(self.model_.likelihood.noise.item())

    def predict(
        self, X: Any, return_std: bool = False, return_cov: bool = False, *, latent: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predictive mean and, optionally, standard deviation or covariance.

        As in :class:`sklearn.gaussian_process.GaussianProcessRegressor` with a ``WhiteKernel``
        (the noise of :attr:`kernel_`), the uncertainty is that of a new observation: the
        latent function's plus the fitted noise. ``latent=True`` gives the latent function's
        alone. The exact method computes it from the Cholesky factor kept at fit time
        (:class:`deq_kernel.gpytorch.ExactPosterior`).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        return_std : bool, default False
            Also return the predictive standard deviation.
        return_cov : bool, default False
            Also return the predictive covariance (not with ``return_std``).
        latent : bool, default False
            The uncertainty of the latent function, without the observation noise.

        Returns
        -------
        y_mean : ndarray of shape (n_samples,)
        y_std : ndarray of shape (n_samples,)
            With ``return_std=True``.
        y_cov : ndarray of shape (n_samples, n_samples)
            With ``return_cov=True``.
        """
        if return_std and return_cov:
            raise ValueError("at most one of return_std and return_cov can be requested")
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        x = self._to_tensor(X)
        noise = None if latent else self.model_.likelihood.noise.detach().reshape(())
        if not isinstance(self.model_, SVGPModel):
            mean, variance = _posterior(self).predict(x, want="cov" if return_cov else "var", noise=noise)
        elif not return_cov:
            mean, variance = predict_latent(self.model_, x, batch_size=self.batch_size)
            if noise is not None:
                variance = variance + noise
        else:
            with torch.no_grad():
                posterior = self.model_(x)
                mean, variance = posterior.mean, posterior.covariance_matrix
            if noise is not None:
                variance = variance + noise * torch.eye(len(X), dtype=variance.dtype, device=variance.device)
        mean = mean.cpu().numpy() * self._y_scale + self._y_mean
        if return_std:
            return mean, variance.clamp_min(0.0).sqrt().cpu().numpy() * self._y_scale
        if return_cov:
            return mean, variance.cpu().numpy() * self._y_scale**2
        return mean

    def sample_y(self, X: Any, n_samples: int = 1, random_state: Any = 0) -> np.ndarray:
        """Draw observations from the predictive distribution at ``X``, as scikit-learn's GP regressor does.

        Parameters
        ----------
        X : array-like of shape (n_samples_X, n_features)
        n_samples : int, default 1
        random_state : int, RandomState instance or None, default 0

        Returns
        -------
        ndarray of shape (n_samples_X, n_samples)
        """
        n_samples = settings.positive_int("n_samples", n_samples)
        rng = check_random_state(random_state)
        mean, cov = self.predict(X, return_cov=True)
        return rng.multivariate_normal(mean, cov, n_samples).T

    def log_marginal_likelihood(
        self, theta: Any = None, eval_gradient: bool = False, clone_kernel: bool = True
    ) -> float | tuple[float, np.ndarray]:
        """The log marginal likelihood of the training targets, as scikit-learn's GP regressor has it.

        ``theta=None`` gives the fitted value, :attr:`log_marginal_likelihood_value_`.
        Otherwise ``theta`` is a point of :attr:`kernel_`'s log-hyperparameter space (its
        ``theta``: output variance, bias, input and weight variances, noise), and the value
        is computed exactly there (Cholesky; targets normalised as in the fit, the fitted
        constant mean kept), with its gradient in ``theta`` when ``eval_gradient``.
        ``clone_kernel`` is accepted for compatibility: the fitted model is never changed.
        """
        check_is_fitted(self)
        if theta is None:
            if eval_gradient:
                raise ValueError("gradient can only be evaluated for theta not None")
            return self.log_marginal_likelihood_value_
        if isinstance(self.model_, SVGPModel):
            raise ValueError("log_marginal_likelihood(theta) needs the exact method (method='exact')")
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != self.kernel_.theta.shape:
            raise ValueError(f"theta must have shape {self.kernel_.theta.shape} (kernel_.theta), got {theta.shape}")
        log = torch.tensor(theta, dtype=torch.float64, requires_grad=bool(eval_gradient))
        free = [h for h in self.kernel_.hyperparameters if not h.fixed]
        chunks = torch.exp(log).split([h.n_elements for h in free])
        values = {h.name.rsplit("__", 1)[-1]: chunk for h, chunk in zip(free, chunks, strict=True)}
        fixed = self.kernel_.get_params()
        for h in self.kernel_.hyperparameters:
            if h.fixed:
                values[h.name.rsplit("__", 1)[-1]] = torch.as_tensor(np.atleast_1d(fixed[h.name]), dtype=torch.float64)
        x = self.model_.train_inputs[0]
        base = self.model_.covar_module.base_kernel
        hypers = dict(
            activation=base.activation,
            weight_variance=values["weight_variance"].reshape(()),
            input_variance=values["input_variance"]
            if values["input_variance"].numel() > 1
            else values["input_variance"].reshape(()),
            bias_variance=values["bias_variance"].reshape(()),
        )
        if isinstance(base, ConvDEQKernel):
            conv = dict(image_shape=base.image_shape, kernel_size=base.kernel_size, readout=base.readout)
            k = conv_equilibrium_covariance(x, **conv, output=base.kernel, **hypers)
        else:
            k = equilibrium_covariance(x, output=base.kernel, **hypers)
        cov = values["constant_value"].reshape(()) * k + values["noise_level"].reshape(()) * torch.eye(
            len(x), dtype=k.dtype
        )
        with torch.no_grad():
            mean = self.model_.mean_module(x)
        value = _GaussianLogDensity.apply(cov, self.model_.train_targets - mean)
        if not eval_gradient:
            return float(value.detach())
        (grad,) = torch.autograd.grad(value, log)
        return float(value.detach()), grad.numpy()


class DEQGPClassifier(ClassifierMixin, _DEQGPBase):
    r"""Gaussian-process classification with the kernel of an infinitely wide deep equilibrium model.

    Uses the Dirichlet-based GP classifier of Milios et al. (NeurIPS 2018): the labels become
    regression targets :math:`\log \alpha_c - \sigma_c^2/2` with heteroscedastic noise
    :math:`\sigma_c^2 = \log(1 + 1/\alpha_c)` (:math:`\alpha_c = 1 + \alpha_\epsilon` for the
    observed class, :math:`\alpha_\epsilon` otherwise), and one exact GP per class is fitted by
    marginal likelihood (GPyTorch's ``DirichletClassificationLikelihood``). This is chosen over a
    variational classifier because inference stays exact and its cost is one kernel matrix,
    shared by the classes: the DEQ hyperparameters (:class:`deq_kernel.DEQKernel`, Gao et al.,
    NeurIPS 2023, arXiv:2310.10767) are common to all classes, while each class has its own
    output variance and constant mean. Class probabilities are the expected softmax of the
    latent functions, by Monte Carlo with fixed draws.

    Parameters
    ----------
    activation : str, default "relu"
        One of :data:`deq_kernel.ACTIVATIONS`.
    kernel : {"nngp", "ntk"}, default "nngp"
        The DEQ's Gaussian-process kernel or its neural tangent kernel (see
        :class:`deq_kernel.DEQKernel`); either is scaled by the fitted output variance.
    weight_variance : float, optional
        Initial weight variance; default half the activation's bound (relu: 1).
    input_variance : float or array-like of shape (n_features,), default 1.0
        Initial input variance (an array requires ``ard=True``).
    bias_variance : float, default 0.1
        Initial bias variance.
    alpha_epsilon : float, default 0.01
        Dirichlet concentration of the unobserved classes (smaller: more confident labels).
    ard : bool, default False
        One input variance per feature.
    optimizer : {"lbfgs", "adam"} or None, default "lbfgs"
        How the marginal likelihood is maximised; ``None`` keeps the initial hyperparameters.
    max_iter : int, default 100
        Largest number of optimiser iterations (per restart).
    tol : float, default 1e-6
        Stopping tolerance of the optimiser.
    learning_rate : float, optional
        Optimiser step size; default 1 for L-BFGS, 0.1 for Adam, 0.01 for ``method="svgp"``.
    n_restarts_optimizer : int, default 0
        Further fits from random initial hyperparameters; the best is kept.
    max_fit_samples : int or None, default 500
        Fit the hyperparameters on a class-stratified random subset of at most this many
        samples, then condition the model on all samples. Each evaluation of the marginal
        likelihood factorises one ``n x n`` matrix per class, so this bounds the cost of
        fitting (500 samples: well under a minute for ten classes on one CPU core); ``None``
        fits on all samples.
    method : {"exact", "svgp"}, default "exact"
        ``"exact"``: an exact GP. ``"svgp"``: a sparse variational GP
        (:class:`deq_kernel.variational.SVGPModel`, :func:`~deq_kernel.variational.fit_svgp`) on all
        samples, with ``n_inducing`` learned inducing points and the hyperparameters fitted by Adam
        on the evidence lower bound over minibatches: O(n m^2) per epoch and O(batch_size m + m^2)
        memory, for data too large for an exact GP. ``optimizer=None`` then holds the
        hyperparameters at their initial values (only the variational distribution and the
        inducing inputs are learned); ``max_iter``, ``tol``, ``n_restarts_optimizer`` and
        ``max_fit_samples`` are unused.
        The likelihood is Bernoulli (probit) for two classes; for more, one latent function per
        class and a softmax likelihood (GPyTorch's ``SoftmaxLikelihood`` without mixing), the
        latent functions sharing the inducing inputs, DEQ hyperparameters and output scale.
    n_inducing : int, default 512
        Inducing points of ``method="svgp"``, initially a random subset of the samples (all of
        them when there are fewer).
    batch_size : int, default 1024
        Minibatch size of ``method="svgp"``, and its block size in prediction.
    epochs : int, default 20
        Passes over the data of ``method="svgp"``.
    verbose : bool, default False
        Report the progress of ``method="svgp"`` on standard error: a progress bar per epoch, or
        one line per epoch when standard error is not a terminal.
    random_state : int, RandomState instance or None, default None
        Draws the subset of ``max_fit_samples``, the restarts' initial values and the Monte
        Carlo draws of :meth:`predict_proba`.
    device : str or torch.device, optional
        Where the model lives (default CPU). Computation is in float64.
    activation_kwargs : dict, optional
        Activation options.
    image_shape : (C, H, W) or (H, W), optional
        Treat each row of ``X`` as an image of this shape (``images.reshape(n, -1)``) and use
        the kernel of an infinitely wide convolutional DEQ
        (:class:`deq_kernel.gpytorch.ConvDEQKernel`, :func:`deq_kernel.conv_equilibrium_covariance`)
        instead of the fully connected one; one input variance (no ``ard``).
    kernel_size : int, default 3
        With ``image_shape``: the convolutions' size, odd and positive.
    readout : {"flatten", "gap"}, default "flatten"
        With ``image_shape``: a linear readout of every pixel, or global average pooling first.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    model_ : deq_kernel.gpytorch.ExactGPModel or deq_kernel.variational.SVGPModel
        The fitted GPyTorch model, batched over classes (``method="svgp"``: one latent function
        for two classes, one per class otherwise).
    kernel_ : DEQ
        The fitted DEQ kernel (shared by the classes) as a scikit-learn kernel.
    log_marginal_likelihood_value_ : float
        Log marginal likelihood of the transformed targets, summed over classes.
    n_iter_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` has string feature names.

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.model_selection import train_test_split
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from deq_kernel.sklearn import DEQGPClassifier
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)
    >>> clf = make_pipeline(StandardScaler(), DEQGPClassifier()).fit(X_train, y_train)
    >>> clf.score(X_test, y_test) > 0.94
    True
    """

    #: Monte Carlo draws (antithetic pairs) for the class probabilities.
    _DRAWS = 512

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_DEQGPBase._parameter_constraints,
        "alpha_epsilon": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(
        self,
        activation: str = "relu",
        *,
        kernel: str = "nngp",
        weight_variance: float | None = None,
        input_variance: float | np.ndarray = 1.0,
        bias_variance: float = 0.1,
        alpha_epsilon: float = 0.01,
        ard: bool = False,
        optimizer: str | None = "lbfgs",
        max_iter: int = 100,
        tol: float = 1e-6,
        learning_rate: float | None = None,
        n_restarts_optimizer: int = 0,
        max_fit_samples: int | None = 500,
        method: str = "exact",
        n_inducing: int = 512,
        batch_size: int = 1024,
        epochs: int = 20,
        verbose: bool = False,
        random_state: int | np.random.RandomState | None = None,
        device: str | torch.device | None = None,
        activation_kwargs: dict[str, Any] | None = None,
        image_shape: tuple[int, ...] | None = None,
        kernel_size: int = 3,
        readout: str = "flatten",
    ) -> None:
        self.activation = activation
        self.kernel = kernel
        self.weight_variance = weight_variance
        self.input_variance = input_variance
        self.bias_variance = bias_variance
        self.alpha_epsilon = alpha_epsilon
        self.ard = ard
        self.optimizer = optimizer
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.n_restarts_optimizer = n_restarts_optimizer
        self.max_fit_samples = max_fit_samples
        self.method = method
        self.n_inducing = n_inducing
        self.batch_size = batch_size
        self.epochs = epochs
        self.verbose = verbose
        self.random_state = random_state
        self.device = device
        self.activation_kwargs = activation_kwargs
        self.image_shape = image_shape
        self.kernel_size = kernel_size
        self.readout = readout

    def fit(self, X: Any, y: Any) -> DEQGPClassifier:
        """Fit the Dirichlet GP classifier's hyperparameters by marginal likelihood.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Class labels.

        Returns
        -------
        self : DEQGPClassifier
        """
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        self._check_image_features(X.shape[1])
        check_classification_targets(y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"DEQGPClassifier needs samples of at least 2 classes, got 1 class ({self.classes_[0]!r})")
        x = self._to_tensor(X)
        labels = torch.as_tensor(labels, device=x.device)
        num_classes = len(self.classes_)

        def build(initial: dict[str, Any], rows: np.ndarray | None) -> ExactGPModel:
            inputs, classes = (x, labels) if rows is None else (x[rows], labels[rows])
            likelihood = DirichletClassificationLikelihood(
                classes, alpha_epsilon=float(self.alpha_epsilon), learn_additional_noise=True, dtype=torch.float64
            )
            # One DEQ kernel (one kernel matrix) for all classes; scale and mean per class.
            covar = ScaleKernel(self._base_kernel(X.shape[1]), batch_shape=torch.Size([num_classes]))
            targets = likelihood.transformed_targets
            model = ExactGPModel(
                inputs, targets, likelihood, covar_module=covar, batch_shape=torch.Size([num_classes])
            ).to(device=x.device, dtype=torch.float64)
            _initialise(model.covar_module, initial)
            return model

        if self.method == "svgp":
            if num_classes == 2:
                likelihood, targets, tasks = BernoulliLikelihood(), labels.to(x.dtype), None
            else:
                likelihood = SoftmaxLikelihood(num_features=num_classes, num_classes=num_classes, mixing_weights=False)
                targets, tasks = labels, num_classes
            self.model_, result = self._fit_svgp(x, targets, likelihood, num_tasks=tasks)
        else:
            self.model_, result = self._fit_model(build, X.shape[0], X.shape[1], stratify=labels.cpu().numpy())
        self.log_marginal_likelihood_value_ = result.log_marginal_likelihood
        self.n_iter_ = result.n_iter
        half = check_random_state(self.random_state).standard_normal((self._DRAWS // 2, num_classes))
        self._draws = np.concatenate([half, -half])  # antithetic: odd error terms cancel
        self._condition()
        return self

    def _fitted_kernel(self) -> Kernel:
        return _to_sklearn_kernel(self.model_.covar_module.base_kernel, self.activation, self.activation_kwargs)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities: the expected softmax of the latent functions.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns in the order of :attr:`classes_`.
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        if isinstance(self.model_, SVGPModel):
            return self._svgp_proba(self._to_tensor(X))
        mean, variance = _posterior(self).predict(self._to_tensor(X))  # batch over classes: (n_classes, n)
        return _expected_softmax(mean.T, variance.T, self._draws)

    def _svgp_proba(self, x: Tensor) -> np.ndarray:
        mean, variance = predict_latent(self.model_, x, batch_size=self.batch_size)
        if self.model_.num_tasks is None:
            # Bernoulli with the probit link: E[Phi(f)] = Phi(mean / sqrt(1 + variance)), exactly.
            p = torch.special.ndtr(mean / torch.sqrt(1.0 + variance))
            return torch.stack([1.0 - p, p], dim=-1).cpu().numpy()
        return _expected_softmax(mean, variance, self._draws)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """The logarithm of :meth:`predict_proba`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        with np.errstate(divide="ignore"):  # a probability of exactly 0 is -inf, as in scikit-learn
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


# --------------------------------------------------------------------------- helpers


#: Guards the lazy construction of an estimator's posterior (estimators unpickled from an older release).
_POSTERIOR_LOCK = threading.Lock()


def _posterior(estimator: _DEQGPBase) -> ExactPosterior:
    """The exact posterior of a fitted exact-method estimator (built at fit time, or once here)."""
    posterior = getattr(estimator, "_posterior", None)
    if posterior is None:
        with _POSTERIOR_LOCK:
            posterior = getattr(estimator, "_posterior", None)
            if posterior is None:
                posterior = estimator._posterior = ExactPosterior(estimator.model_)
    return posterior


def _expected_softmax(mean: Tensor, variance: Tensor, draws: np.ndarray, block: int = 1024) -> np.ndarray:
    """``E[softmax(f)]`` for ``f ~ N(mean, diag(variance))`` rows ``(n, classes)``, by the fixed ``draws``.

    ``block`` rows at a time, so that memory is ``draws x classes x block`` at any ``n``.
    """
    z = torch.as_tensor(draws, dtype=mean.dtype, device=mean.device).unsqueeze(-1)  # (draws, classes, 1)
    proba = mean.new_empty(mean.shape)
    for start in range(0, mean.shape[0], block):
        m, s = mean[start : start + block].T, variance[start : start + block].clamp_min(0.0).sqrt().T
        proba[start : start + block] = torch.softmax(m + s * z, dim=-2).mean(0).T
    return proba.cpu().numpy()


def _float64(value: float, device: torch.device) -> Tensor:
    """``value`` as a float64 tensor: GPyTorch's setters make a Python float float32 first (0.05 -> 0.0500000007)."""
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _initialise(covar_module: ScaleKernel, initial: dict[str, Any]) -> None:
    base = covar_module.base_kernel
    base.weight_variance = float(initial["weight_variance"])
    base.input_variance = torch.as_tensor(np.asarray(initial["input_variance"], dtype=np.float64))
    base.bias_variance = float(initial["bias_variance"])
    covar_module.outputscale = 1.0


def _evaluate(model: ExactGPModel) -> FitResult:
    """The log marginal likelihood at the model's current hyperparameters (exact, Cholesky), as a FitResult."""
    mll = CholeskyMarginalLogLikelihood(model.likelihood, model)
    model.train()
    with torch.no_grad():
        value = float(mll(model(*model.train_inputs), model.train_targets).sum()) * model.train_targets.shape[-1]
    model.eval()
    return FitResult(log_marginal_likelihood=value, n_iter=1, n_evaluations=1, converged=True, history=[value])


def _to_sklearn_kernel(kernel: DEQKernel, activation: Any, activation_kwargs: dict | None) -> DEQ:
    iv = kernel.input_variance.detach().cpu().reshape(-1).numpy()
    if isinstance(kernel, ConvDEQKernel):
        return ConvDEQ(
            image_shape=kernel.image_shape,
            kernel_size=kernel.kernel_size,
            readout=kernel.readout,
            activation=activation,
            weight_variance=float(kernel.weight_variance.detach().reshape(-1)[0]),
            input_variance=float(iv[0]),
            bias_variance=float(kernel.bias_variance.detach().reshape(-1)[0]),
            activation_kwargs=activation_kwargs,
            kernel=kernel.kernel,
        )
    return DEQ(
        activation,
        weight_variance=float(kernel.weight_variance.detach().reshape(-1)[0]),
        input_variance=iv.copy() if iv.size > 1 else float(iv[0]),
        bias_variance=float(kernel.bias_variance.detach().reshape(-1)[0]),
        activation_kwargs=activation_kwargs,
        kernel=kernel.kernel,
    )


def _subsample(num_samples: int, size: int, rng: np.random.RandomState, stratify: np.ndarray | None) -> np.ndarray:
    """Sorted indices of ``size`` of the samples, drawn without replacement (stratified if possible)."""
    if stratify is not None:
        try:
            rows = resample(np.arange(num_samples), replace=False, n_samples=size, stratify=stratify, random_state=rng)
            return np.sort(rows)
        except ValueError:  # a class too small to stratify: one sample of each class, the rest plainly
            firsts = np.unique(stratify, return_index=True)[1]
            others = np.setdiff1d(np.arange(num_samples), firsts)
            extra = rng.choice(others, size=max(0, size - len(firsts)), replace=False)
            return np.sort(np.concatenate([firsts, extra]))
    return np.sort(rng.choice(num_samples, size=size, replace=False))


def _is_numeric_array(value: Any) -> bool:
    try:
        arr = np.asarray(value)
    except Exception:
        return False
    return arr.dtype.kind in "iuf" and not isinstance(value, bool)
