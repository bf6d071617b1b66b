"""erf's pair equation in the arcsine variable (deq_kernel.equilibrium.arcsine) against the general solver."""

from __future__ import annotations

import math

import pytest
import torch

from deq_kernel import ConvergenceError, equilibrium_covariance, settings
from deq_kernel.equilibrium import arcsine, pairs


def _general(monkeypatch, *args, **kwargs):
    """The same call through the general safeguarded Newton solver instead of the arcsine solver."""
    with settings.pair_solver("general"):
        return equilibrium_covariance(*args, **kwargs)


CASES = [
    dict(weight_variance=0.7, bias_variance=0.3),
    dict(weight_variance=0.785, input_variance=5.0),  # near the bound pi/4
    dict(weight_variance=0.5, input_variance=1e4),  # saturated: t near 1
    dict(weight_variance=0.3, input_variance=1e8),
    dict(weight_variance=0.78, input_variance=1e-6, bias_variance=1e-8),  # tiny variances: alpha near 1
    dict(weight_variance=0.0, input_variance=2.0),
    dict(weight_variance=math.pi / 4 * (1 - 1e-9), input_variance=1e-3),
]


@pytest.mark.parametrize("hyper", CASES)
@pytest.mark.parametrize("output", ["nngp", "preactivation"])
def test_arcsine_path_matches_the_general_solver(rng, monkeypatch, hyper, output):
    x = torch.as_tensor(rng.normal(size=(40, 4)) * rng.uniform(0.01, 3.0, size=(40, 1)))
    z = torch.as_tensor(rng.normal(size=(25, 4)))
    for second in (None, z):
        ours = equilibrium_covariance(x, second, activation="erf", output=output, **hyper)
        general = _general(monkeypatch, x, second, activation="erf", output=output, **hyper)
        # The pair equation's condition number is 1 / (1 - alpha) <= 1 / (1 - 4 w / pi).
        assert torch.allclose(ours, general, rtol=1e-12, atol=1e-12 * float(general.abs().max()))


def test_blocks_whose_bound_fails_are_iterated_further(rng, monkeypatch):
    x = torch.as_tensor(rng.normal(size=(30, 3)) * 3.0)
    kw = dict(activation="erf", weight_variance=0.78, bias_variance=0.1)
    expected = equilibrium_covariance(x, **kw)
    steps = []
    solve = arcsine.solve_block

    def spy(*args):
        steps.append(args[-1])
        return solve(*args)

    monkeypatch.setattr(arcsine, "NEWTON_STEPS", 0)  # the final correction alone: the bound fails
    monkeypatch.setattr(arcsine, "solve_block", spy)
    with settings.pair_solver("arcsine"):  # the fused solver (small matrices take the dense one)
        got = equilibrium_covariance(x, **kw)
    assert steps[0] == 0 and max(steps) > 0  # the eager refinement ran
    assert torch.allclose(got, expected, rtol=1e-14, atol=1e-16)


def test_unconverged_erf_pairs_raise(rng, monkeypatch):
    x = torch.as_tensor(rng.normal(size=(10, 3)) * 3.0)
    kw = dict(activation="erf", weight_variance=0.78, bias_variance=0.1)
    # The pair equation holds: c = w V + s12 with V = E[erf(u) erf(v)] and c = K*.
    value = equilibrium_covariance(x, x.clone(), **kw)
    cov = equilibrium_covariance(x, x.clone(), output="preactivation", **kw)
    s12 = (x @ x.T) / 3 + 0.1
    assert torch.allclose(cov, 0.78 * value + s12, rtol=1e-14, atol=1e-14)
    kernel = pairs.arcsine_kernel

    def capped(*args, **kwargs):  # the diagonal converges as usual; the pair solve gets one step
        with settings.max_iterations(1):
            return kernel(*args, **kwargs)

    monkeypatch.setattr(pairs, "arcsine_kernel", capped)
    monkeypatch.setattr(arcsine, "NEWTON_STEPS", 0)
    with (
        settings.pair_solver("arcsine"),
        pytest.raises(ConvergenceError, match="erf pair fixed point did not converge in 1 iterations") as info,
    ):
        equilibrium_covariance(x, **kw)
    assert info.value.residual > 8 * torch.finfo(torch.float64).eps and info.value.iterations == 1


def test_float32_agrees_with_float64(rng):
    x = torch.as_tensor(rng.normal(size=(50, 5)))
    kw = dict(activation="erf", weight_variance=0.7, bias_variance=0.1)
    k64 = equilibrium_covariance(x, **kw)
    k32 = equilibrium_covariance(x.float(), **kw)
    assert k32.dtype == torch.float32
    assert torch.allclose(k32.double(), k64, rtol=0, atol=2e-6)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_float32_keeps_its_accuracy_at_large_variances(rng, scale):
    # Saturated pairs (1 - t ~ 1/(4q)) of large variances are left to the general solver
    # in float32, whose correlation variable resolves them; here they agree with float64.
    x = torch.as_tensor(rng.normal(size=(30, 2)) * scale)
    x = torch.cat([x, 0.999 * x[:5]])  # nearly collinear pairs: t near 1
    kw = dict(activation="erf", weight_variance=0.5)
    k64 = equilibrium_covariance(x, **kw)
    k32 = equilibrium_covariance(x.float(), **kw)
    # float32's own rounding of s12 costs about 1e-5 at scale 1000 (in either variable); the
    # arcsine variable there loses twice that (2e-5 on these points).
    assert torch.allclose(k32.double(), k64, rtol=0, atol=4e-6 if scale < 1000 else 1.5e-5)
    assert arcsine.arcsine_resolves(torch.tensor([scale**2], dtype=torch.float32), torch.ones(1)) == (scale < 30)
