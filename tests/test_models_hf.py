"""finercam.models, transformers and open_clip loaders: random-init models saved as local directories, configs and
checkpoints, loaded offline; each test compares the loaded model's outputs with the original's on the same input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from finercam.errors import InvalidArgumentError, ModelFileNotFoundError, ModelNotFoundError
from finercam.models import load_backbone, load_model, save_head
from zoo import no_random_weights, outputs_close, random_image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


# ------------------------------------------------------------------------------------------------ transformers


@pytest.fixture(scope="module")
def transformers_module() -> object:
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers


def test_hf_dinov2_dir_with_head(tmp_path: Path, transformers_module: object) -> None:
    tf: Any = transformers_module
    torch.manual_seed(7)
    config = tf.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=28, patch_size=14)
    dino = tf.Dinov2Model(config).eval()
    dino.save_pretrained(tmp_path / "dino")
    head = nn.Linear(32, 4)
    save_head(tmp_path / "head.safetensors", head, ["w", "x", "y", "z"], {"pooling": "mean-patch"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no preprocessor_config.json in this directory
        loaded = load_model(f"hf:{tmp_path / 'dino'}", head=tmp_path / "head.safetensors")
    assert loaded.class_names == ("w", "x", "y", "z")
    assert loaded.target_layer == "backbone.encoder.layer.-1.norm1"
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        expected = head(dino(pixel_values=x).last_hidden_state[:, 1:].mean(dim=1))
        assert outputs_close(loaded.model(x), expected)
    with pytest.raises(InvalidArgumentError, match="not an image classifier"):
        load_model(f"hf:{tmp_path / 'dino'}")
    with pytest.raises(ModelFileNotFoundError, match="does not exist"):
        load_model(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        load_model("hf:nobody/no-such-model")


def test_hf_vit_classifier_dir(tmp_path: Path, transformers_module: object) -> None:
    tf: Any = transformers_module
    torch.manual_seed(8)
    config = tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8, num_labels=3, id2label={0: "ant", 1: "bee", 2: "cat"},
                          label2id={"ant": 0, "bee": 1, "cat": 2})
    vit = tf.ViTForImageClassification(config).eval()
    vit.save_pretrained(tmp_path / "vit")
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    loaded = load_model(f"hf:{tmp_path / 'vit'}")
    assert loaded.class_names == ("ant", "bee", "cat")
    assert loaded.preprocess.resize == (32, 32) and loaded.preprocess.mean == (0.5, 0.5, 0.5)
    x = loaded.preprocess(random_image(50, 40))[None]
    with torch.no_grad():
        assert outputs_close(loaded.model(x).logits, vit(pixel_values=x).logits)
    backbone = load_backbone(f"hf:{tmp_path / 'vit'}")  # the classifier checkpoint's ViTModel, CLS features
    assert backbone.pooling == "cls" and backbone.dim == 32


def test_hf_model_from_local_hf_cache(
    tmp_path: Path, transformers_module: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    tf: Any = transformers_module
    torch.manual_seed(11)
    config = tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8, num_labels=2)
    vit = tf.ViTForImageClassification(config).eval()
    repo = tmp_path / "models--someone--tiny-vit"
    vit.save_pretrained(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_model("hf:someone/tiny-vit", preprocess="clip")  # an explicit preset: no fallback warning
    assert loaded.class_names is None  # LABEL_0, LABEL_1 are not names
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert outputs_close(loaded.model(x).logits, vit(pixel_values=x).logits)


def test_hf_clip_image_tower_with_head(tmp_path: Path, transformers_module: object) -> None:
    tf: Any = transformers_module
    torch.manual_seed(9)
    config = tf.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 64, "max_position_embeddings": 8, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    clip = tf.CLIPModel(config).eval()
    clip.save_pretrained(tmp_path / "clip")
    head = nn.Linear(24, 3)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(f"hf:{tmp_path / 'clip'}", head=tmp_path / "head.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embeds = clip.get_image_features(pixel_values=x)
        embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
        assert outputs_close(loaded.model(x), head(embeds))
    assert loaded.target_layer == "backbone.vision_model.encoder.layers.-1.layer_norm1"


# -------------------------------------------------------------------------------------------------- open_clip


def test_open_clip_config_and_checkpoint(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "finercam-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "finercam-tiny-clip.json")
    torch.manual_seed(10)
    clip = open_clip.create_model("finercam-tiny-clip", pretrained=None).eval()
    torch.save({"state_dict": clip.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    head = nn.Linear(16, 4)
    save_head(tmp_path / "head.safetensors", head, list("abcd"))
    with no_random_weights():
        loaded = load_model(f"open_clip:{tmp_path / 'finercam-tiny-clip.json'}@{tmp_path / 'ckpt.pt'}",
                            head=tmp_path / "head.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert outputs_close(loaded.model(x), head(clip.visual(x)))
    assert loaded.target_layer == "backbone.transformer.resblocks.-1.ln_1"
    assert loaded.preprocess.crop == (32, 32) and loaded.preprocess.mean == tuple(CLIP_MEAN)
    with pytest.raises(InvalidArgumentError, match="head=FILE"):
        load_model(f"open_clip:finercam-tiny-clip@{tmp_path / 'ckpt.pt'}")
    with pytest.raises(ModelNotFoundError, match="ViT-B-16"):
        load_backbone("open_clip:ViT-B-61")


@pytest.mark.parametrize(("processor", "settings"), [
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 224}, "crop_pct": 0.875}),  # resize 256, crop 224
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 384}}),  # warped to 384 x 384, no crop
    ("ViTImageProcessor", {"size": {"height": 40, "width": 40}, "rescale_factor": 1 / 127.5}),
    ("ViTImageProcessor", {"size": {"height": 40, "width": 40}, "do_rescale": False, "image_mean": [100.0] * 3,
                           "image_std": [50.0] * 3}),
])
def test_hf_image_processor_settings_match_transformers(tmp_path: Path, transformers_module: object,
                                                        processor: str, settings: dict[str, Any]) -> None:
    """finercam's reading of preprocessor_config.json gives the processor's own tensors (to PIL's rounding)."""
    tf: Any = transformers_module
    from PIL import Image

    torch.manual_seed(0)
    config = tf.ConvNextConfig(num_labels=3, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1])
    tf.ConvNextForImageClassification(config).save_pretrained(tmp_path / "m")
    image_processor = getattr(tf, processor)(**settings)
    image_processor.save_pretrained(tmp_path / "m")
    image = Image.fromarray((torch.rand(300, 400, 3) * 255).to(torch.uint8).numpy())
    theirs = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    ours = load_model(f"hf:{tmp_path / 'm'}").preprocess(image)
    assert ours.shape == theirs.shape
    step = 1.0 / (255 * float(torch.tensor(image_processor.image_std).min()))  # one grey level, normalised
    step *= 255 * image_processor.rescale_factor if image_processor.do_rescale else 255
    assert float((ours - theirs).abs().max()) <= 5 * step


