"""Named activations and :func:`get_activation`."""

from __future__ import annotations

import difflib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import _PI, Activation
from .erf import Erf
from .gelu import Gelu
from .quadrature import QuadratureActivation
from .relu import PiecewiseLinear, Step
from .trig import Cos, Sin

# --------------------------------------------------------------------------- registry


# Derivatives of the named quadrature activations, at module level so that they pickle.


def _tanh_d1(x: Tensor) -> Tensor:
    return 1 - torch.tanh(x) ** 2


def _tanh_d2(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return -2 * t * (1 - t * t)


def _sigmoid_d1(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _sigmoid_d2(x: Tensor) -> Tensor:
    return _sigmoid_d1(x) * (1 - 2 * torch.sigmoid(x))


def _softplus(x: Tensor) -> Tensor:
    # log(1 + e^x) to rounding everywhere: torch.nn.functional.softplus returns x itself
    # beyond x = 20, an absolute error of log1p(e^-20) = 2e-9 that large variances reach.
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def _silu_d1(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_d2(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _make_named() -> dict[str, Callable[..., Activation]]:
    def tanh() -> Activation:
        # tanh' = 1 - tanh^2 peaks at 0 with value 1: both suprema are 1, so w < 1, sharp.
        return QuadratureActivation(
            torch.tanh,
            name="tanh",
            derivative=_tanh_d1,
            second_derivative=_tanh_d2,
            weight_variance_bound=1.0,
            analytic_strip=_PI / 2,
        )

    def sigmoid() -> Activation:
        # sigmoid' <= 1/4, reached at 0: both suprema are 1/16, so w < 16.
        return QuadratureActivation(
            torch.sigmoid,
            name="sigmoid",
            derivative=_sigmoid_d1,
            second_derivative=_sigmoid_d2,
            weight_variance_bound=16.0,
            analytic_strip=_PI,
        )

    def softplus() -> Activation:
        # softplus' = sigmoid < 1 tends to the step as t grows: both suprema are 1/2
        # (approached, not reached), so w < 2, as for relu.
        return QuadratureActivation(
            _softplus,
            name="softplus",
            derivative=torch.sigmoid,
            second_derivative=_sigmoid_d1,
            weight_variance_bound=2.0,
            analytic_strip=_PI,
        )

    def silu() -> Activation:
        # sup_t E[silu'(tZ)^2 Z^2] = 0.563343 at t = 1.759 dominates
        # (sup_t E[silu'(tZ)^2] = 0.508392): w < 1.775 (rounded down).
        return QuadratureActivation(
            torch.nn.functional.silu,
            name="silu",
            derivative=_silu_d1,
            second_derivative=_silu_d2,
            weight_variance_bound=1.775,
            analytic_strip=_PI,
        )

    def leaky_relu(negative_slope: float = 0.01) -> Activation:
        return PiecewiseLinear(negative_slope, name="leaky_relu")

    return {
        "relu": lambda: PiecewiseLinear(0.0, name="relu"),
        "leaky_relu": leaky_relu,
        "abs": lambda: PiecewiseLinear(-1.0, name="abs"),
        "identity": lambda: PiecewiseLinear(1.0, name="identity"),
        "step": Step,
        "erf": Erf,
        "gelu": Gelu,
        "sin": Sin,
        "cos": Cos,
        "tanh": tanh,
        "sigmoid": sigmoid,
        "softplus": softplus,
        "silu": silu,
    }


_FACTORIES = _make_named()
#: Names accepted for ``activation``.
ACTIVATIONS: tuple[str, ...] = tuple(_FACTORIES)
#: Activations built, by what determines them (a name and its options, or a callable and its
#: options), so that an activation is built once: its bound estimate and its compiled kernels
#: are reused. Bounded: the least recently used are dropped beyond :data:`CACHE_SIZE`.
CACHE_SIZE = 64
_CACHE: OrderedDict[tuple[Any, ...], Activation] = OrderedDict()
_LOCK = threading.Lock()


def activation_options(activation: str | Activation | Callable[[Tensor], Tensor]) -> tuple[str, ...]:
    """The keyword options ``activation`` accepts in :func:`get_activation` (``()`` for an Activation instance)."""
    if isinstance(activation, Activation):
        return ()
    if isinstance(activation, str):
        factory = _FACTORIES.get(activation.lower())
        if factory is None:
            return ()
        params = inspect.signature(factory).parameters.values()
    else:
        params = list(inspect.signature(QuadratureActivation.__init__).parameters.values())[2:]  # self, fn
    return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def check_keywords(
    kwargs: dict[str, Any],
    activation: Any,
    *,
    where: str,
    own: tuple[str, ...] = (),
    hints: dict[str, str] | None = None,
) -> None:
    """Raise a ``TypeError`` for a keyword that neither ``where`` (its ``own`` arguments) nor the activation takes.

    The message names the argument, lists what is accepted and suggests the closest name
    (a misspelled ``weight_varience`` used to be reported as an option the activation lacks,
    with an internal function's name).
    """
    if not kwargs:  # the common case, on every kernel evaluation: no signature to read
        return
    options = activation_options(activation)
    unknown = [name for name in kwargs if name not in options]
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, [*own, *options], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if hints and name in hints:
        hint = f" ({hints[name]})"
    label = activation if isinstance(activation, str) else getattr(activation, "__name__", "the callable")
    takes = ", ".join(options) if options else "no options"
    arguments = f"its arguments are {', '.join(own)}; " if own else ""
    raise TypeError(
        f"{where} got an unexpected keyword argument {name!r}{hint}; {arguments}activation {label!r} takes {takes}"
    )


def get_activation(activation: str | Activation | Callable[[Tensor], Tensor] = "relu", **kwargs: Any) -> Activation:
    """Resolve ``activation`` (a name, an :class:`Activation`, or a callable) to an Activation.

    Keyword arguments are the activation's options (``negative_slope`` for
    ``leaky_relu``; those of :class:`QuadratureActivation` for a callable).
    """
    known = (isinstance(activation, str) and activation.lower() in _FACTORIES) or callable(activation)
    if known and not isinstance(activation, Activation):
        check_keywords(kwargs, activation, where="get_activation")
    if isinstance(activation, Activation):
        if kwargs:
            raise TypeError(f"activation options {sorted(kwargs)} cannot be applied to an Activation instance")
        return activation
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _FACTORIES:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} or a callable, got {activation!r}")

        def build() -> Activation:
            try:
                act = _FACTORIES[key](**kwargs)
            except TypeError as exc:
                raise TypeError(f"invalid options for activation {key!r}: {exc}") from None
            act._spec = (key, dict(kwargs))
            return act

        return _cached((key, *sorted(kwargs.items())), build)
    if callable(activation):
        return _cached(
            ("callable", activation, *sorted(kwargs.items())), lambda: QuadratureActivation(activation, **kwargs)
        )
    raise TypeError(f"activation must be one of {', '.join(ACTIVATIONS)} or a callable, got {activation!r}")


def activation_spec(activation: Activation) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` with which :func:`get_activation` rebuilds ``activation``, or ``None``.

    Known for the activations :func:`get_activation` built from a name; ``None`` for one made
    from a callable or constructed directly (nothing but the object itself describes it).
    """
    spec = getattr(activation, "_spec", None)
    return None if spec is None else (spec[0], dict(spec[1]))


def _cached(key: tuple[Any, ...], build: Callable[[], Activation]) -> Activation:
    try:
        hash(key)
    except TypeError:  # an unhashable option value: build without caching
        return build()
    with _LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
            return found
    act = build()
    with _LOCK:
        act = _CACHE.setdefault(key, act)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return act
