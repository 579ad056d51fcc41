r"""The embedded CLIP: a tiny image-text model trained contrastively on :mod:`finercam.synth` birds and captions.

>>> from finercam.embedded.clip_model import load_embedded_clip
>>> clip = load_embedded_clip()                                       # doctest: +SKIP
>>> text = clip.model.encode_text(["white wingbar", "finch"])         # doctest: +SKIP  (2, D), not normalised
>>> image = clip.model.encode_image(images)                           # doctest: +SKIP  images (B, 3, H, W) in [0, 1]

It makes zero-shot concept localization (:mod:`finercam.concepts`) run offline and measurable against the synthetic
part masks. Its logit for a text ``t`` is CLIP's ``y_t = \tau \cos(f(x), g(t))``, with ``f`` the image tower,
``g`` the text tower and ``\tau`` the learned logit scale; text embeddings act as classifier rows.

* Image tower (``visual``): the embedded CNN architecture (:class:`~finercam.embedded.architectures.SmallCNN`) whose
  final linear layer projects the pooled features to the joint embedding, so any input size works and
  ``target_layer="auto"`` finds its last spatial stage (``stage3``, 16 x 16 maps for 64 x 64 images).
* Text tower (``text``): a word-level vocabulary (the caption grammar's words, see :data:`VOCABULARY`), a ``<cls>``
  token, learned positions, two pre-norm transformer layers and a projection of the ``<cls>`` output.

Weights: ``weights/clip.safetensors`` with its card ``weights/clip.json``, produced by
``python -m finercam.embedded.train_clip --threads 1``.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from finercam.embedded.architectures import build
from finercam.errors import InvalidArgumentError, InvalidTypeError
from finercam.synth.spec import COLOUR_NAMES, GENERA, PARTS, PLAIN, SynthConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NAME = "clip"
PAD, CLS = "<pad>", "<cls>"
GRAMMAR_WORDS: tuple[str, ...] = ("a", "an", "the", "with", "and", "bird", PLAIN)
VOCABULARY: tuple[str, ...] = (
    PAD, CLS, *GRAMMAR_WORDS, *(genus.name for genus in GENERA), *COLOUR_NAMES, *PARTS,
)
"""Every word the text tower knows: grammar words, genus names, colour names and part names (index = token id)."""
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}", "a {}")
"""Prompt templates of the embedded model (both forms appear in its training captions)."""


class WordTokenizer:
    """Lower-cases, splits at white space and punctuation (which is dropped) and maps the words to ids after a
    ``<cls>`` token. Anything else (digits, symbols, other letters) is part of a word, so a word the vocabulary lacks
    is an error, never dropped silently.

    Args:
        vocabulary: the words, index = token id; must start with ``<pad>`` and ``<cls>``.
        context_length: the most tokens per text, ``<cls>`` included.
    """

    def __init__(self, vocabulary: Sequence[str], context_length: int) -> None:
        if tuple(vocabulary[:2]) != (PAD, CLS):
            raise InvalidArgumentError(f"the vocabulary must start with {PAD!r} and {CLS!r}")
        self.vocabulary = tuple(vocabulary)
        self.context_length = int(context_length)
        self._ids = {word: index for index, word in enumerate(self.vocabulary)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def words(self, text: str) -> list[str]:
        """The words of ``text`` the tokenizer sees."""
        if not isinstance(text, str):
            raise InvalidTypeError(f"a prompt must be a string; got {type(text).__name__}")
        return "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower()).split()

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """``(N, L)`` token ids, padded with ``<pad>`` (id 0), each row starting with ``<cls>``.

        Raises:
            InvalidArgumentError: a text has no word, a word outside the vocabulary, or too many words.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows: list[list[int]] = []
        for text in texts:
            words = self.words(text)
            if not words:
                raise InvalidArgumentError(f"prompt {text!r} has no word; give a text such as 'white wingbar'")
            unknown = [word for word in words if word not in self._ids or word in (PAD, CLS)]
            if unknown:
                known = ", ".join(self.vocabulary[2:])
                raise InvalidArgumentError(
                    f"the embedded CLIP does not know the word(s) {unknown} in {text!r}; its vocabulary is: {known}"
                )
            if len(words) + 1 > self.context_length:
                raise InvalidArgumentError(
                    f"prompt {text!r} has {len(words)} words; the embedded CLIP reads at most "
                    f"{self.context_length - 1}"
                )
            rows.append([self._ids[CLS], *(self._ids[word] for word in words)])
        width = max(len(row) for row in rows)
        return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long)


