"""Independent reference computations for the tests (numpy and scipy only).

Nothing here imports deq_kernel. Closed-form duals are written from their textbook
formulas; every other dual is a two-dimensional trapezoid rule in the Cholesky
parametrisation of the pair; the kernel itself is the original authors' method, the
plain Picard iteration of the whole covariance matrix, run until the largest change
is below 1e-14.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf as _erf
from scipy.special import expit

SQRT_2PI = math.sqrt(2.0 * math.pi)


def _gelu(x: np.ndarray) -> np.ndarray:
    return x * 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


FUNCTIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "abs": np.abs,
    "identity": lambda x: x,
    "step": lambda x: np.greater(x, 0).astype(float),
    "erf": _erf,
    "sin": np.sin,
    "cos": np.cos,
    "gelu": _gelu,
    "tanh": np.tanh,
    "sigmoid": expit,
    "softplus": lambda x: np.logaddexp(0.0, x),
    "silu": lambda x: x * expit(x),
}


def leaky(slope: float):
    return lambda x: np.where(x > 0, x, slope * x)


# ----------------------------------------------------------------------- closed forms


def _arccos_j(rho: np.ndarray) -> np.ndarray:
    """Degree-1 arc-cosine kernel of unit-variance inputs (Cho & Saul, 2009)."""
    rho = np.clip(rho, -1.0, 1.0)
    th = np.arccos(rho)
    return (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)


def closed_form_dual(name: str, q1, q2, c, slope: float = 0.0):
    """E[phi(u) phi(v)] for (u, v) ~ N(0, [[q1, c], [c, q2]]) by the classical formulas."""
    q1, q2, c = np.broadcast_arrays(*(np.asarray(t, float) for t in (q1, q2, c)))
    g = np.sqrt(q1 * q2)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(g > 0, c / np.where(g > 0, g, 1), 0.0)
    if name == "relu":
        return g * _arccos_j(rho)
    if name == "leaky_relu":
        # phi = relu(x) - a relu(-x): four arc-cosine terms.
        a = slope
        return g * (_arccos_j(rho) + a * a * _arccos_j(rho) - 2 * a * _arccos_j(-rho))
    if name == "abs":
        return g * (2 * _arccos_j(rho) + 2 * _arccos_j(-rho))
    if name == "identity":
        return c
    if name == "step":
        return np.where(g > 0, (np.pi - np.arccos(np.clip(rho, -1, 1))) / (2 * np.pi), 0.0)
    if name == "erf":
        return 2 / np.pi * np.arcsin(2 * c / np.sqrt((1 + 2 * q1) * (1 + 2 * q2)))
    if name == "sin":
        return np.exp(-(q1 + q2) / 2) * np.sinh(c)
    if name == "cos":
        return np.exp(-(q1 + q2) / 2) * np.cosh(c)
    raise KeyError(name)


CLOSED_FORMS = ("relu", "leaky_relu", "abs", "identity", "step", "erf", "sin", "cos")


# ----------------------------------------------------------------------- quadrature


def _grid(h: float = 0.08, half_width: float = 9.0):
    # linspace, with the weights from its exact spacing: np.arange(..., h) drifts (by 5.5e-13 of
    # the window at h = 0.001), and a difference of two nodes is off by rounding of the nodes, either
    # of which turned the weights' sum into 1 +- 5.5e-13.
    count = 2 * round(half_width / h) + 1
    z = np.linspace(-half_width, half_width, count)
    wts = np.exp(-0.5 * z * z) * (2.0 * half_width / (count - 1)) / SQRT_2PI
    return z, wts


def quadrature_dual(fn, q1, q2, c, h: float = 0.08):
    """E[fn(u) fn(v)] by a 2-D trapezoid rule, u = sqrt(q1) z1, v = (c/sqrt(q1)) z1 + sqrt(q2 - c^2/q1) z2."""
    z, wts = _grid(h)
    q1, q2, c = (np.asarray(t, float) for t in np.broadcast_arrays(q1, q2, c))
    out = np.empty(q1.shape)
    for idx in np.ndindex(q1.shape):
        a, b, cc = q1[idx], q2[idx], c[idx]
        if a <= 0:
            out[idx] = fn(np.zeros(1))[0] * np.sum(wts * fn(math.sqrt(max(b, 0)) * z))
            continue
        l10 = cc / math.sqrt(a)
        l11 = math.sqrt(max(b - l10 * l10, 0.0))
        u = math.sqrt(a) * z
        v = l10 * z[:, None] + l11 * z[None, :]
        out[idx] = np.sum(wts[:, None] * wts[None, :] * fn(u)[:, None] * fn(v))
    return out


def quadrature_diag(fn, q, h: float = 0.02):
    z, wts = _grid(h, 12.0)
    q = np.asarray(q, float)
    return np.array([np.sum(wts * fn(math.sqrt(max(v, 0)) * z) ** 2) for v in q.ravel()]).reshape(q.shape)


def nested_quadrature_dual(fn, q1: float, q2: float, rho: float) -> float:
    """E[fn(u) fn(v)] by nested adaptive quadrature (scipy's QUADPACK), for large variances.

    ``u = sqrt(q1) z1``, ``v = sqrt(q2) (rho z1 + sqrt(1 - rho^2) t)``: the outer integral over
    ``z1`` breaks at 0, where ``fn(u)`` changes fastest, and the inner one over ``t`` at
    ``-rho z1 / sqrt(1 - rho^2)``, where ``fn(v)`` does. ``fn`` takes and returns floats.
    Accurate to about 1e-12 up to variances of 1e6 (QUADPACK's roundoff beyond).
    """
    from scipy import integrate

    a1, a2, s = math.sqrt(q1), math.sqrt(q2), math.sqrt(1.0 - rho * rho)

    def density(z: float) -> float:
        return math.exp(-0.5 * z * z) / SQRT_2PI

    def inner(z1: float) -> float:
        crossing = -rho * z1 / s
        points = [crossing] if -12.0 < crossing < 12.0 else None
        return integrate.quad(
            lambda t: fn(a2 * (rho * z1 + s * t)) * density(t),
            -12.0,
            12.0,
            points=points,
            limit=400,
            epsabs=1e-15,
            epsrel=1e-13,
        )[0]

    return integrate.quad(
        lambda z1: fn(a1 * z1) * density(z1) * inner(z1),
        -12.0,
        12.0,
        points=[0.0],
        limit=400,
        epsabs=1e-15,
        epsrel=1e-13,
    )[0]


# ----------------------------------------------------------------------- Picard


def picard_kernel(
    x1,
    x2=None,
    *,
    activation: str = "relu",
    weight_variance: float = 1.0,
    input_variance=1.0,
    bias_variance: float = 0.0,
    output_variance: float = 1.0,
    output: str = "nngp",
    slope: float = 0.0,
    tol: float = 1e-14,
    max_iter: int = 100_000,
):
    """The whole covariance matrix by plain Picard iteration from K = S (the authors' method)."""
    x1 = np.asarray(x1, float)
    x = x1 if x2 is None else np.vstack([x1, np.asarray(x2, float)])
    d = x.shape[1]
    iv = np.broadcast_to(np.asarray(input_variance, float), (d,))
    s = (x * iv / d) @ x.T + bias_variance
    if activation in CLOSED_FORMS:

        def dual(k):
            dg = np.diag(k)
            return closed_form_dual(activation, dg[:, None], dg[None, :], k, slope=slope)

    else:
        fn = FUNCTIONS[activation] if isinstance(activation, str) else activation

        def dual(k):
            dg = np.diag(k)
            n = len(dg)
            out = np.empty_like(k)
            iu = np.triu_indices(n)
            vals = quadrature_dual(fn, dg[iu[0]], dg[iu[1]], k[iu])
            out[iu] = vals
            out[(iu[1], iu[0])] = vals
            return out

    k = s.copy()
    for _ in range(max_iter):
        new = weight_variance * dual(k) + s
        change = np.max(np.abs(new - k))
        k = new
        if change < tol * max(1.0, np.max(np.abs(k))):
            break
    else:
        raise RuntimeError("reference Picard iteration did not converge")
    out = k if output == "preactivation" else output_variance * dual(k)
    n1 = x1.shape[0]
    return out if x2 is None else out[:n1, n1:]


# ----------------------------------------------------------------------- convolutional


def conv_picard_kernel(
    images: np.ndarray,
    *,
    kernel_size: int,
    activation: str,
    weight_variance: float,
    input_variance: float = 1.0,
    bias_variance: float = 0.0,
    output_variance: float = 1.0,
    readout: str = "flatten",
    tol: float = 1e-13,
    max_iter: int = 5000,
) -> np.ndarray:
    """Kernel of a convolutional DEQ by plain iteration over every pixel pair.

    ``images`` is ``(n, C, H, W)``. The covariance of every (image, pixel) with every (image,
    pixel) is iterated whole, ``Sigma <- w A[V(Sigma)] + u A[<x_p, x'_p'> / C] + b``, with
    ``A`` the patch average shifting both pixels by the same offset (zero outside the grid)
    and ``V`` the closed-form dual, until the largest change is below ``tol`` times its
    largest entry; the kernel is the output variance times the pixel average of the
    same-pixel duals (``readout="flatten"``) or of all pixel pairs' duals (``"gap"``).
    """
    n, c, h, w = images.shape
    r = kernel_size // 2

    def average(m: np.ndarray) -> np.ndarray:  # m: (n, H, W, n, H, W)
        pad = [(0, 0), (r, r), (r, r), (0, 0), (r, r), (r, r)]
        mp = np.pad(m, pad)
        out = np.zeros_like(m)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                out += mp[:, r + dy : r + dy + h, r + dx : r + dx + w, :, r + dy : r + dy + h, r + dx : r + dx + w]
        return out / kernel_size**2

    gram = np.einsum("acyx,bcuv->ayxbuv", images, images) / c
    s = input_variance * average(gram) + bias_variance
    sigma = s.copy()
    for _ in range(max_iter):
        flat = sigma.reshape(n * h * w, n * h * w)
        var = np.diag(flat)
        dual = closed_form_dual(activation, var[:, None], var[None, :], flat).reshape(sigma.shape)
        new = weight_variance * average(dual) + s
        change = np.abs(new - sigma).max()
        sigma = new
        if change <= tol * np.abs(sigma).max():
            break
    else:
        raise RuntimeError("the convolutional Picard iteration did not converge")
    flat = sigma.reshape(n * h * w, n * h * w)
    var = np.diag(flat)
    dual = closed_form_dual(activation, var[:, None], var[None, :], flat).reshape(sigma.shape)
    if readout == "gap":
        return output_variance * dual.mean((1, 2, 4, 5))
    same = np.einsum("ayxbyx->ab", dual) / (h * w)
    return output_variance * same
