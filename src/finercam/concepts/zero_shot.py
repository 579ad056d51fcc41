r"""A zero-shot classifier from text prompts: text embeddings are the classifier rows.

With unit image embedding ``\hat f(x)`` and unit prompt embeddings ``w_k`` (rows of ``W``), the classifier's logits are

.. math:: y_k = \tau\, \hat f(x)^\top w_k,

CLIP's scaled cosine similarities. Finer-CAM explains ``s = y_c - \gamma\,\mathrm{agg}_t\, y_{d_t}`` with ``c`` a
concept prompt and ``d_t`` reference prompts (paper, section on multi-modal models): since ``s`` is linear in the
rows, it is the logit of the single text direction ``w_c - \gamma\,\mathrm{mean}_t w_{d_t}``, and the map shows what
the concept adds to its references.

**Prompt ensembling.** Each prompt ``p`` is written into every template ``T_m`` (``"a photo of a {}."``); its row is
the renormalised mean of the normalised embeddings, ``w_p = \mathrm{norm}(\frac1M \sum_m \mathrm{norm}(g(T_m(p))))``,
as in CLIP's zero-shot ImageNet classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finercam.concepts.encoders import CLIPEncoders, clip_encoders
from finercam.errors import InvalidArgumentError, InvalidTypeError

_TRAILING_PUNCTUATION = ".,;:!?…"


def normalise_prompt(prompt: str) -> str:
    """The prompt with case, surrounding / repeated whitespace and trailing punctuation (``.,;:!?…``) ignored, to
    compare prompts: ``"White wingbar."`` is ``"white wingbar"`` (a template adds its own full stop)."""
    return " ".join(prompt.lower().split()).rstrip(_TRAILING_PUNCTUATION + " ")


def check_prompts(prompts: Sequence[str], what: str = "prompts") -> tuple[str, ...]:
    """The prompts, stripped; each must be a non-empty string and none may repeat another.

    Raises:
        InvalidTypeError: a prompt is not a string (or ``prompts`` is a single string).
        InvalidArgumentError: no prompt, an empty prompt, or a repeated one.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InvalidTypeError(f"{what} must be a list of strings; got {type(prompts).__name__}")
    cleaned = []
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise InvalidTypeError(f"{what}: every prompt must be a string; got {prompt!r}")
        if not prompt.strip():
            raise InvalidArgumentError(f"{what}: a prompt is empty; give a text such as 'red beak'")
        cleaned.append(prompt.strip())
    if not cleaned:
        raise InvalidArgumentError(f"{what} is empty; give at least one text prompt")
    seen: dict[str, str] = {}
    for prompt in cleaned:
        key = normalise_prompt(prompt)
        if key in seen:
            raise InvalidArgumentError(f"{what}: {prompt!r} repeats {seen[key]!r}; every prompt must differ")
        seen[key] = prompt
    return tuple(cleaned)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Templates with exactly one ``{}`` each and no other braces (at least one template)."""
    if isinstance(templates, str):
        templates = (templates,)
    chosen = tuple(templates)
    if not chosen:
        raise InvalidArgumentError("templates is empty; give at least one, e.g. '{}' or 'a photo of a {}.'")
    for template in chosen:
        if not isinstance(template, str) or template.count("{}") != 1 or set("{}") & set(template.replace("{}", "")):
            raise InvalidArgumentError(
                f"template {template!r} must contain exactly one '{{}}' where the prompt goes and no other brace, "
                "e.g. 'a photo of a {}.'"
            )
    return chosen


def _precise(tensor: Tensor) -> Tensor:
    """Float64 stays float64; every other dtype is computed with in float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@torch.no_grad()
def encode_prompts(encoders: CLIPEncoders, prompts: Sequence[str], templates: Sequence[str] | None = None) -> Tensor:
    r"""``(P, D)`` unit prompt embeddings ``w_p``, each ensembled over the templates (see the module docstring).

    Args:
        encoders: the CLIP model's towers.
        prompts: the prompts.
        templates: default: the encoders' templates.
    """
    chosen_prompts = check_prompts(prompts)
    chosen_templates = check_templates(templates if templates is not None else encoders.templates)
    texts = [template.format(prompt) for prompt in chosen_prompts for template in chosen_templates]
    embeddings = encoders.encode_text(texts)
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
        raise InvalidArgumentError(
            f"encode_text returned {getattr(embeddings, 'shape', type(embeddings).__name__)} for {len(texts)} texts; "
            "expected one embedding per text (N, D)"
        )
    unit = F.normalize(_precise(embeddings), dim=-1).view(len(chosen_prompts), len(chosen_templates), -1)
    return F.normalize(unit.mean(dim=1), dim=-1)


