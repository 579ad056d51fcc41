"""How the demo's pointing game depends on the reference protocol (an analysis for issue 4; not a test).

The demo's test set (its default size and seed), Grad-CAM, 2 px tolerance. For T nearest references and each aggregation
it prints how often the references are siblings (same genus), then the pointing game against the difference mask
of the first reference and against the union of the T references' masks, at gamma 0 (base CAM), 0.6, 1 and 2; for the
ViT at its explained layer (the final ``norm``) and at the other layers of ``--vit-layers`` (the last block's output
and the paper's ``blocks.<last>.norm1``, which feeds only the last attention).
Run: ``.venv/bin/python benchmarks/protocol_variants.py [--vit FOLDER]``.
"""

from __future__ import annotations

import argparse

import torch

from finercam import FinerCAM
from finercam.demo import DEFAULT_SEED, DEFAULT_SIZE, _test_set
from finercam.embedded import load_embedded
from finercam.metrics import pointing_hits

GAMMAS = (0.0, 0.6, 1.0, 2.0)
VARIANTS = ((3, "mean"), (3, "softmax"), (1, "mean"))
TOLERANCE = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--vit", help="a ViT trained elsewhere: the --out folder of python -m finercam.embedded.train "
                        "--model vit (e.g. with --patch-size 4); default: the shipped one")
    parser.add_argument("--vit-layers", nargs="*", default=["blocks.-1", "blocks.-1.norm1"],
                        help="more ViT layers to score (default: the last block's output and its norm1)")
    args = parser.parse_args()
    models = [load_embedded("cnn"), load_embedded("vit", args.vit)]
    data = _test_set(models, args.size, args.seed)
    species = data.config.species_per_genus
    runs = [(m, m.target_layer) for m in models] + [(models[1], layer) for layer in args.vit_layers]
    for embedded, layer in runs:
        cam = FinerCAM(embedded.model, layer, "gradcam")
        for count, aggregation in VARIANTS:
            sweep = cam.sweep(data.images, GAMMAS, references="nearest", num_references=count,
                              aggregation=aggregation)
            targets, references = sweep.targets, sweep.references
            siblings = references // species == (targets // species)[:, None]
            first = data.difference_mask(targets, references[:, 0])
            union = torch.zeros_like(first)
            for t in range(references.shape[1]):
                union |= data.difference_mask(targets, references[:, t])
            first_sibling, all_siblings = siblings[:, 0].float().mean(), siblings.all(1).float().mean()
            cells = [f"first ref a sibling {first_sibling:.2f}, all {all_siblings:.2f}"]
            for label, mask in (("first-reference mask", first), ("union mask", union)):
                rates = [float(pointing_hits(maps, mask, TOLERANCE).float().mean()) for maps in sweep.maps]
                ratios = " ".join(f"g{gamma:g} {rate:.3f} (x{rate / max(rates[0], 1e-9):.2f})"
                                  for gamma, rate in zip(GAMMAS[1:], rates[1:], strict=True))
                cells.append(f"{label}: base {rates[0]:.3f}, {ratios}")
            print(f"{embedded.name} {layer} T={count} {aggregation} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
