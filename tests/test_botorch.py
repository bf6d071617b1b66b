"""deq_kernel.botorch: the harmonic DEQ kernel of unit-cube inputs and the recommended BoTorch surrogate."""

from __future__ import annotations

import pickle
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import picard_kernel

pytest.importorskip("botorch", reason="BoTorch is an optional extra (pip install 'deq-kernel[botorch]')")

from deq_kernel import DEQKernel
from deq_kernel.botorch import HarmonicDEQKernel, collapsed_fit, deq_surrogate


def harmonic_reference(x1, x2, *, activation, w, iv, b, harmonics):
    """The kernel by plain Picard iteration on features built here, divided by its diagonal."""
    x1, x2 = np.asarray(x1, float), np.asarray(x2, float)
    d = x1.shape[1]
    c = 0.5 ** np.arange(harmonics)
    c = c / c.sum()
    iv = np.broadcast_to(np.asarray(iv, float), (d,))

    def features(x):
        cols = []
        for i in range(d):
            for k in range(harmonics):
                scale = np.sqrt(2 * harmonics * iv[i] * c[k])
                cols += [scale * np.cos((k + 1) * np.pi * x[:, i]), scale * np.sin((k + 1) * np.pi * x[:, i])]
        return np.stack(cols, 1)

    k = picard_kernel(features(x1), features(x2), activation=activation, weight_variance=w, bias_variance=b)
    k0 = picard_kernel(features(x1[:1]), activation=activation, weight_variance=w, bias_variance=b)[0, 0]
    return k / k0


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_harmonic_kernel_against_picard_iteration_on_its_features(activation):
    rng = np.random.default_rng(0)
    x1, x2 = rng.uniform(size=(6, 3)), rng.uniform(size=(4, 3))
    kernel = HarmonicDEQKernel(activation, ard_num_dims=3).double()
    iv = np.array([0.5, 2.0, 1.0])
    kernel.weight_variance, kernel.input_variance, kernel.bias_variance = 0.7, torch.as_tensor(iv), 0.3
    with torch.no_grad():
        got = kernel(torch.as_tensor(x1), torch.as_tensor(x2)).to_dense().numpy()
    expected = harmonic_reference(x1, x2, activation=activation, w=0.7, iv=iv, b=0.3, harmonics=2)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_harmonic_kernel_is_stationary_with_unit_variance_and_positive_definite():
    torch.manual_seed(0)
    kernel = HarmonicDEQKernel("relu", ard_num_dims=4).double()
    x = 0.6 * torch.rand(40, 4, dtype=torch.float64)
    shift = 0.35 * torch.rand(4, dtype=torch.float64)
    with torch.no_grad():
        k = kernel(x).to_dense()
        assert torch.allclose(kernel(x + shift).to_dense(), k, rtol=0, atol=1e-12)  # depends on x - x' only
        assert torch.allclose(k.diagonal(), torch.ones(40, dtype=torch.float64), atol=1e-13)
        assert torch.allclose(kernel(x, diag=True), torch.ones(40, dtype=torch.float64), atol=1e-13)
        assert torch.equal(k, k.mT) and float(torch.linalg.eigvalsh(k).min()) > -1e-12
    assert kernel.is_stationary and "harmonics=2" in repr(kernel)
    # The plain kernel's variance grows to the box's corners: the reason for the harmonics.
    plain = DEQKernel("relu").double()
    corners = torch.tensor([[0.0] * 4, [1.0] * 4], dtype=torch.float64)
    with torch.no_grad():
        assert float(plain(corners, diag=True)[1]) > 2 * float(plain(corners, diag=True)[0])


def test_harmonic_kernel_gradients_match_finite_differences():
    torch.manual_seed(1)
    x = torch.rand(7, 2, dtype=torch.float64)
    kernel = HarmonicDEQKernel("tanh", ard_num_dims=2).double()

    def total(raw):
        kernel.raw_input_variance.data.copy_(raw)
        return kernel(x).to_dense().sum()

    raw = kernel.raw_input_variance.detach().clone() + torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    kernel.raw_input_variance.data.copy_(raw)
    kernel.zero_grad()
    kernel(x).to_dense().sum().backward()
    grad = kernel.raw_input_variance.grad.clone()
    h = 1e-6
    with torch.no_grad():
        for j in range(2):
            e = torch.zeros_like(raw)
            e[0, j] = h
            numeric = (total(raw + e) - total(raw - e)) / (2 * h)
            assert abs(float(grad[0, j]) - float(numeric)) < 1e-6 * max(1.0, abs(float(numeric)))


