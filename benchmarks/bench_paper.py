"""The paper's experiments at the paper's sizes: one entry point, logs and figures under ``benchmarks/results/paper/``.

Gao, Huo, Liu and Gao, *Wide Neural Networks as Gaussian Processes: Lessons from Deep
Equilibrium Models* (NeurIPS 2023). Two parts:

**Sampler** (``sampler``). The Monte Carlo sampler behind every finite-network experiment:
:func:`deq_kernel.finite.sample_outputs` draws ``--networks`` (default 10 000) networks of
width 1000 for 10 inputs (uniform in ``[0, 1]^10``, the paper's), float32, the paper's
``weight_variance=0.36``, relu and tanh, and is timed whole. The baseline, in the same run, is
the paper's method as its text describes it: one network at a time, its weights drawn with
``torch.randn``, then plain (Picard) iteration ``h <- phi(W h + U x + b)`` of the 10 inputs
together until the relative change is below 1e-5 (float32; the "float64" row does the same in
float64), timed on ``--baseline-networks`` networks (default 200) and reported as networks per
second. Targets: 10 000 networks in at most 10 minutes on 2 cores; at least 20x the baseline's
networks per second. Both of the sampler's modes are timed: ``weights="dense"`` (each network's
whole ``W``) and ``weights="subspace"`` (``W`` drawn only on the directions the iteration meets;
the same distribution), each with its ratio to the baseline.

**Experiments** (``gaussian``, ``covariance``, ``eigenvalue``, ``limits``, ``digits`` and
``fixed-point``): the notebooks ``notebooks/02`` to ``06`` and ``01`` executed at their full
sizes (without ``DEQ_KERNEL_CI``), each in a fresh kernel. Each notebook prints the paper's
value next to ours; this script writes every text output to
``results/paper/<name>.log``, every figure to ``results/paper/<name>_<k>.png`` and the cell
times to the summary, and with ``--save-notebooks`` writes the executed notebooks back to
``notebooks/`` (so that they show the full-size outputs; CI re-executes them at the reduced
sizes without saving). Target: each at most 30 minutes, the whole set at most 2 hours.

Usage::

    python benchmarks/bench_paper.py                                  # everything
    python benchmarks/bench_paper.py --only sampler                   # the sampler timing alone
    python benchmarks/bench_paper.py --only gaussian,digits --save-notebooks
    python benchmarks/bench_paper.py --only sampler --networks 500 --baseline-networks 20   # quick check
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "paper"
NOTEBOOKS = {
    "fixed-point": "01_fixed_point_convergence",
    "gaussian": "02_gaussian_outputs",
    "covariance": "03_covariance_error",
    "eigenvalue": "04_smallest_eigenvalue",
    "limits": "05_limits_commute",
    "digits": "06_digits_regression",
}
EXPERIMENTS = ("sampler", *NOTEBOOKS)
WEIGHT_VARIANCE = 0.36
WIDTH = 1000
N_INPUTS = 10
TOL = 1e-5
SAMPLER_TARGET_S = 600.0
RATIO_TARGET = 20.0
NOTEBOOK_TARGET_S = 1800.0
TOTAL_TARGET_S = 7200.0


def _inputs() -> torch.Tensor:
    return torch.rand(N_INPUTS, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def picard_one_at_a_time(
    x: torch.Tensor, activation: str, width: int, n_networks: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """The baseline: each network drawn and solved on its own by plain fixed-point iteration.

    Returns the outputs ``(n_networks, n)`` and the mean number of iterations.
    """
    phi = {"relu": torch.relu, "tanh": torch.tanh}[activation]
    generator = torch.Generator().manual_seed(seed)
    x = x.to(dtype)
    d = x.shape[1]
    outputs, iterations = [], 0
    for _ in range(n_networks):
        u = torch.randn(width, d, generator=generator, dtype=dtype) / math.sqrt(d)
        w = torch.randn(width, width, generator=generator, dtype=dtype) * math.sqrt(WEIGHT_VARIANCE / width)
        v = torch.randn(width, generator=generator, dtype=dtype) / math.sqrt(width)
        injection = x @ u.T
        h = torch.zeros_like(injection)
        step, done = 0, False
        while not done and step < 1000:
            new = phi(h @ w.T + injection)
            done = bool(torch.linalg.vector_norm(new - h) <= TOL * torch.linalg.vector_norm(new))
            h, step = new, step + 1
        iterations += step
        outputs.append(h @ v)
    return torch.stack(outputs), iterations / n_networks


def run_sampler(args: argparse.Namespace, log: list[str]) -> dict:
    x = _inputs()
    rows = {}
    for width in (int(w) for w in args.sampler_widths.split(",")):
        say(log, f"sampler: {args.networks} networks of width {width}, {N_INPUTS} inputs, w = {WEIGHT_VARIANCE}")
        for activation in ("relu", "tanh"):
            rows[f"{activation}_{width}"] = _sampler_row(x, activation, width, args, log)
    return rows


def _sampler_row(x: torch.Tensor, activation: str, width: int, args: argparse.Namespace, log: list[str]) -> dict:
    from deq_kernel.finite import sample_outputs

    row: dict = {}
    samples = {}
    for mode in ("dense", "subspace"):
        options = dict(activation=activation, weight_variance=WEIGHT_VARIANCE, weights=mode)
        sample_outputs(x, width=width, n_networks=4, seed=99, **options)
        start = time.perf_counter()
        samples[mode] = f = sample_outputs(x, width=width, n_networks=args.networks, seed=0, **options)
        ours = time.perf_counter() - start
        key = "ours" if mode == "dense" else "subspace"
        row.update({f"{key}_s": ours, f"{key}_per_s": args.networks / ours, f"{key}_shape": list(f.shape)})
        say(
            log,
            f"  {activation}: sample_outputs(weights={mode!r}) {args.networks} networks in {ours:.1f} s "
            f"({args.networks / ours:.1f} networks/s"
            + (
                f"; target {SAMPLER_TARGET_S / 60:.0f} min for 10 000: "
                f"{'met' if ours * 10000 / args.networks <= SAMPLER_TARGET_S else 'MISSED'})"
                if width == WIDTH
                else ")"
            ),
        )
    f = samples["dense"]
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        count = args.baseline_networks if dtype == torch.float32 else max(1, args.baseline_networks // 2)
        start = time.perf_counter()
        reference, iterations = picard_one_at_a_time(x, activation, width, count, dtype)
        seconds = time.perf_counter() - start
        rate = count / seconds
        row[f"baseline_{name}_per_s"] = rate
        row[f"baseline_{name}_iterations"] = iterations
        ratio, ratio_subspace = row["ours_per_s"] / rate, row["subspace_per_s"] / rate
        row[f"ratio_{name}"], row[f"ratio_subspace_{name}"] = ratio, ratio_subspace
        # Same distribution: the samples' variances of f(x_1) agree within Monte Carlo error.
        var_ours, var_ref = float(f[:, 0].double().var()), float(reference[:, 0].double().var())
        var_subspace = float(samples["subspace"][:, 0].double().var())
        best = max(ratio, ratio_subspace)
        verdict = f" (target >= {RATIO_TARGET:.0f}x: {'met' if best >= RATIO_TARGET else 'MISSED'})"
        say(
            log,
            f"    baseline ({name}, one network at a time, Picard to {TOL:g}): {rate:.1f} networks/s, "
            f"{iterations:.1f} iterations; ours / baseline: dense {ratio:.1f}x, subspace {ratio_subspace:.1f}x"
            f"{verdict if width == WIDTH else ''}; var f(x_1): dense {var_ours:.4f}, subspace {var_subspace:.4f}, "
            f"baseline {var_ref:.4f} ({count} networks)",
        )
    return row


def run_notebook(name: str, args: argparse.Namespace, log: list[str]) -> dict:
    import nbformat
    from nbclient import NotebookClient

    stem = NOTEBOOKS[name]
    path = ROOT / "notebooks" / f"{stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    # The kernel inherits the environment: without DEQ_KERNEL_CI the notebooks run at full size.
    env_ci = os.environ.pop("DEQ_KERNEL_CI", None)
    if args.reduced:
        os.environ["DEQ_KERNEL_CI"] = "1"
    cell_times: list[tuple[int, float]] = []
    started: dict[int, float] = {}

    def on_start(cell: dict, cell_index: int) -> None:
        started[cell_index] = time.perf_counter()

    def on_done(cell: dict, cell_index: int, **_: object) -> None:
        cell_times.append((cell_index, time.perf_counter() - started.get(cell_index, time.perf_counter())))

    client = NotebookClient(
        nb,
        timeout=args.cell_timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_start=on_start,
        on_cell_executed=on_done,
    )
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except Exception as exc:  # a failed cell is reported with what ran before it
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        os.environ.pop("DEQ_KERNEL_CI", None)
        if env_ci is not None:
            os.environ["DEQ_KERNEL_CI"] = env_ci
    seconds = time.perf_counter() - start
    text, figures = [], 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text.append(output["text"])
            elif "data" in output:
                data = output["data"]
                if "image/png" in data:
                    figures += 1
                    (RESULTS / f"{name}_{figures}.png").write_bytes(base64.b64decode(data["image/png"]))
                elif "text/plain" in data:
                    text.append(data["text/plain"] + "\n")
            elif output.get("output_type") == "error":
                text.append(f"{output['ename']}: {output['evalue']}\n")
    (RESULTS / f"{name}.log").write_text("".join(text))
    slowest = sorted(cell_times, key=lambda item: -item[1])[:3]
    status = "FAILED: " + error if error else ("met" if seconds <= NOTEBOOK_TARGET_S else "MISSED")
    say(log, f"{name} ({stem}.ipynb): {seconds / 60:.1f} min (target 30 min: {status}); {figures} figures")
    say(log, "  slowest cells: " + ", ".join(f"#{i} {t:.0f} s" for i, t in slowest))
    for line in "".join(text).splitlines():
        say(log, "  | " + line)
    if args.save_notebooks and error is None and not args.reduced:
        nbformat.write(nb, path)
    return {"seconds": seconds, "figures": figures, "error": error, "cell_seconds": dict(cell_times)}


def say(log: list[str], line: str) -> None:
    print(line, flush=True)
    log.append(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help=f"comma-separated, of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--networks", type=int, default=10000, help="networks the sampler draws per activation")
    parser.add_argument("--sampler-widths", default="100,1000", help="widths of the sampler rows (target at 1000)")
    parser.add_argument("--baseline-networks", type=int, default=200, help="networks the float32 baseline solves")
    parser.add_argument("--cell-timeout", type=int, default=3600, help="seconds one notebook cell may run")
    parser.add_argument("--save-notebooks", action="store_true", help="write the executed notebooks back")
    parser.add_argument("--reduced", action="store_true", help="run the notebooks at CI sizes (a quick check)")
    parser.add_argument("--tag", default="cpu", help="prefix of the summary files")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in EXPERIMENTS]
    if unknown:
        parser.error(f"--only: unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    import deq_kernel

    say(
        log,
        f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}",
    )
    summary: dict = {}
    total = time.perf_counter()
    for name in chosen:
        summary[name] = run_sampler(args, log) if name == "sampler" else run_notebook(name, args, log)
    seconds = time.perf_counter() - total
    say(log, f"total: {seconds / 60:.1f} min (target for the whole set: {TOTAL_TARGET_S / 3600:.0f} h)")
    stem = f"{args.tag}_{'_'.join(chosen) if len(chosen) < len(EXPERIMENTS) else 'all'}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (RESULTS / f"{stem}.txt").write_text("\n".join(log) + "\n")
    return 1 if any(isinstance(v, dict) and v.get("error") for v in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
