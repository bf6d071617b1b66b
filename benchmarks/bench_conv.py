"""Time the convolutional DEQ kernel (flatten readout) on scikit-learn's digits.

Rows, all float64 on this machine's CPU threads, inputs the digits scaled to [0, 1] as
``(n, 1, 8, 8)`` images (P = 64 pixels), ``kernel_size=3``, ``bias_variance=0.1``, the
activation's default weight variance:

* **conv flatten**: ``deq_kernel.conv_equilibrium_covariance`` of the first ``--n`` digits
  (default all 1797), its time and its cost per pair of images; target: all 1797 in at most
  60 s.
* **fully connected**: ``deq_kernel.equilibrium_covariance`` of the same digits as 64-feature
  rows, per pair (the baseline of the ratio ``conv / fc``).
* **plain iteration**: the covariance map iterated over every pixel pair of the first
  ``--plain-n`` digits (default 24), ``Sigma <- w A[V(Sigma)] + u A[G] + b`` on the whole
  ``(n P) x (n P)`` matrix until the largest change is below 1e-13 of its largest entry (the
  original authors' method for the fully connected kernel, extended to images), per pair;
  and the agreement of its kernel with ours on those digits.

**Pooled readout** (``--gap``): ``readout="gap"`` of the first ``--gap-n`` digits (default
500), every pixel pair (``P^2 = 4096`` unknowns per pair of images); target: 500 digits in at
most 10 minutes.

**Accuracy** (``--accuracy``): digits classification on the split of the test suite's
real-data checks (``train_test_split(..., random_state=0, stratify=y)``: 1347 training and
450 test digits), each kernel used as a Gaussian-process regression on one-hot targets
(the posterior mean, the usual NNGP classifier), its noise and weight variance chosen on a
validation fifth of the training digits, then refitted on all of them: the convolutional
NNGP (flatten) against the fully connected DEQ kernel (same images as 64-feature rows) and
RBF (length scale chosen the same way). Target: conv at least as accurate as fully connected.

Usage::

    python benchmarks/bench_conv.py                      # all rows, relu
    python benchmarks/bench_conv.py --n 300 --activations relu,erf
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from sklearn.datasets import load_digits

import deq_kernel

TARGET_S = 60.0
KERNEL_SIZE = 3
BIAS = 0.1


def plain_iteration(images: torch.Tensor, act: deq_kernel.Activation, w: float) -> torch.Tensor:
    """The flatten kernel by iterating the covariance of every (image, pixel) pair whole."""
    n, c, h, wd = images.shape
    pixels = h * wd
    r = KERNEL_SIZE // 2

    def average(m: torch.Tensor) -> torch.Tensor:  # (n, H, W, n, H, W), both pixels shifted alike
        padded = torch.nn.functional.pad(m, (r, r, r, r, 0, 0, r, r, r, r))
        out = torch.zeros_like(m)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                ys, xs = slice(r + dy, r + dy + h), slice(r + dx, r + dx + wd)
                out += padded[:, ys, xs, :, ys, xs]
        return out / KERNEL_SIZE**2

    gram = torch.einsum("acyx,bcuv->ayxbuv", images, images) / c
    s = average(gram) + BIAS
    sigma = s.clone()
    for _ in range(10_000):
        flat = sigma.reshape(n * pixels, n * pixels)
        var = flat.diagonal()
        root = torch.sqrt(var[:, None] * var[None, :])
        value = act.pair_dual((var[:, None],), (var[None, :],), (flat / root).clamp(-1.0, 1.0))[0]
        new = w * average(value.reshape(sigma.shape)) + s
        change = float((new - sigma).abs().max())
        sigma = new
        if change <= 1e-13 * float(sigma.abs().max()):
            break
    flat = sigma.reshape(n * pixels, n * pixels)
    var = flat.diagonal()
    root = torch.sqrt(var[:, None] * var[None, :])
    value = act.pair_dual((var[:, None],), (var[None, :],), (flat / root).clamp(-1.0, 1.0))[0]
    return value.reshape(sigma.shape).diagonal(dim1=1, dim2=4).diagonal(dim1=1, dim2=3).mean((-2, -1))


NOISES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _accuracy(kernels: dict, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> tuple[float, str]:
    """Test accuracy of the best (kernel setting, noise) on a validation fifth of ``train``."""
    classes = int(y.max()) + 1
    onehot = torch.nn.functional.one_hot(y, classes).double()
    gen = torch.Generator().manual_seed(0)
    perm = train[torch.randperm(len(train), generator=gen)]
    fit, val = perm[len(perm) // 5 :], perm[: len(perm) // 5]

    def predict(k: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, noise: float) -> torch.Tensor:
        scale = float(k.diagonal().mean())
        targets = onehot[rows] - onehot[rows].mean(0)
        gram = k[rows][:, rows] + noise * scale * torch.eye(len(rows), dtype=k.dtype)
        return (k[cols][:, rows] @ torch.linalg.solve(gram, targets)).argmax(-1)

    best = None
    for setting, k in kernels.items():
        for noise in NOISES:
            score = float((predict(k, fit, val, noise) == y[val]).double().mean())
            if best is None or score > best[0]:
                best = (score, setting, noise)
    _, setting, noise = best
    accuracy = float((predict(kernels[setting], train, test, noise) == y[test]).double().mean())
    return accuracy, f"{setting}, noise {noise:g}"


def accuracy_rows(images: torch.Tensor, digits: torch.Tensor, y: torch.Tensor) -> list[dict]:
    from sklearn.model_selection import train_test_split

    train, test = (torch.as_tensor(a) for a in train_test_split(range(len(y)), random_state=0, stratify=y.numpy()))
    weights = (0.25, 0.5, 1.0, 1.5)
    start = time.perf_counter()
    conv = {
        f"w={w}": deq_kernel.conv_equilibrium_covariance(images, weight_variance=w, bias_variance=BIAS) for w in weights
    }
    conv_s = time.perf_counter() - start
    fc = {f"w={w}": deq_kernel.equilibrium_covariance(digits, weight_variance=w, bias_variance=BIAS) for w in weights}
    sq = torch.cdist(digits, digits).square()
    rbf = {f"l={ls}": torch.exp(-sq / (2 * ls**2)) for ls in (1.0, 2.0, 4.0, 8.0, 16.0)}
    rows = []
    for name, kernels in (("conv DEQ (flatten)", conv), ("fully connected DEQ", fc), ("RBF", rbf)):
        acc, chosen = _accuracy(kernels, y, train, test)
        rows.append(dict(kernel=name, accuracy=acc, chosen=chosen))
    print(f"digits, {len(train)} training / {len(test)} test images; relu; kernels of conv took {conv_s:.0f} s")
    print(f"{'kernel':22} {'test accuracy':>13}  chosen on validation")
    for r in rows:
        print(f"{r['kernel']:22} {r['accuracy']:13.4f}  {r['chosen']}")
    verdict = "met" if rows[0]["accuracy"] >= rows[1]["accuracy"] else "MISSED"
    print(f"target: conv >= fully connected: {verdict}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1797)
    parser.add_argument("--plain-n", type=int, default=24)
    parser.add_argument("--activations", default="relu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--accuracy", action="store_true", help="also the digits classification rows (about 3 min)")
    parser.add_argument("--gap", action="store_true", help="also the pooled readout's row (about 7 min)")
    parser.add_argument("--gap-n", type=int, default=500)
    args = parser.parse_args()

    print(f"deq_kernel {deq_kernel.__version__}, torch {torch.__version__}")
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads")
    data = load_digits()
    digits = torch.as_tensor(data.data / 16.0)
    images = digits.reshape(-1, 1, 8, 8)
    rows = []
    header = f"{'activation':10} {'row':16} {'images':>6} {'time s':>9} {'us/pair':>9} {'ratio':>8}  target"
    print(header)
    print("-" * len(header))
    for name in args.activations.split(","):
        act = deq_kernel.get_activation(name)
        w = act.default_weight_variance
        x = images[: args.n]
        pairs = x.shape[0] * (x.shape[0] + 1) / 2
        deq_kernel.conv_equilibrium_covariance(x[:8], activation=name, bias_variance=BIAS)  # warm-up
        start = time.perf_counter()
        conv_k = deq_kernel.conv_equilibrium_covariance(x, activation=name, kernel_size=KERNEL_SIZE, bias_variance=BIAS)
        conv_s = time.perf_counter() - start
        start = time.perf_counter()
        deq_kernel.equilibrium_covariance(digits[: args.n], activation=name, bias_variance=BIAS)
        fc_s = time.perf_counter() - start
        conv_pair, fc_pair = conv_s / pairs * 1e6, fc_s / pairs * 1e6
        verdict = "met" if conv_s <= TARGET_S or x.shape[0] < 1797 else "MISSED"
        target = f"<= {TARGET_S:.0f} s {verdict}" if x.shape[0] == 1797 else "-"
        print(f"{name:10} {'conv flatten':16} {x.shape[0]:6d} {conv_s:9.2f} {conv_pair:9.2f} {'1.00x':>8}  {target}")
        ratio = conv_pair / fc_pair
        print(f"{name:10} {'fully connected':16} {x.shape[0]:6d} {fc_s:9.2f} {fc_pair:9.3f} {ratio:7.0f}x  conv / fc")
        small = images[: args.plain_n]
        small_pairs = small.shape[0] * (small.shape[0] + 1) / 2
        start = time.perf_counter()
        plain = plain_iteration(small, act, w)
        plain_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = deq_kernel.conv_equilibrium_covariance(small, activation=name, bias_variance=BIAS)
        ours_s = time.perf_counter() - start
        agree = float((ours - plain).abs().max() / plain.abs().max())
        plain_pair, ours_pair = plain_s / small_pairs * 1e6, ours_s / small_pairs * 1e6
        print(
            f"{name:10} {'plain iteration':16} {small.shape[0]:6d} {plain_s:9.2f} {plain_pair:9.1f} "
            f"{plain_pair / ours_pair:7.1f}x  plain / ours (ours {ours_s:.3f} s); max rel. difference {agree:.1e}"
        )
        rows.append(
            dict(
                activation=name,
                images=x.shape[0],
                conv_s=conv_s,
                fc_s=fc_s,
                plain_images=small.shape[0],
                plain_s=plain_s,
                ours_small_s=ours_s,
                max_rel_difference=agree,
                conv_diag_mean=float(conv_k.diagonal().mean()),
            )
        )
    if args.gap:
        x = images[: args.gap_n]
        start = time.perf_counter()
        deq_kernel.conv_equilibrium_covariance(x, readout="gap", kernel_size=KERNEL_SIZE, bias_variance=BIAS)
        gap_s = time.perf_counter() - start
        pairs = x.shape[0] * (x.shape[0] + 1) / 2
        verdict = ("met" if gap_s <= 600 else "MISSED") if x.shape[0] >= 500 else "-"
        per_pair = gap_s / pairs * 1e6
        print(f"{'relu':10} {'conv gap':16} {x.shape[0]:6d} {gap_s:9.2f} {per_pair:9.1f}  <= 600 s {verdict}")
        rows.append(dict(activation="relu", readout="gap", images=x.shape[0], gap_s=gap_s))
    if args.accuracy:
        rows.extend(accuracy_rows(images, digits, torch.as_tensor(data.target)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
