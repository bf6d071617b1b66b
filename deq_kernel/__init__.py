"""deq_kernel: the Gaussian-process kernel of infinitely wide deep equilibrium models.

The covariance of ``f(x) = v . h*(x)``, ``h* = phi(W h* + U x + b)``, as width goes to
infinity (Gao, Huo, Liu and Gao, NeurIPS 2023), computed exactly, with implicit
gradients, for GPyTorch, BoTorch and scikit-learn.
"""

from __future__ import annotations

from . import activations, settings
from .activations import ACTIVATIONS, Activation, get_activation
from .convolutional import conv_equilibrium_covariance
from .equilibrium.backend import OutputTooLargeError
from .equilibrium.newton import ConvergenceError
from .functional import equilibrium_covariance
from .gpytorch import DEQKernel

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "ConvergenceError",
    "DEQKernel",
    "OutputTooLargeError",
    "__version__",
    "activations",
    "conv_equilibrium_covariance",
    "equilibrium_covariance",
    "get_activation",
    "settings",
]
