"""``target_layer="auto"`` and ``reshape="auto"``: for every model family the automatic choice gives exactly the maps
of an explicit layer with a hand-written reshape; token grids follow the input size; ambiguity raises."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from finercam import FinerCAM, InvalidArgumentError, InvalidTypeError, ModelOutputError, TokenGrid
from finercam.autolayer import LayerCandidate, auto_layer, candidate_layers
from finercam.compat import import_torchvision
from finercam.errors import AmbiguousLayoutError, AutoLayerError, GridInferenceError, ModelShapeError
from finercam.grids import ChannelsLast, Geometry, grid_reshape, infer_token_grid
from finercam.layers import first_tensor, replace_first_tensor, resolve_layer

Reshape = Callable[[Tensor], Tensor] | None


def tokens(prefix: int, h: int, w: int) -> Callable[[Tensor], Tensor]:
    """The reshape users write by hand: drop ``prefix`` tokens, lay the rest out as ``h x w``."""
    return lambda t: t[:, prefix:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def channel_last(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


class WithHead(nn.Module):
    """A backbone (returning features, or an output whose ``key`` holds them) and a linear head."""

    def __init__(self, backbone: nn.Module, features: int, key: str | None = None, classes: int = 5) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, classes)
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone(x)
        return self.head(getattr(out, self.key) if self.key else out)


def _timm(name: str, **kwargs: object) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **{"num_classes": 5, **kwargs})


def _dinov2_reg4(img_size: tuple[int, int], **kwargs: object) -> nn.Module:
    return _timm(
        "vit_small_patch14_reg4_dinov2", img_size=img_size, embed_dim=48, depth=2, num_heads=2, dynamic_img_size=True,
        **kwargs,
    )


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=96,
                             num_classes=5)


_HF_SMALL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 96,
             "image_size": 56, "patch_size": 14}


def _hf(kind: str) -> nn.Module:
    import transformers as hf

    if kind == "dinov2":
        return hf.Dinov2ForImageClassification(hf.Dinov2Config(**_HF_SMALL, num_labels=5))
    if kind == "dinov2-reg":
        config = hf.Dinov2WithRegistersConfig(**_HF_SMALL, num_labels=5, num_register_tokens=4)
        return hf.Dinov2WithRegistersForImageClassification(config)
    if kind == "vit":
        return hf.ViTForImageClassification(hf.ViTConfig(**_HF_SMALL, num_labels=5))
    return WithHead(hf.CLIPVisionModel(hf.CLIPVisionConfig(**_HF_SMALL)), 48, key="pooler_output")


def _open_clip() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    visual = VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    return WithHead(visual, 16)


class Family(NamedTuple):
    build: Callable[[], nn.Module]
    size: tuple[int, int]
    layer: str
    reshape: Reshape
    grid: tuple[int, int]


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(import_torchvision().models, name)(weights=None, num_classes=5)


FAMILIES = {
    "timm-resnet18": Family(lambda: _timm("resnet18"), (64, 96), "layer4", None, (2, 3)),
    "timm-vit": Family(
        lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2),
        (32, 32), "blocks.1.norm1", tokens(1, 4, 4), (4, 4),
    ),
    "timm-vit-reg4": Family(lambda: _dinov2_reg4((56, 84)), (56, 84), "blocks.1.norm1", tokens(5, 4, 6), (4, 6)),
    "timm-swin": Family(
        lambda: _timm("swin_tiny_patch4_window7_224", img_size=(64, 96), window_size=4, embed_dim=16,
                      depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
        (64, 96), "layers.3.blocks.0.norm1", channel_last, (2, 3),
    ),
    "timm-dinov2-paper-head": Family(  # the paper's set-up: a linear head on the mean of the patch tokens
        lambda: WithHead(_timm("vit_small_patch14_reg4_dinov2", img_size=(56, 84), embed_dim=48, depth=2, num_heads=2,
                               global_pool="avg", num_classes=0), 48),
        (56, 84), "backbone.blocks.1.norm1", tokens(5, 4, 6), (4, 6),
    ),
    "timm-convnext": Family(lambda: _timm("convnext_atto"), (64, 96), "stages.3", None, (2, 3)),
    "tv-resnet18": Family(_tv("resnet18"), (64, 64), "layer4", None, (2, 2)),
    "tv-vit": Family(_tv_vit, (32, 32), "encoder.layers.encoder_layer_1.ln_1", tokens(1, 4, 4), (4, 4)),
    "tv-swin_t": Family(_tv("swin_t"), (64, 96), "features.7.1.norm1", channel_last, (2, 3)),
    "hf-dinov2": Family(lambda: _hf("dinov2"), (56, 84), "dinov2.encoder.layer.1.norm1", tokens(1, 4, 6), (4, 6)),
    "hf-dinov2-reg": Family(
        lambda: _hf("dinov2-reg"), (56, 84), "dinov2_with_registers.encoder.layer.1.norm1", tokens(5, 4, 6), (4, 6)
    ),
    "hf-vit": Family(lambda: _hf("vit"), (56, 56), "vit.layers.1.layernorm_before", tokens(1, 4, 4), (4, 4)),
    "hf-clip-head": Family(
        lambda: _hf("clip"), (56, 56), "backbone.encoder.layers.1.layer_norm1", tokens(1, 4, 4), (4, 4)
    ),
    "open_clip-head": Family(_open_clip, (32, 32), "backbone.transformer.resblocks.1.ln_1", tokens(1, 4, 4), (4, 4)),
}


def _model(family: Family, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return family.build().eval()


def _assert_same(auto: Tensor, explicit: Tensor) -> None:
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_auto_equals_an_explicit_layer_with_a_hand_written_reshape(name: str) -> None:
    family = FAMILIES[name]
    model = _model(family)
    x = torch.randn(2, 3, *family.size)
    assert auto_layer(model) == family.layer
    auto = FinerCAM(model).sweep(x, gammas=[0.0, 0.6])
    explicit = FinerCAM(model, family.layer, reshape=family.reshape).sweep(x, gammas=[0.0, 0.6])
    assert auto.layers == (family.layer,)
    assert auto.raw_maps.shape == (2, 2, *family.grid)
    _assert_same(auto.raw_maps, explicit.raw_maps)
    _assert_same(auto.baseline_raw_maps, explicit.baseline_raw_maps)
    assert auto.maps.shape == (2, 2, *family.size)


@pytest.mark.parametrize("method", ["layercam", "scorecam"])
def test_auto_reshape_serves_every_method(method: str) -> None:
    family = FAMILIES["timm-vit-reg4"]
    model = _model(family)
    x = torch.randn(2, 3, *family.size)
    auto = FinerCAM(model, method=method)(x)
    explicit = FinerCAM(model, family.layer, method, reshape=family.reshape)(x)
    _assert_same(auto.raw_maps, explicit.raw_maps)


def test_dinov2_with_4_registers_at_280x420_needs_no_reshape_code() -> None:
    torch.manual_seed(0)
    model = _dinov2_reg4((280, 420)).eval()
    x = torch.randn(2, 3, 280, 420)
    result = FinerCAM(model)(x)
    assert result.layers == ("blocks.1.norm1",)
    assert result.raw_maps.shape == (2, 20, 30)
    assert result.maps.shape == (2, 280, 420)
    explicit = FinerCAM(model, "blocks.-1.norm1", reshape=TokenGrid(20, 30, prefix_tokens=5))(x)
    _assert_same(result.raw_maps, explicit.raw_maps)


@pytest.mark.parametrize(("size", "grid"), [((280, 420), (20, 30)), ((98, 154), (7, 11)), ((154, 98), (11, 7))])
def test_token_grids_follow_non_square_and_odd_inputs(size: tuple[int, int], grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = _dinov2_reg4((98, 154)).eval()  # built at one size, explained at others (dynamic_img_size)
    cam = FinerCAM(model)
    x = torch.randn(1, 3, *size)
    result = cam(x)
    assert result.raw_maps.shape == (1, *grid)
    assert result.maps.shape == (1, *size)
    _assert_same(result.raw_maps, FinerCAM(model, "blocks.1.norm1", reshape=tokens(5, *grid))(x).raw_maps)


def test_padded_patch_embeddings_round_up() -> None:
    torch.manual_seed(0)
    model = _dinov2_reg4((98, 154), dynamic_img_pad=True).eval()
    result = FinerCAM(model)(torch.randn(1, 3, 100, 160))  # 100/14 = 7.1 -> 8 rows, 160/14 = 11.4 -> 12 columns
    assert result.raw_maps.shape == (1, 8, 12)
    assert result.maps.shape == (1, 100, 160)


class SequenceFirstViT(nn.Module):
    """A ViT on ``nn.TransformerEncoder`` without ``batch_first``: tokens are ``(N, B, D)``; no patch attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(3, 16, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.patchify(x).flatten(2).permute(2, 0, 1)
        return self.head(self.encoder(torch.cat([self.cls.expand(1, x.shape[0], -1), patches]))[0])


def test_sequence_first_tokens_and_a_patchify_convolution() -> None:
    torch.manual_seed(0)
    model = SequenceFirstViT().eval()
    x = torch.randn(3, 3, 32, 40)
    result = FinerCAM(model)(x)
    assert result.layers == ("encoder.layers.1.norm1",)
    grid = tokens(1, 4, 5)
    explicit = FinerCAM(model, "encoder.layers.1.norm1", reshape=lambda t: grid(t.transpose(0, 1)))(x)
    _assert_same(result.raw_maps, explicit.raw_maps)


def test_layers_returning_tuples_and_model_outputs() -> None:
    import transformers as hf

    torch.manual_seed(0)
    swin = hf.SwinForImageClassification(hf.SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4, num_labels=3
    )).eval()
    x = torch.randn(2, 3, 64, 96)
    block = FinerCAM(swin, "swin.encoder.layers.1.blocks.0")(x)  # the block returns a tuple
    assert block.raw_maps.shape == (2, 8, 12)
    assert auto_layer(swin) == "swin.encoder.layers.1.blocks.0.layernorm_before"

    clip = _model(FAMILIES["hf-clip-head"])
    x = torch.randn(2, 3, 56, 56)
    encoder = FinerCAM(clip, "backbone.encoder")(x)  # returns a BaseModelOutput
    last_block = FinerCAM(clip, "backbone.encoder.layers.1")(x)
    _assert_same(encoder.raw_maps, last_block.raw_maps)


