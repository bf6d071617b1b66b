r"""The engine: the equilibrium fixed points of the kernel, and their implicit gradients.

A call flows one way through these modules::

    plan      validate the arguments; choose the pair solver (the only place a path is chosen)
    solve     s(x, x'), the diagonal, the pairs, and the requested output (NNGP, K*, NTK)
    diagonal  q = w D(q) + s, one scalar fixed point per point
    pairs     the per-point data and the operands of the one matrix product; solver adapters
    table     relu family: rho*(c~) tabulated per weight variance        } fused, in row
    arcsine   erf: t - alpha asin t = beta, monotone Newton steps         } blocks by
    series    smooth activations: Mehler's series, per-point coefficients } blocks
    general   any activation: bracketed Newton on the exact dual
    newton    the one stopping rule, the checked Newton method, ConvergenceError
    blocks    row blocks, symmetric mirroring, fused calls, implicit backward
    backend   torch.compile where it pays and works; memory checks
    ntk       the neural tangent kernel from the equilibrium quantities
    complement  pairs near correlation +-1 solved in a complement (relu family, cos, erf)
    conv      convolutional DEQs: pixel variances per image, same-pixel covariances per pair

Every path returns the same numbers to rounding; ``deq_kernel.settings.pair_solver`` forces
one (for verification).
"""

from __future__ import annotations

from .newton import ConvergenceError
from .plan import SOLVERS, PairSolver, choose
from .solve import solve

__all__ = ["SOLVERS", "ConvergenceError", "PairSolver", "choose", "solve"]
