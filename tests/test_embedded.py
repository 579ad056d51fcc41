"""The embedded default models: they load offline, match their cards, classify fresh synthetic birds, and work with
FinerCAM's automatic layer and grid inference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import finercam
from finercam import synth
from finercam.embedded import (
    EMBEDDED_MODELS,
    WEIGHTS_DIR,
    EmbeddedModel,
    load_embedded,
)
from finercam.errors import InvalidArgumentError

# A seed used by neither the training data (0) nor the card's test set (1): images the models never saw.
FRESH_SEED = 20250
FRESH_SIZE = 400
# The models are shipped at >= 95% test accuracy (2000 images). A 400-image estimate of an accuracy p = 0.95 has a
# standard error sqrt(0.95 * 0.05 / 400) = 0.011, so the fresh-seed check allows two standard errors below 0.95.
MIN_ACCURACY = 0.95
TOLERANCE = 0.02

# "layer": the card's (explained) layer; "auto": FinerCAM's automatic choice (for the ViT the paper's last-block norm1,
# while the card names the final norm, whose Grad-CAM is the exact per-token decomposition of the linear head).
EXPECTED = {"cnn": {"layer": "stage3", "auto": "stage3", "grid": (16, 16)},
            "vit": {"layer": "norm", "auto": "blocks.4.norm1", "grid": (8, 8)}}
# The benchmark the models are trained on: 3 genera of 8 species (three two-valued parts per genus), 24 classes.
SPECIES_PER_GENUS, CLASSES = 8, 24


@pytest.fixture(scope="module")
def fresh() -> synth.SynthDataset:
    return synth.generate(FRESH_SIZE, seed=FRESH_SEED, species_per_genus=SPECIES_PER_GENUS)


@pytest.fixture(scope="module", params=EMBEDDED_MODELS)
def embedded(request: pytest.FixtureRequest) -> EmbeddedModel:
    return load_embedded(request.param)


def test_registry() -> None:
    assert EMBEDDED_MODELS == ("cnn", "vit")
    for name in EMBEDDED_MODELS:
        assert (WEIGHTS_DIR / f"{name}.safetensors").is_file()
        assert (WEIGHTS_DIR / f"{name}.json").is_file()


def test_loads(embedded: EmbeddedModel) -> None:
    model = embedded.model
    assert not model.training
    assert embedded.image_size == 64
    assert len(embedded.class_names) == CLASSES
    assert embedded.class_names == tuple(synth.generate(0, species_per_genus=SPECIES_PER_GENUS).class_names)
    assert embedded.card["data"]["config"]["species_per_genus"] == SPECIES_PER_GENUS
    assert torch.allclose(model.mean.flatten(), torch.tensor(embedded.mean))
    assert torch.allclose(model.std.flatten(), torch.tensor(embedded.std))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, CLASSES)
    # "zero in normalised space" is filling with the mean in pixel space
    filled = torch.tensor(embedded.mean).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    assert model.normalise(filled).abs().max() < 1e-6
    if embedded.name == "vit":
        assert embedded.target_layer == "norm" and len(model.blocks) == 5
        assert model.patch_embed.patch_size == (8, 8) and model.num_prefix_tokens == 1


def test_card_matches_weights(embedded: EmbeddedModel) -> None:
    card, model = embedded.card, embedded.model
    assert card["name"] == embedded.name
    assert card["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert card["num_classes"] == len(card["class_names"]) == CLASSES
    assert card["training"]["label_smoothing"] == 0.0  # keeps the similarity structure references rely on
    assert tuple(card["class_names"]) == embedded.class_names
    path = WEIGHTS_DIR / f"{embedded.name}.safetensors"
    assert card["weights_bytes"] == path.stat().st_size < 2_500_000
    assert set(load_file(path)) == set(model.state_dict())
    assert card["test_accuracy"] >= MIN_ACCURACY
    assert card["data"]["test_seed"] != card["data"]["train_seed"]
    assert card["data"]["test_size"] >= 1000
    for key in ("training_command", "wall_time_s", "torch_version", "finercam_version", "architecture"):
        assert card[key]


def test_fresh_seed_accuracy(embedded: EmbeddedModel, fresh: synth.SynthDataset) -> None:
    with torch.no_grad():
        predictions = embedded.model(fresh.images).argmax(1)
    accuracy = (predictions == fresh.labels).float().mean().item()
    assert accuracy >= MIN_ACCURACY - TOLERANCE, f"{embedded.name}: {accuracy:.3f}"


def test_auto_layer(embedded: EmbeddedModel, fresh: synth.SynthDataset) -> None:
    auto = EXPECTED[embedded.name]["auto"]
    assert finercam.auto_layer(embedded.model, example=fresh.images[:1]) == auto
    assert finercam.auto_layer(embedded.model, image_size=(64, 64)) == auto
    assert embedded.target_layer == EXPECTED[embedded.name]["layer"]


def test_vit_final_norm_gradcam_is_the_exact_decomposition_of_its_head(fresh: synth.SynthDataset) -> None:
    """The ViT's head is linear on the mean of its N final-normed patch tokens z_i, so Grad-CAM at ``norm`` has the
    channel weights w / N and the raw map (w_c - gamma * mean_t w_{d_t}) . z_i / N: its sum over the grid is the
    explained score s = y_c - gamma * mean_t y_{d_t} without the head's biases."""
    vit = load_embedded("vit")
    images = fresh.images[:6]
    result = finercam.FinerCAM(vit.model, vit.target_layer).sweep(images, (0.0, 0.6, 2.0))
    logits, bias = result.logits, vit.model.head.bias
    own = (logits - bias).gather(1, result.targets[:, None])[:, 0]
    references = (logits - bias).gather(1, result.references).mean(1)
    for gamma, raw in zip(result.gammas, result.layer_raw_maps[0], strict=True):
        torch.testing.assert_close(raw.sum(dim=(1, 2)), own - gamma * references, atol=1e-4, rtol=1e-4)


