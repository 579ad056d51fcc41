r"""Train the embedded CLIP on :mod:`finercam.synth` birds and generated captions; write ``clip.safetensors`` + its
card ``clip.json``.

    python -m finercam.embedded.train_clip --threads 1                  # the shipped weights
    python -m finercam.embedded.train_clip --out /tmp/models --threads 1

Each step pairs every image of a batch with one random caption of its class (:mod:`finercam.embedded.captions`) and
minimises a symmetric InfoNCE loss over the batch's logits ``\ell_{ij} = \tau \cos(f(x_i), g(t_j))``. A batch holds
many birds of one class and "finch" is true of every finch, so a row (or column) has a set ``P_i`` of positives, every
caption *true* of the image, and ``N_i`` of negatives; each positive is contrasted with the negatives alone:

.. math:: L = \tfrac12 \Big( \tfrac1B \sum_i \tfrac1{|P_i|} \sum_{p \in P_i}
          -\log \tfrac{e^{\ell_{ip}}}{e^{\ell_{ip}} + \sum_{n \in N_i} e^{\ell_{in}}}
          + \text{the same over columns} \Big),

which is CLIP's loss when every row has one positive, and asks every true caption (not only the best one) to beat
every false one. ``--loss clip`` trains with CLIP's own loss instead (:func:`clip_info_nce`: the paired caption is the
only positive, every other caption of the batch a negative, even one that is true of the image).

``--locked-image cnn|vit`` trains CLIP the LiT way (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text
Tuning", 2022), as CLIP-style models are often made from a pretrained vision model: the image tower is the shipped
embedded classifier's backbone, frozen (eval mode, no gradient), with a new linear projection of its pooled features
(its mean patch token for the ViT) in place of the classifier head; only that projection, the text tower and the logit
scale are trained. The card's CAM layer is then the classifier's own (``stage3``, ``norm``).

Everything is seeded: training images ``synth.generate(train_size, seed=TRAIN_DATA_SEED)``, held-out images
``synth.generate(test_size, seed=TEST_DATA_SEED)``; ``--seed`` seeds the initialisation, the shuffling, the captions
and the augmentation. The card records the zero-shot top-1 accuracy on the held-out images with one prompt per
species (its full description, :func:`~finercam.embedded.captions.species_prompt`) and one per genus.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from finercam import synth
from finercam.argtypes import seed as seed_type
from finercam.embedded import captions, load_embedded
from finercam.embedded.clip_model import DEFAULT_TEMPLATES, NAME, VOCABULARY, WEIGHTS_DIR, SmallCLIP
from finercam.embedded.train import (
    IMAGE_SIZE,
    TEST_DATA_SEED,
    TRAIN_DATA_SEED,
    one_cycle_adamw,
    provenance,
    training_data,
    write_card,
)
from finercam.errors import InvalidArgumentError
from finercam.synth.spec import species_of

SPECIES_PER_GENUS = 8
"""As the embedded classifiers (:mod:`finercam.embedded.train`): three species-telling parts per genus."""
NO_NEGATIVE = -1e4

IMAGE_TOWERS: dict[str, dict[str, Any]] = {
    "cnn": {"class": "SmallCNN", "config": {"widths": [16, 32, 64, 64]}, "target_layer": "stage3"},
    "vit": {"class": "SmallViT", "config": {"dim": 96, "depth": 4, "heads": 4, "mlp_ratio": 2.0,
                                            "stem_widths": [32, 64]}, "target_layer": "blocks.3.norm1"},
}
"""The image towers ``--visual`` chooses from (the embedded classifiers' architectures, projecting to the embedding)."""
RECIPE: dict[str, Any] = {
    "embed_dim": 64,
    "visual": "cnn",
    "text": {"width": 64, "depth": 2, "heads": 4, "mlp_ratio": 2.0, "context_length": 24},
    "species_per_genus": SPECIES_PER_GENUS,
    "train_size": 8000, "test_size": 2000, "epochs": 12, "batch_size": 128,
    "lr": 3e-3, "weight_decay": 5e-4, "warmup": 0.2, "bare_captions": captions.BARE, "loss": "multi-positive",
    "locked_image": None,
}


def multi_positive_info_nce(logits: Tensor, positive: Tensor) -> Tensor:
    """The symmetric InfoNCE loss with several positives per row and column (see the module docstring).

    Args:
        logits: ``(B, B)`` image-by-caption logits.
        positive: ``(B, B)`` bool, which captions are true of which images (the diagonal always is).
    """
    negatives = logits.masked_fill(positive, NO_NEGATIVE)  # a finite fill: a row without negatives costs ~0
    weights = positive.to(logits.dtype)
    rows = F.softplus(torch.logsumexp(negatives, dim=1, keepdim=True) - logits)
    columns = F.softplus(torch.logsumexp(negatives, dim=0, keepdim=True) - logits)
    image_to_text = (rows * weights).sum(1) / weights.sum(1)
    text_to_image = (columns * weights).sum(0) / weights.sum(0)
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def clip_info_nce(logits: Tensor, positive: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE loss: caption ``i`` is the one positive of image ``i`` (``positive`` is ignored)."""
    pairs = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, pairs) + F.cross_entropy(logits.T, pairs))


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "multi-positive": multi_positive_info_nce,
    "clip": clip_info_nce,
}
"""The contrastive losses ``--loss`` chooses from (the recipe's: ``multi-positive``)."""
LOCKABLE = ("cnn", "vit")
"""The embedded classifiers whose backbone ``--locked-image`` can use."""
LOSS_CARDS = {
    "multi-positive": "symmetric InfoNCE; every caption true of an image is a positive, each contrasted with the "
                      "negatives",
    "clip": "CLIP's symmetric InfoNCE: the paired caption is the only positive, every other caption a negative",
}
"""How the card describes each loss."""


LOCKED_HEADS = {"SmallCNN": "fc", "SmallViT": "head"}
"""The classifier head of each embedded architecture, which a locked tower replaces by its projection."""


def lock_image_tower(model: SmallCLIP, classifier: nn.Module) -> None:
    """Copy ``classifier``'s weights (all but its head) into ``model.visual`` and freeze them; only the new
    projection (``model.visual``'s head, freshly initialised) stays trainable."""
    head = LOCKED_HEADS[type(model.visual).__name__]
    backbone = {name: value for name, value in classifier.state_dict().items() if not name.startswith(f"{head}.")}
    loaded = model.visual.load_state_dict(backbone, strict=False)
    projection = sorted(f"{head}.{name}" for name, _ in getattr(model.visual, head).named_parameters())
    if sorted(loaded.missing_keys) != projection or loaded.unexpected_keys:
        raise InvalidArgumentError(f"the locked tower does not match its classifier: {loaded}")
    for name, parameter in model.visual.named_parameters():
        parameter.requires_grad_(name.startswith(f"{head}."))


def flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips (a bird facing left is the same bird)."""
    flipped = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flipped[:, None, None, None], images.flip(3), images)


@torch.no_grad()
def prompt_embeddings(model: SmallCLIP, prompts: Sequence[str], templates: Sequence[str]) -> Tensor:
    """``(P, D)`` unit text embeddings: each prompt averaged over the templates (normalised), then renormalised."""
    rows = [F.normalize(model.encode_text([t.format(p) for t in templates]), dim=-1).mean(0) for p in prompts]
    return F.normalize(torch.stack(rows), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model: SmallCLIP, images: Tensor, truth: Tensor, prompts: Sequence[str],
                       batch_size: int = 500) -> float:
    """Top-1 accuracy of the prompts as a zero-shot classifier (prompt ``k`` stands for class ``k``)."""
    model.eval()
    text = prompt_embeddings(model, prompts, DEFAULT_TEMPLATES)
    correct = 0
    for start in range(0, len(truth), batch_size):
        image = F.normalize(model.encode_image(images[start : start + batch_size]), dim=-1)
        correct += int(((image @ text.T).argmax(1) == truth[start : start + batch_size]).sum())
    return correct / max(len(truth), 1)


def evaluate(model: SmallCLIP, data: synth.SynthDataset) -> dict[str, float]:
    """Zero-shot top-1 accuracy on species (full descriptions) and on genera (their names)."""
    config = data.config
    species = [captions.species_prompt(config, label) for label in range(config.num_classes)]
    genera = list(dict.fromkeys(s.genus for s in species_of(config)))
    return {
        "species": zero_shot_accuracy(model, data.images, data.labels, species),
        "genus": zero_shot_accuracy(model, data.images, data.genus, genera),
    }


def train(out: Path, seed: int = 0, threads: int = 2, log: Callable[[str], None] = print,
          command: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Train the embedded CLIP (the recipe's fields overridden by ``overrides``); write it to ``out``; return the
    card."""
    recipe = {**RECIPE, **{k: v for k, v in overrides.items() if v is not None}}
    if recipe["loss"] not in LOSSES:
        raise InvalidArgumentError(f"unknown loss {recipe['loss']!r}; choose one of {sorted(LOSSES)}")
    contrastive_loss = LOSSES[recipe["loss"]]
    if recipe["locked_image"] is not None and overrides.get("visual") is not None:
        raise InvalidArgumentError("--visual and --locked-image both choose the image tower; give one of them")
    if recipe["locked_image"] not in (None, *LOCKABLE):
        raise InvalidArgumentError(
            f"unknown locked image tower {recipe['locked_image']!r}; choose one of the embedded classifiers "
            f"{list(LOCKABLE)}"
        )
    torch.set_num_threads(threads)
    start = time.perf_counter()
    config, train_set, test_set, mean, std, data_time = training_data(recipe, log)

    embed_dim = recipe["embed_dim"]
    locked = recipe["locked_image"]
    if locked is None:
        tower = IMAGE_TOWERS[recipe["visual"]]
        visual = {"class": tower["class"],
                  "config": {**tower["config"], "num_classes": embed_dim, "mean": mean, "std": std}}
        if visual["class"] == "SmallViT":
            visual["config"]["img_size"] = IMAGE_SIZE
        target_layer, described = tower["target_layer"], f"{visual['class']} {tower['config']}"
    else:
        backbone = load_embedded(locked)
        architecture = backbone.card["architecture"]
        visual = {"class": architecture["class"], "config": {**architecture["config"], "num_classes": embed_dim}}
        target_layer, described = backbone.target_layer, f"{visual['class']} of embedded:{locked}, locked"
    text = {**recipe["text"], "vocab_size": len(VOCABULARY), "embed_dim": embed_dim}
    torch.manual_seed(seed)
    model = SmallCLIP(visual, text, VOCABULARY)
    if locked is not None:
        lock_image_tower(model, backbone.model)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    table = captions.class_table(config)

    decay = [p for name, p in model.named_parameters()
             if p.requires_grad and p.ndim >= 2 and "embedding" not in name]
    n, batch_size, epochs = len(train_set), recipe["batch_size"], recipe["epochs"]
    optimiser, schedule = one_cycle_adamw(model, decay, recipe, epochs * math.ceil(n / batch_size))
    params = sum(p.numel() for p in model.parameters())
    log(f"SmallCLIP ({params:,} parameters; image tower {described}, text tower "
        f"{recipe['text']}, vocabulary {len(VOCABULARY)} words): {epochs} epochs of {n} images, batch {batch_size}, "
        f"{threads} threads")
    model.train()
    accuracy: dict[str, float] = {}
    for epoch in range(epochs):
        if locked is not None:
            model.visual.eval()  # a locked tower keeps its batch-norm statistics
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for i in range(0, n, batch_size):
            index = order[i : i + batch_size]
            labels = train_set.labels[index]
            drawn = [captions.sample_caption(config, int(label), rng, recipe["bare_captions"]) for label in labels]
            tokens = model.tokenizer([caption.text for caption in drawn])
            requirements = torch.tensor([caption.requirements for caption in drawn], dtype=torch.long)
            positive = captions.positives(requirements, table[labels])
            logits = model(flip(train_set.images[index], generator), tokens)
            loss = contrastive_loss(logits, positive)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100.0))
            total += loss.detach().item() * len(index)
        accuracy = evaluate(model, test_set)
        model.train()
        log(f"epoch {epoch + 1}/{epochs}: loss {total / n:.3f}, logit scale {model.logit_scale.exp().item():.1f}, "
            f"held-out zero-shot accuracy: species {accuracy['species']:.2%}, genus {accuracy['genus']:.2%} "
            f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    train_accuracy = evaluate(model, train_set.subset(slice(0, recipe["test_size"])))
    wall = time.perf_counter() - start
    log(f"final: held-out species {accuracy['species']:.2%} (train {train_accuracy['species']:.2%}), "
        f"wall time {wall:.0f} s")

    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights,
              metadata={"format": "pt", "model": NAME})
    card = {
        "name": NAME,
        "architecture": {"class": "SmallCLIP", "module": "finercam.embedded.clip_model", "embed_dim": embed_dim,
                         "visual": visual, "text": text},
        "vocabulary": list(VOCABULARY),
        "templates": list(DEFAULT_TEMPLATES),
        "parameter_count": params,
        "weights_bytes": weights.stat().st_size,
        "dtype": "float32",
        "target_layer": target_layer,
        "image_size": IMAGE_SIZE,
        "input": "RGB images (B, 3, H, W) in [0, 1], any size; the image tower normalises internally with mean/std",
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "data": {
            "generator": "finercam.synth.generate",
            "config": {"image_size": IMAGE_SIZE, "num_genera": config.num_genera,
                       "species_per_genus": config.species_per_genus, "note": "all other fields default"},
            "train_seed": TRAIN_DATA_SEED, "test_seed": TEST_DATA_SEED,
            "train_size": len(train_set), "test_size": len(test_set),
            "captions": "finercam.embedded.captions.sample_caption: genus, 'bird' or no subject, and a random subset "
                        "of the beak colour and the species-telling parts' values",
            "bare_captions": recipe["bare_captions"],
        },
        "training": {
            "seed": seed, "threads": threads, "epochs": epochs, "batch_size": batch_size,
            "locked_image": None if locked is None else {
                "model": f"embedded:{locked}", "method": "LiT: the classifier's backbone frozen, a new linear "
                "projection in place of its head", "backbone_training_command": backbone.card.get("training_command"),
            },
            "loss": LOSS_CARDS[recipe["loss"]],
            "optimizer": "AdamW", "lr": recipe["lr"], "weight_decay": recipe["weight_decay"],
            "schedule": f"one-cycle, cosine warmup ({recipe['warmup']:.0%} of steps) then cosine decay",
            "augmentation": "random horizontal flip",
        },
        "species_prompts": [captions.species_prompt(config, label) for label in range(config.num_classes)],
        "zero_shot_accuracy": {
            "prompts": "species: captions.species_prompt (full description); genus: its name; templates "
                       f"{list(DEFAULT_TEMPLATES)} averaged",
            "species_test": round(accuracy["species"], 4), "genus_test": round(accuracy["genus"], 4),
            "species_train": round(train_accuracy["species"], 4), "genus_train": round(train_accuracy["genus"], 4),
        },
        **provenance(command or "python -m finercam.embedded.train_clip", wall, data_time),
    }
    return write_card(out, NAME, card, weights, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finercam.embedded.train_clip",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the package's)")
    parser.add_argument("--seed", type=seed_type, default=0, help="initialisation / shuffling / caption seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--visual", choices=sorted(IMAGE_TOWERS), help="image tower (default: the recipe's, cnn)")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--train-size", type=int, help="override the recipe's number of training images")
    parser.add_argument("--test-size", type=int, help="override the recipe's number of held-out images")
    parser.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    parser.add_argument("--species-per-genus", type=int, help="override the recipe's species per genus")
    parser.add_argument("--loss", choices=sorted(LOSSES),
                        help="contrastive loss (default: the recipe's, multi-positive; clip: CLIP's own)")
    parser.add_argument("--locked-image", choices=LOCKABLE,
                        help="LiT: the image tower is this embedded classifier's backbone, frozen, with a new "
                             "projection (default: an image tower trained from scratch)")
    parser.add_argument("--bare-captions", type=float,
                        help="share of attribute captions without a subject (default: the recipe's)")
    args = parser.parse_args(argv)
    if args.out.resolve() == WEIGHTS_DIR.resolve():
        print(f"writing over the shipped weights in {WEIGHTS_DIR} (give --out DIR to keep them)", flush=True)
    command = "python -m finercam.embedded.train_clip " + " ".join(sys.argv[1:] if argv is None else argv)
    train(args.out, seed=args.seed, threads=args.threads, command=command.strip(), visual=args.visual,
          epochs=args.epochs, train_size=args.train_size, test_size=args.test_size, lr=args.lr,
          bare_captions=args.bare_captions, species_per_genus=args.species_per_genus, loss=args.loss,
          locked_image=args.locked_image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