class ZeroShotClassifier(nn.Module):
    r"""Image encoder + fixed unit text embeddings as classifier rows: ``y_k = \tau\, \hat f(x)^\top w_k``.

    Usable by :class:`finercam.FinerCAM` like any classifier; ``FinerCAM(classifier)`` finds the image tower's layer
    on its own (``target_layer="auto"``), and ``classifier_weights=classifier`` (its ``weight``, the rows ``W``) makes
    ``references="weights"`` pick the prompts most similar in text-embedding space.

    Args:
        image_encoder: images -> image embeddings ``(B, D)`` (e.g. :attr:`CLIPEncoders.image_encoder`).
        text_embeddings: ``(C, D)`` one row per prompt (normalised here).
        prompts: the ``C`` prompts, in row order (the class names).
        logit_scale: ``\tau``.
        target_layer: the recommended CAM layer inside ``image_encoder``, if known.

    Attributes:
        prompts: the prompts (also :attr:`class_names`).
        logit_scale: ``\tau``.
        target_layer: the recommended CAM layer's name in this module (``image_encoder.<layer>``), or ``None``.
    """

    def __init__(self, image_encoder: nn.Module, text_embeddings: Tensor, prompts: Sequence[str],
                 logit_scale: float = 100.0, target_layer: str | None = None) -> None:
        super().__init__()
        if not isinstance(image_encoder, nn.Module):
            raise InvalidTypeError(f"image_encoder must be an nn.Module; got {type(image_encoder).__name__}")
        if not isinstance(text_embeddings, Tensor) or text_embeddings.ndim != 2:
            raise InvalidArgumentError("text_embeddings must be a (C, D) tensor, one row per prompt")
        names = check_prompts(prompts)
        if len(names) != text_embeddings.shape[0]:
            raise InvalidArgumentError(
                f"{len(names)} prompts for {text_embeddings.shape[0]} text embeddings; give one prompt per row"
            )
        if not float(logit_scale) > 0:
            raise InvalidArgumentError(f"logit_scale must be positive; got {logit_scale!r}")
        self.image_encoder = image_encoder
        parameter = next(image_encoder.parameters(), None)
        device = parameter.device if parameter is not None else text_embeddings.device
        with torch.inference_mode(False):  # rows made under the caller's inference mode become ordinary tensors
            rows = F.normalize(_precise(text_embeddings.detach()).clone(), dim=-1).to(device)
        self.register_buffer("text_embeddings", rows)
        self.prompts = names
        self.logit_scale = float(logit_scale)
        self.target_layer = f"image_encoder.{target_layer}" if target_layer else None

    @classmethod
    def from_prompts(cls, model: object, prompts: Sequence[str], templates: Sequence[str] | None = None,
                     tokenizer: object = None) -> ZeroShotClassifier:
        """Build the classifier of ``prompts`` for a CLIP model (anything :func:`clip_encoders` accepts).

        Args:
            model: a :class:`CLIPEncoders`, an open_clip model, a transformers ``CLIPModel`` or the embedded CLIP.
            prompts: the class prompts, e.g. ``["red beak", "bird"]``.
            templates: prompt templates to ensemble over (default: the model's).
            tokenizer: for transformers models (and open_clip models with their own tokenizer).
        """
        encoders = clip_encoders(model, tokenizer)
        embeddings = encode_prompts(encoders, prompts, templates)
        return cls(encoders.image_encoder, embeddings, prompts, encoders.logit_scale, encoders.target_layer)

    @property
    def weight(self) -> Tensor:
        """``(C, D)`` the unit prompt embeddings ``W`` (the classifier rows)."""
        return self.text_embeddings

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.prompts

    def index(self, prompt: str) -> int:
        """The row of a prompt (case and whitespace ignored).

        Raises:
            InvalidArgumentError: the prompt is not one of the classifier's.
        """
        key = normalise_prompt(prompt)
        for row, name in enumerate(self.prompts):
            if normalise_prompt(name) == key:
                return row
        raise InvalidArgumentError(f"prompt {prompt!r} is not one of the classifier's prompts {list(self.prompts)}")

    def image_features(self, images: Tensor) -> Tensor:
        r"""``(B, D)`` unit image embeddings ``\hat f(x)``."""
        features = self.image_encoder(images)
        if isinstance(features, tuple | list):
            features = features[0]
        return F.normalize(features, dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        r"""``(B, C)`` logits ``\tau\, \hat f(x)^\top w_k``."""
        features = self.image_features(images)
        rows = self.text_embeddings.to(device=features.device, dtype=features.dtype)
        return self.logit_scale * features @ rows.T

    def extra_repr(self) -> str:
        return f"prompts={list(self.prompts)}, logit_scale={self.logit_scale:g}"
