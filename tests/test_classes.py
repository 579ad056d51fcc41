"""``FinerCAM.explain_classes``: several classes of every image from one forward pass, each exactly what a separate
call explaining that class gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finercam import FinerCAM, InvalidArgumentError, InvalidTypeError
from finercam.methods import METHODS
from model_state import assert_unchanged, snapshot


def _assert_same(a: object, b: object) -> None:
    for name in ("maps", "raw_maps", "baseline_maps", "logits", "targets", "references"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("aggregation", ["mean", "softmax"])
def test_each_class_equals_its_own_call(method: str, aggregation: str, tiny_net: nn.Module,
                                        images: torch.Tensor) -> None:
    cam = FinerCAM(tiny_net, "features", method, score_batch_size=7)
    results = cam.explain_classes(images, classes=3, gamma=0.8, aggregation=aggregation, num_references=2)
    top = tiny_net(images).topk(3, dim=1).indices
    assert len(results) == 3
    for k, result in enumerate(results):
        assert result.targets.tolist() == top[:, k].tolist()  # the k-th prediction of each image, best first
        alone = cam(images, targets=top[:, k], gamma=0.8, aggregation=aggregation, num_references=2)
        _assert_same(result, alone)
        assert not (result.references == result.targets[:, None]).any()  # each class has its own references


def test_one_forward_pass_serves_every_class(tiny_net: nn.Module, images: torch.Tensor) -> None:
    calls: list[int] = []
    handle = tiny_net.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        FinerCAM(tiny_net, "features").explain_classes(images, classes=4)
        assert calls == [images.shape[0]]  # one forward of the batch; only the VJPs grow with K
        calls.clear()
        cam = FinerCAM(tiny_net, "features", "scorecam", score_batch_size=8)
        cam(images)
        single = list(calls)
        calls.clear()
        cam.explain_classes(images, classes=4)
        assert calls == single  # the masked forwards are shared by the four classes too
    finally:
        handle.remove()


def test_the_forms_of_classes(tiny_net: nn.Module, images: torch.Tensor) -> None:
    cam = FinerCAM(tiny_net, "features")
    batch = images.shape[0]
    same = cam.explain_classes(images, classes=[5, 1])  # these classes for every image
    assert [r.targets.tolist() for r in same] == [[5] * batch, [1] * batch]
    rows = [[k % 6, (k + 2) % 6] for k in range(batch)]
    for given in (rows, torch.tensor(rows), torch.tensor(rows).numpy()):
        results = cam.explain_classes(images, classes=given)  # type: ignore[arg-type]
        assert [r.targets.tolist() for r in results] == [[row[0] for row in rows], [row[1] for row in rows]]
    _assert_same(cam.explain_classes(images, classes=torch.tensor(1))[0], cam(images, targets=None))  # top-1
    _assert_same(same[0], cam(images, targets=5))


def test_bad_classes_are_named(tiny_net: nn.Module, images: torch.Tensor) -> None:
    cam = FinerCAM(tiny_net, "features")
    before = snapshot(tiny_net)
    cases: list[tuple[object, type[Exception], str]] = [
        (7, InvalidArgumentError, r"classes=7 asks for the top 7 predictions, but the model has 6 classes; give 1\.\."),
        (0, InvalidArgumentError, r"classes=0 asks for the top 0 predictions"),
        ([[1, 2], [3]], InvalidArgumentError, r"classes gives 2 lists of lengths \[1, 2\]; expected 4 lists"),
        ([1, 9], InvalidArgumentError, r"class 9 at position \(0, 1\) is not a class of this model: it has 6"),
        (torch.zeros(4, 2), InvalidTypeError, r"classes must hold integer class indices; got a tensor of dtype"),
        (torch.zeros(3, 2, dtype=torch.long), InvalidArgumentError, r"classes has shape \(3, 2\); expected \(B, K\)"),
        ("top", InvalidTypeError, r"classes must be an int, a list of classes or a \(B, K\) integer tensor"),
        ([], InvalidTypeError, r"classes must be an int K \(top-K predictions\), a list of classes"),
    ]
    for classes, error, message in cases:
        with pytest.raises(error, match=message):
            cam.explain_classes(images, classes=classes)  # type: ignore[arg-type]
        assert_unchanged(tiny_net, before)  # also when it raises
    with pytest.raises(InvalidArgumentError, match=r"chooses the references of each class with a strategy"):
        cam.explain_classes(images, references=torch.zeros(4, 1, dtype=torch.long))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"gamma must be"):
        cam.explain_classes(images, gamma=-1)


def test_the_model_is_left_as_found(tiny_net: nn.Module, images: torch.Tensor) -> None:
    tiny_net.train()
    tiny_net.features[0].weight.requires_grad_(False)  # type: ignore[index]
    before = snapshot(tiny_net)
    results = FinerCAM(tiny_net, "features").explain_classes(images, classes=2)
    assert_unchanged(tiny_net, before)
    assert all(not r.maps.requires_grad for r in results)
