r"""``explain_concepts``: where a text concept shows in an image, alone and contrasted with reference prompts.

With the zero-shot classifier of the prompts ``[c, d_1, ..., d_T]`` (:class:`ZeroShotClassifier`), Finer-CAM explains

.. math:: s = y_c - \gamma \cdot \tfrac1T \textstyle\sum_t y_{d_t}, \qquad y_k = \tau \cos(f(x), w_k),

so ``"red beak"`` versus ``"bird"`` shows what the concept adds to the generic bird. ``\gamma = 0`` is the plain
concept map (the base CAM of ``y_c``), returned from the same pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from finercam.concepts.encoders import clip_encoders
from finercam.concepts.references import ReferenceSpec, reference_prompts
from finercam.concepts.zero_shot import ZeroShotClassifier, check_prompts, encode_prompts
from finercam.errors import InvalidArgumentError, InvalidTypeError
from finercam.explain import DEFAULT_GAMMA, FinerCAM
from finercam.layers import LayerSpec
from finercam.result import CAMResult


@dataclass(frozen=True)
class ConceptExplanation:
    r"""The maps of one concept against its references, for a batch of images.

    Attributes:
        concept: the concept prompt ``c``.
        versus: the reference prompts ``d_t``.
        gamma: the comparison strength ``\gamma``.
        concept_maps: ``(B, H, W)`` in ``[0, 1]``: the plain concept map (the base CAM of ``y_c``, ``\gamma = 0``).
        contrast_maps: ``(B, H, W)`` in ``[0, 1]``: the Finer-CAM of ``y_c - \gamma\,\mathrm{mean}_t y_{d_t}``.
        similarities: ``(B, 1 + T)`` cosine similarities of each image with ``c`` then each ``d_t``.
        classifier: the zero-shot classifier of ``[c, d_1, ..., d_T]`` (to reuse, e.g. for a gamma sweep).
        result: the full :class:`~finercam.result.CAMResult` (raw signed maps, logits, layers).
    """

    concept: str
    versus: tuple[str, ...]
    gamma: float
    concept_maps: Tensor
    contrast_maps: Tensor
    similarities: Tensor
    classifier: ZeroShotClassifier
    result: CAMResult

    @property
    def concept_raw_maps(self) -> Tensor:
        """``(B, h, w)`` the signed plain concept map before the ReLU, at layer resolution (one target layer; for
        several, ``result.layer_baseline_raw_maps[i]``)."""
        return self.result._single_layer(self.result.layer_baseline_raw_maps, "concept_raw_maps",
                                         "result.layer_baseline_raw_maps")

    @property
    def contrast_raw_maps(self) -> Tensor:
        """``(B, h, w)`` the signed contrast map before the ReLU, at layer resolution (may be all negative; one target
        layer; for several, ``result.layer_raw_maps[i]``)."""
        return self.result._single_layer(self.result.layer_raw_maps, "contrast_raw_maps", "result.layer_raw_maps")

    @property
    def layer(self) -> str:
        """The explained layer(s)."""
        return ", ".join(self.result.layers)


def _batch(images: object) -> Tensor:
    if not isinstance(images, Tensor):
        raise InvalidTypeError(
            f"images must be a tensor (3, H, W) or (B, 3, H, W) preprocessed for the model; got {type(images).__name__}"
        )
    return images[None] if images.ndim == 3 else images


def _check_distinct(prompts: Sequence[str], rows: Tensor) -> None:
    """A reference whose text embedding is the concept's (the tokenizer reads both as the same text) would give a
    contrast of zero everywhere."""
    same = (rows[1:] @ rows[0]) > 1 - 1e-6
    if bool(same.any()):
        reference = prompts[1 + int(same.nonzero()[0])]
        raise InvalidArgumentError(
            f"the reference {reference!r} has the same text embedding as the concept {prompts[0]!r}: the model's "
            "tokenizer reads them as the same text (punctuation dropped, or the text cut at the context length), so "
            "the contrast would be zero everywhere; give a reference that differs in words"
        )


def explain_concepts(
    model: object,
    images: Tensor,
    concept: str,
    versus: ReferenceSpec,
    *,
    gamma: float = DEFAULT_GAMMA,
    templates: Sequence[str] | None = None,
    method: str = "gradcam",
    target_layer: LayerSpec | Sequence[LayerSpec] = "auto",
    tokenizer: object = None,
) -> ConceptExplanation:
    r"""Localize a text concept ``c`` in images, alone and contrasted with reference prompts ``d_t``.

    Example:
        >>> from finercam.concepts import explain_concepts, Siblings  # doctest: +SKIP
        >>> clip = load_embedded_clip()  # doctest: +SKIP
        >>> out = explain_concepts(clip, images, "white wingbar", versus="finch", gamma=0.6)  # doctest: +SKIP
        >>> out.concept_maps.shape, out.contrast_maps.shape  # doctest: +SKIP
        (torch.Size([B, 64, 64]), torch.Size([B, 64, 64]))

    Args:
        model: a CLIP model (open_clip, transformers ``CLIPModel`` with ``tokenizer``, the embedded CLIP, or a
            :class:`~finercam.concepts.encoders.CLIPEncoders`).
        images: ``(B, 3, H, W)`` or ``(3, H, W)``, preprocessed for the model; any size the image tower takes.
        concept: the concept prompt, e.g. ``"red beak"``.
        versus: the references: a prompt (``"bird"``), a list of prompts, or a strategy
            (:class:`~finercam.concepts.references.Parent`, :class:`~finercam.concepts.references.Siblings`,
            :class:`~finercam.concepts.references.Nearest`).
        gamma: comparison strength ``\gamma \ge 0`` (the paper's default 0.6).
        templates: prompt templates to ensemble over (default: the model's).
        method: a base CAM method of :data:`finercam.METHODS`.
        target_layer: ``"auto"`` (the image tower's last block's first norm, or a CNN's last stage), or a layer of
            the classifier (its image tower is ``image_encoder``, e.g. ``"image_encoder.stage3"``).
        tokenizer: the text tokenizer, for transformers models.

    Raises:
        InvalidArgumentError: an empty concept or reference, a reference equal to the concept (as text, or as the
            model's tokenizer reads it), a word the model does not know (embedded CLIP), bad gamma or images.
    """
    if not isinstance(concept, str):
        raise InvalidTypeError(f"concept must be a string; got {type(concept).__name__}")
    if not concept.strip():
        raise InvalidArgumentError("the concept is empty; give a text such as 'red beak'")
    concept = check_prompts([concept], "concept")[0]
    encoders = clip_encoders(model, tokenizer)
    references = reference_prompts(concept, versus, encoders, templates)
    prompts = (concept, *references)
    rows = encode_prompts(encoders, prompts, templates)
    _check_distinct(prompts, rows)
    classifier = ZeroShotClassifier(encoders.image_encoder, rows, prompts, encoders.logit_scale, encoders.target_layer)
    batch = _batch(images)
    cam = FinerCAM(classifier, target_layer, method)
    result = cam(batch, targets=0, references=[list(range(1, len(references) + 1))] * batch.shape[0], gamma=gamma)
    return ConceptExplanation(
        concept=concept,
        versus=references,
        gamma=result.gamma,
        concept_maps=result.baseline_maps,
        contrast_maps=result.maps,
        similarities=result.logits / classifier.logit_scale,
        classifier=classifier,
        result=result,
    )
