r"""The one stopping rule and the one checked Newton method of the engine.

Every fixed point of the kernel is the root of an increasing scalar equation, per point
or per pair, solved elementwise and vectorised. Whatever the path, a root is accepted
when its residual is at the rounding level of the working dtype,
:func:`tolerance` = ``settings.tolerance_factor`` machine epsilons relative to the size of
the equation's terms, and a path that cannot show that within
``settings.max_iterations`` iterations raises :class:`ConvergenceError`, built here by
:func:`unconverged`. An unconverged value is never returned.

:func:`newton` is Newton's method safeguarded by bisection: a bracket with ``r <= 0`` on
one side and ``r >= 0`` on the other is kept, and a step that leaves it is replaced by the
bracket's midpoint (or, while the bracket is open above, ``hi = inf``, by ``2 x + 1``).
Once every entry meets the stopping rule, one more Newton step takes it from the
tolerance to rounding level.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import settings

__all__ = ["ConvergenceError", "newton", "tolerance", "unconverged"]


class ConvergenceError(RuntimeError):
    """A fixed-point solve did not reach its tolerance within the iteration cap.

    Attributes
    ----------
    residual : float
        The largest residual left, in the units of the equation solved.
    iterations : int
        Iterations taken.
    """

    def __init__(self, message: str, *, residual: float, iterations: int) -> None:
        super().__init__(message)
        self.residual = residual
        self.iterations = iterations


def tolerance(dtype: torch.dtype) -> float:
    """The stopping rule's relative residual: ``settings.tolerance_factor`` epsilons of ``dtype``."""
    return settings.tolerance_factor.value() * torch.finfo(dtype).eps


def unconverged(
    what: str, worst: float, tol: float, iterations: int, measure: str = "relative residual"
) -> ConvergenceError:
    """The error every path raises when a fixed point misses the stopping rule."""
    return ConvergenceError(
        f"the {what} fixed point did not converge in {iterations} iterations "
        f"(largest {measure} {worst:.3g}, tolerance {tol:.3g}); raise "
        "deq_kernel.settings.max_iterations or check the hyperparameters",
        residual=worst,
        iterations=iterations,
    )


def newton(
    residual: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    *,
    what: str,
    skip: Tensor | None = None,
) -> Tensor:
    """Solve the increasing equations ``r(x) = 0`` elementwise, with ``r(lo) <= 0 <= r(hi)``.

    ``residual(x)`` returns ``(r, dr/dx, scale)``; an entry has converged when
    ``|r| <= tol * scale`` or its bracket has shrunk to rounding size. Entries in
    ``skip`` are left as they are. ``hi`` may be infinite (a root known to lie above
    ``lo`` only): a step that leaves the bracket then goes to ``2 x + 1`` instead of the
    midpoint, until a point with ``r >= 0`` closes it.
    """
    tol = tolerance(x.dtype)
    max_iter = settings.max_iterations.value()
    for iteration in range(max_iter + 1):
        r, dr, scale = residual(x)
        done = (r.abs() <= tol * scale) | (hi - lo <= tol * (1.0 + x.abs()))
        if skip is not None:
            done = done | skip
        lo = torch.where(r < 0, x, lo)
        hi = torch.where(r > 0, x, hi)
        step = x - r / dr
        inside = (dr > 0) & (step >= lo) & (step <= hi)  # False for NaN as well
        fallback = torch.where(torch.isinf(hi), 2.0 * x.abs() + 1.0, 0.5 * (lo + hi))
        newton_or_bisect = torch.where(inside, step, fallback)
        if bool(done.all()):
            # One more Newton step from the converged point: the stopping test is met
            # at the tolerance, the step takes the root to rounding level.
            return torch.where(inside & ~(skip if skip is not None else torch.zeros_like(done)), step, x)
        if iteration == max_iter:
            open_r = torch.where(done, torch.zeros_like(r), r.abs() / scale)
            raise unconverged(what, float(open_r.max()), tol, max_iter)
        x = torch.where(done, x, newton_or_bisect)
    raise AssertionError("unreachable")  # pragma: no cover
