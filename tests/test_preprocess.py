"""Preprocessing: the presets, the official DINOv2 pipeline, and settings read from timm and transformers configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finercam.compat import import_torchvision
from finercam.errors import FinerCAMError, InvalidArgumentError
from finercam.models import PREPROCESS_PRESETS, Preprocess, get_preprocess
from zoo import random_image

timm = pytest.importorskip("timm")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ------------------------------------------------------------------------------------------------ preprocess


def _official_preprocess(image: Image.Image, patch_size: int = 14, max_size: int = 1000) -> torch.Tensor:
    """The official Finer-CAM ``preprocess`` (tutorials/tutorial.ipynb, generate_cams.py), verbatim in logic."""
    from torchvision.transforms import Compose, Normalize, Resize, ToTensor

    image = image.convert("RGB")
    width, height = image.size
    if max(width, height) > max_size:
        scale = max_size / max(width, height)
        width = int(width * scale)
        height = int(height * scale)
        image = image.resize((width, height), Image.BICUBIC)
    new_height = int(np.ceil(height / patch_size) * patch_size)
    new_width = int(np.ceil(width / patch_size) * patch_size)
    transform = Compose([
        Resize((new_height, new_width), interpolation=Image.BICUBIC),
        ToTensor(),
        Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ])
    return transform(image).to(torch.float32)


@pytest.mark.parametrize("size", [(333, 517), (3000, 1234), (50, 2001), (5, 5), (1000, 999), (1400, 1000)])
def test_dinov2_official_sizes(size: tuple[int, int]) -> None:
    pre = PREPROCESS_PRESETS["dinov2-official"]
    height, width = pre.output_size(*size)
    assert height % 14 == 0 and width % 14 == 0
    assert max(height, width) <= 1008  # longest side <= 1000 before rounding up to a multiple of 14
    width0, height0 = size
    if max(size) > 1000:  # the official code: scale so the longest side is 1000, truncating
        scale = 1000 / max(size)
        width0, height0 = int(width0 * scale), int(height0 * scale)
    assert max(width0, height0) <= 1000
    assert (height, width) == (int(np.ceil(height0 / 14) * 14), int(np.ceil(width0 / 14) * 14))
    assert height - height0 < 14 and width - width0 < 14  # rounded up, never down


@pytest.mark.parametrize("size", [(333, 517), (1500, 700), (20, 31)])
def test_dinov2_official_matches_the_official_code(size: tuple[int, int]) -> None:
    import_torchvision()
    image = random_image(*size)
    ours = PREPROCESS_PRESETS["dinov2-official"](image)
    assert ours.shape == _official_preprocess(image).shape
    assert torch.allclose(ours, _official_preprocess(image), atol=1e-6)


def test_imagenet_preset_matches_torchvision() -> None:
    tv = import_torchvision()
    t = tv.transforms
    image = random_image(301, 257)
    reference = t.Compose([t.Resize(256), t.CenterCrop(224), t.ToTensor(),
                           t.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    assert torch.allclose(get_preprocess("imagenet")(image), reference, atol=1e-6)


def test_timm_config_preprocess_matches_timm() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    config = timm.data.resolve_data_config({}, model=model)
    reference = timm.data.create_transform(**config)(random_image(300, 211))
    from finercam.models.configs import from_timm_config

    ours = from_timm_config(config, "resnet18")(random_image(300, 211))
    assert ours.shape == reference.shape and torch.allclose(ours, reference, atol=1e-6)


def test_preprocess_presets_and_errors() -> None:
    image = random_image(40, 30).convert("L")  # converted to RGB
    assert get_preprocess("none")(image).shape == (3, 30, 40)
    assert get_preprocess("clip")(image).shape == (3, 224, 224)
    assert "multiples of 14" in PREPROCESS_PRESETS["dinov2"].describe()
    with pytest.raises(InvalidArgumentError, match="dinov2-official"):
        get_preprocess("imagenett")
    with pytest.raises(FinerCAMError, match="PIL"):
        get_preprocess("clip")(torch.zeros(3, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="interpolation"):
        Preprocess(interpolation="cubic")


def test_presets_at_another_size() -> None:
    image = Image.new("RGB", (100, 80), (200, 100, 50))
    small = get_preprocess("imagenet@32")
    assert (small.resize, small.crop, small.mean) == (36, (32, 32), PREPROCESS_PRESETS["imagenet"].mean)
    assert get_preprocess("imagenet@224") == Preprocess(**{**PREPROCESS_PRESETS["imagenet"].__dict__,
                                                            "name": "imagenet@224"})
    assert tuple(get_preprocess("clip@48")(image).shape) == (3, 48, 48)
    exact = get_preprocess("none@8x12")
    assert tuple(exact(image).shape) == (3, 8, 12) and exact.mean is None
    assert float(exact(image)[0].mean()) == pytest.approx(200 / 255, abs=1e-3)  # no normalisation
    for bad, message in (("dinov2@32", "takes no @SIZE"), ("imagenet@0", "from 1 to 4096"),
                         ("imagenet@3x4x5", "or HxW"), ("imgnet@32", "unknown preprocessing preset")):
        with pytest.raises(InvalidArgumentError, match=message):
            get_preprocess(bad)
