"""The shipped ViT's recipe: token distillation from the CNN (its formula, a frozen teacher) and the
``distill-probe`` objective (the backbone never sees a label; the head is the linear probe of its frozen tokens)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from finercam.embedded import load_embedded
from finercam.embedded.architectures import SmallCNN, SmallViT
from finercam.embedded.distill import TokenDistillation
from finercam.errors import InvalidArgumentError


def _pair() -> tuple[SmallCNN, SmallViT]:
    torch.manual_seed(0)
    teacher = SmallCNN(num_classes=4, widths=(8, 8, 8, 12)).train()
    student = SmallViT(num_classes=4, dim=16, depth=1, heads=2)
    return teacher, student


def test_loss_is_the_normalised_error_against_the_teacher_pooled_onto_the_token_grid() -> None:
    teacher, student = _pair()
    distillation = TokenDistillation(teacher, student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(3, 3, 64, 64)
    tokens = student.encode(images)
    loss = distillation(images, tokens, (8, 8))
    # by hand: the teacher's 16 x 16 stage3 maps averaged over 2 x 2 cells, row-major like the patch tokens
    maps = teacher.stage3(teacher.stage2(teacher.pool(teacher.stage1(teacher.stem(teacher.normalise(images))))))
    target = F.avg_pool2d(maps, 2).reshape(3, 12, 64).transpose(1, 2)
    predicted = tokens[:, 1:] @ distillation.project.weight.T + distillation.project.bias
    expected = (predicted - target).square().mean() / target.square().mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.patch_embed.proj.weight.grad.abs().sum() > 0 and distillation.project.weight.grad is not None
    assert student.head.weight.grad is None  # the head plays no part in the distillation


def test_loss_vanishes_when_the_projected_tokens_are_the_teacher_features() -> None:
    teacher, student = _pair()
    distillation = TokenDistillation(teacher, student)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        target = F.adaptive_avg_pool2d(teacher.encode(images), (8, 8)).flatten(2).transpose(1, 2)
        distillation.project.weight.zero_()
        distillation.project.bias.zero_()
        # predicting zero: the error is the target's energy, so the normalised loss is 1
        assert float(distillation(images, student.encode(images), (8, 8))) == pytest.approx(1.0)
        # tokens that carry the features in their first channels, read by a projection that selects them
        tokens = torch.cat([torch.zeros(2, 1, 16), F.pad(target, (0, 4))], dim=1)
        distillation.project.weight.copy_(torch.eye(12, 16))
        assert float(distillation(images, tokens, (8, 8))) < 1e-12


def test_encode_then_logits_is_the_forward() -> None:
    teacher, student = _pair()
    images = torch.rand(2, 3, 64, 64)
    for model in (teacher.eval(), student.eval()):
        torch.testing.assert_close(model.logits_from(model.encode(images)), model(images))


def test_distill_probe_objective_fits_the_head_on_the_frozen_tokens(tmp_path) -> None:
    """A tiny run: the card records the objective; the shipped head is exactly the L-BFGS probe of the trained
    backbone's mean patch tokens (refitting it gives the same weights)."""
    from finercam import synth
    from finercam.embedded.train import main
    from finercam.probe import fit_linear_head

    assert main(["--model", "vit", "--out", str(tmp_path), "--epochs", "1", "--train-size", "48",
                 "--test-size", "24", "--threads", "1"]) == 0
    card = json.loads((tmp_path / "vit.json").read_text())
    assert card["training"]["objective"] == "distill-probe" and card["training"]["token_distillation"]["lambda"] == 1
    assert card["target_layer"] == "norm"
    vit = load_embedded("vit", tmp_path)
    train_set = synth.generate(48, seed=0, species_per_genus=8)
    with torch.no_grad():
        pooled = vit.model.pooled(vit.model.encode(train_set.images))
    refit = fit_linear_head(pooled, train_set.labels, 24, weight_decay=1e-4)
    torch.testing.assert_close(vit.model.head.weight, refit.weight)
    torch.testing.assert_close(vit.model.head.bias, refit.bias)


def test_objective_errors(tmp_path) -> None:
    from finercam.embedded.train import main

    common = ["--out", str(tmp_path), "--epochs", "1", "--train-size", "8", "--test-size", "8", "--threads", "1"]
    with pytest.raises(InvalidArgumentError, match="distill-probe objective needs --distill > 0; got 0"):
        main(["--model", "vit", "--distill", "0", *common])
    with pytest.raises(InvalidArgumentError, match=r"a weight >= 0; got -1\.0"):
        main(["--model", "vit", "--objective", "supervised", "--distill", "-1", *common])
    with pytest.raises(InvalidArgumentError, match="teaches a ViT's tokens; got SmallCNN"):
        main(["--model", "cnn", "--distill", "1", *common])
