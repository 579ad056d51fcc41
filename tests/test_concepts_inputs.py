"""How the concepts API and command treat what users hand them: tokenizers that do not fit the model, prompts the
text tower cannot read, templates, inference mode, the text tower's own train/eval mode, float64 models, sizes the
patch grid does not cover, and the maps file of ``finercam concepts`` (found by an audit; each was silent or a raw
traceback before)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finercam import FinerCAM
from finercam.cli import main
from finercam.concepts import Siblings, ZeroShotClassifier, clip_encoders, encode_prompts, explain_concepts
from finercam.concepts.figure import save_concept_figure
from finercam.concepts.loading import load_clip
from finercam.embedded.clip_model import load_embedded_clip
from finercam.errors import InvalidArgumentError, InvalidTypeError, ModelOutputError


def _images(batch: int = 1, height: int = 32, width: int = 32) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(7))


def _states(model: nn.Module) -> list[tuple[str, bool]]:
    return [(name, module.training) for name, module in model.named_modules()]


# --------------------------------------------------------------------------------------------------- tokenizers


def test_the_default_tokenizer_serves_only_models_of_its_vocabulary(make_open_clip: Any) -> None:
    """open_clip's BPE ids fed to a SigLIP-size vocabulary would give plausible, meaningless maps."""
    for vocabulary in (1000, 256_000):
        with pytest.raises(InvalidArgumentError, match=rf"{vocabulary} tokens.*open_clip.get_tokenizer"):
            explain_concepts(make_open_clip(vocab_size=vocabulary), _images(), "red beak", versus="bird")
    explain_concepts(make_open_clip(), _images(), "red beak", versus="bird")  # 49,408: OpenAI's BPE, accepted


def test_prompts_longer_than_the_context_are_refused_not_cut(open_clip_model: nn.Module, hf_clip: Any) -> None:
    long = "bird with " + " and ".join(["a red beak"] * 8)
    with pytest.raises(InvalidArgumentError, match="tokens; the text tower reads at most 16"):
        explain_concepts(open_clip_model, _images(), long, versus="bird")
    model, tokenizer = hf_clip
    with pytest.raises(InvalidArgumentError, match="tokens; the text tower reads at most 32"):
        explain_concepts(model, _images(), long, versus="bird", tokenizer=tokenizer)


def test_tokenizers_of_the_other_library_are_named(open_clip_model: nn.Module, hf_clip: Any) -> None:
    model, hf_tokenizer = hf_clip
    with pytest.raises(InvalidTypeError, match=r"returned BatchEncoding .*open_clip.get_tokenizer"):
        explain_concepts(open_clip_model, _images(), "red beak", versus="bird", tokenizer=hf_tokenizer)
    with pytest.raises(InvalidTypeError, match="returned NoneType"):
        explain_concepts(open_clip_model, _images(), "red beak", versus="bird", tokenizer=lambda texts: None)
    from open_clip.tokenizer import SimpleTokenizer

    with pytest.raises(InvalidArgumentError, match="does not take a transformers call"):
        explain_concepts(model, _images(), "red beak", versus="bird", tokenizer=SimpleTokenizer(context_length=16))


def test_a_reference_read_as_the_concept_is_refused() -> None:
    """The embedded tokenizer drops punctuation: 'white-wingbar' is 'white wingbar', a contrast of zero."""
    clip = load_embedded_clip()
    with pytest.raises(InvalidArgumentError, match="same text embedding as the concept"):
        explain_concepts(clip, torch.rand(1, 3, 64, 64), "white wingbar", versus="white-wingbar")
    with pytest.raises(InvalidArgumentError, match="same text embedding"):
        explain_concepts(clip, torch.rand(1, 3, 64, 64), "white wingbar", versus=["finch", "white, wingbar"])


@pytest.mark.parametrize("template", ["a {}}", "{{}}", "a {} {x}", "{0}"])
def test_templates_with_stray_braces_are_refused(template: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"exactly one '\{\}'"):
        encode_prompts(clip_encoders(load_embedded_clip()), ["red beak"], [template])


def test_siblings_swap_the_longest_matching_value() -> None:
    assert Siblings(("blue", "blue green", "red")).prompts("blue green wing") == ["blue wing", "red wing"]
    assert Siblings(("blue", "blue green", "red")).prompts("blue wing") == ["blue green wing", "red wing"]


# --------------------------------------------------------------------------------------------------- modes, dtypes


def test_inference_mode_gives_the_same_maps(open_clip_model: nn.Module) -> None:
    images = _images(2)
    expected = explain_concepts(open_clip_model, images, "red beak", versus="bird")
    with torch.inference_mode():
        inside = explain_concepts(open_clip_model, images, "red beak", versus="bird")
        classifier = ZeroShotClassifier.from_prompts(open_clip_model, ["red beak", "bird"])
    torch.testing.assert_close(inside.contrast_maps, expected.contrast_maps)
    assert not classifier.weight.is_inference()  # rows made under inference mode still serve autograd later
    result = FinerCAM(classifier)(images, targets=0, references=[[1]] * 2, gamma=expected.gamma)
    torch.testing.assert_close(result.raw_maps, expected.contrast_raw_maps)


def test_a_model_built_under_inference_mode_is_named_as_the_cause() -> None:
    with torch.inference_mode():
        frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ModelOutputError, match=r"inference tensors \(the model was created or loaded inside"):
        FinerCAM(frozen, "1")(torch.randn(1, 3, 8, 8))


