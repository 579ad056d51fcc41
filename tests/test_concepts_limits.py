"""What the towers and tokenizers of ``finercam concepts`` cannot read is said, never cut or dropped: prompts a
user-supplied open_clip tokenizer would cut, words outside the embedded CLIP's vocabulary, sizes a fixed-size tower
cannot take, a transformers folder without tokenizer files, and devices this machine lacks; prompts holding ``$`` are
drawn as written (found by an audit; each was silent, misleading or a raw traceback before)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from finercam.concepts import clip_encoders, encode_prompts, explain_concepts
from finercam.concepts.figure import save_concept_figure
from finercam.concepts.loading import load_clip
from finercam.embedded.clip_model import load_embedded_clip
from finercam.errors import InvalidArgumentError, ModelNotFoundError
from finercam.runtime import resolve_device


def _images(batch: int = 1, height: int = 32, width: int = 32) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------------------- tokenizers


def test_prompts_a_given_open_clip_tokenizer_would_cut_are_refused(open_clip_model: nn.Module) -> None:
    """open_clip's own tokenizers (what ``open_clip.get_tokenizer`` returns, and the command line passes) cut at the
    context length without a word: two prompts differing after the cut would get the same row."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=16)  # the tiny model's context: 14 words + start and end
    fits, cut = " ".join(["red"] * 14), " ".join(["red"] * 15)
    encoders = clip_encoders(open_clip_model, tokenizer, ["{}"])
    with pytest.raises(InvalidArgumentError, match="longer than the 16 tokens the text tower reads"):
        encode_prompts(encoders, [cut + " beak"])
    with pytest.raises(InvalidArgumentError, match="longer than the 16 tokens"):
        explain_concepts(open_clip_model, _images(), cut, versus="bird", tokenizer=tokenizer, templates=["{}"])
    rows = encode_prompts(encoders, [fits, "bird"])  # exactly the context: accepted, as the default tokenizer reads it
    assert torch.allclose(rows, encode_prompts(clip_encoders(open_clip_model, templates=["{}"]), [fits, "bird"]))
    plain = clip_encoders(open_clip_model, lambda texts: tokenizer(texts), ["{}"])  # cannot be asked: not checked
    assert torch.allclose(encode_prompts(plain, [fits]), rows[:1])


def test_the_default_tokenizers_length_error_is_not_wrapped_in_tokenizer_advice(open_clip_model: nn.Module) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        explain_concepts(open_clip_model, _images(), " ".join(["red"] * 15), versus="bird", templates=["{}"])
    assert "the text tower reads at most 16" in str(error.value)
    assert "tokenizer failed" not in str(error.value) and "get_tokenizer" not in str(error.value)


@pytest.mark.parametrize(("prompt", "unknown"), [
    ("white wingbar 2", "['2']"), ("café crown", "['café']"), ("weiß crown", "['weiß']"),
    ("white wingbar 🐦", "['🐦']"), ("red crown $5", "['$5']"),
])
def test_the_embedded_clip_names_words_it_cannot_read(prompt: str, unknown: str) -> None:
    """Digits, symbols and letters outside a-z used to be dropped: "white wingbar 2" gave "white wingbar"'s map."""
    with pytest.raises(InvalidArgumentError, match=re.escape(f"does not know the word(s) {unknown}")):
        explain_concepts(load_embedded_clip(), torch.rand(1, 3, 64, 64), prompt, versus="finch")


def test_the_embedded_clip_drops_only_punctuation_and_case() -> None:
    tokenizer = load_embedded_clip().model.tokenizer
    assert torch.equal(tokenizer(["White-Wingbar!"]), tokenizer(["white wingbar"]))
    assert tokenizer.words("a  finch,\twith a «black» beak.") == ["a", "finch", "with", "a", "black", "beak"]


def test_a_transformers_folder_without_tokenizer_files_is_named(tmp_path: Path, hf_clip: Any) -> None:
    """transformers builds an empty 2-token tokenizer when the files are missing, instead of failing."""
    model, tokenizer = hf_clip
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelNotFoundError, match=r"hf:.*: no tokenizer files in .*pass --tokenizer DIR"):
            load_clip(f"hf:{tmp_path / 'model'}")
        with pytest.raises(ModelNotFoundError, match="--tokenizer: no tokenizer files"):
            load_clip(f"hf:{tmp_path / 'model'}", tokenizer=str(tmp_path / "model"))
        loaded = load_clip(f"hf:{tmp_path / 'model'}", tokenizer=str(tmp_path / "tokenizer"))
    rows = encode_prompts(loaded.encoders, ["red beak"])
    direct = clip_encoders(model, tokenizer, loaded.encoders.templates)
    assert torch.allclose(rows, encode_prompts(direct, ["red beak"]))


# --------------------------------------------------------------------------------------------------- sizes, devices


def test_a_fixed_size_open_clip_tower_names_the_size_it_takes() -> None:
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    torch.manual_seed(0)
    resnet = CLIP(embed_dim=16, vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
                  text_cfg={"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}).eval()
    out = explain_concepts(resnet, _images(1, 64, 64), "red beak", versus="bird")  # its own size works
    assert out.contrast_raw_maps.shape[0] == 1
    with pytest.raises(InvalidArgumentError, match=r"ModifiedResNet failed on images of 64 x 112 px .*takes 64 x 64"):
        explain_concepts(resnet, _images(1, 64, 112), "red beak", versus="bird")


def test_devices_this_machine_lacks_are_named() -> None:
    with pytest.raises(InvalidArgumentError, match="'meta' holds no data"):
        resolve_device("meta")
    if not torch.backends.mps.is_available():
        with pytest.raises(InvalidArgumentError, match="'mps': this machine has no MPS"):
            resolve_device("mps")
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        with pytest.raises(InvalidArgumentError, match=r"'xpu' is not available here \(.*\); use auto, cpu"):
            resolve_device("xpu")
    assert resolve_device("cpu") == torch.device("cpu")


# --------------------------------------------------------------------------------------------------- figures


def test_prompts_holding_dollar_signs_are_drawn_as_written(tmp_path: Path, open_clip_model: nn.Module) -> None:
    """matplotlib reads ``$...$`` as mathematics: 'finch $^$' failed to parse and lost the figure and the maps."""
    out = explain_concepts(open_clip_model, _images(), "a $5 bill", versus="finch $^$")
    assert save_concept_figure(tmp_path / "f.png", _images().clamp(0, 1), out).stat().st_size > 0


def test_figures_leave_matplotlibs_state_as_found(tmp_path: Path) -> None:
    """No pyplot: the caller's backend (a notebook's inline one), open figures and rc settings stay as they were."""
    import matplotlib
    import matplotlib.pyplot as plt

    from finercam import viz

    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        figures = plt.get_fignums()
        columns = [viz.Column("image $^$"), viz.Column("map", torch.rand(1, 16, 16), captions=["$x$ literal"])]
        assert viz.save_comparison(tmp_path / "c.png", torch.rand(1, 3, 16, 16), columns).is_file()
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
        assert matplotlib.rcParams["text.parse_math"] is True
    finally:
        matplotlib.use(backend)
