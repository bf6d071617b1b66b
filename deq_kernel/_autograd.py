"""The one rule for the package's hand-written backward passes: first derivatives only.

Every custom :class:`torch.autograd.Function` here (the implicit-function-theorem gradients of
the fixed points, the closed-form gradient of the Gaussian log density) returns exact first
derivatives and is not itself differentiable. A backward pass that is asked to build a graph
(``create_graph=True``: :func:`torch.autograd.functional.hessian`, gradient penalties) runs
with gradients enabled; there it raises instead of returning a second derivative that
silently misses this function's part (which is what ``once_differentiable`` does when the
incoming gradient depends on the same inputs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SECOND_DERIVATIVES", "first_derivatives_only", "refuse_function_transforms"]

#: The error of a backward pass asked to build a graph for second derivatives.
SECOND_DERIVATIVES = (
    "deq_kernel's implicit gradients are first derivatives only: differentiating them again "
    "(create_graph=True, torch.autograd.functional.hessian) is not supported"
)


def first_derivatives_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``backward`` staticmethod so that it raises under ``create_graph=True``."""

    @functools.wraps(backward)
    def guarded(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVES)
        return backward(ctx, *grads)

    return guarded


#: The error of a call under a torch.func transform.
FUNCTION_TRANSFORMS = (
    "{where} does not run under torch.func transforms (vmap, grad, jacrev, jvp): its fixed points "
    "are solved with data-dependent stopping and its implicit gradients are hand-written autograd "
    "Functions. Instead of vmap, pass a batch of inputs (shape (..., n, d)) or of hyperparameters; "
    "instead of torch.func.grad, use torch.autograd.grad or .backward()"
)


def refuse_function_transforms(where: str) -> None:
    """Raise a clear error when called under a :mod:`torch.func` transform.

    Without it, ``vmap`` fails deep inside with "data-dependent control flow" and ``grad``
    with a remark about ``setup_context``, neither naming the library or what to do.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        raise RuntimeError(FUNCTION_TRANSFORMS.format(where=where))