def test_bad_input_to_the_harmonic_kernel_and_the_surrogate():
    kernel = HarmonicDEQKernel("relu", ard_num_dims=2).double()
    with pytest.raises(ValueError, match=r"unit cube \[0, 1\]\^d, got values from -0.5 .*Normalize"):
        kernel(torch.tensor([[-0.5, 0.2], [0.1, 0.3]], dtype=torch.float64)).to_dense()
    with pytest.raises((ValueError, RuntimeError), match="ard_num_dims"):  # GPyTorch's own check comes first
        kernel(torch.rand(4, 3, dtype=torch.float64)).to_dense()
    with pytest.raises(ValueError, match="harmonics must be a positive integer"):
        HarmonicDEQKernel("relu", harmonics=0)
    X, Y = torch.rand(8, 2, dtype=torch.float64), torch.rand(8, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="1 point\\(s\\) outside bounds"):
        deq_surrogate(torch.cat([X, torch.tensor([[2.0, 0.5]], dtype=torch.float64)]), torch.rand(9, 1).double())
    with pytest.raises(ValueError, match=r"bounds must have shape \(2, 2\)"):
        deq_surrogate(X, Y, bounds=torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="train_X must be a tensor of shape"):
        deq_surrogate(X[0], Y)


def test_surrogate_priors_replace_or_remove_the_defaults():
    from gpytorch.priors import GammaPrior, LogNormalPrior

    X, Y = torch.rand(8, 3, dtype=torch.float64), torch.rand(8, 1, dtype=torch.float64)

    def priors_of(model):
        return {name: prior for name, _, prior, _, _ in model.covar_module.named_priors()}

    default = priors_of(deq_surrogate(X, Y))
    assert set(default) == {"input_variance_prior", "bias_variance_prior"}
    chosen = deq_surrogate(
        X,
        Y,
        priors={
            "input_variance_prior": LogNormalPrior(2.3, 1.5),
            "bias_variance_prior": None,
            "weight_variance_prior": GammaPrior(2.0, 2.0),
        },
    )
    got = priors_of(chosen)
    assert set(got) == {"input_variance_prior", "weight_variance_prior"}
    assert float(got["input_variance_prior"].loc) == pytest.approx(2.3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['noise_prior'\]"):
        deq_surrogate(X, Y, priors={"noise_prior": GammaPrior(1.0, 1.0)})
    with pytest.raises(TypeError, match=r"priors\['bias_variance_prior'\] must be a gpytorch Prior"):
        deq_surrogate(X, Y, priors={"bias_variance_prior": 0.1})


def test_surrogate_in_a_box_batched_multi_output_and_fantasies():
    from botorch.fit import fit_gpytorch_mll
    from botorch.sampling import SobolQMCNormalSampler
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(2)
    bounds = torch.tensor([[-5.0, 0.0], [10.0, 15.0]], dtype=torch.float64)
    X = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(12, 2, dtype=torch.float64)
    Y = torch.sin(X[:, :1] / 3) + torch.cos(X[:, 1:] / 4)
    model = deq_surrogate(X, Y, bounds=bounds)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    test = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(5, 2, dtype=torch.float64)
    posterior = model.posterior(test)
    assert posterior.mean.shape == (5, 1) and bool(torch.isfinite(posterior.variance).all())
    assert collapsed_fit(model) == []
    # Two outcomes (a batched kernel, one per outcome) and a batch of 3 training sets.
    two = deq_surrogate(X, torch.cat([Y, -Y], -1), bounds=bounds)
    assert two.covar_module.batch_shape == (2,) and two.posterior(test).mean.shape == (5, 2)
    batched = deq_surrogate(X.expand(3, 12, 2), Y.expand(3, 12, 1), bounds=bounds)
    assert batched.posterior(test).mean.shape == (3, 5, 1)
    fantasy = model.fantasize(test[:2], sampler=SobolQMCNormalSampler(torch.Size([4])))
    assert fantasy.posterior(test).mean.shape == (4, 5, 1)


def test_collapsed_fits_are_reported():
    X = torch.rand(10, 3, dtype=torch.float64)
    model = deq_surrogate(X, X.sum(-1, keepdim=True))
    model.likelihood.noise = 0.9
    kernel = model.covar_module
    kernel.weight_variance = 0.995 * float(kernel.raw_weight_variance_constraint.upper_bound)
    kernel.input_variance = 1e-6
    found = " | ".join(collapsed_fit(model))
    assert "explains the data as noise" in found and "at its upper end" in found and "a constant function" in found
    kernel.weight_variance, kernel.input_variance = 1.0, 1e5
    model.likelihood.noise = 1e-3
    assert collapsed_fit(model) == ["an input variance is 1e+05: the fit separates the points completely"]
    with pytest.raises(TypeError, match="must be a DEQKernel"):
        from botorch.models import SingleTaskGP

        collapsed_fit(SingleTaskGP(X, X.sum(-1, keepdim=True)))


def test_harmonic_kernel_from_threads_and_through_save_and_load(tmp_path):
    torch.manual_seed(3)
    kernel = HarmonicDEQKernel("erf", ard_num_dims=3).double()
    kernel.input_variance = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    sets = [torch.rand(30, 3, dtype=torch.float64) for _ in range(8)]
    with torch.no_grad():
        serial = [kernel(x).to_dense() for x in sets]
        results = [None] * 8

        def work(i):
            results[i] = kernel(sets[i]).to_dense()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(a, b) for a, b in zip(results, serial, strict=True))
        again = pickle.loads(pickle.dumps(kernel))
        assert torch.equal(again(sets[0]).to_dense(), serial[0]) and again.harmonics == kernel.harmonics
        torch.save(kernel.state_dict(), tmp_path / "k.pt")
        fresh = HarmonicDEQKernel("erf", ard_num_dims=3).double()
        fresh.load_state_dict(torch.load(tmp_path / "k.pt", weights_only=True))
        assert torch.equal(fresh(sets[1]).to_dense(), serial[1])


