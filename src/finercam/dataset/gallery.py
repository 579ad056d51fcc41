r"""A self-contained HTML gallery of a result store: search by class, sort by confidence margin.

One file, no network: every thumbnail (image | base CAM | Finer-CAM) is an inline base64 JPEG, and a few lines of
inline JavaScript filter the cards by class name (in any class of the image, or only its true, explained, predicted
or reference classes) and reorder them. The **confidence margin** of an image is
``p_c - max_{j != c} p_j`` (the explained class against its strongest rival; negative when the model prefers
another class): sorting by it ascending puts the hardest, most fine-grained cases first. Every text that comes from
the data (ids, paths, class names, skip reasons) is HTML-escaped, and the script reads it only through ``dataset``
and ``textContent``, never as markup.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from finercam.dataset.export import display_image, left_out_reason
from finercam.dataset.names import make_folder
from finercam.dataset.render import default_gamma, render_baseline, render_map
from finercam.dataset.store import atomic_write
from finercam.dataset.store_reader import ResultStore
from finercam.errors import InvalidArgumentError
from finercam.methods import get_method

ORDERS = ("listing", "margin")
SEARCH_FIELDS = {
    "classes": "in any class of the image", "true": "in the true class", "explained": "in the explained class c",
    "predicted": "in the predicted class", "references": "in a reference class",
}
"""Where the search box looks (``data-*`` attribute of each card: lower-cased class names, ``" | "``-joined)."""
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
.bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:1em}
.card{border:1px solid #ccc;border-radius:4px;padding:6px;font-size:12px;width:min-content}
.card img{display:block}.id{font-weight:bold;word-break:break-all}.neg{color:#b00}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
"""
_SCRIPT = """
const cards=[...document.querySelectorAll('.card')],box=document.querySelector('.cards');
const byId=id=>document.getElementById(id),search=byId('search'),field=byId('field'),order=byId('order'),
      count=byId('count');
function update(){
  const q=search.value.trim().toLowerCase(),where=field.value;
  const key={listing:c=>+c.dataset.index,'margin-up':c=>+c.dataset.margin,'margin-down':c=>-c.dataset.margin,
             confidence:c=>-c.dataset.confidence}[order.value];
  const sorted=[...cards].sort((a,b)=>key(a)-key(b));
  let shown=0;
  for(const c of sorted){const hit=!q||c.dataset[where].includes(q);c.hidden=!hit;shown+=hit;box.appendChild(c);}
  count.textContent=shown+' of '+cards.length+' images';
}
search.addEventListener('input',update);field.addEventListener('change',update);order.addEventListener('change',update);
update();
"""


MAX_ASPECT = 4
"""A panel of the gallery is at most this many times wider than high (a wider image is shown smaller)."""


def margins(store: ResultStore) -> Tensor:
    """``(n,)`` confidence margin ``p_c - max_{j != c} p_j`` of each row."""
    probabilities = store.probabilities
    if probabilities.shape[0] == 0 or probabilities.shape[1] < 2:
        return torch.zeros(probabilities.shape[0])
    target = probabilities.gather(1, store.targets[:, None]).squeeze(1)
    rivals = probabilities.scatter(1, store.targets[:, None], float("-inf")).amax(dim=1)
    return target - rivals


