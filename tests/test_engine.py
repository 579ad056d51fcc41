"""The engine's promises: the model is left exactly as found, nothing is computed that is not needed, batches are
independent, and bad input gets a clear error naming the bad value."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from finercam import FinerCAM, InvalidArgumentError, InvalidTypeError, LayerNotFoundError, TokenGrid
from finercam.capture import forward_with_capture
from finercam.errors import ModelOutputError, ModelShapeError
from finercam.layers import resolve_layers
from finercam.methods import METHODS
from model_state import assert_unchanged, snapshot


def _mixed_state(model: nn.Module) -> nn.Module:
    model.train()
    model.features[0].eval()  # type: ignore[index]
    model.head[0].weight.requires_grad_(False)  # type: ignore[index]
    return model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_model_is_left_exactly_as_found(tiny_net: nn.Module, images: Tensor, method: str) -> None:
    model = _mixed_state(tiny_net)
    before = snapshot(model)
    with FinerCAM(model, "features", method) as cam:
        cam(images)
        cam.sweep(images, gammas=[0.0, 1.0], aggregation="softmax")
    assert_unchanged(model, before)


def test_model_is_restored_when_an_exception_is_raised(tiny_net: nn.Module, images: Tensor) -> None:
    model = _mixed_state(tiny_net)
    before = snapshot(model)
    cam = FinerCAM(model, "features")
    with pytest.raises(InvalidArgumentError, match="target class 99"):
        cam(images, targets=99)  # fails after the forward pass, with hooks and a graph in place
    assert_unchanged(model, before)

    class Boom(RuntimeError):
        pass

    def explode(*_: object) -> None:
        raise Boom("inside the model")

    handle = model.head[0].register_forward_hook(explode)  # type: ignore[index]
    with torch.no_grad(), pytest.raises(ModelOutputError, match="inside the model") as raised:  # grad mode too
        cam(images)
    assert isinstance(raised.value.__cause__, Boom)  # the model's own error, chained
    handle.remove()
    assert_unchanged(model, before)


def test_context_manager_never_swallows_errors(tiny_net: nn.Module, images: Tensor) -> None:
    with pytest.raises(IndexError), FinerCAM(tiny_net, "features"):
        raise IndexError("user code")


def test_frozen_model_with_inplace_relus(resnet18: nn.Module) -> None:
    for parameter in resnet18.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    with FinerCAM(resnet18, "layer4") as cam:
        result = cam(x)
    assert result.maps.shape == (2, 64, 64)
    assert result.raw_maps.abs().sum() > 0
    # layer4.1.relu is an in-place ReLU used twice: the recorded activation is still the layer's output.
    with torch.no_grad():
        reference = resnet18.layer4(resnet18.layer3(resnet18.layer2(resnet18.layer1(
            resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))))))
    capture = forward_with_capture(resnet18, x, resolve_layers(resnet18, "layer4"), record_graph=True)
    torch.testing.assert_close(capture.activations[0].detach(), reference)


def test_no_graph_is_recorded_below_the_target_layer(tiny_net: nn.Module, images: Tensor) -> None:
    layers = resolve_layers(tiny_net, "features.2")
    capture = forward_with_capture(tiny_net, images, layers, record_graph=True)
    activation = capture.activations[0]
    assert activation.is_leaf and activation.requires_grad  # the graph starts at the layer
    assert capture.logits.requires_grad
    # Gradients reach only the activation: parameters below it are not part of the graph at all.
    first_conv = tiny_net.features[0].weight  # type: ignore[index]
    with pytest.raises(RuntimeError, match=r"does not require grad|not have been used"):
        torch.autograd.grad(capture.logits.sum(), first_conv)


def test_batch_independence(resnet18: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    with FinerCAM(resnet18, "layer4", "layercam") as cam:
        together = cam(x, targets=[1, 2, 3], gamma=0.6)
        for b in range(3):
            alone = cam(x[b : b + 1], targets=[b + 1], gamma=0.6)
            assert torch.equal(alone.references[0], together.references[b])
            scale = alone.raw_maps.abs().max()
            torch.testing.assert_close(together.raw_maps[b] / scale, alone.raw_maps[0] / scale, atol=1e-5, rtol=0)
            torch.testing.assert_close(together.maps[b], alone.maps[0], atol=1e-4, rtol=0)


def test_dtype_is_the_models(tiny_net: nn.Module, images: Tensor) -> None:
    model = tiny_net.double()
    with FinerCAM(model, "features") as cam:
        result = cam(images)  # float32 images are cast to the model's float64
    assert result.maps.dtype == result.raw_maps.dtype == result.logits.dtype == torch.float64


def test_inference_mode_inputs_and_context(tiny_net: nn.Module, images: Tensor) -> None:
    expected = FinerCAM(tiny_net, "features")(images).raw_maps
    with torch.inference_mode():
        frozen = images.clone()
        result = FinerCAM(tiny_net, "features")(frozen)
    torch.testing.assert_close(result.raw_maps, expected)
    with torch.inference_mode():  # classes and references read from a prediction made in inference mode
        top = tiny_net(images).topk(3, dim=1).indices
    cam = FinerCAM(tiny_net, "features")
    given = cam(images, targets=top[:, 1], references=top[:, 2:])
    same = cam(images, targets=top[:, 1].clone(), references=top[:, 2:].clone())
    torch.testing.assert_close(given.raw_maps, same.raw_maps)
    torch.testing.assert_close(cam.explain_classes(images, classes=top)[2].raw_maps,
                               cam(images, targets=top[:, 2].clone()).raw_maps)


def test_no_host_copies_in_the_hot_path(tiny_net: nn.Module, images: Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("host copy in the hot path")

    monkeypatch.setattr(Tensor, "numpy", forbidden)
    monkeypatch.setattr(Tensor, "cpu", forbidden)
    monkeypatch.setattr(Tensor, "tolist", forbidden)
    for method in METHODS:
        FinerCAM(tiny_net, "features", method).sweep(images, gammas=[0.0, 0.6])


def test_an_all_zero_map_stays_zero_not_nan(linear_head_net: nn.Module) -> None:
    x = torch.zeros(2, 3, 16, 16)
    with torch.no_grad():
        linear_head_net.features[0].bias.fill_(-1.0)  # type: ignore[index]
    result = FinerCAM(linear_head_net, "features")(x)  # ReLU features are all zero
    assert torch.equal(result.maps, torch.zeros_like(result.maps))
    assert torch.equal(result.baseline_maps, torch.zeros_like(result.maps))


def test_maps_are_normalised_at_input_size(resnet18: nn.Module) -> None:
    x = torch.randn(2, 3, 70, 90)
    result = FinerCAM(resnet18, "layer4")(x, gamma=0.3)
    assert result.maps.shape == (2, 70, 90)
    assert result.raw_maps.shape == (2, 3, 3)
    assert float(result.maps.min()) == 0.0
    assert float(result.maps.amax(dim=(1, 2)).min()) > 0.999


def test_several_layers(resnet18: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    result = FinerCAM(resnet18, ["layer3", "layer4"])(x)
    assert [tuple(r.shape) for r in result.layer_raw_maps] == [(2, 4, 4), (2, 2, 2)]
    assert result.maps.shape == (2, 64, 64)
    with pytest.raises(InvalidArgumentError, match="layer_raw_maps"):
        _ = result.raw_maps


def test_token_layers_with_an_explicit_grid(timm_vit: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    result = FinerCAM(timm_vit, "blocks.-1.norm1", reshape=TokenGrid(4, 4, prefix_tokens=1))(x)
    assert result.raw_maps.shape == (2, 4, 4)
    assert result.maps.shape == (2, 32, 32)
    with pytest.raises(ModelShapeError, match="TokenGrid"):
        FinerCAM(timm_vit, "blocks.-1.norm1", reshape=None)(x)
    with pytest.raises(ModelShapeError, match="17 tokens"):
        FinerCAM(timm_vit, "blocks.-1.norm1", reshape=TokenGrid(5, 5))(x)


def test_single_class_model_explains_the_logit_and_says_so(tiny_net: nn.Module, images: Tensor) -> None:
    tiny_net.head[-1] = nn.Linear(8, 1)  # type: ignore[index]
    result = FinerCAM(tiny_net, "features")(images)
    assert result.references.shape == (4, 0)
    assert not result.has_references
    torch.testing.assert_close(result.raw_maps, result.baseline_raw_maps)


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda m, x: FinerCAM(m, "layer5"), LayerNotFoundError, r"'layer5' does not exist.*did you mean 'layer4'"),
        (lambda m, x: FinerCAM(m, "layer4.7"), LayerNotFoundError, "index 7 is out of range"),
        (lambda m, x: FinerCAM(m, 42), InvalidTypeError, "dotted name"),
        (lambda m, x: FinerCAM(m, "layer4", "gradcam3"), InvalidArgumentError, "unknown CAM method 'gradcam3'"),
        (lambda m, x: FinerCAM(m, "layer4")(x, targets=10), InvalidArgumentError, "10 classes"),
        (lambda m, x: FinerCAM(m, "layer4")(x, gamma=-0.5), InvalidArgumentError, "-0.5"),
        (lambda m, x: FinerCAM(m, "layer4")(x, gamma=float("nan")), InvalidArgumentError, ">= 0"),
        (lambda m, x: FinerCAM(m, "layer4")(x, gamma=True), InvalidTypeError, "real number"),
        (lambda m, x: FinerCAM(m, "layer4")(x, references=[[1, 2]]), InvalidArgumentError, "list of 2 lists"),
        (
            lambda m, x: FinerCAM(m, "layer4")(x, references=torch.ones(2, 2, 2, dtype=torch.long)),
            InvalidArgumentError,
            r"\(B, T\)",
        ),
        (lambda m, x: FinerCAM(m, "layer4")(x[0]), InvalidArgumentError, "4-D batch.*unsqueeze"),
        (lambda m, x: FinerCAM(m, "layer4")(x.long()), InvalidTypeError, "floating-point"),
        (lambda m, x: FinerCAM(m, "layer4")(x, aggregation="max"), InvalidArgumentError, "'mean', 'softmax'"),
        (lambda m, x: FinerCAM(m, "layer4")(x, num_references=0), InvalidArgumentError, "num_references"),
        (lambda m, x: FinerCAM(m, "layer4").sweep(x, gammas=[]), InvalidArgumentError, "gammas is empty"),
        (lambda m, x: FinerCAM(m, "layer4")(x, gamma=1e39), InvalidArgumentError, "does not fit the model's dtype"),
        (lambda m, x: FinerCAM(m, "layer4", None), InvalidTypeError, "method must be a name.*got NoneType"),
        (lambda m, x: FinerCAM(m, "layer4")(x, references=3), InvalidTypeError, "got int 3.*num_references="),
        (lambda m, x: FinerCAM(m, "layer4")(x, references=[[-1], [2]]), InvalidArgumentError, "class -1"),
        (lambda m, x: TokenGrid(4.0, 4, 1), InvalidTypeError, "integer height"),  # type: ignore[arg-type]
    ],
)
def test_bad_input_gets_a_clear_error(resnet18: nn.Module, call, error, fragment) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(error, match=fragment):
        call(resnet18, x)


def test_a_layer_that_does_not_feed_the_logits(tiny_net: nn.Module, images: Tensor) -> None:
    tiny_net.unused = nn.Conv2d(3, 3, 1)  # type: ignore[assignment]
    with pytest.raises(ModelOutputError, match="did not run"):
        FinerCAM(tiny_net, "unused")(images)


def test_an_input_the_model_cannot_take_names_its_shape(resnet18: nn.Module) -> None:
    with pytest.raises(ModelOutputError, match=r"failed on images of shape \(2, 1, 32, 32\).*3 channels"):
        FinerCAM(resnet18, "layer4")(torch.randn(2, 1, 32, 32))


def test_a_model_without_class_logits(tiny_net: nn.Module, images: Tensor) -> None:
    with pytest.raises(ModelOutputError, match=r"shape \(4, 8, 8, 8\); expected \(B, C\)"):
        FinerCAM(tiny_net.features, "2")(images)


class _SharedConv(nn.Module):
    """One convolution applied twice: its activations are ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.shared(torch.relu(self.shared(x))).mean((2, 3)))


