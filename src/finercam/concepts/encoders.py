r"""The two towers of a CLIP-style model behind one interface: :class:`CLIPEncoders`.

For CLIP, the logit of a text prompt ``t`` is ``y_t = \tau \cos(f(x), g(t))``: ``f`` the image tower, ``g`` the text
tower, ``\tau`` the logit scale. :func:`clip_encoders` adapts

* open_clip models (``CLIP``, ``CustomTextCLIP``: ``model.visual`` and ``model.encode_text`` with a tokenizer),
* transformers ``CLIPModel`` (``vision_model`` + ``visual_projection``; ``get_text_features`` with a tokenizer),
* the embedded CLIP (:func:`finercam.embedded.clip_model.load_embedded_clip`).

The image encoders accept **any input size**: transformers CLIP through ``interpolate_pos_encoding=True``, open_clip's
own ViT through :class:`OpenCLIPImageEncoder` (open_clip 3.3 has no such option for it, so the wrapper resamples the
learned position embeddings bicubically to the input's patch grid), the embedded CNN natively. Only the image tower is
an ``nn.Module`` here, so ``FinerCAM(target_layer="auto")`` sees one stack of blocks and picks its last block's first
norm (``ln_1`` for open_clip, ``layer_norm1`` for transformers; the layer of CLIP-ES), or the CNN's last stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finercam.capture import preserved_model
from finercam.errors import FinerCAMError, InvalidArgumentError, InvalidTypeError, MissingDependencyError

TextEncoder = Callable[[Sequence[str]], Tensor]
CLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
)
"""Default prompt templates for open_clip and transformers CLIP (from OpenAI CLIP's ImageNet prompt list; the
Finer-CAM paper does not publish its own)."""


@dataclass(frozen=True)
class CLIPEncoders:
    r"""A CLIP-style model as an image encoder module and a text encoder function.

    Attributes:
        image_encoder: images ``(B, 3, H, W)`` (the model's preprocessing applied) -> image embeddings ``f(x)``
            ``(B, D)``, not necessarily normalised.
        encode_text: prompts -> text embeddings ``g(t)`` ``(N, D)``, not necessarily normalised (run without
            gradients, in eval mode, on the model's device, in its dtype).
        logit_scale: ``\tau``, the model's scale of the cosine similarities.
        templates: the default prompt templates (each with one ``{}``).
        name: a label for messages and figures.
        target_layer: the recommended CAM layer inside ``image_encoder``, or ``None`` for ``"auto"``.
    """

    image_encoder: nn.Module
    encode_text: TextEncoder
    logit_scale: float
    templates: tuple[str, ...] = ("{}",)
    name: str = "clip"
    target_layer: str | None = None


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def text_encoding(model: nn.Module) -> Iterator[None]:
    """Encode text without gradients and in eval mode (no dropout in the text tower), outside any
    ``torch.inference_mode`` of the caller (the rows become a buffer that autograd reads later); every module's
    train/eval flag and the grad mode are restored."""
    with torch.inference_mode(False), preserved_model(model), torch.no_grad():
        yield


# --- open_clip -------------------------------------------------------------------------------------------------------


def _is_native_open_clip_vit(visual: nn.Module) -> bool:
    return all(hasattr(visual, name) for name in ("conv1", "class_embedding", "positional_embedding", "transformer",
                                                  "ln_pre", "_pool", "grid_size"))


def resample_position_embedding(positional: Tensor, grid: tuple[int, int], new_grid: tuple[int, int],
                                prefix_tokens: int = 1) -> Tensor:
    """Bicubically resample the patch positions of a ``(prefix + h * w, D)`` learned position embedding to a new grid
    ``(h', w')``; the prefix (CLS) positions are kept."""
    if tuple(grid) == tuple(new_grid):
        return positional
    prefix, patches = positional[:prefix_tokens], positional[prefix_tokens:]
    height, width = grid
    patches = patches.reshape(1, height, width, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", align_corners=False).to(positional.dtype)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)])


class OpenCLIPImageEncoder(nn.Module):
    """open_clip's image tower (``visual``), taking images of any size.

    For open_clip's own ``VisionTransformer`` the patch grid follows the input (``H / p x W / p``, as its patch
    convolution gives; each side must be a multiple of the patch size, see :func:`check_patch_multiple`) and the
    position embeddings are resampled to it; at the tower's native size the tower runs unchanged. Other towers
    (ResNets, timm towers) are called as they are.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        visual = self.visual
        if not _is_native_open_clip_vit(visual):
            return _pooled(_fixed_size_forward(visual, images))
        patch_h, patch_w = visual.patch_size
        check_patch_multiple(images, (patch_h, patch_w))
        grid = (images.shape[-2] // patch_h, images.shape[-1] // patch_w)
        if grid == tuple(visual.grid_size):
            return _pooled(visual(images))
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resample_position_embedding(visual.positional_embedding, tuple(visual.grid_size), grid).to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        x = visual.transformer(x)
        pooled, _tokens = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled


def _fixed_size_forward(visual: nn.Module, images: Tensor) -> object:
    """``visual(images)`` for an open_clip tower that is not its own ViT (a ResNet with attention pooling, a timm
    tower); one that fails away from its native size says so, naming the size it takes."""
    try:
        return visual(images)
    except (RuntimeError, ValueError, AssertionError) as error:  # timm asserts its input size
        side = getattr(visual, "image_size", None)
        native = (side, side) if isinstance(side, int) else tuple(side) if isinstance(side, tuple | list) else None
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if native is None or size == native:
            raise
        raise InvalidArgumentError(
            f"the open_clip image tower {type(visual).__name__} failed on images of {size[0]} x {size[1]} px "
            f"({error}); it takes {native[0]} x {native[1]} px (only open_clip's own ViT has its position "
            "embeddings resampled to other sizes): resize the images to that size (on the command line, drop "
            "--keep-aspect)"
        ) from None


def check_patch_multiple(images: Tensor, patch: tuple[int, int]) -> None:
    """A ViT's patch grid covers ``floor(H / p) * p`` rows: on other sizes the maps would be stretched over pixels the
    model never saw, so such sizes are refused.

    Raises:
        InvalidArgumentError: a side of the images is not a multiple of the patch size.
    """
    height, width = images.shape[-2:]
    if height % patch[0] or width % patch[1]:
        raise InvalidArgumentError(
            f"images of {height} x {width} px: the ViT's patches are {patch[0]} x {patch[1]} px, so its tokens would "
            f"cover only {height // patch[0] * patch[0]} x {width // patch[1] * patch[1]} px and the maps would be "
            "misplaced; resize or pad each side to a multiple of the patch size (the command line's --keep-aspect "
            "rounds up)"
        )


def _pooled(output: object) -> Tensor:
    """The pooled embedding of an image tower's output (a tensor, or ``(pooled, tokens)``)."""
    if isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, Tensor) or output.ndim != 2:
        raise InvalidArgumentError("the image tower must return image embeddings (B, D)")
    return output


def _open_clip_tokenizer(model: nn.Module) -> Callable[[Sequence[str]], Tensor]:
    """open_clip's BPE tokenizer at the model's context length, for the models it belongs to (a text tower of
    exactly its vocabulary size); a prompt longer than the context is an error, not cut silently."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as error:
        raise MissingDependencyError(
            "open_clip models need the 'open_clip_torch' package: pip install 'finercam[clip]'"
        ) from error
    context = int(getattr(model, "context_length", 77))
    vocab_size = getattr(model, "vocab_size", None)
    tokenizer = SimpleTokenizer(context_length=context)
    if vocab_size != len(tokenizer.encoder):
        size = f"{vocab_size} tokens" if isinstance(vocab_size, int) else "a vocabulary of unknown size"
        raise InvalidArgumentError(
            f"the open_clip model's text tower has {size}; the default tokenizer (open_clip's BPE, "
            f"{len(tokenizer.encoder)} tokens) fits OpenAI-style CLIP models only: pass the model's own tokenizer "
            "(tokenizer=open_clip.get_tokenizer(ARCH))"
        )

    def tokenize(texts: Sequence[str]) -> Tensor:
        for text in texts:
            length = len(tokenizer.encode(text)) + 2  # with the start and end tokens
            if length > context:
                raise InvalidArgumentError(
                    f"the text {text!r} is {length} tokens; the text tower reads at most {context}: shorten the "
                    "prompt or its template"
                )
        return tokenizer(list(texts))

    return tokenize


def _token_ids(tokens_of: Callable[..., Any], texts: Sequence[str]) -> Tensor:
    """The ``(N, L)`` token ids an open_clip tokenizer gives for ``texts``, checked, none of them cut short."""
    advice = "open_clip models need a tokenizer returning token ids (N, L), e.g. open_clip.get_tokenizer(ARCH)"
    try:
        tokens = tokens_of(list(texts))
    except FinerCAMError:
        raise
    except (TypeError, ValueError, AttributeError) as error:
        raise InvalidArgumentError(f"the tokenizer failed ({type(error).__name__}: {error}); {advice}") from error
    well_formed = isinstance(tokens, Tensor) and tokens.ndim == 2 and not tokens.is_floating_point()
    if not well_formed or tokens.shape[0] != len(texts):
        got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise InvalidTypeError(f"the tokenizer returned {got} for {len(texts)} texts; {advice}")
    _refuse_cut_texts(tokens_of, texts, tokens)
    return tokens


def _refuse_cut_texts(tokens_of: Callable[..., Any], texts: Sequence[str], tokens: Tensor) -> None:
    """Refuse texts the tokenizer cut at its context length ``L``, as open_clip's tokenizers do without a word.

    The texts are tokenized again with a longer context (open_clip's tokenizers take ``context_length=``): a text
    that fits gives the same ``L`` ids followed by padding only; a cut one differs within the first ``L`` ids (the
    end token moved) or has ids past them. A tokenizer without that argument cannot be checked.
    """
    context = int(tokens.shape[1])
    try:
        longer = tokens_of(list(texts), context_length=context + 256)
    except TypeError:
        return
    if not (isinstance(longer, Tensor) and longer.ndim == 2 and longer.shape[0] == len(texts)
            and longer.shape[1] > context):
        return
    longer = longer.to(tokens.device)
    padding = longer[:, -1:]
    cut = (longer[:, :context] != tokens).any(1) | (longer[:, context:] != padding).any(1)
    if bool(cut.any()):
        text = texts[int(cut.nonzero()[0])]
        raise InvalidArgumentError(
            f"the text {text!r} is longer than the {context} tokens the text tower reads (the tokenizer would cut "
            "it): shorten the prompt or its template"
        )


def from_open_clip(model: nn.Module, tokenizer: Callable[[Sequence[str]], Tensor] | None = None,
                   templates: Sequence[str] = CLIP_TEMPLATES, name: str = "open_clip") -> CLIPEncoders:
    """Adapt an open_clip model (``model.visual``, ``model.encode_text``, ``model.logit_scale``).

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP``.
        tokenizer: prompts -> token ids ``(N, L)``, e.g. ``open_clip.get_tokenizer(ARCH)``; default: open_clip's BPE
            tokenizer with the model's context length (the tokenizer of OpenAI-style CLIP models).
    """
    if not (hasattr(model, "visual") and callable(getattr(model, "encode_text", None))):
        raise InvalidTypeError(f"{type(model).__name__} is not an open_clip model (no .visual and .encode_text)")
    tokens_of = tokenizer if tokenizer is not None else _open_clip_tokenizer(model)

    def encode_text(prompts: Sequence[str]) -> Tensor:
        tokens = _token_ids(tokens_of, prompts)
        with text_encoding(model):
            return model.encode_text(tokens.to(_device_of(model)))

    scale = getattr(model, "logit_scale", None)
    tau = float(scale.detach().exp()) if isinstance(scale, Tensor) else 100.0
    return CLIPEncoders(OpenCLIPImageEncoder(model.visual), encode_text, tau, tuple(templates), name,
                        "visual.transformer.resblocks.-1.ln_1" if _is_native_open_clip_vit(model.visual) else None)


# --- transformers ----------------------------------------------------------------------------------------------------


class HFCLIPImageEncoder(nn.Module):
    """transformers CLIP's image tower and projection: ``visual_projection(vision_model(x).pooler_output)``, with
    ``interpolate_pos_encoding=True`` so that any input size works."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, images: Tensor) -> Tensor:
        patch = getattr(getattr(self.vision_model, "config", None), "patch_size", None)
        if isinstance(patch, int):
            check_patch_multiple(images, (patch, patch))
        output = self.vision_model(pixel_values=images, interpolate_pos_encoding=True)
        pooled = output.pooler_output if hasattr(output, "pooler_output") else output[1]
        return self.visual_projection(pooled)


def empty_tokenizer_size(tokenizer: Any) -> int | None:
    """The vocabulary size of a transformers tokenizer that did not load (2 tokens or fewer: transformers builds one,
    instead of failing, for a folder without the tokenizer's files or a hub id that is not cached), else ``None``."""
    size = getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and size <= 2 else None


def _check_hf_tokenizer(tokenizer: Any) -> None:
    if not callable(tokenizer):
        raise InvalidTypeError(f"tokenizer must be callable (a transformers tokenizer); got {type(tokenizer).__name__}")
    size = empty_tokenizer_size(tokenizer)
    if size is not None:
        raise InvalidArgumentError(
            f"the tokenizer has a vocabulary of {size} tokens: it did not load (transformers returns such a tokenizer "
            "offline for a hub id that is not cached); load it from the model's local directory"
        )


def _hf_text_positions(model: nn.Module) -> int | None:
    """How many tokens a transformers CLIP's text tower reads (its position embeddings), if its config says."""
    config = getattr(getattr(model, "config", None), "text_config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def _hf_tokens(tokenizer: Any, texts: Sequence[str], limit: int | None) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``(N, L)`` of a transformers tokenizer, checked against the text tower's
    ``limit`` of positions."""
    advice = "give the CLIPModel's own transformers tokenizer, e.g. CLIPTokenizer.from_pretrained(DIR)"
    try:
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    except (TypeError, ValueError, AttributeError) as error:
        raise InvalidArgumentError(
            f"the tokenizer does not take a transformers call (texts, padding=True, return_tensors='pt'): "
            f"{type(error).__name__}: {error}; {advice}"
        ) from error
    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.shape[0] != len(texts):
        raise InvalidTypeError(f"the tokenizer returned {type(batch).__name__} without input_ids (N, L); {advice}")
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        mask = torch.ones_like(ids)
    if limit is not None and ids.shape[1] > limit:
        lengths = mask.sum(dim=1)
        longest = int(lengths.argmax())
        raise InvalidArgumentError(
            f"the text {texts[longest]!r} is {int(lengths[longest])} tokens; the text tower reads at most {limit}: "
            "shorten the prompt or its template"
        )
    return ids, mask


def from_hf(model: nn.Module, tokenizer: Any, templates: Sequence[str] = CLIP_TEMPLATES,
            name: str = "hf") -> CLIPEncoders:
    """Adapt a transformers ``CLIPModel``.

    Args:
        model: a ``CLIPModel`` (``vision_model``, ``visual_projection``, ``get_text_features``).
        tokenizer: its tokenizer (called with ``padding=True, return_tensors="pt"``), e.g.
            ``CLIPTokenizer.from_pretrained(DIR)``.
    """
    if not all(hasattr(model, name) for name in ("vision_model", "visual_projection", "get_text_features")):
        raise InvalidTypeError(
            f"{type(model).__name__} is not a transformers CLIPModel (vision_model, visual_projection, "
            "get_text_features)"
        )
    _check_hf_tokenizer(tokenizer)
    limit = _hf_text_positions(model)

    def encode_text(prompts: Sequence[str]) -> Tensor:
        ids, mask = _hf_tokens(tokenizer, prompts, limit)
        device = _device_of(model)
        with text_encoding(model):
            output = model.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device))
        return output.pooler_output if hasattr(output, "pooler_output") else output

    scale = getattr(model, "logit_scale", None)
    tau = float(scale.detach().exp()) if isinstance(scale, Tensor) else 100.0
    return CLIPEncoders(HFCLIPImageEncoder(model.vision_model, model.visual_projection), encode_text, tau,
                        tuple(templates), name, None)


# --- the embedded CLIP -----------------------------------------------------------------------------------------------


def from_embedded(clip: Any, templates: Sequence[str] | None = None) -> CLIPEncoders:
    """Adapt the embedded CLIP (an :class:`~finercam.embedded.clip_model.EmbeddedCLIP` or its ``SmallCLIP``; both
    have the default templates :data:`~finercam.embedded.clip_model.DEFAULT_TEMPLATES`, only the former its card's
    recommended layer)."""
    from finercam.embedded.clip_model import DEFAULT_TEMPLATES

    model = getattr(clip, "model", clip)
    chosen = tuple(templates) if templates is not None else tuple(getattr(clip, "templates", DEFAULT_TEMPLATES))

    def encode_text(prompts: Sequence[str]) -> Tensor:
        with text_encoding(model):
            return model.encode_text(list(prompts))

    return CLIPEncoders(model.visual, encode_text, float(model.logit_scale.detach().exp()), chosen, "embedded:clip",
                        getattr(clip, "target_layer", None))


def clip_encoders(model: Any, tokenizer: Any = None, templates: Sequence[str] | None = None) -> CLIPEncoders:
    """:class:`CLIPEncoders` for an open_clip model, a transformers ``CLIPModel`` or the embedded CLIP (an existing
    :class:`CLIPEncoders` is returned as it is).

    Raises:
        InvalidTypeError: the model is none of those.
    """
    if isinstance(model, CLIPEncoders):
        return model
    inner = getattr(model, "model", None)
    if hasattr(inner, "encode_tokens") or hasattr(model, "encode_tokens"):
        return from_embedded(model, templates)
    kwargs = {"templates": tuple(templates)} if templates is not None else {}
    if hasattr(model, "get_text_features") and hasattr(model, "vision_model"):
        if tokenizer is None:
            raise InvalidArgumentError("a transformers CLIPModel needs its tokenizer: clip_encoders(model, tokenizer)")
        return from_hf(model, tokenizer, **kwargs)
    if hasattr(model, "visual") and hasattr(model, "encode_text"):
        return from_open_clip(model, tokenizer, **kwargs)
    raise InvalidTypeError(
        f"{type(model).__name__} is not a CLIP model finercam knows: give an open_clip model, a transformers "
        "CLIPModel, the embedded CLIP (finercam.embedded.clip_model.load_embedded_clip()) or a CLIPEncoders"
    )
