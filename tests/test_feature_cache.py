"""The feature cache of ``train-probe`` (:mod:`finercam.feature_cache`): resumable, keyed by the backbone's content
and by each image file, so that it never serves stale features and never recomputes what it has."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from finercam.feature_cache import extract_features
from finercam.images import ImageFolder, ImageReadError, image_folder
from finercam.models import LoadedBackbone
from finercam.models.preprocess import Preprocess


class Counting(nn.Module):
    """A small CNN feature extractor that counts the images it sees and stops (Ctrl-C) after ``stop_after``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen = 0
        self.stop_after: int | None = None

    def forward(self, images: Tensor) -> Tensor:
        if self.stop_after is not None and self.seen >= self.stop_after:
            raise KeyboardInterrupt
        self.seen += len(images)
        return self.net(images)


def backbone(module: Counting) -> LoadedBackbone:
    return LoadedBackbone(features=module, dim=4, preprocess=Preprocess(name="test", resize=(12, 12)),
                          spec="python:test.py:build")


@pytest.fixture
def folder(tmp_path: Path) -> ImageFolder:
    generator = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(5):
            pixels = (torch.rand(12, 12, 3, generator=generator) * 255).to(torch.uint8).numpy()
            # bmp: a file of the same size whatever the pixels, so a change shows in the modification time only
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{index}.bmp")
    return image_folder(tmp_path / "data")


def quiet(_: str) -> None:
    pass


def test_an_interrupted_extraction_resumes_where_it_stopped(tmp_path: Path, folder: ImageFolder) -> None:
    fresh = Counting()
    expected, labels, cached = extract_features(backbone(fresh), folder, tmp_path / "fresh", batch_size=2, log=quiet)
    assert not cached and fresh.seen == 10
    assert labels.tolist() == [label for _, label in folder.samples]

    model = Counting()
    model.stop_after = 6  # three batches of two, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        extract_features(backbone(model), folder, tmp_path / "cache", batch_size=2, chunk_images=4, log=quiet)
    model.stop_after, model.seen = None, 0
    lines: list[str] = []
    features, _, cached = extract_features(backbone(model), folder, tmp_path / "cache", batch_size=2,
                                           chunk_images=4, log=lines.append)
    assert model.seen == 4 and not cached  # the 6 images done before the interruption were kept (one chunk of 4 + 2)
    assert "features of 6 of 10 images from the cache" in lines[0]
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    model.seen = 0
    again, _, cached = extract_features(backbone(model), folder, tmp_path / "cache", log=quiet)
    assert cached and model.seen == 0
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-6)


def test_another_split_of_the_same_images_needs_no_forward_pass(tmp_path: Path, folder: ImageFolder) -> None:
    model = Counting()
    whole, _, _ = extract_features(backbone(model), folder, tmp_path / "cache", log=quiet)
    model.seen = 0
    part = dataclasses.replace(folder, samples=folder.samples[1::3])
    features, labels, cached = extract_features(backbone(model), part, tmp_path / "cache", log=quiet)
    assert cached and model.seen == 0
    assert torch.equal(features, whole[1::3]) and labels.tolist() == [label for _, label in part.samples]


def test_changed_weights_or_a_changed_image_are_recomputed(tmp_path: Path, folder: ImageFolder) -> None:
    model = Counting()
    before, _, _ = extract_features(backbone(model), folder, tmp_path / "cache", log=quiet)
    path = folder.samples[3][0]
    size = path.stat().st_size
    Image.new("RGB", (12, 12), (250, 0, 0)).save(path)  # the same file name and size, new pixels
    assert path.stat().st_size == size
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    model.seen = 0
    after, _, cached = extract_features(backbone(model), folder, tmp_path / "cache", log=quiet)
    assert model.seen == 1 and not cached
    assert not torch.allclose(after[3], before[3]) and torch.equal(after[:3], before[:3])

    with torch.no_grad():
        model.net[0].bias.add_(1.0)  # a retrained checkpoint at the same path: same spec, other weights
    model.seen = 0
    retrained, _, cached = extract_features(backbone(model), folder, tmp_path / "cache", log=quiet)
    assert model.seen == 10 and not cached
    assert not torch.allclose(retrained, after)


def test_an_unreadable_image_keeps_the_rows_before_it(tmp_path: Path, folder: ImageFolder) -> None:
    bad = folder.samples[7][0]
    bad.write_bytes(b"not an image")
    model = Counting()
    with pytest.raises(ImageReadError, match=r"2\.bmp"):
        extract_features(backbone(model), folder, tmp_path / "cache", batch_size=3, log=quiet)
    bad.unlink()
    fixed = dataclasses.replace(folder, samples=tuple(s for s in folder.samples if s[0] != bad))
    model.seen = 0
    extract_features(backbone(model), fixed, tmp_path / "cache", batch_size=3, log=quiet)
    assert model.seen == 3  # 6 of the 9 remaining images were computed before the bad one


def test_a_damaged_cache_file_is_skipped_and_recomputed(tmp_path: Path, folder: ImageFolder) -> None:
    model = Counting()
    expected, _, _ = extract_features(backbone(model), folder, tmp_path / "cache", log=quiet)
    (chunk,) = (tmp_path / "cache").glob("features-*/*.safetensors")
    chunk.write_bytes(b"\x00" * 20)
    lines: list[str] = []
    model.seen = 0
    features, _, cached = extract_features(backbone(model), folder, tmp_path / "cache", log=lines.append)
    assert model.seen == 10 and not cached
    assert any("skipping an unreadable feature cache file" in line for line in lines)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)


def test_a_changed_model_file_with_the_same_weights_is_recomputed(tmp_path: Path, folder: ImageFolder) -> None:
    source = tmp_path / "net.py"
    source.write_text("def build():\n    ...  # version 1\n")
    model = Counting()
    spec = f"python:{source}:build"
    loaded = dataclasses.replace(backbone(model), spec=spec)
    extract_features(loaded, folder, tmp_path / "cache", log=quiet)
    source.write_text("def build():\n    ...  # version 2: another stride, the same weights\n")
    model.seen = 0
    _, _, cached = extract_features(loaded, folder, tmp_path / "cache", log=quiet)
    assert not cached and model.seen == 10