def test_finercam_runs(embedded: EmbeddedModel, fresh: synth.SynthDataset) -> None:
    images = fresh.images[:4]
    with finercam.FinerCAM(embedded.model) as cam:
        result = cam(images)
        assert [layer.name for layer in cam.layers] == [EXPECTED[embedded.name]["auto"]]
    assert result.maps.shape == (4, 64, 64)
    assert torch.isfinite(result.maps).all()
    assert tuple(result.raw_maps.shape[1:]) == EXPECTED[embedded.name]["grid"]
    assert result.references.shape == (4, 3)


def test_unknown_name() -> None:
    with pytest.raises(InvalidArgumentError, match="cnn, vit") as info:
        load_embedded("resnet")
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidArgumentError):
        load_embedded(None)  # type: ignore[arg-type]


def test_missing_weights_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr("finercam.embedded.WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"finercam\.embedded\.train --model vit"):
        load_embedded("vit")


def test_loading_needs_no_network_and_no_model_library() -> None:
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise RuntimeError('network access')\n"
        "socket.socket.connect = refuse; socket.socket.connect_ex = refuse\n"
        "socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "for name in ('timm', 'torchvision', 'transformers', 'open_clip'): sys.modules[name] = None\n"
        "from finercam.embedded import load_embedded\n"
        "import torch\n"
        "for name in ('cnn', 'vit'):\n"
        "    m = load_embedded(name)\n"
        f"    assert m.model(torch.rand(1, 3, 64, 64)).shape == (1, {CLASSES})\n"
        "assert not {'timm', 'torchvision'} & {k for k, v in sys.modules.items() if v is not None}\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_training_script_smoke(tmp_path) -> None:
    from finercam.embedded.train import main

    assert main(["--model", "cnn", "--out", str(tmp_path), "--epochs", "1", "--train-size", "48",
                 "--test-size", "24", "--threads", "1"]) == 0
    import json

    card = json.loads((tmp_path / "cnn.json").read_text())
    assert card["data"]["train_size"] == 48 and card["training"]["epochs"] == 1
    assert card["parameter_count"] == load_embedded("cnn").card["parameter_count"]
    assert (tmp_path / "cnn.safetensors").stat().st_size == card["weights_bytes"]
    retrained = load_embedded("cnn", tmp_path)  # a model trained elsewhere loads from its folder
    assert retrained.card["training"]["epochs"] == 1 and not retrained.model.training
    with pytest.raises(InvalidArgumentError, match="only apply to the ViT"):
        main(["--model", "cnn", "--out", str(tmp_path), "--patch-size", "4"])


def test_vit_patch_size_four_gives_a_finer_token_grid() -> None:
    """``SmallViT(patch_size=4)``: a 16 x 16 token grid at 64 px that FinerCAM finds on its own; other strides are
    refused by name."""
    from finercam.embedded.architectures import SmallViT

    torch.manual_seed(0)
    model = SmallViT(num_classes=5, dim=32, depth=2, heads=2, patch_size=4).eval()
    assert model.patch_embed.grid_size == (16, 16) and model.pos_embed.shape == (1, 256, 32)
    result = finercam.FinerCAM(model, "blocks.1.norm1").sweep(torch.rand(2, 3, 64, 64), (0.0, 0.6))
    assert tuple(result.layer_raw_maps[0].shape[-2:]) == (16, 16)
    with pytest.raises(ValueError, match="stride of 8 or 4; got patch_size=2"):
        SmallViT(patch_size=2)
    reflect = SmallViT(num_classes=5, dim=32, depth=1, heads=2, stem_padding="reflect").eval()
    assert {m.padding_mode for m in reflect.patch_embed.stem if isinstance(m, torch.nn.Conv2d)} == {"reflect"}
    assert reflect(torch.rand(2, 3, 64, 48)).shape == (2, 5)  # other sizes: interpolated position embeddings


def test_vit_cls_pooling_reads_only_the_cls_token() -> None:
    """``SmallViT(pool="cls")``: the logits are the head of the final-normed CLS token, so the last block's patch
    tokens after its attention have no gradient; ``pool="mean"`` reads every patch token. Other values are refused."""
    from finercam.embedded.architectures import SmallViT

    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    for pool in ("cls", "mean"):
        model = SmallViT(num_classes=5, dim=32, depth=2, heads=2, pool=pool).eval()
        captured: list[torch.Tensor] = []
        handle = model.norm.register_forward_hook(lambda _m, _i, out, into=captured: into.append(out))
        logits = model(images)
        handle.remove()
        (tokens,) = captured
        pooled = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
        torch.testing.assert_close(logits, model.head(pooled))
        (gradient,) = torch.autograd.grad(logits[:, 0].sum(), tokens)
        assert (gradient[:, 1:].abs().sum() == 0) == (pool == "cls")
    with pytest.raises(ValueError, match="patch tokens' mean or the CLS token; got pool='max'"):
        SmallViT(pool="max")
