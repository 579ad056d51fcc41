"""Train an embedded model on :mod:`finercam.synth` birds and write ``<name>.safetensors`` + its card ``<name>.json``.

    python -m finercam.embedded.train --model cnn --threads 1   # the shipped weights: about 6 min on one free core
    python -m finercam.embedded.train --model vit --threads 1   # the shipped weights (after the CNN's): ~9 min
    python -m finercam.embedded.train --model vit --objective supervised --distill 0 --epochs 18 --out /tmp/vit-sup \
        --threads 1   # the earlier ViT, trained on the labels alone (its maps do not find the parts)
    python -m finercam.embedded.train --model cnn --out /tmp/models --threads 1
    python -m finercam.embedded.train --model vit --patch-size 4 --out /tmp/vit4 --threads 1  # 16 x 16 tokens
    python -m finercam.embedded.train --model vit --objective supervised --distill 0 --pool cls --out /tmp/vit-cls \
        --threads 1   # a DeiT-style CLS head, on the labels (under distill-probe the CLS token is taught nothing)

A model written elsewhere loads with ``load_embedded(name, folder)``.

Everything is seeded: the training images are ``synth.generate(train_size, seed=TRAIN_DATA_SEED)``, the held-out test
images ``synth.generate(test_size, seed=TEST_DATA_SEED)`` (other individuals), and ``--seed`` seeds the
initialisation, the shuffling and the augmentation. The same command on the same torch build and thread count
gives the same weights; other thread counts or CPUs may differ in the last bits of floating-point sums.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import finercam
from finercam import synth
from finercam.argtypes import seed as seed_type
from finercam.embedded import EMBEDDED_MODELS, WEIGHTS_DIR, load_embedded
from finercam.embedded.architectures import SmallViT, build
from finercam.embedded.distill import TokenDistillation
from finercam.errors import InvalidArgumentError
from finercam.metrics import top1_accuracy
from finercam.probe import fit_linear_head

TRAIN_DATA_SEED = 0
TEST_DATA_SEED = 1
IMAGE_SIZE = 64
SPECIES_PER_GENUS = 8
"""Three small parts with two values each in every genus: each species has three look-alikes (siblings that differ
in one part), as the nearest classes of a real fine-grained species are congeneric."""

# Per-model recipes; every field can be overridden on the command line. No label smoothing: it pulls every wrong
# class's logit to the same value, erasing which classes the model finds similar (Mueller et al., NeurIPS 2019), and
# Finer-CAM picks its references by exactly that similarity (on the 4-species benchmark, with 0.1 the ViT's nearest
# class was of another genus for 57 % of the test images, without 19 %; the shipped 8-species ViT: 8 %).
RECIPES: dict[str, dict[str, Any]] = {
    "cnn": {
        "architecture": "SmallCNN",
        "config": {"widths": [16, 32, 64, 64]},
        "target_layer": "stage3", "species_per_genus": SPECIES_PER_GENUS,
        "train_size": 8000, "test_size": 2000, "epochs": 12, "batch_size": 64,
        "lr": 3e-3, "weight_decay": 5e-4, "warmup": 0.2, "label_smoothing": 0.0, "shift": 0, "clip": 0.0,
        "objective": "supervised", "distill": 0.0,
    },
    "vit": {
        "architecture": "SmallViT",
        "config": {"dim": 96, "depth": 5, "heads": 4, "mlp_ratio": 2.0, "stem_widths": [32, 64]},
        "target_layer": "norm", "species_per_genus": SPECIES_PER_GENUS,
        "train_size": 8000, "test_size": 2000, "epochs": 12, "batch_size": 64,
        "lr": 1.5e-3, "weight_decay": 0.05, "warmup": 0.1, "label_smoothing": 0.0, "shift": 4, "clip": 1.0,
        "objective": "distill-probe", "distill": 1.0, "probe_weight_decay": 1e-4,
    },
}
OBJECTIVES = ("supervised", "distill-probe")
"""``supervised``: cross-entropy on the labels (plus ``distill`` times the token distillation when it is > 0).
``distill-probe`` (the shipped ViT): the backbone learns only the token distillation of
:mod:`finercam.embedded.distill` from the embedded CNN; then it is frozen and its head is a linear probe of the mean
of its final-normed patch tokens, as the paper's heads on frozen DINOv2 / CLIP backbones. Trained on labels alone,
the ViT's global attention spreads the class evidence over tokens away from the parts (its exact CAM peaked on the
distinguishing part less often than a random map); the distilled tokens are local as the CNN's features are."""


ARCHITECTURE_OVERRIDES = ("patch_size", "stem_padding", "pool")
"""Overrides that change the architecture's config rather than the recipe."""


