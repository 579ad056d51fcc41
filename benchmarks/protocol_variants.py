"""How the demo's pointing game depends on the reference protocol (an analysis for issue 4; not a test).

Same fresh-seed images as ``finercam demo`` (240, seed 8128), Grad-CAM, 2 px tolerance. For T nearest (or top)
references it scores the maps against the difference mask of the first reference and against the union of the T
references' masks, at gamma 0 (base CAM), 0.6 and 2. Run: ``.venv/bin/python benchmarks/protocol_variants.py``.
"""

from __future__ import annotations

import torch

from finercam import FinerCAM, synth
from finercam.embedded import load_embedded
from finercam.metrics import pointing_hits

GAMMAS = (0.0, 0.6, 2.0)
VARIANTS = (("nearest", 3), ("nearest", 1), ("top", 1))
TOLERANCE = 2


def main() -> None:
    data = synth.generate(240, seed=8128)
    for name in ("cnn", "vit"):
        embedded = load_embedded(name)
        cam = FinerCAM(embedded.model, embedded.target_layer, "gradcam")
        for strategy, count in VARIANTS:
            sweep = cam.sweep(data.images, gammas=list(GAMMAS), references=strategy, num_references=count)
            first = data.difference_mask(sweep.targets, sweep.references[:, 0])
            union = torch.zeros_like(first)
            for t in range(sweep.references.shape[1]):
                union |= data.difference_mask(sweep.targets, sweep.references[:, t])
            cells = []
            for label, mask in (("first-reference mask", first), ("union mask", union)):
                rates = [float(pointing_hits(sweep.maps[g], mask, TOLERANCE).float().mean()) for g in range(3)]
                ratios = " ".join(f"g{gamma:g} {rate:.3f} (x{rate / max(rates[0], 1e-9):.2f})"
                                  for gamma, rate in zip(GAMMAS[1:], rates[1:], strict=True))
                cells.append(f"{label}: base {rates[0]:.3f}, {ratios}")
            print(f"{name} {strategy} T={count} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
