"""Zero-shot concepts over random-init open_clip and transformers CLIP models (built offline): the zero-shot classifier
is CLIP's own scaled cosine, gradients reach the image tower's layer, the Finer map is the gradient of
``y_c - gamma * mean_t y_{d_t}`` computed by hand, prompt ensembling is the renormalised mean, references are chosen
as documented, and inputs of other sizes work on both backends."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finercam import FinerCAM
from finercam.concepts import (
    CLIPEncoders,
    HFCLIPImageEncoder,
    Nearest,
    OpenCLIPImageEncoder,
    Parent,
    Siblings,
    ZeroShotClassifier,
    clip_encoders,
    encode_prompts,
    explain_concepts,
    nearest_rows,
    reference_prompts,
)
from finercam.concepts.encoders import resample_position_embedding
from finercam.errors import InvalidArgumentError, InvalidTypeError
from finercam.layers import resolve_layer

PROMPTS = ["red beak", "bird", "blue wing"]
GAMMA = 0.7


# --------------------------------------------------------------------------------------------------- the models


@pytest.fixture(params=["open_clip", "hf"])
def encoders(request: pytest.FixtureRequest) -> CLIPEncoders:
    if request.param == "open_clip":
        return clip_encoders(request.getfixturevalue("open_clip_model"), templates=["{}"])
    model, tokenizer = request.getfixturevalue("hf_clip")
    return clip_encoders(model, tokenizer, templates=["{}"])


def _images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 3) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _expected_layer(encoders: CLIPEncoders) -> str:
    if isinstance(encoders.image_encoder, OpenCLIPImageEncoder):
        return "image_encoder.visual.transformer.resblocks.1.ln_1"
    return "image_encoder.vision_model.encoder.layers.1.layer_norm1"


# --------------------------------------------------------------------------------------------------- the classifier


def test_classifier_logits_are_clips_scaled_cosines(encoders: CLIPEncoders) -> None:
    classifier = ZeroShotClassifier.from_prompts(encoders, PROMPTS)
    images = _images()
    with torch.no_grad():
        image = F.normalize(encoders.image_encoder(images), dim=-1)
        text = F.normalize(encoders.encode_text(PROMPTS), dim=-1)
        expected = encoders.logit_scale * image @ text.T
        assert torch.allclose(classifier(images), expected, atol=1e-5)
    assert classifier.class_names == tuple(PROMPTS)
    assert classifier.index("  Blue   WING ") == 2
    assert torch.allclose(classifier.weight.norm(dim=1), torch.ones(3))


def test_towers_match_the_libraries_own_image_features(open_clip_model: nn.Module, hf_clip: Any) -> None:
    images = _images()
    with torch.no_grad():
        assert torch.allclose(OpenCLIPImageEncoder(open_clip_model.visual)(images),
                              open_clip_model.encode_image(images), atol=1e-6)
        model, _ = hf_clip
        features = model.get_image_features(pixel_values=images)
        features = features if isinstance(features, Tensor) else features.pooler_output
        assert torch.allclose(HFCLIPImageEncoder(model.vision_model, model.visual_projection)(images), features,
                              atol=1e-6)


def test_prompt_ensembling_is_the_renormalised_mean_of_normalised_embeddings(encoders: CLIPEncoders) -> None:
    templates = ["a photo of a {}.", "{}", "a close-up of the {}"]
    rows = encode_prompts(encoders, ["red beak", "bird"], templates)
    for row, prompt in zip(rows, ["red beak", "bird"], strict=True):
        each = F.normalize(encoders.encode_text([t.format(prompt) for t in templates]), dim=-1)
        assert torch.allclose(row, F.normalize(each.mean(0), dim=0), atol=1e-6)
    single = encode_prompts(encoders, ["red beak"], ["{}"])[0]
    assert not torch.allclose(rows[0], single, atol=1e-4)  # the templates matter


# --------------------------------------------------------------------------------------------------- Finer-CAM


def _hand_gradcam(classifier: ZeroShotClassifier, layer: str, images: Tensor, grid: tuple[int, int],
                  score: Callable[[Tensor], Tensor]) -> Tensor:
    """Grad-CAM of ``score(logits)`` at ``layer`` computed directly with autograd (tokens: CLS first)."""
    captured: list[Tensor] = []
    handle = resolve_layer(classifier, layer).module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = classifier(images)
            (gradient,) = torch.autograd.grad(score(logits).sum(), captured[0])
    finally:
        handle.remove()
    h, w = grid

    def maps(tokens: Tensor) -> Tensor:
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    activation, gradient = maps(captured[0].detach()), maps(gradient)
    return (gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)


def test_gradients_reach_the_image_tower_and_the_contrast_is_the_formula(encoders: CLIPEncoders) -> None:
    classifier = ZeroShotClassifier.from_prompts(encoders, PROMPTS)
    images = _images(batch=3)
    cam = FinerCAM(classifier)  # target_layer="auto" inside the wrapped image tower
    result = cam(images, targets=0, references=[[1, 2]] * 3, gamma=GAMMA)
    assert result.layers == (_expected_layer(encoders),)
    assert result.raw_maps.shape == (3, 4, 4)
    assert bool(result.raw_maps.abs().gt(0).all()) and bool(result.raw_maps.isfinite().all())

    def contrast(logits: Tensor) -> Tensor:
        return logits[:, 0] - GAMMA * logits[:, 1:3].mean(dim=1)

    by_hand = _hand_gradcam(classifier, result.layers[0], images, (4, 4), contrast)
    assert torch.allclose(result.raw_maps, by_hand, atol=1e-5, rtol=1e-4)
    # Grad-CAM is linear in the gradient: raw(c - gamma * mean_t d_t) = raw(c) - gamma * mean_t raw(d_t).
    raw = {k: cam(images, targets=k, references=[[(k + 1) % 3]] * 3, gamma=0).raw_maps for k in range(3)}
    assert torch.allclose(result.raw_maps, raw[0] - GAMMA * (raw[1] + raw[2]) / 2, atol=1e-5, rtol=1e-4)
    assert torch.allclose(result.baseline_raw_maps, raw[0], atol=1e-6)
    assert not any(p.grad is not None for p in classifier.parameters())


def test_explain_concepts_returns_the_plain_and_contrast_maps(encoders: CLIPEncoders) -> None:
    images = _images(batch=2)
    out = explain_concepts(encoders, images, "red beak", versus=["bird", "blue wing"], gamma=GAMMA)
    assert out.versus == ("bird", "blue wing")
    assert out.concept_maps.shape == out.contrast_maps.shape == (2, 32, 32)
    assert out.similarities.shape == (2, 3) and bool((out.similarities.abs() <= 1 + 1e-5).all())
    reference = FinerCAM(out.classifier)(images, targets=0, references=[[1, 2]] * 2, gamma=GAMMA)
    assert torch.allclose(out.contrast_raw_maps, reference.raw_maps, atol=1e-6)
    assert torch.allclose(out.concept_raw_maps, reference.baseline_raw_maps, atol=1e-6)
    single = explain_concepts(encoders, images[0], "red beak", versus="bird", gamma=0.0)  # one (3, H, W) image
    assert torch.allclose(single.contrast_maps, single.concept_maps)


@pytest.mark.parametrize("size", [(48, 40), (24, 32)])
def test_other_input_sizes_interpolate_the_position_embeddings(encoders: CLIPEncoders, size: tuple[int, int]) -> None:
    classifier = ZeroShotClassifier.from_prompts(encoders, PROMPTS)
    images = _images(batch=2, height=size[0], width=size[1])
    result = FinerCAM(classifier)(images, targets=0, references=[[1]] * 2, gamma=GAMMA)
    assert result.raw_maps.shape == (2, size[0] // 8, size[1] // 8)
    assert result.maps.shape == (2, *size)
    assert bool(result.raw_maps.isfinite().all())


def test_position_resampling_is_the_identity_at_the_native_grid() -> None:
    positions = torch.randn(1 + 16, 8)
    assert resample_position_embedding(positions, (4, 4), (4, 4)) is positions
    resampled = resample_position_embedding(positions, (4, 4), (6, 5))
    assert resampled.shape == (1 + 30, 8) and torch.equal(resampled[0], positions[0])


# --------------------------------------------------------------------------------------------------- references


class _FixedText:
    """A text encoder with known embeddings: prompts are looked up in a table."""

    def __init__(self, table: dict[str, Sequence[float]]) -> None:
        self.table = table

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([self.table[p] for p in prompts], dtype=torch.float32)


def _fixed_encoders() -> CLIPEncoders:
    table = {"red wing": [1.0, 0.0, 0.0], "orange wing": [0.9, 0.2, 0.0], "red beak": [0.6, 0.8, 0.0],
             "bird": [0.0, 0.2, 1.0], "tree": [-1.0, 0.0, 0.0]}
    return CLIPEncoders(nn.Identity(), _FixedText(table), 10.0, ("{}",), "fixed")


def test_reference_strategies() -> None:
    encoders = _fixed_encoders()
    assert reference_prompts("red wing", "bird") == ("bird",)
    assert reference_prompts("red wing", Parent("bird")) == ("bird",)
    assert reference_prompts("red wing", Siblings(("red", "blue", "black"))) == ("blue wing", "black wing")
    assert reference_prompts("a red wing", Siblings(("light blue", "red"))) == ("a light blue wing",)
    assert reference_prompts("light blue wing", Siblings(("light blue", "red"))) == ("red wing",)
    candidates = ("red wing", "tree", "bird", "red beak", "orange wing")
    assert reference_prompts("red wing", Nearest(candidates, k=2), encoders) == ("orange wing", "red beak")
    rows = encode_prompts(encoders, list(candidates))
    assert nearest_rows(rows, 0, 2).tolist() == [4, 3]


def test_weights_references_of_the_classifier_are_the_nearest_prompts() -> None:
    encoders = _fixed_encoders()
    prompts = ["red wing", "tree", "bird", "red beak", "orange wing"]
    classifier = ZeroShotClassifier.from_prompts(encoders, prompts)
    logits = classifier(torch.randn(2, 3))
    from finercam.objectives import classifier_matrix, select_references

    chosen = select_references("weights", logits, torch.zeros(2, dtype=torch.long), 2,
                               classifier_matrix(classifier, len(prompts)))
    assert chosen.indices.tolist() == [nearest_rows(classifier.weight, 0, 2).tolist()] * 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: reference_prompts("red wing", "Red  Wing"), "its own reference"),
        (lambda e: reference_prompts("red wing", ["bird", " "]), "empty"),
        (lambda e: reference_prompts("red wing", ["bird", "BIRD"]), "repeats"),
        (lambda e: reference_prompts("red wing", "Red wing."), "'Red wing.' is the concept itself"),
        (lambda e: reference_prompts("red wing", ["bird", "bird!"]), "'bird!' repeats 'bird'"),
        (lambda e: reference_prompts("red wing", []), "empty"),
        (lambda e: reference_prompts("green tail", Siblings(("red", "blue"))), "none of the sibling values"),
        (lambda e: Siblings(("red",)), "at least two"),
        (lambda e: Nearest(("bird",), k=0), "k must be"),
        (lambda e: encode_prompts(e, ["red wing"], ["no placeholder"]), "exactly one"),
        (lambda e: explain_concepts(e, torch.zeros(1, 3), "", versus="bird"), "concept is empty"),
    ],
)
def test_bad_prompts_are_clear_errors(call: Callable[[CLIPEncoders], object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        call(_fixed_encoders())


def test_unknown_models_and_broken_tokenizers_are_rejected(hf_clip: Any) -> None:
    with pytest.raises(InvalidTypeError, match="not a CLIP model"):
        clip_encoders(nn.Linear(2, 2))
    model, _ = hf_clip
    with pytest.raises(InvalidArgumentError, match="needs its tokenizer"):
        clip_encoders(model)

    class Broken:
        vocab_size = 2

        def __call__(self, *args: object, **kwargs: object) -> None:
            return None

    with pytest.raises(InvalidArgumentError, match="did not load"):
        clip_encoders(model, Broken())


# --------------------------------------------------------------------------------------------------- from files


def test_load_clip_from_saved_files_and_the_command(tmp_path: Path, open_clip_model: nn.Module, hf_clip: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import warnings

    import open_clip
    from safetensors.torch import load_file

    from finercam.concepts.command import add_commands, dispatch
    from finercam.concepts.loading import load_clip

    model, tokenizer = hf_clip
    model.save_pretrained(tmp_path / "hf-clip")
    tokenizer.save_pretrained(tmp_path / "hf-clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "finercam-concepts-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "finercam-concepts-clip.json")
    torch.save({"state_dict": open_clip_model.state_dict()}, tmp_path / "clip.pt")
    images = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_hf = load_clip(f"hf:{tmp_path / 'hf-clip'}", keep_aspect=True)
        loaded_oc = load_clip(f"open_clip:{tmp_path / 'finercam-concepts-clip.json'}@{tmp_path / 'clip.pt'}")
    for loaded, encoders in ((loaded_hf, clip_encoders(model, tokenizer, ["{}"])),
                             (loaded_oc, clip_encoders(open_clip_model, templates=["{}"]))):
        with torch.no_grad():
            assert torch.allclose(loaded.encoders.image_encoder(images), encoders.image_encoder(images), atol=1e-5)
            assert torch.allclose(loaded.encoders.encode_text(PROMPTS), encoders.encode_text(PROMPTS), atol=1e-5)
    assert loaded_hf.preprocess.crop is None and loaded_hf.preprocess.multiple_of == 8
    assert loaded_oc.preprocess.crop == (32, 32)

    picture = tmp_path / "wide.png"
    from PIL import Image

    Image.fromarray((torch.rand(40, 70, 3) * 255).to(torch.uint8).numpy()).save(picture)
    parser = argparse.ArgumentParser(prog="finercam")
    add_commands(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "figure.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = dispatch(parser.parse_args(["concepts", str(picture), "--model", f"hf:{tmp_path / 'hf-clip'}",
                                             "--keep-aspect", "--concept", "red beak", "--versus", "bird",
                                             "--template", "a photo of a {}.", "--out", str(out)]))
    assert status == 0, capsys.readouterr().err
    assert "input: (3, 32, 56)" in capsys.readouterr().out  # 40 x 70 -> shorter side 32 -> sides rounded up to 8
    assert load_file(out.with_suffix(".safetensors"))["contrast_raw_map"].shape == (4, 7)


def test_classifier_arguments_are_checked() -> None:
    encoder = nn.Linear(3, 2)
    with pytest.raises(InvalidArgumentError, match="one prompt per row"):
        ZeroShotClassifier(encoder, torch.randn(3, 2), ["a", "b"])
    with pytest.raises(InvalidArgumentError, match=r"\(C, D\)"):
        ZeroShotClassifier(encoder, torch.randn(2), ["a", "b"])
    with pytest.raises(InvalidArgumentError, match="logit_scale"):
        ZeroShotClassifier(encoder, torch.randn(2, 2), ["a", "b"], logit_scale=0)
    with pytest.raises(InvalidTypeError, match=r"nn\.Module"):
        ZeroShotClassifier(lambda x: x, torch.randn(2, 2), ["a", "b"])  # type: ignore[arg-type]
    classifier = ZeroShotClassifier(encoder, torch.randn(2, 2), ["a", "b"])
    with pytest.raises(InvalidArgumentError, match="not one of"):
        classifier.index("c")


def test_load_clip_refuses_arguments_the_model_does_not_use(tmp_path: Path) -> None:
    from finercam.concepts.loading import load_clip

    with pytest.raises(InvalidArgumentError, match=r"'embedded:clip' takes no weights=; a checkpoint is only loaded "
                                                   "into open_clip models"):
        load_clip("embedded:clip", weights=tmp_path / "any.pth")
    with pytest.raises(InvalidArgumentError, match=r"'embedded:clip' takes no tokenizer=; a tokenizer folder is only "
                                                   "used by hf: models"):
        load_clip("embedded:clip", tokenizer=str(tmp_path))


def test_prompts_compare_without_trailing_punctuation() -> None:
    from finercam.concepts.zero_shot import normalise_prompt

    assert normalise_prompt("  White   wingbar. ") == normalise_prompt("white wingbar!?") == "white wingbar"
    assert normalise_prompt("bird (male)") == "bird (male)"  # only sentence punctuation at the end goes
    classifier = ZeroShotClassifier(nn.Linear(3, 2), torch.randn(2, 2), ["red wing", "bird"])
    assert classifier.index("Red wing.") == 0


def test_one_candidate_given_as_a_string_is_one_prompt() -> None:
    from finercam.concepts import Nearest, Siblings

    assert Nearest("bird", 1).candidates == ("bird",)
    assert Nearest(["bird", "finch"], 1).candidates == ("bird", "finch")
    with pytest.raises(InvalidArgumentError, match="at least two values"):
        Siblings("red")