def test_text_is_encoded_in_eval_mode_and_the_modes_are_restored(hf_clip: Any) -> None:
    """Text dropout in a model left in train mode would make the prompt rows random."""
    import transformers as tf

    model, tokenizer = hf_clip
    config = tf.CLIPConfig(text_config={**model.config.text_config.to_dict(), "attention_dropout": 0.5,
                                        "dropout": 0.5},
                           vision_config=model.config.vision_config.to_dict(), projection_dim=16)
    noisy = tf.CLIPModel(config)
    noisy.load_state_dict(model.state_dict())
    images = _images()
    expected = explain_concepts(noisy.eval(), images, "red beak", versus="bird", tokenizer=tokenizer).similarities
    noisy.train()
    before = _states(noisy)
    for _ in range(2):
        got = explain_concepts(noisy, images, "red beak", versus="bird", tokenizer=tokenizer).similarities
        torch.testing.assert_close(got, expected)
    assert _states(noisy) == before


def test_float64_models_keep_float64_rows(open_clip_model: nn.Module) -> None:
    model = open_clip_model.double()
    try:
        images = _images().double()
        out = explain_concepts(model, images, "red beak", versus="bird", templates=["{}"])
        with torch.no_grad():
            image = F.normalize(model.encode_image(images), dim=-1)
            text = F.normalize(model.encode_text(_bpe(["red beak", "bird"])), dim=-1)
        assert out.classifier.weight.dtype == torch.float64
        torch.testing.assert_close(out.similarities, image @ text.T, atol=1e-12, rtol=0)
    finally:
        open_clip_model.float()


def _bpe(texts: list[str]) -> Tensor:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=16)(texts)


def test_sizes_the_patch_grid_does_not_cover_are_refused(open_clip_model: nn.Module, hf_clip: Any) -> None:
    model, tokenizer = hf_clip
    for clip, kwargs in ((open_clip_model, {}), (model, {"tokenizer": tokenizer})):
        with pytest.raises(InvalidArgumentError, match=r"50 x 37 px.*cover only 48 x 32 px"):
            explain_concepts(clip, _images(1, 50, 37), "red beak", versus="bird", **kwargs)
        explain_concepts(clip, _images(1, 48, 40), "red beak", versus="bird", **kwargs)  # multiples of 8 work


def test_the_small_clip_and_its_wrapper_give_the_same_rows() -> None:
    clip = load_embedded_clip()
    images = torch.rand(1, 3, 64, 64)
    wrapped = explain_concepts(clip, images, "white wingbar", versus="finch")
    bare = explain_concepts(clip.model, images, "white wingbar", versus="finch")
    torch.testing.assert_close(bare.classifier.weight, wrapped.classifier.weight)
    torch.testing.assert_close(bare.contrast_maps, wrapped.contrast_maps)


# --------------------------------------------------------------------------------------------------- outputs


def test_raw_maps_of_several_layers_point_to_the_result() -> None:
    out = explain_concepts(load_embedded_clip(), torch.rand(1, 3, 64, 64), "white wingbar", versus="finch",
                           target_layer=["image_encoder.stage2", "image_encoder.stage3"])
    with pytest.raises(InvalidArgumentError, match=r"result.layer_raw_maps\[i\]"):
        _ = out.contrast_raw_maps
    with pytest.raises(InvalidArgumentError, match=r"result.layer_baseline_raw_maps\[i\]"):
        _ = out.concept_raw_maps
    assert len(out.result.layer_raw_maps) == 2


def test_a_figure_needs_one_picture_per_explained_image(tmp_path: Path) -> None:
    out = explain_concepts(load_embedded_clip(), torch.rand(2, 3, 64, 64), "white wingbar", versus="finch")
    with pytest.raises(InvalidArgumentError, match=r"explanation has 2 image\(s\)"):
        save_concept_figure(tmp_path / "f.png", torch.rand(3, 64, 64), out)
    assert save_concept_figure(tmp_path / "f.png", torch.rand(2, 3, 64, 64), out).is_file()


def test_weights_given_twice_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="weights given twice"):
        load_clip("open_clip:ViT-B-32@/nowhere/a.pt", weights=tmp_path / "b.pt")


def _bird(tmp_path: Path, width: int = 64, height: int = 64) -> Path:
    from PIL import Image

    path = tmp_path / "bird.png"
    Image.fromarray((torch.rand(height, width, 3) * 255).byte().numpy()).save(path)
    return path


def test_the_command_takes_tower_layers_and_lists_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bird = _bird(tmp_path)
    base = ["concepts", str(bird), "--concept", "white wingbar", "--versus", "finch", "--out", str(tmp_path / "f")]
    assert main([*base, "--layer", "stage2"]) == 0
    assert "layer: image_encoder.stage2" in capsys.readouterr().out
    assert main([*base, "--layer", "stage9"]) == 2
    error = capsys.readouterr().err
    assert "Layers of the image tower for --layer: " in error and "stage3 (the default)" in error
    assert "named_modules" not in error and "finercam layers" not in error


def test_the_maps_file_records_how_it_was_made(tmp_path: Path) -> None:
    from safetensors import safe_open

    bird = _bird(tmp_path, width=96, height=80)
    assert main(["concepts", str(bird), "--concept", "white wingbar", "--versus", "finch", "--template", "a {}",
                 "--out", str(tmp_path / "f.png")]) == 0
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as maps:
        metadata = maps.metadata()
        size = tuple(maps.get_tensor("contrast_map").shape)
    assert size == (80, 96)  # no centre crop: the maps lie on the whole image
    assert json.loads(metadata["maps_size"]) == [80, 96] and metadata["maps_on"] == "the whole image"
    assert json.loads(metadata["templates"]) == ["a {}"]
    assert metadata["image"] == str(bird) and metadata["keep_aspect"] == "False"
    assert metadata["preprocess"].startswith("embedded:clip")
