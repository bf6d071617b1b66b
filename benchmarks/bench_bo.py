"""Bayesian optimisation with the DEQ kernel against BoTorch's default model and its infinite-width BNN kernel.

Each run is a BoTorch loop in the unit cube: ``--init`` random initial points (Sobol, seeded),
then ``--iterations`` rounds of: fit the model by ``fit_gpytorch_mll``, maximise
``qLogNoisyExpectedImprovement`` (q = 1, 4 restarts, 128 raw samples), evaluate the problem
there (noise-free, maximisation of the negated test function). Models:

* ``default``: ``SingleTaskGP(X, Y)``, BoTorch's default (Matern-5/2, dimension-scaled
  lengthscale prior, ``Normalize``-free unit cube, ``Standardize``);
* ``iwbnn``: ``SingleTaskGP(X, Y, covar_module=InfiniteWidthBNNKernel(depth=3))``, BoTorch's
  infinite-width network kernel, as its tutorial builds it;
* ``deq-relu``, ``deq-erf``, ``deq-tanh``, ``deq-relu-ntk``: the library's recommended DEQ
  surrogate, :func:`deq_kernel.botorch.deq_surrogate` (the DEQ kernel of harmonic features of
  the unit-cube inputs, stationary and of unit variance, with priors on its variances);
* ``centred-relu``: the first candidate, ``ScaleKernel(DEQKernel("relu", ard_num_dims=d))`` on
  inputs centred by ``Normalize(d, bounds, center=0)``, kept for comparison.

Problems (``--problems``): ``hartmann6``, ``branin``, ``ackley10`` and ``hartmann6in50`` (Hartmann-6
on 6 of 50 dimensions, the other 44 ignored), all from ``botorch.test_functions``.

For every problem and model it prints the mean and standard error over ``--seeds`` seeds of
the best value after the initial design and after every 10 iterations, the gap to the
optimum, and the wall time of a loop (fits and acquisition), each against ``default`` in the
same run; ``--json`` saves the traces, ``--plot`` a figure of best value by iteration.

Usage::

    python benchmarks/bench_bo.py                                     # everything (long)
    python benchmarks/bench_bo.py --problems hartmann6 --seeds 2 --iterations 6 --models default,deq-relu
    python benchmarks/bench_bo.py --problems hartmann6in50 --models deq-erf --input-variance-median 10
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

MODELS = ("default", "iwbnn", "deq-relu", "deq-erf", "deq-tanh", "deq-relu-ntk", "centred-relu")
PROBLEMS = ("hartmann6", "branin", "ackley10", "hartmann6in50")


def problem(name: str):
    """``(function of unit-cube points, dimension, optimum)``: the negated test function (to maximise)."""
    from botorch.test_functions import Ackley, Branin, Hartmann

    if name == "hartmann6":
        f, d, embed = Hartmann(dim=6, negate=True), 6, None
    elif name == "branin":
        f, d, embed = Branin(negate=True), 2, None
    elif name == "ackley10":
        f, d, embed = Ackley(dim=10, negate=True), 10, None
    elif name == "hartmann6in50":
        f, d, embed = Hartmann(dim=6, negate=True), 50, [3, 11, 19, 27, 35, 43]
    else:
        raise SystemExit(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    lower, upper = f.bounds[0].double(), f.bounds[1].double()

    def evaluate(x: torch.Tensor) -> torch.Tensor:
        z = x if embed is None else x[..., embed]
        return f(lower + (upper - lower) * z).unsqueeze(-1)

    return evaluate, d, float(f.optimal_value)  # of the negated function, as BoTorch reports it


def build(model: str, X: torch.Tensor, Y: torch.Tensor):
    from botorch.models import SingleTaskGP

    if model == "default":
        return SingleTaskGP(X, Y)
    if model == "iwbnn":
        from botorch.models.kernels.infinite_width_bnn import InfiniteWidthBNNKernel

        return SingleTaskGP(X, Y, covar_module=InfiniteWidthBNNKernel(3, device=X.device))
    parts = model.split("-")
    activation, kernel = parts[1], ("ntk" if parts[-1] == "ntk" else "nngp")
    build_deq = centred_surrogate if parts[0] == "centred" else deq_surrogate
    return build_deq(X, Y, activation=activation, kernel=kernel)


#: ``--input-variance-median``: the median of the DEQ surrogates' input-variance prior (None: the library's).
INPUT_VARIANCE_MEDIAN: float | None = None


def deq_surrogate(X: torch.Tensor, Y: torch.Tensor, *, activation: str, kernel: str):
    """The recommended DEQ surrogate: :func:`deq_kernel.botorch.deq_surrogate` (harmonic inputs, priors)."""
    from gpytorch.priors import LogNormalPrior

    from deq_kernel.botorch import deq_surrogate as recommended

    priors = None
    if INPUT_VARIANCE_MEDIAN is not None:
        priors = {"input_variance_prior": LogNormalPrior(math.log(INPUT_VARIANCE_MEDIAN), 1.5)}
    return recommended(X, Y, activation=activation, kernel=kernel, priors=priors)


def centred_surrogate(X: torch.Tensor, Y: torch.Tensor, *, activation: str, kernel: str):
    """The first candidate, kept for comparison: ``ScaleKernel(DEQKernel)`` on inputs centred by ``Normalize``."""
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.input import Normalize
    from gpytorch.kernels import ScaleKernel

    from deq_kernel import DEQKernel

    d = X.shape[-1]
    unit = torch.stack([torch.zeros(d), torch.ones(d)]).to(X)
    covar = ScaleKernel(DEQKernel(activation, kernel=kernel, ard_num_dims=d))
    return SingleTaskGP(X, Y, covar_module=covar, input_transform=Normalize(d, bounds=unit, center=0.0))


def run_loop(model: str, name: str, seed: int, init: int, iterations: int) -> tuple[list[float], float]:
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.optim import optimize_acqf
    from botorch.utils.sampling import draw_sobol_samples
    from gpytorch.mlls import ExactMarginalLogLikelihood

    evaluate, d, _ = problem(name)
    bounds = torch.stack([torch.zeros(d), torch.ones(d)]).double()
    torch.manual_seed(seed)
    X = draw_sobol_samples(bounds, n=init, q=1, seed=seed).squeeze(-2)
    Y = evaluate(X)
    best = [float(Y.max())]
    start = time.perf_counter()
    for _ in range(iterations):
        gp = build(model, X, Y)
        with warnings.catch_warnings():  # a benchmark script: BoTorch's fit warnings are expected here
            warnings.simplefilter("ignore")
            fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
            acq = qLogNoisyExpectedImprovement(gp, X_baseline=X, prune_baseline=True)
            candidate, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=4, raw_samples=128)
        X = torch.cat([X, candidate])
        Y = torch.cat([Y, evaluate(candidate)])
        best.append(float(Y.max()))
    return best, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--init", type=int, default=0, help="initial points (default: 2d + 2, at most 24)")
    parser.add_argument("--json", help="save the traces here")
    parser.add_argument("--plot", help="save a figure of the best value by iteration here (needs matplotlib)")
    parser.add_argument(
        "--input-variance-median",
        type=float,
        help="median of the deq-* surrogates' log-normal input-variance prior, log-scale 1.5 (default: the library's)",
    )
    args = parser.parse_args(argv)
    global INPUT_VARIANCE_MEDIAN
    INPUT_VARIANCE_MEDIAN = args.input_variance_median
    torch.set_default_dtype(torch.float64)  # a benchmark script owns its process
    models, problems = args.models.split(","), args.problems.split(",")
    print(
        f"deq_kernel BO benchmark: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.seeds} seeds, {args.iterations} iterations"
    )
    results: dict = {}
    for name in problems:
        _, d, optimum = problem(name)
        init = args.init or min(2 * d + 2, 24)
        results[name] = {}
        print(f"\n{name} (d = {d}, optimum {optimum:.4g}, {init} initial points)")
        marks = sorted({*range(0, args.iterations + 1, 10), args.iterations})
        print(
            f"{'model':<14}" + "".join(f"{'it ' + str(i):>16}" for i in marks) + f"{'loop s':>10}{'time/default':>14}"
        )
        for model in models:
            traces, seconds = [], []
            for seed in range(args.seeds):
                best, elapsed = run_loop(model, name, seed, init, args.iterations)
                traces.append(best)
                seconds.append(elapsed)
            results[name][model] = {"traces": traces, "seconds": seconds}
            cells = []
            for i in marks:
                values = [t[i] for t in traces]
                se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):>9.4f}+-{se:<5.3f}")
            mean_s = statistics.mean(seconds)
            base = results[name].get("default")
            ratio = f"{mean_s / statistics.mean(base['seconds']):.2f}x" if base else "-"
            print(f"{model:<14}" + "".join(f"{c:>16}" for c in cells) + f"{mean_s:>10.1f}{ratio:>14}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"saved {args.json}")
    if args.plot:
        _plot(results, args.plot)
    return 0


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), constrained_layout=True, squeeze=False)
    for ax, (name, by_model) in zip(axes[0], results.items(), strict=True):
        for model, data in by_model.items():
            traces = torch.tensor(data["traces"])
            mean = traces.mean(0)
            se = traces.std(0) / math.sqrt(traces.shape[0]) if traces.shape[0] > 1 else torch.zeros_like(mean)
            steps = range(len(mean))
            ax.plot(steps, mean, label=model)
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
        ax.set(title=name, xlabel="iteration", ylabel="best value")
    axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
