"""The ``finercam example`` job: train a toy fine-grained classifier on the spot (CPU, no download), explain it with
a base CAM and Finer-CAM, score both with the pointing game on the known difference masks and write a figure."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

import finercam
from finercam import toy
from finercam.explain import FinerCAM
from finercam.methods import METHODS
from finercam.metrics import mask_energy, pointing_hits
from finercam.runtime import cpu_threads

SHOWN = 6
SWEEP_GAMMA = 2.0


def _say(line: str) -> None:
    print(line, flush=True)


def _shown_indices(labels: Tensor, count: int) -> list[int]:
    """The first test images, taken round-robin over classes so that every class is shown."""
    per_class = [(labels == c).nonzero().flatten().tolist() for c in range(int(labels.max()) + 1)]
    chosen: list[int] = []
    for rank in range(max(len(p) for p in per_class)):
        chosen += [p[rank] for p in per_class if rank < len(p)]
        if len(chosen) >= count:
            break
    return chosen[:count]


def _short(name: str) -> str:
    return name.replace(" beak, ", "/").replace(" wing", "")


@dataclass(frozen=True)
class Scores:
    """The pointing game and mask energy of the baseline and Finer-CAM maps over the evaluated test images."""

    difference: Tensor
    cell: int
    hits: dict[str, Tensor]
    rates: dict[str, dict[str, float]]
    energy: dict[str, float]
    num_references: int

    @property
    def main_rates(self) -> dict[str, float]:
        return self.rates[f"dilation_{self.cell}px"]


def _score(cam: FinerCAM, test: toy.ToyDataset, args: argparse.Namespace) -> Scores:
    """Explain the first ``--eval-size`` test images and score the peaks against the difference masks."""
    count = min(args.eval_size, len(test.labels))
    result = cam(test.images[:count], references="nearest", num_references=args.num_references, gamma=args.gamma)
    part_masks = {name: mask[:count] for name, mask in test.part_masks.items()}
    difference = toy.difference_mask(part_masks, result.targets, result.references[:, 0])
    cell = test.images.shape[-1] // result.raw_maps.shape[-1]  # pixels per cell of the explained layer's map
    maps = {"baseline": result.baseline_maps, "finer": result.maps}
    rates = {
        f"dilation_{d}px": {
            name: round(float(pointing_hits(m, difference, d).float().mean()), 4) for name, m in maps.items()
        }
        for d in sorted({args.dilation, cell})
    }
    return Scores(
        difference=difference,
        cell=cell,
        hits={name: pointing_hits(m, difference, cell) for name, m in maps.items()},
        rates=rates,
        energy={name: round(float(mask_energy(m, difference).mean()), 4) for name, m in maps.items()},
        num_references=int(result.references.shape[1]),
    )


def _figure(
    cam: FinerCAM, test: toy.ToyDataset, scores: Scores, accuracy: float, args: argparse.Namespace
) -> tuple[Path, list[dict[str, object]]]:
    """Explain a few test images at two gammas and save the comparison figure; returns its path and the rows."""
    from finercam import viz

    names, title = toy.CLASS_NAMES, METHODS[args.method].title
    count = scores.difference.shape[0]
    shown = _shown_indices(test.labels[:count], SHOWN)
    images = test.images[shown]
    sweep = cam.sweep(images, [args.gamma, SWEEP_GAMMA], references="nearest", num_references=args.num_references)
    image_captions, finer_captions, mask_captions, rows = [], [], [], []
    for row, index in enumerate(shown):
        target, refs = int(sweep.targets[row]), [int(r) for r in sweep.references[row] if r >= 0]
        first, second = toy.class_attributes(target), toy.class_attributes(refs[0])
        parts = [part for part in toy.PARTS if int(first[part]) != int(second[part])]
        probability = float(sweep.probabilities[row, target])
        truth = names[int(test.labels[index])]
        image_captions.append(f"true: {_short(truth)}\npred: {_short(names[target])} (p={probability:.2f})")
        finer_captions.append(f"vs {_short(names[refs[0]])}" + (f" (+{len(refs) - 1})" if len(refs) > 1 else ""))
        verb = "differs" if len(parts) == 1 else "differ"
        mask_captions.append(f"{_short(names[target])} vs {_short(names[refs[0]])}:\n{' + '.join(parts)} {verb}")
        rows.append({
            "test_index": index, "true": truth, "predicted": names[target], "probability": round(probability, 4),
            "references": [names[r] for r in refs], "difference_parts": parts,
            f"baseline_hit_{scores.cell}px": bool(scores.hits["baseline"][index]),
            f"finer_hit_{scores.cell}px": bool(scores.hits["finer"][index]),
        })
    columns = [
        viz.Column("image", captions=image_captions),
        viz.Column(f"{title} (baseline)", sweep.baseline_maps, captions=["explains pred"] * len(shown)),
        viz.Column(f"Finer-CAM γ={args.gamma:g}", sweep.maps[0], captions=finer_captions),
        viz.Column(f"Finer-CAM γ={SWEEP_GAMMA:g}", sweep.maps[1], captions=finer_captions),
        viz.Column("difference mask", outlines=scores.difference[shown], captions=mask_captions),
    ]
    rates = scores.main_rates
    suptitle = (
        f"Toy birds (test accuracy {accuracy:.0%}). Pointing game on {count} images (difference mask grown "
        f"{scores.cell} px): {title} {rates['baseline']:.0%}, Finer-CAM {rates['finer']:.0%}   (x = map peak)"
    )
    return viz.save_comparison(Path(args.out) / "example.png", images, columns, suptitle=suptitle), rows


def run_example(args: argparse.Namespace) -> int:
    """``finercam example``: train the toy model, score the maps, write ``example.png`` and ``example.json``."""
    with cpu_threads(args.threads):
        return _run_example(args)


def _run_example(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _say(f"finercam example: training a small CNN on a toy fine-grained task (seed {args.seed}, CPU) ...")
    _say("  4 classes of birds that share the body and differ only in the beak colour and the wing-bar")
    test = toy.make_toy_dataset(args.test_size, args.seed + 1)
    model, accuracy = toy.train_toy_model(
        args.seed, train_size=args.train_size, epochs=args.epochs, test=test, log=lambda line: _say("  " + line)
    )
    trained = time.perf_counter() - start
    _say(f"test accuracy {accuracy:.1%} on {args.test_size} images ({trained:.0f} s)")

    cam = FinerCAM(model, target_layer="block4", method=args.method)
    scores = _score(cam, test, args)
    title, count = METHODS[args.method].title, scores.difference.shape[0]
    _say(
        f"pointing game on {count} test images: is the map's peak inside the difference mask between the predicted "
        "class and its nearest reference class (beak and/or wing-bar), grown by d px?"
    )
    for key, rate in scores.rates.items():
        d = int(key.removeprefix("dilation_").removesuffix("px"))
        note = " (one cell of the explained layer's map)" if d == scores.cell else ""
        _say(
            f"  d={d}{note}: {title} {rate['baseline']:.1%}, "
            f"Finer-CAM (gamma {args.gamma:g}, T={scores.num_references}) {rate['finer']:.1%}"
        )
    png, rows = _figure(cam, test, scores, accuracy, args)

    report = {
        "finercam_version": finercam.__version__,
        "seed": args.seed, "method": args.method, "gamma": args.gamma, "references": "nearest",
        "num_references": scores.num_references, "train_size": args.train_size, "epochs": args.epochs,
        "test_size": args.test_size, "test_accuracy": accuracy, "train_seconds": round(trained, 2),
        "pointing_game": {
            "images": count,
            "mask": "difference mask between the predicted class and its nearest reference class, grown by d px",
            **scores.rates,
        },
        "mask_energy": scores.energy,
        "examples": rows,
        "figure": str(png),
        "seconds": round(time.perf_counter() - start, 2),
    }
    report_path = Path(args.out) / "example.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    _say(f"wrote {png}")
    _say(f"wrote {report_path}")
    rates = scores.main_rates
    _say(
        f"pointing-game hit rate (d={scores.cell} px): {title} {rates['baseline']:.1%}, "
        f"Finer-CAM {rates['finer']:.1%}"
    )
    return 0