def test_open_clip_preprocessing_follows_the_pretrained_checkpoints(tmp_path: Path) -> None:
    """Built without a pretrained tag, open_clip reports CLIP's defaults; SigLIP's checkpoints were trained squashed
    with mean and std 0.5, which open_clip's own pretrained config says; tags that disagree are named."""
    open_clip = pytest.importorskip("open_clip")
    from types import SimpleNamespace

    from finercam.models.open_clip_loader import preprocess_of, warn_random_weights

    tower = SimpleNamespace(visual=SimpleNamespace(image_size=(224, 224), preprocess_cfg={}))  # no pretrained tag
    siglip = preprocess_of(open_clip, "ViT-B-16-SigLIP", tower, "open_clip:ViT-B-16-SigLIP")
    expected = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    assert siglip.mean == tuple(expected["mean"]) == (0.5, 0.5, 0.5) and siglip.std == (0.5, 0.5, 0.5)
    assert siglip.resize == (224, 224) and expected["resize_mode"] == "squash"  # was the shorter side to 224
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip = preprocess_of(open_clip, "ViT-B-32", tower, "open_clip:ViT-B-32")  # every tag agrees: no warning
    assert clip.mean == tuple(CLIP_MEAN) and clip.resize == 224
    with pytest.warns(UserWarning, match=r"pretrained checkpoints of ViT-L-14 preprocess differently \(openai, "):
        preprocess_of(open_clip, "ViT-L-14", tower, "open_clip:ViT-L-14")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"random weights \(the folder .* holds no weights file"):
        warn_random_weights(f"local-dir:{tmp_path}", f"local-dir:{tmp_path}", None, stacklevel=1)
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_random_weights(f"local-dir:{tmp_path}", f"local-dir:{tmp_path}", None, stacklevel=1)