def test_six_iterations_on_hartmann6_improve_on_the_initial_design():
    # The recommended construction, in BoTorch's loop (benchmarks/bench_bo.py): the plain DEQ
    # kernel on unit-cube inputs never improved on its initial design here.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_bo
    finally:
        sys.path.pop(0)
    for seed in (0, 1):
        best, _ = bench_bo.run_loop("deq-relu", "hartmann6", seed, 14, 6)
        assert best[-1] > best[0] + 0.1, (seed, best)


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_marginal_likelihood_with_the_priors_is_finite_at_the_ends_of_the_range(activation):
    # The priors' densities at the constraints' ends: a variance that underflowed to exactly 0
    # made LogNormalPrior raise from inside fit_gpytorch_mll (an L-BFGS step went there).
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(4)
    X = torch.rand(10, 3, dtype=torch.float64)
    model = deq_surrogate(X, X.sum(-1, keepdim=True), activation=activation)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    kernel = model.covar_module
    for raw in (-1e4, -30.0, 0.0, 30.0, 1e4):
        for parameter in (kernel.raw_input_variance, kernel.raw_bias_variance, kernel.raw_weight_variance):
            with torch.no_grad():
                parameter.fill_(raw)
            model.zero_grad()
            value = mll(model(*model.train_inputs), model.train_targets)
            value.backward()
            assert bool(torch.isfinite(value)), (raw, parameter.shape)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert all(bool(torch.isfinite(g).all()) for g in grads), raw


def test_gradient_reaches_a_second_argument_equal_to_the_first():
    """K(x, x') with x' a copy of x (not the same tensor): the gradient in x' is its own, not sent to x."""
    kernel = HarmonicDEQKernel("relu").double()
    x = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    copy = x.clone().requires_grad_(True)
    weights = torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (grad,) = torch.autograd.grad((kernel.forward(x, copy) * weights).sum(), copy)
    step = 1e-6
    for i, j in [(0, 0), (3, 1)]:
        up, down = x.clone(), x.clone()
        up[i, j] += step
        down[i, j] -= step
        with torch.no_grad():
            fd = ((kernel.forward(x, up) - kernel.forward(x, down)) * weights).sum() / (2 * step)
        assert float(grad[i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