def _thumbnail(store: ResultStore, row: int, gamma: float, size: int) -> str:
    """``data:`` URL of the strip image | baseline | Finer-CAM, each ``size`` px high."""
    from finercam.viz import overlay

    picture = display_image(store, store.ok_records()[row])
    shape = tuple(picture.shape[-2:])
    panels = [
        picture.permute(1, 2, 0).numpy(),
        overlay(picture, render_baseline(store, row, shape), channels="first"),  # type: ignore[arg-type]
        overlay(picture, render_map(store, row, gamma, shape), channels="first"),  # type: ignore[arg-type]
    ]
    scale = min(size / shape[0], MAX_ASPECT * size / shape[1])  # a 2000 x 1 image fits too (JPEG: <= 65,500 px)
    width, height = max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale))
    strip = Image.new("RGB", (3 * width + 4, size), "white")
    for column, panel in enumerate(panels):
        image = Image.fromarray((np.clip(panel, 0, 1) * 255).round().astype(np.uint8)).resize((width, height))
        strip.paste(image, (column * (width + 2), (size - height) // 2))
    buffer = io.BytesIO()
    strip.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _card(store: ResultStore, row: int, gamma: float, margin: float, thumbnail: str) -> str:
    escape = html.escape
    record = store.ok_records()[row]
    target, prediction, label = int(store.targets[row]), int(store.predictions[row]), int(store.labels[row])
    probabilities = store.probabilities[row]
    references = [int(d) for d in store.references[row].tolist() if d >= 0]
    names = {
        "true": [store.class_name(label)] if label >= 0 else [],
        "explained": [store.class_name(target)],
        "predicted": [store.class_name(prediction)],
        "references": [store.class_name(d) for d in references],
    }
    names["classes"] = sorted({name for group in names.values() for name in group})
    searched = " ".join(
        f'data-{key}="{escape(" | ".join(group).lower(), quote=True)}"' for key, group in names.items()
    )
    refs = ", ".join(f"{store.class_name(d)} ({float(probabilities[d]):.3f})" for d in references) or "none"
    truth = escape(store.class_name(label)) if label >= 0 else "unknown"
    return (
        f'<div class="card" data-index="{record.index}" data-margin="{margin:.6f}" '
        f'data-confidence="{float(probabilities[target]):.6f}" {searched}>'
        f'<img src="{thumbnail}" alt="{escape(record.id, quote=True)}">'
        f'<div class="id">{escape(record.id)}</div>'
        f"<div>c: {escape(store.class_name(target))} (p {float(probabilities[target]):.3f})</div>"
        f"<div>true: {truth}; predicted: {escape(store.class_name(prediction))}</div>"
        f"<div>references: {escape(refs)}</div>"
        f'<div class="{"neg" if margin < 0 else ""}">margin {margin:+.3f}</div></div>'
    )


def write_gallery(
    store: ResultStore,
    out: str | Path,
    gamma: float | None = None,
    *,
    limit: int | None = 500,
    order: str = "listing",
    thumbnail: int = 128,
) -> tuple[Path, list[tuple[str, str]]]:
    """Write the gallery HTML file.

    Args:
        store: the loaded store.
        out: the ``.html`` file.
        gamma: the Finer-CAM comparison strength shown (default: the store's).
        limit: at most this many images (``None``: all); chosen in ``order``.
        order: ``"listing"`` (the first images) or ``"margin"`` (the smallest margins first).
        thumbnail: panel height in pixels.

    Returns:
        The file, and ``(id, reason)`` of images left out (unreadable now).
    """
    if order not in ORDERS:
        raise InvalidArgumentError(f"order must be one of {list(ORDERS)}; got {order!r}")
    gamma = default_gamma(store) if gamma is None else float(gamma)
    values = margins(store)
    rows = list(range(len(store)))
    if order == "margin":
        rows = torch.argsort(values, stable=True).tolist()
    rows = rows[:limit] if limit is not None else rows
    cards, left_out = [], []
    for row in rows:
        try:
            thumb = _thumbnail(store, row, gamma, thumbnail)
        except Exception as error:  # one image that cannot be drawn is left out with its reason, never the rest
            left_out.append((store.ok_records()[row].id, left_out_reason(error)))
            continue
        cards.append(_card(store, row, gamma, float(values[row]), thumb))
    document = _document(store, gamma, cards, len(rows), left_out)
    path = Path(out)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path / "report.html" if path.is_dir() or not path.suffix else path.with_suffix(".html")
    make_folder(path.parent)
    atomic_write(path, document.encode("utf-8"))
    return path, left_out


def _document(
    store: ResultStore, gamma: float, cards: list[str], chosen: int, left_out: list[tuple[str, str]]
) -> str:
    escape = html.escape
    config = store.config
    title = get_method(store.method).title
    model = ", ".join(f"{key}={value}" for key, value in config["model"].items() if value)
    skipped = store.skipped
    rows = "".join(f"<tr><td>{escape(r.id)}</td><td>{escape(r.reason or '')}</td></tr>" for r in skipped[:1000])
    more = f"<p>... and {len(skipped) - 1000} more</p>" if len(skipped) > 1000 else ""
    skipped_html = (
        f"<h2>Skipped files ({len(skipped)})</h2><table><tr><th>id</th><th>reason</th></tr>{rows}</table>{more}"
        if skipped else ""
    )
    coverage = store.coverage_note()
    partial = f"<p><strong>Note: {escape(coverage)}.</strong></p>" if coverage else ""
    left = "".join(f"<tr><td>{escape(image_id)}</td><td>{escape(reason)}</td></tr>" for image_id, reason in left_out)
    left_html = (
        f"<h2>Left out of this gallery ({len(left_out)})</h2><table><tr><th>id</th><th>reason</th></tr>{left}</table>"
        if left_out else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Finer-CAM gallery</title><style>{_STYLE}</style></head><body>
<h1>Finer-CAM gallery</h1>
<p>{escape(model)}; layer {escape(", ".join(store.layers))}; {escape(title)}; {len(store)} images explained,
{len(skipped)} skipped; references {escape(str(config["references"]))}
(T = {int(config["num_references"])}, {escape(str(config["aggregation"]))});
explained class: {escape(config["target"])}.
Each card: image | base CAM (gamma 0) | Finer-CAM (gamma {gamma:g}). Showing {len(cards)} of {chosen} chosen.</p>
{partial}<div class="bar"><input id="search" type="search" placeholder="search by class name" size="40">
<select id="field">{"".join(f'<option value="{key}">{label}</option>' for key, label in SEARCH_FIELDS.items())}</select>
<select id="order"><option value="listing">listing order</option><option value="margin-up">margin, smallest first
</option><option value="margin-down">margin, largest first</option><option value="confidence">confidence, highest
first</option></select> <span id="count"></span></div>
<div class="cards">{"".join(cards)}</div>
{left_html}{skipped_html}
<script>{_SCRIPT}</script></body></html>
"""
