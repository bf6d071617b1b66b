"""Finite-width DEQs: the Monte Carlo covariance against the kernel, Gaussian outputs,
the fixed point against plain iteration, implicit gradients against unrolled autograd,
the finite-depth kernel against an independent recursion, and bad input.

Every statistical test has a fixed seed. Widths and sample sizes are chosen so that the
assertions hold with a wide margin on these seeds and fail if the code is wrong (a
kernel off by a few percent, a wrong initialisation scale, a non-Gaussian sampler).
Runs use the paper's weight scale sigma_w = 0.6 (weight_variance 0.36) unless stated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import closed_form_dual, quadrature_dual
from scipy import stats

from deq_kernel import ConvergenceError, equilibrium_covariance
from deq_kernel.finite import (
    DEQNetwork,
    DroppedNetworksWarning,
    _SubspaceWeights,
    empirical_covariance,
    finite_depth_covariance,
    network_generator,
    network_kernels,
    sample_outputs,
)

WV = 0.36  # the paper's sigma_w = 0.6


@pytest.fixture(scope="module")
def points() -> torch.Tensor:
    # Ten standard normal points in d = 10, as in the paper's covariance experiments.
    return torch.randn(10, 10, generator=torch.Generator().manual_seed(4567), dtype=torch.float64)


def _frobenius_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(estimate - exact) / torch.linalg.matrix_norm(exact))


# --------------------------------------------------------------------------- the wide limit


@pytest.fixture(scope="module")
def wide_outputs(points) -> torch.Tensor:
    """f(x) of 3000 independent relu networks of width 512 (the issue's acceptance size)."""
    return sample_outputs(points, width=512, n_networks=3000, seed=11, weight_variance=WV).double()


def test_output_covariance_at_width_512_within_6_percent(points, wide_outputs):
    exact = equilibrium_covariance(points, weight_variance=WV)
    estimate = wide_outputs.T @ wide_outputs / wide_outputs.shape[0]
    error = _frobenius_error(estimate, exact)
    # Measured 0.03 (Monte Carlo error of 3000 draws, about sqrt(2/3000) relative). A
    # kernel 10% too large gives 0.10; the wrong W scale (variance 1/d) gives 0.4.
    assert error < 0.06
    assert _frobenius_error(estimate, 1.1 * exact) > 0.06


def test_empirical_covariance_matches_the_kernel_within_its_standard_error(points):
    exact = equilibrium_covariance(points, weight_variance=WV)
    estimate, stderr = empirical_covariance(
        points, width=512, n_networks=300, seed=3, weight_variance=WV, estimator="conditional", return_stderr=True
    )
    # v averaged out exactly: the error left is the O(1/width) bias plus a small noise.
    assert _frobenius_error(estimate, exact) < 0.02
    z = ((estimate - exact) / stderr).abs()
    assert float(z.max()) < 4.5


# --------------------------------------------------------------------------- the subspace sampler


def _adaptive_queries(op: _SubspaceWeights, batch: int, n: int, width: int, dtype: torch.dtype, steps: int):
    """Apply ``op`` to vectors that depend on its earlier answers, with zero, repeated and
    duplicated rows among them; return the queries and the answers."""
    gen = torch.Generator().manual_seed(5)
    queries, answers = [], []
    h = torch.zeros(batch, n, width, dtype=dtype)
    for step in range(steps):
        if step % 4 == 2:
            h = 2.0 * queries[-1]  # directions met before
        elif step % 4 == 3:
            h = h.clone()
            h[:, -1] = h[:, 0]  # two equal rows
        queries.append(h)
        answers.append(op(h))
        h = torch.tanh(answers[-1] + torch.randn(batch, n, width, generator=gen, dtype=dtype))
    return queries, answers


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_subspace_weights_answer_as_one_matrix(dtype, tol):
    # Once the basis is complete the operator holds W whole: every earlier answer must be W
    # times its query (the basis kept orthonormal throughout, also for zero and repeated rows).
    width = 24
    op = _SubspaceWeights([torch.Generator().manual_seed(i) for i in range(3)], width, 0.7, dtype, "cpu")
    queries, answers = _adaptive_queries(op, 3, 4, width, dtype, 12)
    assert op.whole is not None
    for h, out in zip(queries, answers, strict=True):
        expected = h @ op.whole.mT
        assert float((out - expected).abs().max()) <= tol * float(expected.abs().max() + 1)


def test_subspace_weights_have_the_law_of_a_dense_draw():
    # W assembled from adaptive queries (each depending on earlier answers) over 3000 operators:
    # its entries must be independent N(0, std^2), as a dense draw's.
    width, std, count = 6, 0.7, 3000
    op = _SubspaceWeights([torch.Generator().manual_seed(i) for i in range(count)], width, std, torch.float64, "cpu")
    _adaptive_queries(op, count, 2, width, torch.float64, 5)
    entries = op.whole.reshape(count, -1) / std
    assert stats.kstest(entries.flatten().numpy(), "norm").pvalue > 1e-3
    corr = torch.corrcoef(entries.T)
    off = corr - torch.eye(width * width, dtype=torch.float64)
    assert float(off.abs().max()) < 5.0 / math.sqrt(count) * 1.6
    assert abs(float(entries.var()) - 1.0) < 0.03
    # A biased construction fails this: the entries along the first query's direction alone.
    first = op.whole[:, :, 0] / std
    assert abs(float(first.var()) - 1.0) < 0.08


def test_subspace_sampler_has_the_dense_samplers_law(points):
    # The two modes draw other networks from the same distribution: their estimates of the
    # width-64 covariance (finite-width bias included) agree within their standard errors.
    kw = dict(width=64, n_networks=600, weight_variance=WV, estimator="conditional", return_stderr=True)
    dense, se_dense = empirical_covariance(points, seed=0, **kw)
    sub, se_sub = empirical_covariance(points, seed=0, weights="subspace", **kw)
    z = (dense - sub).abs() / torch.sqrt(se_dense**2 + se_sub**2)
    assert float(z.max()) < 4.5
    assert not torch.equal(dense, sub)
    # And both tend to the kernel.
    exact = equilibrium_covariance(points, weight_variance=WV)
    assert _frobenius_error(sub, exact) < 0.05


def test_subspace_sampler_is_reproducible_and_batch_independent(points):
    kw = dict(width=200, n_networks=6, seed=3, activation="tanh", weight_variance=WV, weights="subspace")
    first = sample_outputs(points, **kw)
    assert torch.equal(first, sample_outputs(points, **kw))
    # One network per batch stops each iteration at its own tolerance: equal to it.
    single = sample_outputs(points, batch_size=1, **kw)
    assert torch.allclose(first, single, rtol=0, atol=1e-4 * float(first.abs().max()))


def test_output_marginals_are_gaussian_at_width_512(points, wide_outputs):
    k = equilibrium_covariance(points, weight_variance=WV, diag=True)
    pvalues = [stats.kstest((wide_outputs[:, i] / k[i].sqrt()).numpy(), "norm").pvalue for i in range(len(k))]
    # Against N(0, k(x, x)) itself, not a fitted normal; all ten points at a familywise 1%.
    assert min(pvalues) > 0.01 / len(k), pvalues


def test_output_marginals_are_not_gaussian_at_width_8(points):
    with pytest.warns(DroppedNetworksWarning) as record:
        outputs = sample_outputs(
            points, width=8, n_networks=3000, seed=11, weight_variance=WV, max_iter=150, nonconverged="drop"
        )
    assert "of 3000 networks" in str(record[0].message)
    assert outputs.shape[0] >= 2990  # a handful of width-8 draws have no attracting equilibrium
    k = equilibrium_covariance(points, weight_variance=WV, diag=True)
    pvalues = [stats.kstest((outputs[:, i].double() / k[i].sqrt()).numpy(), "norm").pvalue for i in range(len(k))]
    assert max(pvalues) < 0.01, pvalues


@pytest.mark.slow  # the paper's size; the fast variant is the width-512, 3000-network test above
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_output_marginals_are_gaussian_at_the_papers_size(activation, slow_selected):
    """Gao et al.'s Figure 1 setting: 10000 networks of width 1000, sigma_w = 0.6, two inputs."""
    x = torch.rand(2, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outputs = sample_outputs(x, width=1000, n_networks=10000, seed=1000, activation=activation, weight_variance=WV)
    k = equilibrium_covariance(x, activation=activation, weight_variance=WV, diag=True)
    pvalues = [stats.kstest((outputs[:, i].double() / k[i].sqrt()).numpy(), "norm").pvalue for i in range(2)]
    assert min(pvalues) > 0.01 / 2, pvalues


def test_per_network_kernel_error_falls_like_one_over_width(points):
    """The paper's Figure 3: mean squared relative Frobenius error of one network's kernel."""
    exact = equilibrium_covariance(points, weight_variance=WV)
    widths = [32, 64, 128, 256]
    errors = []
    for width, count in zip(widths, [400, 300, 200, 150], strict=True):
        kernels = network_kernels(points, width=width, n_networks=count, seed=width, weight_variance=WV)
        sq = ((kernels - exact) ** 2).sum((-1, -2)) / (exact**2).sum()
        errors.append(float(sq.mean()))
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    assert -1.3 < slope < -0.8, (slope, errors)
    assert errors[-1] < 0.05


def test_mean_kernel_bias_falls_with_width(points):
    """The bias of the network covariance itself, O(1/width), resolved by Rao-Blackwellising."""
    exact = equilibrium_covariance(points, weight_variance=WV)
    errors = [
        _frobenius_error(
            empirical_covariance(points, width=w, n_networks=4000, seed=w, weight_variance=WV, estimator="conditional"),
            exact,
        )
        for w in (32, 64)
    ]
    # Measured about 0.05 and 0.025: halving with each doubling of the width.
    assert 1.4 < errors[0] / errors[1] < 3.0, errors


@pytest.mark.parametrize(
    "activation,wv,kwargs", [("tanh", 0.36, {}), ("erf", 0.5, {}), ("leaky_relu", 0.5, {"negative_slope": 0.2})]
)
def test_other_activations_and_bias_converge(points, activation, wv, kwargs):
    exact = equilibrium_covariance(points, activation=activation, weight_variance=wv, bias_variance=0.3, **kwargs)
    estimate = empirical_covariance(
        points,
        width=256,
        n_networks=300,
        seed=5,
        activation=activation,
        weight_variance=wv,
        bias_variance=0.3,
        estimator="conditional",
        **kwargs,
    )
    assert _frobenius_error(estimate, exact) < 0.03


def test_ard_input_variance_matches_the_kernel(points):
    iv = torch.linspace(0.2, 3.0, 10, dtype=torch.float64)
    exact = equilibrium_covariance(points, weight_variance=WV, input_variance=iv)
    estimate = empirical_covariance(
        points, width=256, n_networks=300, seed=5, weight_variance=WV, input_variance=iv, estimator="conditional"
    )
    assert _frobenius_error(estimate, exact) < 0.03
    uniform = equilibrium_covariance(points, weight_variance=WV)
    assert _frobenius_error(estimate, uniform) > 0.1  # the test can tell ARD from none


# --------------------------------------------------------------------------- finite depth


def _reference_finite_depth(x, depth, name, wv, bv=0.0, injection=True):
    """Independent numpy recursion K^1 = s, K^{l+1} = wv E[phi phi](K^l) + (s or bv)."""
    x = np.asarray(x)
    s = x @ x.T / x.shape[1] + bv
    closed = name in ("relu", "erf")

    def dual(k):
        dg = np.diag(k)
        if closed:
            return closed_form_dual(name, dg[:, None], dg[None, :], k)
        return quadrature_dual(np.tanh, dg[:, None], dg[None, :], k)

    k = s
    for _ in range(depth - 1):
        k = wv * dual(k) + (s if injection else bv)
    return dual(k)


@pytest.mark.parametrize("name,wv", [("relu", 1.5), ("erf", 0.7), ("tanh", 0.9)])
@pytest.mark.parametrize("injection", [True, False])
def test_finite_depth_covariance_matches_independent_recursion(points, name, wv, injection):
    x = points[:5]
    for depth in (1, 2, 5):
        ours = finite_depth_covariance(x, depth, activation=name, weight_variance=wv, input_injection=injection)
        ref = _reference_finite_depth(x.numpy(), depth, name, wv, injection=injection)
        assert np.max(np.abs(ours.numpy() - ref)) <= 1e-9 * np.max(np.abs(ref))


def test_finite_depth_covariance_tends_to_the_equilibrium(points):
    stack = finite_depth_covariance(points, 120, weight_variance=1.5, bias_variance=0.2, all_depths=True)
    exact = equilibrium_covariance(points, weight_variance=1.5, bias_variance=0.2)
    errors = [_frobenius_error(k, exact) for k in stack]
    assert errors[-1] < 1e-10
    # Geometric convergence: relu contracts at rate at most weight_variance / 2 per layer.
    assert errors[40] < 0.75**40 * errors[0] * 10
    hyper = {"weight_variance": 1.5, "bias_variance": 0.2, "output": "preactivation"}
    pre = finite_depth_covariance(points, 120, **hyper)
    assert _frobenius_error(pre, equilibrium_covariance(points, **hyper)) < 1e-10


def test_finite_depth_networks_match_the_finite_depth_kernel(points):
    kernel = finite_depth_covariance(points, 2, weight_variance=WV)
    estimate = empirical_covariance(
        points, width=256, n_networks=300, seed=2, weight_variance=WV, depth=2, estimator="conditional"
    )
    assert _frobenius_error(estimate, kernel) < 0.03
    # Depth 2 is not yet the equilibrium (the finite-depth kernels differ from it by about 6%).
    assert _frobenius_error(kernel, equilibrium_covariance(points, weight_variance=WV)) > 0.03


def test_mlp_kernel_degenerates_with_depth_but_the_deq_kernel_does_not(points):
    mlp = finite_depth_covariance(points, 200, weight_variance=2.0, input_injection=False, all_depths=True)
    deq = finite_depth_covariance(points, 200, weight_variance=1.5, all_depths=True)

    def smallest(k):
        return float(torch.linalg.eigvalsh(k / k.diagonal().mean())[0])

    assert smallest(mlp[-1]) < 0.02 * smallest(mlp[0])
    assert smallest(deq[-1]) > 0.2 * smallest(deq[0]) > 0


# --------------------------------------------------------------------------- the network


def test_network_weights_follow_the_design_initialisation():
    net = DEQNetwork(
        50, 2000, 3, weight_variance=1.2, input_variance=0.5, bias_variance=0.3, output_variance=2.0,
        generator=network_generator(0), dtype=torch.float64,
    )  # fmt: skip
    for param, variance in [
        (net.input_weight, 0.5 / 50),
        (net.weight, 1.2 / 2000),
        (net.bias, 0.3),
        (net.output_weight, 2.0 / 2000),
    ]:
        sample_var = float(param.detach().var())
        sem = variance * math.sqrt(2.0 / param.numel())
        assert abs(sample_var - variance) < 5 * sem, (param.shape, sample_var, variance)
        assert abs(float(param.detach().mean())) < 5 * math.sqrt(variance / param.numel())


# Width 256: the networks of a batch are drawn on several threads.
@pytest.mark.parametrize("width", [32, 256])
def test_sampled_networks_are_the_module_with_the_same_generator(points, width):
    kwargs = {"width": width, "n_networks": 7, "seed": 9, "weight_variance": WV, "dtype": torch.float64, "tol": 1e-12}
    outputs = sample_outputs(points, batch_size=3, **kwargs)
    again = sample_outputs(points, batch_size=7, **kwargs)
    torch.testing.assert_close(outputs, again, rtol=1e-10, atol=1e-12)  # batching does not matter
    for i in (0, 4, 6):
        net = DEQNetwork(
            10, width, weight_variance=WV, generator=network_generator(9, i), dtype=torch.float64, tol=1e-12
        )
        with torch.no_grad():
            torch.testing.assert_close(net(points)[:, 0], outputs[i], rtol=1e-9, atol=1e-11)
    other = sample_outputs(points, **{**kwargs, "seed": 10})
    assert not torch.allclose(outputs, other)


@pytest.mark.parametrize("activation,wv", [("relu", 0.36), ("relu", 1.2), ("tanh", 0.5), ("gelu", 0.8)])
@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_fixed_point_agrees_with_plain_unrolled_iteration(points, activation, wv, solver):
    net = DEQNetwork(
        10, 200, activation=activation, weight_variance=wv, bias_variance=0.1, solver=solver,
        generator=network_generator(1), dtype=torch.float64, max_iter=2000, tol=1e-13,
    )  # fmt: skip
    with torch.no_grad():
        h = net.equilibrium(points)
        unrolled = net.hidden(points, depth=3000)
        fixed = net.activation(net.injection(points) + h @ net.weight.T)
    assert net.last_solve.residual <= net.tol
    assert net.last_solve.history[0] == pytest.approx(1.0)  # from h = 0
    torch.testing.assert_close(h, unrolled, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fixed, h, rtol=1e-9, atol=1e-11)


def test_anderson_finds_equilibria_where_picard_cycles(points):
    """Near the edge of contraction (relu, weight_variance 1.5, width 300) Picard iteration
    cycles on one input; Anderson reaches a true fixed point there, and the same one as
    Picard on every other input."""
    options = {"weight_variance": 1.5, "dtype": torch.float64, "max_iter": 2000, "tol": 1e-13}
    nets = {s: DEQNetwork(10, 300, solver=s, generator=network_generator(2), **options) for s in ("anderson", "picard")}
    with torch.no_grad():
        h = nets["anderson"].equilibrium(points)
        with pytest.raises(ConvergenceError, match="2000 iterations"):
            nets["picard"](points)
        net = nets["picard"]
        picard = torch.stack([net.equilibrium(points[i : i + 1])[0] if i != 6 else h[6] for i in range(10)])
        image = net.activation(net.injection(points) + h @ net.weight.T)
    assert float(((image - h).norm(dim=-1) / h.norm(dim=-1)).max()) < 1e-9
    torch.testing.assert_close(h, picard, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_implicit_gradients_match_autograd_through_a_long_unrolled_iteration(points, activation):
    torch.manual_seed(0)
    net = DEQNetwork(
        10, 40, 2, activation=activation, weight_variance=0.8, bias_variance=0.2,
        generator=network_generator(3), dtype=torch.float64, tol=1e-13,
    )  # fmt: skip
    x = points[:4].clone().requires_grad_(True)
    target = torch.randn(4, 2, dtype=torch.float64)

    def grads(depth):
        net.zero_grad()
        x.grad = None
        loss = ((net(x, depth=depth) - target) ** 2).sum()
        loss.backward()
        return [x.grad.clone()] + [p.grad.clone() for p in net.parameters()]

    implicit = grads(None)
    unrolled = grads(400)
    for a, b in zip(implicit, unrolled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_gradcheck_of_the_equilibrium():
    net = DEQNetwork(
        3, 6, activation="tanh", weight_variance=0.9, bias_variance=0.5,
        generator=network_generator(4), dtype=torch.float64, tol=1e-13,
    )  # fmt: skip
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    names = ["input_weight", "weight", "bias", "output_weight"]
    params = [getattr(net, name).detach().clone().requires_grad_(True) for name in names]

    def fn(x, *values):
        return torch.func.functional_call(net, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-8)


def test_network_trains_by_sgd(points):
    torch.manual_seed(0)
    net = DEQNetwork(10, 64, weight_variance=0.5, generator=network_generator(5), dtype=torch.float64)
    y = torch.sin(points.sum(-1, keepdim=True))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((net(points) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(math.isfinite(v) for v in losses)


# --------------------------------------------------------------------------- failure


def test_nonconvergence_raises_with_residual_and_iterations(points):
    net = DEQNetwork(10, 100, weight_variance=1.9, generator=network_generator(6), max_iter=3, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="did not converge in 3 iterations") as info:
        net(points)
    assert info.value.iterations == 3
    assert info.value.residual > net.tol
    with pytest.raises(ConvergenceError):
        sample_outputs(points, width=64, n_networks=4, seed=0, weight_variance=1.9, max_iter=2)


def test_divergence_raises(points):
    # A width-4 tanh network with a huge weight scale would be refused (bound 1); with the
    # identity activation and W scaled past 1 by hand, Picard iteration blows up.
    net = DEQNetwork(10, 4, activation="identity", weight_variance=0.5, generator=network_generator(0), solver="picard")
    with torch.no_grad():
        net.weight.copy_(torch.eye(4) * 3.0)
    with pytest.raises(ConvergenceError, match=r"diverged|did not converge"):
        net(points.float())


def test_backward_reports_nonconvergence_of_the_adjoint(points):
    from deq_kernel.finite import _ImplicitBackward  # the autograd Function of DEQNetwork.equilibrium

    net = DEQNetwork(10, 100, weight_variance=1.0, generator=network_generator(6), dtype=torch.float64)
    with torch.no_grad():
        h = net.equilibrium(points)
    tight = {"tol": 1e-30, "max_iter": 2, "solver": "picard", "memory": 1}
    out = _ImplicitBackward.apply(h, net.injection(points), net.weight, net.activation, tight)
    with pytest.raises(ConvergenceError, match="adjoint"):
        out.sum().backward()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"in_features": 0}, ValueError, "in_features"),
        ({"in_features": 2.5}, TypeError, "in_features"),
        ({"width": True}, TypeError, "width"),
        ({"width": -3}, ValueError, "width"),
        ({"out_features": 0}, ValueError, "out_features"),
        ({"weight_variance": -1.0}, ValueError, "weight_variance"),
        ({"weight_variance": 2.0}, ValueError, "weight_variance must be < 2"),
        ({"weight_variance": "1"}, TypeError, "weight_variance"),
        ({"input_variance": float("nan")}, ValueError, "input_variance"),
        ({"input_variance": [1.0, 2.0]}, ValueError, "input_variance"),
        ({"bias_variance": -0.1}, ValueError, "bias_variance"),
        ({"output_variance": None}, TypeError, "output_variance"),
        ({"activation": "swish"}, ValueError, "activation"),
        ({"solver": "newton"}, ValueError, "solver"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": "small"}, TypeError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"memory": 1.0}, TypeError, "memory"),
        ({"dtype": torch.float16}, TypeError, "dtype"),
        ({"generator": 3}, TypeError, "generator"),
    ],
)
def test_network_rejects_bad_arguments(kwargs, error, match):
    args = {"in_features": 3, "width": 8, **kwargs}
    with pytest.raises(error, match=match):
        DEQNetwork(**args)


def test_network_rejects_bad_inputs():
    net = DEQNetwork(3, 8, generator=network_generator(0))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        net(torch.zeros(4, 2))
    with pytest.raises(TypeError, match="dtype"):
        net(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        net([[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="depth"):
        net(torch.zeros(4, 3), depth=0)
    assert net(torch.zeros(5, 2, 3)).shape == (5, 2, 1)  # batch dimensions pass through


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": np.zeros((3,))}, ValueError, r"x must have shape \(n, d\)"),
        ({"x": [["a"]]}, TypeError, "x must be"),
        ({"x": np.full((2, 2), np.inf)}, ValueError, "NaN or infinite"),
        ({"width": 0}, ValueError, "width"),
        ({"n_networks": 2.0}, TypeError, "n_networks"),
        ({"seed": -1}, TypeError, "seed"),
        ({"seed": None}, TypeError, "seed"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"depth": 0}, ValueError, "depth"),
        ({"estimator": "mle"}, ValueError, "estimator"),
        ({"return_stderr": 1}, TypeError, "return_stderr"),
        ({"nonconverged": "ignore"}, ValueError, "nonconverged"),
        ({"weights": "sparse"}, ValueError, "weights must be one of 'dense', 'subspace'"),
        ({"weight_variance": 2.5}, ValueError, "weight_variance"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
        ({"negative_slope": 0.1}, TypeError, "activation options|negative_slope"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, error, match):
    args = {"x": np.ones((2, 2)), "width": 4, "n_networks": 2, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        empirical_covariance(**args)


def test_finite_depth_covariance_rejects_bad_arguments(points):
    with pytest.raises(ValueError, match="depth"):
        finite_depth_covariance(points, 0)
    with pytest.raises(ValueError, match="output"):
        finite_depth_covariance(points, 2, output="ntk")
    with pytest.raises(TypeError, match="input_injection"):
        finite_depth_covariance(points, 2, input_injection="yes")


def test_module_docstrings_run():
    import doctest

    import deq_kernel.finite as finite

    result = doctest.testmod(finite, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