def test_a_layer_that_runs_twice_is_refused() -> None:
    model = _SharedConv().eval()
    before = snapshot(model)
    for method in ("gradcam", "scorecam"):
        with pytest.raises(ModelOutputError, match="'shared' ran 2 times in one forward pass"):
            FinerCAM(model, "shared", method)(torch.randn(2, 3, 8, 8))
    assert_unchanged(model, before)


class _NoGradHead(nn.Module):
    """A frozen-backbone probe whose forward runs the head under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        with torch.no_grad():
            return self.fc(features.mean((2, 3)))


def test_a_forward_that_cuts_the_graph_is_explained_in_the_error() -> None:
    with pytest.raises(ModelOutputError, match=r"torch\.no_grad.*method=.scorecam."):
        FinerCAM(_NoGradHead().eval(), "backbone")(torch.randn(2, 3, 8, 8))
    assert FinerCAM(_NoGradHead().eval(), "backbone", "scorecam")(torch.randn(2, 3, 8, 8)).maps.isfinite().all()


class _IndexFirst(nn.Module):
    """A layer returning (indices, activations), as pooling with indices does."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros(1, dtype=torch.long), x * 2


class _IndexFirstNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.sub = _IndexFirst()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.sub(self.conv(x))[1]).mean((2, 3)))


