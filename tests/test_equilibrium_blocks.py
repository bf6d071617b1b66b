"""The row-block driver of the fused pair solvers (deq_kernel/equilibrium/blocks.py): the
backward pass from the forward pass's saved arrays equals the one that solves again."""

from __future__ import annotations

import pytest
import torch

from deq_kernel import equilibrium_covariance, settings
from deq_kernel.equilibrium import blocks


@pytest.mark.parametrize("output", ["nngp", "preactivation"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_saved_and_recomputed_backward_passes_agree(rng, monkeypatch, output, symmetric):
    x0 = torch.as_tensor(rng.normal(size=(2, 37, 3)))
    z0 = torch.as_tensor(rng.normal(size=(2, 23, 3)))
    weights = torch.as_tensor(rng.normal(size=(2, 37, 37 if symmetric else 23)))
    decisions: list[bool] = []
    saving = blocks._saves

    def spy(*args):
        decisions.append(saving(*args))
        return decisions[-1]

    monkeypatch.setattr(blocks, "_saves", spy)
    grads = []
    seen = []
    for budget in (blocks.SAVE_BYTES, 0):
        monkeypatch.setattr(blocks, "SAVE_BYTES", budget)
        decisions.clear()
        x = x0.clone().requires_grad_(True)
        z = z0.clone().requires_grad_(True)
        # One weight variance per batch entry: one table each, the blocks entry by entry.
        hypers = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in ([0.7, 1.4], 1.3, 0.2, 0.8)]
        with settings.pair_solver("table"), settings.max_block_size(200):  # several row blocks
            k = equilibrium_covariance(
                x,
                None if symmetric else z,
                activation="leaky_relu",
                negative_slope=0.1,
                weight_variance=hypers[0],
                input_variance=hypers[1],
                bias_variance=hypers[2],
                output_variance=hypers[3],
                output=output,
            )
        leaves = [x, *hypers[:3]] + ([hypers[3]] if output == "nngp" else []) + ([] if symmetric else [z])
        grads.append(torch.autograd.grad((k * weights).sum(), leaves))
        seen.append(list(decisions))
    assert seen[0] and all(seen[0]) and not any(seen[1])  # saved, then solved again
    for kept, again in zip(*grads, strict=True):
        assert torch.allclose(kept, again, rtol=1e-13, atol=1e-15)
