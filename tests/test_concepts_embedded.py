"""The embedded CLIP and the ``concepts`` command: the model loads offline and matches its card, zero-shot
classifies fresh birds, its concept maps find the parts they name, and the command writes its figure and maps or
prints a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finercam import FinerCAM, synth
from finercam.cli import main
from finercam.concepts import ZeroShotClassifier, clip_encoders, explain_concepts
from finercam.embedded import captions
from finercam.embedded.clip_model import WEIGHTS_DIR, EmbeddedCLIP, load_embedded_clip
from finercam.errors import InvalidArgumentError
from finercam.metrics import pointing_hits

# Neither the training seed (0) nor the card's held-out seed (1), nor the benchmark's (4242).
FRESH_SEED = 31337


@pytest.fixture(scope="module")
def clip() -> EmbeddedCLIP:
    return load_embedded_clip()


@pytest.fixture(scope="module")
def fresh(clip: EmbeddedCLIP) -> synth.SynthDataset:
    return synth.generate(120, seed=FRESH_SEED, config=clip.synth_config)


def test_loads_offline_and_matches_its_card(clip: EmbeddedCLIP) -> None:
    card = clip.card
    assert (WEIGHTS_DIR / "clip.safetensors").stat().st_size == card["weights_bytes"] < 4_000_000
    assert sum(p.numel() for p in clip.model.parameters()) == card["parameter_count"]
    assert not clip.model.training
    assert card["data"]["train_seed"] != card["data"]["test_seed"]
    assert card["zero_shot_accuracy"]["species_test"] >= 0.8
    assert card["training_command"].startswith("python -m finercam.embedded.train_clip")
    assert clip.logit_scale == pytest.approx(card["logit_scale"], rel=1e-3)
    with torch.no_grad():
        assert clip.model.encode_image(torch.rand(2, 3, 64, 64)).shape == (2, card["architecture"]["embed_dim"])
        assert clip.model.encode_image(torch.rand(1, 3, 80, 56)).shape[0] == 1  # any input size


def test_zero_shot_classifies_fresh_species(clip: EmbeddedCLIP, fresh: synth.SynthDataset) -> None:
    prompts = [captions.species_prompt(fresh.config, k) for k in range(fresh.config.num_classes)]
    classifier = ZeroShotClassifier.from_prompts(clip, prompts)
    with torch.no_grad():
        accuracy = float((classifier(fresh.images).argmax(1) == fresh.labels).float().mean())
    assert accuracy >= 0.75
    # FinerCAM finds the image tower's last spatial stage on its own.
    result = FinerCAM(classifier)(fresh.images[:2], references="weights", classifier_weights=classifier)
    assert result.layers == (classifier.target_layer,) == ("image_encoder." + clip.target_layer,)


def test_concept_maps_point_at_the_named_part(clip: EmbeddedCLIP, fresh: synth.SynthDataset) -> None:
    """A cheap version of benchmarks/concepts_pointing.py: 'white wingbar' versus 'finch' on the finches that have
    one. The contrast must hit the wing-bar at least as often as the plain concept map, and most of the time."""
    attributes = [synth.class_attributes(label, fresh.config) for label in fresh.labels.tolist()]
    have = [i for i, a in enumerate(attributes)
            if a["genus"] == "finch" and a["wingbar"] == "white" and bool(fresh.part_masks["wingbar"][i].any())]
    assert len(have) >= 8
    images, masks = fresh.images[have], fresh.part_masks["wingbar"][have]
    out = explain_concepts(clip, images, "white wingbar", versus="finch", gamma=1.0)
    plain = pointing_hits(out.concept_maps, masks, 2).float().mean()
    contrast = pointing_hits(out.contrast_maps, masks, 2).float().mean()
    assert contrast >= plain and contrast >= 0.6


def test_unknown_words_are_named(clip: EmbeddedCLIP) -> None:
    encoders = clip_encoders(clip)
    with pytest.raises(InvalidArgumentError, match="epaulets"):
        encoders.encode_text(["red epaulets"])
    with pytest.raises(InvalidArgumentError, match="no word"):
        encoders.encode_text(["..."])


# ---------------------------------------------------------------------------------------------------- the command


def _run(argv: list[str]) -> int:
    return main(argv)


@pytest.fixture(scope="module")
def bird_file(tmp_path_factory: pytest.TempPathFactory, fresh: synth.SynthDataset) -> Path:
    index = next(i for i, label in enumerate(fresh.labels.tolist())
                 if synth.class_attributes(label, fresh.config)["genus"] == "jay")
    path = tmp_path_factory.mktemp("birds") / "jay.png"
    pixels = (fresh.images[index] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_command_writes_the_figure_and_the_maps(bird_file: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "jay.png"
    status = _run(["concepts", str(bird_file), "--concept", "black crown", "--versus", "jay", "--versus", "bird",
                   "--gamma", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert "'black crown'" in printed and "versus:   'jay'" in printed and "versus:   'bird'" in printed
    assert out.is_file() and out.stat().st_size > 5000
    maps = load_file(out.with_suffix(".safetensors"))
    assert maps["concept_map"].shape == maps["contrast_map"].shape == (64, 64)
    assert maps["similarities"].shape == (3,)
    status = _run(["concepts", str(bird_file), "--concept", "black crown", "--siblings", "black,white,red",
                   "--out", str(tmp_path / "siblings.png")])
    assert status == 0 and "versus:   'white crown'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concept", "  ", "--versus", "bird"], "--concept is empty"),
        (["--concept", "black crown", "--versus", "Black Crown"], "its own reference"),
        (["--concept", "red epaulets", "--versus", "bird"], "does not know the word"),
        (["--concept", "black crown"], "give the references one way"),
        (["--concept", "black crown", "--nearest", "2"], "needs --candidates"),
    ],
)
def test_command_bad_input_is_one_line(bird_file: Path, argv: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["concepts", str(bird_file), *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("finercam concepts: ") and message in error and error.count("\n") == 1


def test_command_unknown_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["concepts", str(tmp_path / "missing.png"), "--concept", "red beak", "--versus", "bird"]) == 2
    error = capsys.readouterr().err
    assert "does not exist" in error and error.count("\n") == 1