def test_the_activation_is_the_first_floating_point_tensor_of_a_tuple() -> None:
    torch.manual_seed(0)
    model, x = _IndexFirstNet().eval(), torch.randn(2, 3, 8, 8)
    explained = FinerCAM(model, "sub")(x, targets=1, references=[[0], [0]])
    direct = FinerCAM(model, "conv")(x, targets=1, references=[[0], [0]])
    # sub's activation is 2 * conv's and its gradient half of conv's: the same Grad-CAM map.
    assert torch.allclose(explained.raw_maps, direct.raw_maps, atol=1e-6)


class _SequenceFirstViT(nn.Module):
    """Tokens kept sequence-first, (N, B, D), as with nn.MultiheadAttention(batch_first=False)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).permute(2, 0, 1)
        tokens = torch.cat([self.cls_token.expand(1, x.shape[0], -1), tokens])
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        return self.head(tokens[1:].mean(0))


def test_sequence_first_tokens_when_the_batch_equals_the_token_count() -> None:
    torch.manual_seed(0)
    model = _SequenceFirstViT().eval()
    x = torch.randn(17, 3, 32, 32)  # 16 patches + CLS = 17 tokens = the batch size
    cam = FinerCAM(model, "norm1")
    whole = cam(x, targets=0, references=[[1]] * 17)
    pair = cam(x[:2], targets=0, references=[[1]] * 2)
    assert torch.allclose(whole.raw_maps[:2], pair.raw_maps, atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
@pytest.mark.parametrize("aggregation", ["mean", "softmax"])
def test_half_precision_stays_finite(tiny_net: nn.Module, images: Tensor, method: str, aggregation: str) -> None:
    # float16 rounds 1e-8 and 1e-9 to 0: a constant Score-CAM channel and references with probability 0 must not
    # give 0 / 0.
    model = tiny_net.half()
    with torch.no_grad():
        head = model.head[-1]
        head.bias.copy_(torch.tensor([25.0] + [0.0] * (head.bias.numel() - 1)))  # a confident prediction
        model.features[2].bias[0] = -1e4  # a dead ReLU channel: constant
    result = FinerCAM(model, "features", method)(images.half(), aggregation=aggregation)
    assert result.maps.dtype == torch.float16
    assert bool(result.maps.isfinite().all()) and bool(result.baseline_maps.isfinite().all())


def test_gammas_as_tensors_and_sweep_positions(tiny_net: nn.Module, images: torch.Tensor) -> None:
    cam = FinerCAM(tiny_net, "features")
    assert torch.equal(cam(images, gamma=torch.tensor(0.6)).maps, cam(images, gamma=0.6).maps)
    sweep = cam.sweep(images, gammas=torch.linspace(0, 2, 5))
    assert sweep.gammas == (0.0, 0.5, 1.0, 1.5, 2.0)
    assert torch.equal(sweep.at(-1).maps, sweep.maps[4]) and sweep.at(-1).gamma == 2.0
    with pytest.raises(InvalidArgumentError, match=r"a whole number from -5 to 4; got 5$"):
        sweep.at(5)
    with pytest.raises(InvalidArgumentError, match=r"got 0\.5; for gamma 0\.5 use at\(sweep\.gammas\.index\(0\.5\)\)"):
        sweep.at(0.5)


def test_a_layer_name_without_its_parent_suggests_the_full_name() -> None:
    model = nn.Sequential()
    model.add_module("image_encoder", nn.Sequential())
    model.image_encoder.add_module("norm", nn.LayerNorm(4))
    with pytest.raises(LayerNotFoundError, match=r"did you mean 'image_encoder\.norm'"):
        resolve_layers(model, "norm")
