"""Low precision, non-finite values and large inputs: maps normalised at float32 precision whatever the model's dtype,
a layer with NaN or infinite values named instead of NaN maps, Score-CAM passes bounded in pixels and their errors
wrapped; and the pixel and index types that are easy to get wrong (uint8 overlays, big-endian 16-bit TIFFs, NumPy
integers, probe labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import finercam.explain as explain_module
from finercam import FinerCAM
from finercam.errors import InvalidArgumentError, ModelOutputError
from finercam.images import load_image
from finercam.postprocess import fuse_layers, minmax, normalize_maps
from finercam.probe import fit_linear_head
from finercam.viz import overlay


class Offset(nn.Module):
    """A layer whose maps all sit on a large positive offset (range about 7 % of the values)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_maps_are_normalised_at_float32_precision(dtype: torch.dtype) -> None:
    """bfloat16 has 3 significant digits: its rounding test took a map of range 0.37 on values near 5 as constant,
    so the map came out blank; float16's raised eps dimmed small maps."""
    raw = torch.tensor([[4.844, 5.0], [5.1, 5.213]]).to(dtype)
    expected = normalize_maps(raw.float(), (8, 8))
    got = normalize_maps(raw, (8, 8))
    assert got.dtype == dtype and float(got.max()) == 1.0
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=0)
    small = torch.tensor([[0.0, 1e-4], [2e-4, 3e-4]]).to(dtype)  # float16's smallest normal number is 6.1e-5
    torch.testing.assert_close(minmax(small).float(), minmax(small.float()), atol=1e-3, rtol=0)
    torch.testing.assert_close(fuse_layers([raw, raw.flip(-1)], (4, 4)).float(),
                               fuse_layers([raw.float(), raw.float().flip(-1)], (4, 4)), atol=1e-2, rtol=0)
    assert float(normalize_maps(torch.ones(1, 1, dtype=dtype) * 3, (4, 4)).abs().max()) == 0.0  # constant: 0


def test_a_bfloat16_model_gets_the_float32_models_map() -> None:
    torch.manual_seed(0)
    model = Offset().eval()
    with torch.no_grad():
        model.conv.bias.fill_(5.0)
    x = torch.rand(1, 3, 12, 12)
    for method in ("gradcam", "scorecam"):
        full = FinerCAM(model, "conv", method)(x, gamma=0.0).maps
        half = FinerCAM(model.to(torch.bfloat16), "conv", method)(x, gamma=0.0).maps
        model.float()
        assert float(half.max()) == 1.0, method  # was 0: a blank map
        assert torch.corrcoef(torch.stack([full.flatten(), half.float().flatten()]))[0, 1] > 0.9, method


