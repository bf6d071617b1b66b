"""Solver settings, as context managers (in the manner of ``gpytorch.settings``).

Each setting holds a thread-local value, so concurrent calls from several threads
can use different settings without seeing each other's::

    with deq_kernel.settings.max_iterations(5):
        K = deq_kernel.equilibrium_covariance(x)   # may raise ConvergenceError
"""

from __future__ import annotations

import numbers
import os
import threading
from typing import Any, ClassVar

__all__ = ["compile", "max_block_size", "max_iterations", "pair_solver", "tolerance_factor"]


class _Setting:
    """A thread-local value with a default, set for the duration of a ``with`` block."""

    _default: ClassVar[Any]
    _local: ClassVar[threading.local]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._local = threading.local()

    def __init__(self, value: Any) -> None:
        self._value = self._validate(value)

    @classmethod
    def _validate(cls, value: Any) -> Any:
        return value

    @classmethod
    def value(cls) -> Any:
        stack = getattr(cls._local, "stack", None)
        return stack[-1] if stack else cls._default

    def __enter__(self) -> _Setting:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(self._value)
        return self

    def __exit__(self, *exc: object) -> None:
        self._local.stack.pop()


def positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int``: any integer (numpy's too) of at least 1, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class max_iterations(_Setting):
    """Largest number of Newton iterations a fixed-point solve may take (default 100).

    A solve that has not met its stopping rule after this many iterations raises
    :class:`deq_kernel.ConvergenceError`; it never returns the unconverged values.
    """

    _default = 100

    @classmethod
    def _validate(cls, value: Any) -> int:
        return positive_int("max_iterations", value)


class tolerance_factor(_Setting):
    """The stopping rule's tolerance, in units of the working dtype's machine epsilon.

    A fixed point is accepted when its residual is at most ``tolerance_factor * eps``
    (relative to the size of the terms of the equation). The default, 64, sits a
    little above the rounding floor of the residual's evaluation.
    """

    _default = 64.0

    @classmethod
    def _validate(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
            raise ValueError(f"tolerance_factor must be a number >= 1, got {value!r}")
        return float(value)


class compile(_Setting):
    """Fuse the pair kernels with ``torch.compile``: ``"auto"`` (default), ``True`` or ``False``.

    ``"auto"`` compiles, in a background thread at low priority, the kernels that serve pair
    arrays of at least 4M entries (``n`` about 2048 and up), and runs the eager kernels until
    the compiled ones are ready: no call waits for the compiler, which takes from seconds to
    minutes the first time on a machine (its results are cached on disk for later processes).
    ``True`` compiles whatever it serves, at once (the first call of each kernel waits);
    ``False`` never compiles. Without a working compiler the eager kernels are used in every
    case; results agree to rounding either way.

    The default can be set for a whole process without code, by the environment variable
    ``DEQ_KERNEL_COMPILE`` (``auto``, ``1``/``true`` or ``0``/``false``), read at import.
    """

    _default = "auto"

    @classmethod
    def _validate(cls, value: Any) -> Any:
        if value not in ("auto", True, False):
            raise ValueError(f"compile must be 'auto', True or False, got {value!r}")
        return value


def _compile_from_environment() -> Any:
    raw = os.environ.get("DEQ_KERNEL_COMPILE")
    if raw is None:
        return "auto"
    value = {"auto": "auto", "1": True, "true": True, "0": False, "false": False}.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"DEQ_KERNEL_COMPILE must be auto, 1, true, 0 or false, got {raw!r}")
    return value


compile._default = _compile_from_environment()


class max_block_size(_Setting):
    """Most pair entries computed at once (default ``None``: chosen automatically).

    Temporaries of the pair computation are proportional to this, not to the matrix:
    a small block computes matrices whose temporaries would not fit in memory, at
    some cost in speed.
    """

    _default = None

    @classmethod
    def _validate(cls, value: Any) -> int | None:
        return None if value is None else positive_int("max_block_size", value)


class pair_solver(_Setting):
    """Force the pair solver by name (default ``"auto"``: the engine's plan chooses).

    The names are those of :data:`deq_kernel.equilibrium.plan.SOLVERS`. Every solver returns
    the same numbers to rounding; forcing one is for verification and benchmarking. Forcing a
    solver that cannot serve a call raises ``ValueError`` saying why.
    """

    _default = "auto"

    @classmethod
    def _validate(cls, value: Any) -> str:
        from .equilibrium.plan import SOLVERS  # the names live with the solvers

        names = ("auto", *(s.name for s in SOLVERS))
        if value not in names:
            raise ValueError(f"pair_solver must be one of {', '.join(map(repr, names))}, got {value!r}")
        return value