def test_first_tensor_helpers() -> None:
    from transformers.modeling_outputs import BaseModelOutput

    a, b = torch.ones(2), torch.zeros(2)
    output = BaseModelOutput(last_hidden_state=a)
    replaced = replace_first_tensor(output, b)
    assert type(replaced) is BaseModelOutput and replaced.last_hidden_state is b and output.last_hidden_state is a
    assert first_tensor(replaced) is b and first_tensor((None, a)) is a and first_tensor({"x": 1}) is None

    class Pair(NamedTuple):
        hidden: Tensor
        extra: int

    assert replace_first_tensor(Pair(a, 3), b) == (b, 3)
    assert replace_first_tensor((None, a, 1), b) == (None, b, 1)


def test_models_returning_dicts_and_model_outputs() -> None:
    family = FAMILIES["hf-dinov2"]
    model = _model(family)  # returns an ImageClassifierOutput

    class AsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"features": x.mean(), "logits": self.inner(x).logits}

    x = torch.randn(2, 3, *family.size)
    _assert_same(FinerCAM(AsDict())(x).raw_maps, FinerCAM(model)(x).raw_maps)


def _state(model: nn.Module) -> tuple[object, ...]:
    return (
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.grad for p in model.parameters()],
        torch.is_grad_enabled(),
    )