class Overflowing(nn.Module):
    """A layer that overflows to infinity where the first channel is above 2.5; the head clamps, so the logits stay
    finite and only the maps would show it (as NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blown = torch.where(x[:, :1] > 2.5, torch.tensor(float("inf")), torch.tensor(1.0))
        return self.fc(self.act(self.conv(x) * blown).clamp(-10, 10).mean((2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "layercam"])
def test_non_finite_maps_name_the_layer_and_the_images(method: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8).clamp(-2, 2)
    x[1, 0, 2, 2] = 3.0
    with pytest.raises(ModelOutputError, match=r"the maps of target layer 'act' are not finite \(NaN or infinite\) "
                                               r"for image\(s\) \[1\]: the layer's activations are; check"):
        FinerCAM(Overflowing().eval(), "act", method)(x)
    maps = FinerCAM(Overflowing().eval(), "act", method)(x[[0, 2]]).maps  # the other images are explained
    assert bool(maps.isfinite().all())


def test_score_cam_passes_hold_a_bounded_number_of_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Offset().eval()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _module, inputs: sizes.append(int(inputs[0].shape[0])))
    x = torch.rand(2, 3, 12, 12)
    wide = FinerCAM(model, "conv", "scorecam", score_batch_size=8)(x)
    assert max(sizes[1:]) == 8  # the first forward is the capture
    sizes.clear()
    monkeypatch.setattr(explain_module, "SCORE_PIXELS_PER_PASS", 3 * 12 * 12)
    bounded = FinerCAM(model, "conv", "scorecam", score_batch_size=8)(x)
    assert max(sizes[1:]) == 3 and sum(sizes[1:]) == 2 * 4  # B x K masked inputs, 3 at a time
    torch.testing.assert_close(bounded.maps, wide.maps)


def test_score_cam_forward_errors_are_wrapped() -> None:
    class FailsLater(Offset):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            FailsLater.calls += 1
            if FailsLater.calls > 1:
                raise RuntimeError("boom")
            return super().forward(x)

    with pytest.raises(ModelOutputError, match=r"the model's forward pass failed on images of shape \(4, 3, 8, 8\) "
                                               r"\(torch.float32\): boom"):
        FinerCAM(FailsLater().eval(), "conv", "scorecam")(torch.rand(1, 3, 8, 8))


def test_sweep_positions_may_be_numpy_or_torch_integers(tiny_net: nn.Module, images: torch.Tensor) -> None:
    sweep = FinerCAM(tiny_net, "features").sweep(images, [0.0, 0.6, 1.0])
    for index in (np.int64(1), torch.tensor(1), np.int32(-2)):
        assert torch.equal(sweep.at(index).maps, sweep.maps[1])  # type: ignore[arg-type]
    for bad in (True, 1.0, 3, torch.tensor(0.5)):
        with pytest.raises(InvalidArgumentError, match="a whole number from -3 to 2"):
            sweep.at(bad)  # type: ignore[arg-type]


def test_overlay_reads_integer_pixels_on_their_full_range() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 5, 3)).astype(np.uint8)
    cam = rng.random((6, 5))
    expected = overlay(pixels / 255.0, cam)
    np.testing.assert_allclose(overlay(pixels, cam), expected, atol=1e-12)  # was min-max stretched
    np.testing.assert_allclose(overlay(pixels.astype(np.uint16) * 257, cam), expected, atol=1e-12)
    np.testing.assert_allclose(overlay(torch.from_numpy(pixels).permute(2, 0, 1), cam), expected, atol=1e-12)
    gray = np.full((6, 5, 3), 200, np.uint8)  # a uniform picture stays itself, not black
    np.testing.assert_allclose(overlay(gray, cam, alpha=0.0), np.full((6, 5, 3), 200 / 255))
    normalised = torch.randn(3, 6, 5)  # model inputs: still stretched for display
    shown = overlay(normalised, cam, alpha=0.0)
    assert shown.min() == 0.0 and shown.max() == 1.0
    assert overlay(torch.rand(3, 6, 5, dtype=torch.bfloat16), cam).shape == (6, 5, 3)


def test_big_endian_16_bit_tiffs_load_like_little_endian_ones(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(np.uint16)
    Image.frombytes("I;16B", (30, 20), values.astype(">u2").tobytes()).save(tmp_path / "big.tif")  # ImageJ's order
    Image.frombytes("I;16", (30, 20), values.astype("<u2").tobytes()).save(tmp_path / "little.tif")
    assert Image.open(tmp_path / "big.tif").mode == "I;16B"
    big, little = np.asarray(load_image(tmp_path / "big.tif")), np.asarray(load_image(tmp_path / "little.tif"))
    assert np.array_equal(big, little) and np.array_equal(big[..., 0], (values >> 8).astype(np.uint8))


def test_the_probe_fits_under_inference_mode_in_float32_and_names_bad_labels() -> None:
    torch.manual_seed(0)
    features, labels = torch.randn(60, 6), torch.randint(0, 3, (60,))
    features[torch.arange(60), labels] += 3.0  # separable enough to learn
    plain = fit_linear_head(features, labels, 3)
    with torch.inference_mode():
        inside = fit_linear_head(features, labels, 3)
    half = fit_linear_head(features.half(), labels, 3)
    assert torch.equal(inside.weight, plain.weight) and half.weight.dtype == torch.float32
    torch.testing.assert_close(half.weight, plain.weight, atol=2e-2, rtol=0)
    assert float((plain(features).argmax(1) == labels).float().mean()) > 0.9
    with pytest.raises(InvalidArgumentError, match="labels must be class indices from 0 to 2; got values 0 to 5"):
        fit_linear_head(features, labels * 2 + (labels > 0), 3)
    with pytest.raises(InvalidArgumentError, match=r"features \(N, D\) and N labels; got features \(60, 6\) and "
                                                   r"labels \(59,\)"):
        fit_linear_head(features, labels[1:], 3)