class TextBlock(nn.Module):
    """A pre-norm transformer layer with a padding mask: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TextTower(nn.Module):
    """Token ids ``(N, L)`` -> text embeddings ``g(t)`` ``(N, embed_dim)`` (the projected ``<cls>`` output)."""

    def __init__(
        self, vocab_size: int, embed_dim: int, width: int = 64, depth: int = 2, heads: int = 4,
        mlp_ratio: float = 2.0, context_length: int = 24,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width, padding_idx=0)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: Tensor) -> Tensor:
        padding = tokens == 0
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, padding)
        return self.proj(self.norm(x[:, 0]))


class SmallCLIP(nn.Module):
    r"""The embedded CLIP: ``visual`` (images in ``[0, 1]`` -> ``f(x)``), ``text`` (token ids -> ``g(t)``) and the
    logit scale ``\tau = \exp(\text{logit\_scale})``.

    Args:
        visual: ``{"class": "SmallCNN" | "SmallViT", "config": {...}}`` with ``num_classes`` = the embedding size.
        text: keyword arguments of :class:`TextTower` (``vocab_size`` and ``embed_dim`` included).
        vocabulary: the tokenizer's words.
    """

    def __init__(self, visual: dict[str, Any], text: dict[str, Any], vocabulary: Sequence[str]) -> None:
        super().__init__()
        self.visual = build(visual["class"], visual["config"])
        self.text = TextTower(**text)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.tokenizer = WordTokenizer(vocabulary, self.text.context_length)

    def encode_image(self, images: Tensor) -> Tensor:
        """``f(x)``: ``(B, D)`` image embeddings (not normalised) of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        return self.visual(images)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """``g(t)``: ``(N, D)`` text embeddings (not normalised) of token ids ``(N, L)``."""
        return self.text(tokens.to(self.logit_scale.device))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """``g(t)``: ``(N, D)`` text embeddings (not normalised) of prompts."""
        return self.encode_tokens(self.tokenizer(texts))

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        r"""``(B, N)`` logits ``\tau \cos(f(x_i), g(t_j))``."""
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_tokens(tokens), dim=-1)
        return self.logit_scale.exp() * image @ text.T


@dataclass(frozen=True)
class EmbeddedCLIP:
    """The embedded CLIP, ready for :mod:`finercam.concepts`.

    Attributes:
        model: the :class:`SmallCLIP` in eval mode, on CPU.
        vocabulary: the words its text tower knows.
        templates: its prompt templates (:data:`DEFAULT_TEMPLATES`).
        target_layer: the CAM layer inside the image tower (``"stage3"``).
        mean, std: the image tower's internal normalisation (inputs are pixels in ``[0, 1]``).
        image_size: the training image size (64).
        card: the model card (parsed JSON).
    """

    model: SmallCLIP
    vocabulary: tuple[str, ...]
    templates: tuple[str, ...]
    target_layer: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    card: dict

    @property
    def synth_config(self) -> SynthConfig:
        """The configuration of the synthetic birds it was trained on (genera, species, image size)."""
        data = self.card["data"]["config"]
        return SynthConfig(image_size=int(data["image_size"]), num_genera=int(data["num_genera"]),
                           species_per_genus=int(data["species_per_genus"]))

    @property
    def logit_scale(self) -> float:
        r"""``\tau``, the scale of the cosine similarities."""
        return float(self.model.logit_scale.detach().exp())


def build_from_card(card: dict[str, Any]) -> SmallCLIP:
    """An untrained :class:`SmallCLIP` with the architecture of a model card."""
    architecture = card["architecture"]
    return SmallCLIP(architecture["visual"], architecture["text"], card["vocabulary"])


def load_embedded_clip(directory: str | Path | None = None) -> EmbeddedCLIP:
    """Load the embedded CLIP from the package (or from ``directory``: ``clip.safetensors`` + ``clip.json``), on CPU.

    Raises:
        FileNotFoundError: the weights are missing (train them with ``python -m finercam.embedded.train_clip``).
    """
    folder = Path(directory) if directory is not None else WEIGHTS_DIR
    weights, card_path = folder / f"{NAME}.safetensors", folder / f"{NAME}.json"
    if not weights.is_file() or not card_path.is_file():
        raise FileNotFoundError(
            f"the embedded CLIP is not installed: {weights} or {card_path} is missing; create them with "
            "'python -m finercam.embedded.train_clip --threads 1'"
        )
    card = json.loads(card_path.read_text())
    model = build_from_card(card)
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    config = card["architecture"]["visual"]["config"]
    return EmbeddedCLIP(
        model=model,
        vocabulary=tuple(card["vocabulary"]),
        templates=tuple(card["templates"]),
        target_layer=card["target_layer"],
        mean=tuple(float(v) for v in config["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in config["std"]),  # type: ignore[arg-type]
        image_size=int(card["image_size"]),
        card=card,
    )
