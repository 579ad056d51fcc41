"""The state of a model that finercam must leave exactly as found, snapshotted and compared in tests."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything an explanation must leave as found: modes, flags, gradients, hooks, weights, grad mode."""
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    """The model is as :func:`snapshot` saw it, and no ``.grad`` was written."""
    after = snapshot(model)
    for key in ("training", "requires_grad", "hooks", "grad_mode"):
        assert after[key] == before[key], key
    assert all(g is None for g in after["grads"])  # type: ignore[union-attr]
    for name, value in before["state"].items():  # type: ignore[union-attr]
        assert torch.equal(after["state"][name], value), name  # type: ignore[index]