def _assert_state(model: nn.Module, before: tuple[object, ...]) -> None:
    after = _state(model)
    assert after[0] == before[0] and after[1] == before[1] and after[4] == before[4]
    assert all(torch.equal(after[2][k], v) for k, v in before[2].items())  # type: ignore[index, union-attr]
    assert all(g is None for g in after[3])  # type: ignore[union-attr]


class TwoTowers(nn.Module):
    """An image tower and, registered after it, a text tower that never runs on images."""

    def __init__(self) -> None:
        super().__init__()
        self.image = _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
        self.text = nn.TransformerEncoder(nn.TransformerEncoderLayer(48, 2, 96, batch_first=True), 2,
                                          enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.image(x)


def test_only_blocks_that_run_on_the_image_count() -> None:
    torch.manual_seed(0)
    model = TwoTowers().eval()
    assert auto_layer(model) == "image.blocks.1.norm1"  # registration order alone would say text.layers.1.norm1
    assert [c.name for c in candidate_layers(model)] == ["image.blocks.0.norm1", "image.blocks.1.norm1"]


def test_the_dry_run_leaves_the_model_as_found(resnet18: nn.Module) -> None:
    resnet18.train()
    resnet18.layer1.eval()
    before = _state(resnet18)  # BatchNorm running statistics would change in train mode
    candidates = candidate_layers(resnet18, (64, 64))
    _assert_state(resnet18, before)
    assert [c.name for c in candidates] == ["bn1", "layer1", "layer2", "layer3", "layer4"]
    assert [c.recommended for c in candidates] == [False] * 4 + [True]
    assert candidates[-1] == LayerCandidate("layer4", "cnn-stage", (1, 512, 2, 2), True, candidates[-1].description)
    FinerCAM(resnet18)(torch.randn(2, 3, 64, 64))
    _assert_state(resnet18, before)

    def explode(*_: object) -> None:
        raise RuntimeError("inside the model")

    handle = resnet18.layer2.register_forward_hook(explode)
    with torch.no_grad(), pytest.raises(ModelOutputError, match=r"dry run of ResNet.*inside the model"):
        auto_layer(resnet18, (64, 64))
    handle.remove()
    _assert_state(resnet18, before)


def test_small_inputs_pick_the_last_stage_larger_than_1x1(resnet18: nn.Module) -> None:
    assert auto_layer(resnet18, (64, 64)) == "layer4"  # 2 x 2
    assert auto_layer(resnet18, (32, 32)) == "layer3"  # layer4 is 1 x 1
    cam = FinerCAM(resnet18)
    assert repr(cam).startswith("FinerCAM(model=ResNet, target_layer='auto'")
    assert cam(torch.randn(1, 3, 32, 32)).layers == ("layer3",)
    assert cam.layers[0].name == "layer3"  # resolved once, then kept
    assert FinerCAM(resnet18).layers[0].name == "layer4"  # before any call: the model's declared size or 224


def test_candidates_of_a_hierarchical_transformer() -> None:
    model = _model(FAMILIES["timm-swin"])
    candidates = candidate_layers(model, (64, 96))
    assert [c.name for c in candidates if c.recommended] == ["layers.3.blocks.0.norm1"]
    assert {c.kind for c in candidates} == {"swin-block-norm1"}
    assert [c.output_shape for c in candidates] == [(1, 16, 24, 16), (1, 8, 12, 32), (1, 4, 6, 64), (1, 2, 3, 128)]
    vit = candidate_layers(_model(FAMILIES["tv-vit"]))  # no dry run needed: no shapes
    assert [(c.name, c.kind, c.output_shape) for c in vit][-1] == ("encoder.layers.encoder_layer_1.ln_1",
                                                                   "vit-block-ln_1", None)
    assert resolve_layer(model, candidates[-1].name).name == candidates[-1].name


def test_grid_inference_rules() -> None:
    assert infer_token_grid(197, (224, 224), Geometry((16, 16), 1)) == TokenGrid(14, 14, 1)
    assert infer_token_grid(49, (224, 224), Geometry((4, 4), None)) == TokenGrid(7, 7, 0)  # Swin stage 4: 4 * 2^3
    assert infer_token_grid(17, (32, 32), Geometry(None, 1)) == TokenGrid(4, 4, 1)  # factorisation search
    # a layer before the model's prefix tokens are added (``patch_embed``): the model's count, else none
    assert infer_token_grid(196, (224, 224), Geometry((16, 16), 1)) == TokenGrid(14, 14, 0)
    assert infer_token_grid(196, (224, 224), Geometry((16, 16), 0)) == TokenGrid(14, 14, 0)
    with pytest.raises(AmbiguousLayoutError, match=r"several patch grids fit 17 tokens.*3x3 \+ 8 prefix.*TokenGrid"):
        infer_token_grid(17, (32, 32), Geometry(None, None))
    with pytest.raises(GridInferenceError, match=r"no patch grid fits 40 tokens for a 32x32 input.*TokenGrid"):
        infer_token_grid(40, (32, 32), Geometry((8, 8), 1))
    with pytest.raises(GridInferenceError, match="no patch grid fits 198 tokens"):
        infer_token_grid(198, (224, 224), Geometry((16, 16), 1))  # 2 prefix tokens, but the model declares 1


def test_four_d_layouts(resnet18: nn.Module) -> None:
    swin = _model(FAMILIES["timm-swin"])
    norm = swin.layers[3].blocks[0].norm1
    assert grid_reshape(swin, norm, (2, 2, 3, 128), (64, 96)) == ChannelsLast()
    assert grid_reshape(swin, swin.layers[3], (2, 2, 3, 128), (64, 96)) == ChannelsLast()  # only that fits
    assert grid_reshape(resnet18, resnet18.layer4, (2, 512, 2, 3), (64, 96)) is None
    with pytest.raises(AmbiguousLayoutError, match=r"both channels-first .* and channel-last .* reshape="):
        grid_reshape(swin, swin.layers[3], (1, 8, 8, 8), (64, 64))
    with pytest.raises(ModelShapeError, match=r"shape \(2, 10\)"):
        grid_reshape(resnet18, resnet18.fc, (2, 10), (64, 64))


def test_bad_auto_arguments_get_clear_errors(timm_vit: nn.Module) -> None:
    with pytest.raises(InvalidArgumentError, match="reshape must be 'auto', None or a callable; got 'grid'"):
        FinerCAM(timm_vit, reshape="grid")
    with pytest.raises(InvalidTypeError, match="reshape must be 'auto'"):
        FinerCAM(timm_vit, reshape=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"image_size must be \(height, width\).*\(224,\)"):
        auto_layer(timm_vit, (224,))  # type: ignore[arg-type]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(AutoLayerError, match=r"no transformer block .* no module emitting a map larger than 1x1"):
        FinerCAM(mlp)(torch.randn(2, 3, 8, 8))
    handle = timm_vit.blocks.register_forward_pre_hook(lambda _, args: (args[0][:, :14],))  # token pruning
    with pytest.raises(GridInferenceError, match=r"no patch grid fits 14 tokens for a 32x32 input \(patch size"):
        FinerCAM(timm_vit)(torch.randn(1, 3, 32, 32))
    handle.remove()


def test_the_models_own_error_on_the_real_images_names_their_shape() -> None:
    from finercam.embedded import load_embedded

    model = load_embedded("cnn").model
    flags = [p.requires_grad for p in model.parameters()]
    for images in (torch.rand(1, 4, 64, 64), torch.rand(1, 3, 1, 1)):
        shape = re.escape(str(tuple(images.shape)))
        with pytest.raises(ModelOutputError, match=rf"forward pass failed on images of shape {shape}"):
            FinerCAM(model)(images)  # target_layer="auto": the dry run is on these very images
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(not m._forward_hooks and p.grad is None for m in model.modules() for p in m.parameters(False))
