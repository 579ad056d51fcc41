"""Models that bend the engine's assumptions: patches folded into the batch, post-norm transformer blocks, token
models without attention, blocks of tokens, batch-coupled normalisation, in-place changes of saved tensors,
degenerate heads and layers. Each gets the right layer or one clear error, never silent wrong maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from finercam import FinerCAM, InvalidArgumentError
from finercam.autolayer import auto_layer
from finercam.errors import GridInferenceError, ModelOutputError, ModelShapeError
from finercam.grids import grid_reshape
from finercam.metrics import relative_confidence_drop

timm = pytest.importorskip("timm")


def test_patches_folded_into_the_batch_are_never_explained_as_images() -> None:
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    folded = "stages.4.1.transformer.1.norm1"  # MobileViT unfolds 2 x 2 patches into the batch: (4 B, N, C)
    assert auto_layer(model, example=x) == "final_conv"  # not a transformer block's folded norm
    with pytest.raises(ModelShapeError, match=rf"target layer '{folded}' emits \(8, 1, 96\) for 2 image\(s\), 8 "
                                              r"maps: its batch dimension is not the images'"):
        FinerCAM(model, folded)(x)
    assert FinerCAM(model)(x).maps.shape == (2, 64, 64)


def test_token_models_without_attention_use_their_last_token_layer() -> None:
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    mixer = MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=16).eval()
    nn.init.normal_(mixer.head.weight)  # timm starts the head at zero: every map would be zero, the oracle's too
    x = torch.randn(3, 3, 32, 32)
    assert auto_layer(mixer, example=x) == "norm"  # not the patch-embedding stem, 40 modules before the head
    result = FinerCAM(mixer)(x, gamma=0.0)
    tokens: list[torch.Tensor] = []
    handle = mixer.norm.register_forward_hook(lambda module, args, output: tokens.append(output))
    try:
        logits = mixer(x.requires_grad_(False))
    finally:
        handle.remove()
    activation = tokens[0]
    gradient, = torch.autograd.grad(logits.gather(1, result.targets[:, None]).sum(), activation)
    oracle = (gradient.mean(dim=1, keepdim=True) * activation).sum(dim=2).view(3, 4, 4).detach()  # Grad-CAM, 4 x 4
    assert float(oracle.abs().amax()) > 1e-3  # a real map, not two zeros agreeing
    torch.testing.assert_close(result.raw_maps, oracle, atol=1e-6, rtol=1e-4)


def test_post_norm_blocks_are_explained_at_the_block_output() -> None:
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    v2 = SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1),
                           num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert auto_layer(v2, example=x) == "layers.1.blocks.0"  # its norm1 holds the attention's update
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=3).eval()
    assert auto_layer(swin, example=x) == "layers.1.blocks.0.norm1"  # pre-norm: the paper's layer
    torch.testing.assert_close(FinerCAM(v2)(x).raw_maps, FinerCAM(v2, "layers.1.blocks.0")(x).raw_maps)


def test_blocks_of_tokens_are_not_read_as_a_map() -> None:
    norm = nn.LayerNorm(32)  # NesT: (B, blocks, tokens per block, C), neither (B, C, h, w) nor (B, h, w, C)
    with pytest.raises(GridInferenceError, match=r"neither channels-first \(B, C, h, w\) nor channel-last"):
        grid_reshape(nn.Sequential(norm), norm, (2, 1, 64, 32), (128, 128), batch_size=2)
    conv = nn.Conv2d(3, 8, 1)  # a convolution's output is channels-first, whatever size a wrapper resized to
    assert grid_reshape(nn.Sequential(conv), conv, (2, 8, 7, 7), (100, 300), batch_size=2) is None


def test_batch_coupled_normalisation_is_refused_for_several_images(tiny_net: nn.Module,
                                                                   images: torch.Tensor) -> None:
    tiny_net.head[0] = nn.Sequential(tiny_net.head[0], nn.BatchNorm2d(8, track_running_stats=False))  # type: ignore[index]
    tiny_net.eval()
    with pytest.raises(ModelOutputError, match=r"statistics of the batch even in eval mode .*\['head\.0\.1'\].*"
                                               r"Explain one image at a time"):
        FinerCAM(tiny_net, "features")(images)
    one = FinerCAM(tiny_net, "features")(images[:1])
    assert one.maps.shape == (1, 16, 16)
    masked = [FinerCAM(tiny_net, "features", "scorecam", score_batch_size=size)(images[:1]).raw_maps
              for size in (64, 1)]
    torch.testing.assert_close(masked[0], masked[1])  # the masked inputs go one at a time: none mixes another
    maps = torch.rand(2, 16, 16)
    both = relative_confidence_drop(tiny_net, images[:2], maps, torch.tensor([0, 1]), torch.tensor([[2], [3]]),
                                    fill="zero")
    alone = [relative_confidence_drop(tiny_net, images[i:i + 1], maps[i:i + 1], torch.tensor([i]),
                                      torch.tensor([[2 + i]]), fill="zero") for i in range(2)]
    for k, value in both.items():
        torch.testing.assert_close(value, torch.cat([a[k] for a in alone]))  # metrics: each image as if alone


def test_an_in_place_change_of_a_saved_tensor_names_the_way_out(images: torch.Tensor) -> None:
    class Doubling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.sigmoid(self.conv(x))
            y.mul_(2)  # sigmoid saved its output for the backward pass
            return self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Doubling().eval()
    with pytest.raises(ModelOutputError, match=r"changes in place, after target layer\(s\) \['conv'\].*"
                                               r"method='scorecam'"):
        FinerCAM(model, "conv")(images)
    assert FinerCAM(model, "conv", "scorecam")(images).maps.shape == (4, 16, 16)


def test_degenerate_heads_and_layers_are_named(tiny_net: nn.Module, images: torch.Tensor) -> None:
    cam = FinerCAM(tiny_net, "features")
    torch.testing.assert_close(cam(images, num_references=np.int64(2)).maps, cam(images, num_references=2).maps)
    zero = torch.zeros(6, 8)
    with pytest.raises(InvalidArgumentError, match=r"classifier row of target class \d+ is all zero"):
        cam(images, references="weights", classifier_weights=zero)
    nan = torch.randn(6, 8)
    nan[:] = float("nan")
    with pytest.raises(InvalidArgumentError, match=r"is not finite"):
        cam(images, references="weights", classifier_weights=nan)
    partly = torch.randn(6, 8)
    target = int(cam(images[:1]).targets[0])
    partly[(target + 1) % 6] = 0.0  # a zero row of another class ranks last, never first
    chosen = cam(images[:1], references="weights", classifier_weights=partly, num_references=5).references[0]
    assert int(chosen[-1]) == (target + 1) % 6
    with pytest.raises(ModelShapeError, match=r"target layer 'head\.2' emits 1 x 1 maps"):
        FinerCAM(tiny_net, "head.2")(images)  # the global pooling


def test_class_attention_blocks_of_tokens_and_outer_tokens_get_their_layers() -> None:
    from timm.models.cait import Cait
    from timm.models.nest import Nest
    from timm.models.tnt import TNT

    torch.manual_seed(0)
    cait = Cait(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, depth_token_only=1,
                num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert auto_layer(cait, example=x) == "blocks_token_only.0.norm1"  # pre-norm over cat(cls, x): not post-norm
    tnt = TNT(img_size=32, patch_size=16, embed_dim=16, inner_dim=8, depth=2, num_heads_inner=1, num_heads_outer=2,
              num_classes=3).eval()
    assert auto_layer(tnt, example=x) == "blocks.1.norm_out"  # the outer (patch) tokens, not the folded inner ones
    assert FinerCAM(tnt)(x).raw_maps.shape == (2, 2, 2)
    nest = Nest(img_size=128, patch_size=4, num_levels=3, embed_dims=(16, 16, 16), num_heads=(1, 1, 1),
                depths=(1, 1, 1), num_classes=3).eval()
    big = torch.randn(2, 3, 128, 128)
    assert auto_layer(nest, example=big) == "levels.2"  # its blocks' norms emit (B, blocks, tokens, C): no maps
    assert FinerCAM(nest)(big).raw_maps.shape == (2, 8, 8)