def training_data(
    recipe: dict[str, Any], log: Callable[[str], None]
) -> tuple[synth.SynthConfig, synth.SynthDataset, synth.SynthDataset, list[float], list[float], float]:
    """The recipe's synthetic training images (seed :data:`TRAIN_DATA_SEED`) and held-out images (seed
    :data:`TEST_DATA_SEED`), their per-channel mean and std (for the model's internal normalisation), and the
    seconds it took."""
    start = time.perf_counter()
    config = synth.SynthConfig(image_size=IMAGE_SIZE, species_per_genus=recipe["species_per_genus"])
    log(f"generating {recipe['train_size']} training images (seed {TRAIN_DATA_SEED}) and "
        f"{recipe['test_size']} held-out images (seed {TEST_DATA_SEED})...")
    train_set = synth.generate(recipe["train_size"], seed=TRAIN_DATA_SEED, config=config)
    test_set = synth.generate(recipe["test_size"], seed=TEST_DATA_SEED, config=config)
    mean = [round(float(v), 4) for v in train_set.images.mean(dim=(0, 2, 3))]
    std = [round(float(v), 4) for v in train_set.images.std(dim=(0, 2, 3))]
    return config, train_set, test_set, mean, std, time.perf_counter() - start


def one_cycle_adamw(
    model: nn.Module, decay: list[nn.Parameter], recipe: dict[str, Any], steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW with ``recipe["weight_decay"]`` on the ``decay`` parameters only (none on biases and norms), and a
    one-cycle schedule: cosine warm-up over ``recipe["warmup"]`` of the ``steps`` to ``recipe["lr"]``, cosine decay."""
    no_decay = [p for p in model.parameters() if not any(p is q for q in decay)]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"],
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=recipe["lr"], total_steps=steps, pct_start=recipe["warmup"], anneal_strategy="cos",
        cycle_momentum=False,
    )
    return optimiser, schedule


def augment(images: Tensor, generator: torch.Generator, shift: int) -> Tensor:
    """Random horizontal flips, and random translations of up to ``shift`` pixels (reflection padding)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if shift:
        n, _, h, w = images.shape
        padded = F.pad(images, (shift,) * 4, mode="reflect")
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
        crops = [padded[i, :, y : y + h, x : x + w] for i, (x, y) in enumerate(zip(dx, dy, strict=True))]
        images = torch.stack(crops)
    return images


def _distillation(model: nn.Module, weight: float, log: Callable[[str], None]) -> TokenDistillation | None:
    """The token distillation from the shipped CNN when ``weight`` (lambda) is positive and ``model`` is a ViT."""
    if not weight:
        return None
    if not isinstance(model, SmallViT):
        raise InvalidArgumentError(f"--distill teaches a ViT's tokens; got {type(model).__name__}")
    teacher = load_embedded("cnn")
    log(f"distilling the tokens from the embedded CNN's {teacher.target_layer} (lambda {weight:g}; "
        f"teacher test accuracy {teacher.card['test_accuracy']:.2%})")
    return TokenDistillation(teacher.model, model)  # type: ignore[arg-type]


def _objective(recipe: dict[str, Any]) -> str:
    """The recipe's objective, checked: ``supervised`` or ``distill-probe`` (which needs ``distill > 0``)."""
    objective = recipe["objective"]
    if objective not in OBJECTIVES:
        raise InvalidArgumentError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not recipe["distill"] >= 0:
        raise InvalidArgumentError(f"--distill is a weight >= 0; got {recipe['distill']}")
    if objective == "distill-probe" and not recipe["distill"] > 0:
        raise InvalidArgumentError(f"the distill-probe objective needs --distill > 0; got {recipe['distill']}")
    return objective


def _batch_loss(
    model: nn.Module, distillation: TokenDistillation | None, images: Tensor, labels: Tensor, recipe: dict[str, Any]
) -> tuple[Tensor, Tensor | None]:
    """One batch's loss (cross-entropy when supervised, plus lambda times the token distillation when on) and its
    logits (``None`` under ``distill-probe``, whose head is fitted afterwards)."""
    features = model.encode(images)  # type: ignore[operator]
    loss, logits = images.new_zeros(()), None
    if recipe["objective"] == "supervised":
        logits = model.logits_from(features)  # type: ignore[operator]
        loss = F.cross_entropy(logits, labels, label_smoothing=recipe["label_smoothing"])
    if distillation is not None:
        grid = model.patch_embed.grid_size  # type: ignore[union-attr]
        loss = loss + recipe["distill"] * distillation(images, features, grid)
    return loss, logits


def _fit_probe(model: nn.Module, train_set: synth.SynthDataset, num_classes: int, weight_decay: float) -> None:
    """Replace ``model.head`` by a linear probe of its frozen pooled features (full-batch L-BFGS, cross-entropy +
    ``weight_decay`` * ||W||^2, as ``finercam train-probe`` fits heads on frozen backbones)."""
    with torch.no_grad():
        pooled = torch.cat([model.pooled(model.encode(train_set.images[i : i + 500]))  # type: ignore[operator]
                            for i in range(0, len(train_set), 500)])
    head = fit_linear_head(pooled, train_set.labels, num_classes, weight_decay=weight_decay)
    model.head.load_state_dict(head.state_dict())  # type: ignore[union-attr]


def train(
    name: str, out: Path, seed: int = 0, threads: int = 2, log=print, command: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the model ``name`` with its recipe (fields overridden by ``overrides``); write it to ``out``; return
    the card."""
    architecture = {k: overrides.pop(k) for k in ARCHITECTURE_OVERRIDES if overrides.get(k) is not None}
    recipe = {**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}}
    if architecture:
        if recipe["architecture"] != "SmallViT":
            raise InvalidArgumentError(f"{sorted(architecture)} only apply to the ViT; got --model {name}")
        recipe["config"] = {**recipe["config"], **architecture}
    torch.set_num_threads(threads)
    start = time.perf_counter()
    data_config, train_set, test_set, mean, std, data_time = training_data(recipe, log)
    log(f"data ready in {data_time:.0f} s; mean {mean}, std {std}")

    config = {"num_classes": data_config.num_classes, **recipe["config"], "mean": mean, "std": std}
    if recipe["architecture"] == "SmallViT":
        config["img_size"] = IMAGE_SIZE
    torch.manual_seed(seed)
    model = build(recipe["architecture"], config)
    generator = torch.Generator().manual_seed(seed)
    supervised = _objective(recipe) == "supervised"
    distillation = _distillation(model, recipe["distill"], log)
    trainable = nn.ModuleList([model] if distillation is None else [model, distillation.project])
    decay = [p for p in trainable.parameters() if p.ndim in (2, 4)]  # linear and conv weights
    n, batch_size, epochs = len(train_set), recipe["batch_size"], recipe["epochs"]
    optimiser, schedule = one_cycle_adamw(trainable, decay, recipe, epochs * math.ceil(n / batch_size))
    params = sum(p.numel() for p in model.parameters())
    log(f"{recipe['architecture']} {config} ({params:,} parameters): {epochs} epochs of {n} images, "
        f"batch {batch_size}, {threads} threads")
    model.train()
    test_accuracy = 0.0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total_loss, correct = 0.0, 0
        for i in range(0, n, batch_size):
            index = order[i : i + batch_size]
            images = augment(train_set.images[index], generator, recipe["shift"])
            labels = train_set.labels[index]
            loss, logits = _batch_loss(model, distillation, images, labels, recipe)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if recipe["clip"]:
                nn.utils.clip_grad_norm_(trainable.parameters(), recipe["clip"])
            optimiser.step()
            schedule.step()
            total_loss += loss.detach().item() * len(index)
            if logits is not None:
                correct += int((logits.detach().argmax(1) == labels).sum())
        seconds = time.perf_counter() - start
        if supervised:
            test_accuracy = top1_accuracy(model, test_set.images, test_set.labels)
            log(f"epoch {epoch + 1}/{epochs}: loss {total_loss / n:.3f}, train accuracy (augmented) "
                f"{correct / n:.1%}, test accuracy {test_accuracy:.2%} ({seconds:.0f} s)")
        else:
            log(f"epoch {epoch + 1}/{epochs}: distillation loss {total_loss / n:.4f} ({seconds:.0f} s)")
    model.eval()
    if not supervised:
        _fit_probe(model, train_set, data_config.num_classes, recipe["probe_weight_decay"])
        test_accuracy = top1_accuracy(model, test_set.images, test_set.labels)
    train_accuracy = top1_accuracy(model, train_set.images, train_set.labels)
    wall = time.perf_counter() - start
    log(f"final: train accuracy {train_accuracy:.2%}, test accuracy {test_accuracy:.2%}, wall time {wall:.0f} s")

    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    state = {key: value for key, value in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt", "model": name})
    card = {
        "name": name,
        "architecture": {"class": recipe["architecture"], "config": config,
                         "module": "finercam.embedded.architectures"},
        "parameter_count": params,
        "weights_bytes": weights.stat().st_size,
        "dtype": "float32",
        "class_names": list(train_set.class_names),
        "num_classes": data_config.num_classes,
        "target_layer": recipe["target_layer"],
        "image_size": IMAGE_SIZE,
        "mean": mean,
        "std": std,
        "input": "RGB images (B, 3, H, W) in [0, 1]; the model normalises internally with mean/std",
        "data": {
            "generator": "finercam.synth.generate",
            "config": {"image_size": data_config.image_size, "num_genera": data_config.num_genera,
                       "species_per_genus": data_config.species_per_genus, "note": "all other fields default"},
            "train_seed": TRAIN_DATA_SEED, "test_seed": TEST_DATA_SEED,
            "train_size": len(train_set), "test_size": len(test_set),
        },
        "training": {
            "seed": seed, "threads": threads, "epochs": epochs, "batch_size": batch_size,
            "optimizer": "AdamW", "lr": recipe["lr"], "weight_decay": recipe["weight_decay"],
            "schedule": f"one-cycle, cosine warmup ({recipe['warmup']:.0%} of steps) then cosine decay",
            "label_smoothing": recipe["label_smoothing"], "grad_clip": recipe["clip"],
            "token_distillation": (
                {"teacher": "embedded cnn (stage3, average-pooled onto the token grid)", "lambda": recipe["distill"],
                 "loss": "normalised squared error of a linear projection of the final-normed patch tokens"}
                if recipe["distill"] else None
            ),
            "objective": recipe["objective"],
            "head": "trained with the backbone" if supervised else (
                "linear probe of the frozen mean patch tokens (L-BFGS, cross-entropy + "
                f"{recipe['probe_weight_decay']:g} ||W||^2)"),
            "augmentation": "random horizontal flip" + (f", random shift up to {recipe['shift']} px (reflect)"
                                                       if recipe["shift"] else ""),
        },
        "train_accuracy": round(train_accuracy, 4),
        "test_accuracy": round(test_accuracy, 4),
        **provenance(command or f"python -m finercam.embedded.train --model {name}", wall, data_time),
    }
    return write_card(out, name, card, weights, log)


def provenance(command: str, wall: float, data_time: float) -> dict[str, Any]:
    """The card's record of how a model was made: the command, the times and the library versions."""
    return {
        "training_command": command,
        "wall_time_s": round(wall, 1),
        "data_generation_time_s": round(data_time, 1),
        "torch_version": torch.__version__,
        "finercam_version": finercam.__version__,
    }


def write_card(out: Path, name: str, card: dict[str, Any], weights: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Write ``card`` as ``out/<name>.json`` next to its ``weights`` and return it."""
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {weights} ({card['weights_bytes'] / 1e6:.2f} MB) and {out / f'{name}.json'}")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finercam.embedded.train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=EMBEDDED_MODELS, required=True)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the package's)")
    parser.add_argument("--seed", type=seed_type, default=0, help="initialisation / shuffling / augmentation seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--train-size", type=int, help="override the recipe's number of training images")
    parser.add_argument("--test-size", type=int, help="override the recipe's number of test images")
    parser.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    parser.add_argument("--label-smoothing", type=float, help="override the recipe's label smoothing")
    parser.add_argument("--species-per-genus", type=int, help="override the recipe's species per genus")
    parser.add_argument("--patch-size", type=int, choices=(4, 8),
                        help="ViT only: the patch embedding's stride (default 8: an 8 x 8 token grid at 64 px)")
    parser.add_argument("--stem-padding", choices=("zeros", "reflect"),
                        help="ViT only: the padding of the patch embedding's convolutions (default zeros)")
    parser.add_argument("--pool", choices=("mean", "cls"),
                        help="ViT only: the head reads the mean of the patch tokens (default) or the CLS token")
    parser.add_argument("--distill", type=float,
                        help="ViT only: weight lambda of the token distillation from the embedded CNN (0: none; "
                        "the ViT's recipe: 1)")
    parser.add_argument("--objective", choices=OBJECTIVES,
                        help="supervised (cross-entropy) or distill-probe (token distillation from the embedded CNN, "
                        "then a linear probe of the frozen tokens; the ViT's recipe)")
    args = parser.parse_args(argv)
    if args.out.resolve() == WEIGHTS_DIR.resolve():
        print(f"writing over the shipped weights in {WEIGHTS_DIR} (give --out DIR to keep them)", flush=True)
    command = "python -m finercam.embedded.train " + " ".join(sys.argv[1:] if argv is None else argv)
    train(args.model, args.out, seed=args.seed, threads=args.threads, command=command.strip(),
          epochs=args.epochs, train_size=args.train_size, test_size=args.test_size, lr=args.lr,
          label_smoothing=args.label_smoothing, species_per_genus=args.species_per_genus, patch_size=args.patch_size,
          stem_padding=args.stem_padding, pool=args.pool, distill=args.distill, objective=args.objective)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
