"""Choosing the target layer automatically: ``target_layer="auto"``.

Two rules, searched over the whole module tree (so a backbone wrapped with a head is found):

1. **Transformers.** A *transformer block* is a module with a LayerNorm-like first norm child (``norm1``: timm ViT,
   DeiT, DINOv2 with or without registers, Swin, HF DINOv2; ``ln_1``: torchvision ViT, open_clip; ``layernorm_before``:
   HF ViT and Swin; ``layer_norm1``: HF CLIP; ``norm_out``: TNT's outer tokens) next to an attention child (its
   name contains ``attn`` or ``attention``). The choice is the **last block's first norm**, the layer of the
   Finer-CAM paper and of CLIP-ES: its output still holds one token per patch, and it feeds the last attention that
   mixes them into the logits.
   Hierarchical transformers (Swin) have one stack of blocks per stage; the choice is again the last block's first
   norm, which sits in the last stage (stride 32, channel-last ``(B, h, w, C)`` in timm and torchvision).
   When several stacks exist (stages, or a text and an image tower), a dry run keeps those that ran on the image,
   and tells res-post-norm blocks (Swin V2: ``x + norm1(attn(x))``, the norm runs after the attention, on its
   output) apart: for those the block's own output is chosen.
2. **CNNs.** A dry run (one forward pass without gradients on a zero image, or on the user's first image) records
   every module's output. The choice is the module that finishes last with a 4-D output larger than 1 x 1, ignoring
   modules run more than once and trivial ones (identity, activations, dropout, flatten, adaptive pooling). Of the
   modules that emitted that very tensor (a stage and its last block), the shallowest one that is not a container of
   several resolutions is named: ``layer4`` for a ResNet, ``stages.3`` for a timm ConvNeXt, ``features.7`` for a
   torchvision ConvNeXt. The result depends on the image size: at inputs so small that the last stage is 1 x 1,
   the stage before it is chosen. Outputs whose first dimension is not the one image (patches folded into the
   batch, as in MobileViT's blocks) are never chosen.
3. **Token models without attention blocks** (MLP-Mixer, ResMLP, gMLP): when modules emitting one image's patch
   tokens ``(1, N, D)`` (no class token: the head pools the patches) finish after the last spatial map, and ``N``
   makes exactly one patch grid of the image (as the engine will lay it out), the last of them is chosen (the
   shallowest of the modules that emitted that tensor).

Names are canonical (``model.named_modules()``), e.g. ``blocks.11.norm1``; :func:`finercam.layers.resolve_layer`
accepts them. Dry runs leave the model exactly as found (see :func:`finercam.capture.dry_run`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from finercam.capture import ModuleRecord, dry_run
from finercam.errors import AutoLayerError, InvalidArgumentError, InvalidTypeError, ModelOutputError, ModelShapeError
from finercam.grids import declared_batch_first, grid_reshape, plausible_grid
from finercam.layers import TokenGrid, check_model, infer_device_dtype, int_pair

FIRST_NORM_NAMES = ("norm1", "ln_1", "layernorm_before", "layer_norm1", "norm_out")
DEFAULT_IMAGE_SIZE = (224, 224)
_TRIVIAL_NAMES = frozenset(
    {"Identity", "DropPath", "Flatten", "Unflatten", "GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "Mish",
     "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "Hardswish",
     "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"}
)
_TRIVIAL_TYPES = (
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


@dataclass(frozen=True)
class LayerCandidate:
    """A layer ``target_layer="auto"`` considered.

    Attributes:
        name: canonical dotted name, accepted by ``FinerCAM(model, target_layer=name)``.
        kind: ``"vit-block-<norm>"`` (first norm of a ViT block), ``"swin-block-<norm>"`` (of a hierarchical
            transformer block), ``"cnn-stage"`` (last module at one spatial resolution) or ``"token-layer"`` (the
            last layer of patch tokens of a model without attention blocks).
        output_shape: its output shape for one image (batch dimension 1), ``None`` when no dry run was made.
        recommended: whether ``target_layer="auto"`` picks it (exactly one candidate).
        description: a short human explanation.
    """

    name: str
    kind: str
    output_shape: tuple[int, ...] | None
    recommended: bool
    description: str = ""


@dataclass(frozen=True)
class TransformerBlock:
    """A transformer block: its dotted name and the attribute name of its first norm."""

    name: str
    norm: str

    @property
    def layer(self) -> str:
        return f"{self.name}.{self.norm}" if self.name else self.norm

    @property
    def stack(self) -> str:
        return self.name.rpartition(".")[0]


def _class_name(module: nn.Module) -> str:
    """The module's Python class name, also for TorchScript modules (which are all ``RecursiveScriptModule``)."""
    return str(getattr(module, "original_name", "") or type(module).__name__)


def _is_layer_norm(module: nn.Module) -> bool:
    """LayerNorm-like: a ``normalized_shape`` (LayerNorm, RMSNorm) or a ``*Norm`` class that is not a batch norm."""
    name = _class_name(module)
    return hasattr(module, "normalized_shape") or ("Norm" in name and "BatchNorm" not in name)


def _first_norm(module: nn.Module) -> str | None:
    for attribute in FIRST_NORM_NAMES:
        child = dict(module.named_children()).get(attribute)
        if child is not None and _is_layer_norm(child):
            return attribute
    return None


def _attention_children(module: nn.Module) -> list[str]:
    """The names of ``module``'s attention children (a name containing ``attn`` or ``attention``)."""
    return [name for name, _ in module.named_children() if "attn" in name.lower() or "attention" in name.lower()]


def _has_attention(module: nn.Module) -> bool:
    return bool(_attention_children(module))


def transformer_blocks(model: nn.Module) -> list[TransformerBlock]:
    """Every transformer block of ``model`` (outermost only), in registration order."""
    blocks: list[TransformerBlock] = []
    for name, module in model.named_modules():
        norm = _first_norm(module)
        if norm is None or not _has_attention(module):
            continue
        if not any(name.startswith(f"{block.name}.") for block in blocks if block.name):
            blocks.append(TransformerBlock(name, norm))
    return blocks


def _check_image_size(image_size: object) -> tuple[int, int] | None:
    if image_size is None:
        return None
    pair = int_pair(image_size) if isinstance(image_size, tuple | list) else None
    if pair is None:
        raise InvalidArgumentError(
            f"image_size must be (height, width) in pixels, two positive ints; got {image_size!r}"
        )
    return pair


def declared_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size the model declares: timm ``patch_embed.img_size`` or ``pretrained_cfg["input_size"]``,
    torchvision and open_clip ``image_size``, HF ``config.image_size``; ``None`` when it declares none."""
    for module in model.modules():
        config = getattr(module, "pretrained_cfg", None)
        cfg_size = config.get("input_size") if isinstance(config, dict) else None
        sources = (
            getattr(getattr(module, "patch_embed", None), "img_size", None),
            getattr(module, "image_size", None),
            getattr(getattr(module, "config", None), "image_size", None),
            tuple(cfg_size[-2:]) if isinstance(cfg_size, tuple | list) and len(cfg_size) == 3 else None,
        )
        for source in sources:
            pair = int_pair(source)
            if pair is not None:
                return pair
    return None


def _example_input(model: nn.Module, image_size: tuple[int, int] | None) -> Tensor:
    """A zero image ``(1, C, H, W)`` on the model's device: ``C`` from the first convolution (else 3)."""
    size = image_size or declared_image_size(model) or DEFAULT_IMAGE_SIZE
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    device, dtype = infer_device_dtype(model)
    return torch.zeros(1, channels, *size, device=device, dtype=dtype or torch.float32)


def _run(model: nn.Module, example: Tensor, synthesized: bool) -> list[ModuleRecord]:
    """Dry-run ``example``; when finercam made it up (a zero image of a guessed size), a failure says so."""
    if not synthesized:
        return dry_run(model, example)
    try:
        return dry_run(model, example)
    except Exception as error:  # the model's own error, re-raised with what finercam tried to do
        cause = error.__cause__ if isinstance(error, ModelOutputError) and error.__cause__ is not None else error
        raise ModelOutputError(
            f"target_layer='auto': a dry run of {type(model).__name__} on an input of shape {tuple(example.shape)} "
            f"failed ({type(cause).__name__}: {cause}). Pass image_size= (the size the model expects) or "
            "target_layer= explicitly."
        ) from cause


def _is_trivial(module: nn.Module) -> bool:
    name = _class_name(module)
    if isinstance(module, _TRIVIAL_TYPES) or name in _TRIVIAL_NAMES or ("Adaptive" in name and "Pool" in name):
        return True
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(module, nn.MultiheadAttention)


def _is_spatial(record: ModuleRecord, image_size: tuple[int, int]) -> bool:
    """Whether ``record`` emitted channels-first maps larger than 1x1 that fit the image (and ran once)."""
    shape = record.shape
    return (
        bool(record.name)
        and record.calls == 1
        and shape is not None
        and len(shape) == 4
        and shape[0] == 1  # one image in, one row out: not patches folded into the batch (MobileViT, TNT)
        and (shape[-1] > 1 or shape[-2] > 1)
        and plausible_grid(shape[-2], shape[-1], image_size)
        and not _is_trivial(record.module)
    )


class _Tree:
    """The dry run's records of spatial modules, with which modules span several resolutions."""

    def __init__(self, records: list[ModuleRecord], image_size: tuple[int, int]) -> None:
        self.maps = [record for record in records if _is_spatial(record, image_size)]
        sizes = {record.name: record.shape[-2:] for record in self.maps if record.shape is not None}
        ran = {record.name for record in records}
        self.spanning = {record.name for record in records if self._child_sizes(record, sizes, ran) > 1}

    @staticmethod
    def _child_sizes(record: ModuleRecord, sizes: dict[str, tuple[int, ...]], ran: set[str]) -> int:
        """How many spatial sizes ``record``'s children emitted; a child that never runs itself (a ``ModuleList``
        of stages, as in transformers' ConvNeXt and ResNet encoders) is looked through."""
        found: set[tuple[int, ...]] = set()
        pending = [(f"{record.name}.{child}" if record.name else child, module)
                   for child, module in record.module.named_children()]
        while pending:
            name, module = pending.pop()
            if name in sizes:
                found.add(sizes[name])
            elif name not in ran:
                pending += [(f"{name}.{child}", grandchild) for child, grandchild in module.named_children()]
        return len(found)

    def depth(self, record: ModuleRecord) -> int:
        """Ancestors (below the model) at a single resolution: 0 for a backbone's stages, 1 for their blocks."""
        parts = record.name.split(".")
        return sum(".".join(parts[:i]) not in self.spanning for i in range(1, len(parts)))

    def stage(self, records: list[ModuleRecord], final: bool) -> ModuleRecord:
        """The stage among ``records`` (one resolution, in finishing order). The final one is the last to finish;
        an earlier one is the last among the shallowest, containers first (a stage, not a layer of the transition
        after it). Of the modules that emitted that very tensor (a stage and its last block), the outermost that
        spans a single resolution is named."""
        last = records[-1]
        if not final:
            shallowest = min(map(self.depth, records))
            chosen = [record for record in records if self.depth(record) == shallowest]
            last = ([record for record in chosen if next(record.module.children(), None) is not None] or chosen)[-1]
        same = sorted((r for r in self.maps if r.identity == last.identity), key=lambda r: r.name.count("."))
        return next((r for r in same if r.name not in self.spanning), same[0])


def _is_token_layer(model: nn.Module, record: ModuleRecord, image_size: tuple[int, int]) -> bool:
    """Whether ``record`` emitted one image's tokens ``(1, N, D)`` (and ran once) that make exactly one patch grid
    of the image with no prefix token, as the engine will lay them out (:func:`finercam.grids.grid_reshape`)."""
    shape = record.shape
    if not (bool(record.name) and record.calls == 1 and shape is not None and len(shape) == 3 and shape[0] == 1
            and shape[1] > 1 and not _is_trivial(record.module)):
        return False
    try:
        reshape = grid_reshape(model, record.module, shape, image_size, batch_size=1)
    except ModelShapeError:  # no grid, or several: not a layer to pick without asking
        return False
    # Only patch tokens alone: beside a class token, the head reads that token and the patches get no gradient.
    return isinstance(reshape, TokenGrid) and reshape.prefix_tokens == 0


def _token_candidate(
    model: nn.Module, records: list[ModuleRecord], image_size: tuple[int, int], after: int
) -> LayerCandidate | None:
    """The last token layer finishing after ``after`` (the last spatial map's order): token models without attention
    blocks (MLP-Mixer, ResMLP, gMLP) keep their patch tokens to the end. Of the modules that emitted that very
    tensor, the shallowest is named."""
    later = [record for record in records if record.order > after]
    last = next((record for record in reversed(later) if _is_token_layer(model, record, image_size)), None)
    if last is None:
        return None
    same = sorted((r for r in later if r.identity == last.identity and _is_token_layer(model, r, image_size)),
                  key=lambda r: r.name.count("."))
    return LayerCandidate(same[0].name, "token-layer", same[0].shape, True,
                          "the last layer of patch tokens (after every spatial map)")


def _cnn_candidates(model: nn.Module, records: list[ModuleRecord], example: Tensor) -> list[LayerCandidate]:
    size = (int(example.shape[-2]), int(example.shape[-1]))
    tree = _Tree(records, size)
    tokens = _token_candidate(model, records, size, max((record.order for record in tree.maps), default=-1))
    if not tree.maps and tokens is not None:
        return [tokens]
    if not tree.maps:
        raise AutoLayerError(
            f"target_layer='auto' found no layer in {type(model).__name__}: no transformer block (a child named "
            f"{', '.join(FIRST_NORM_NAMES)} next to an attention module) and no module emitting a map larger than "
            f"1x1 for an input of shape {tuple(example.shape)}. Pass target_layer= explicitly (all names: "
            "model.named_modules())."
        )
    per_size: dict[tuple[int, ...], list[ModuleRecord]] = {}
    for record in tree.maps:
        key = record.shape[-2:]  # type: ignore[index]
        per_size[key] = [*per_size.pop(key, []), record]  # ordered by the last module at each size
    groups = list(per_size.values())
    chosen = [tree.stage(group, final=index == len(groups) - 1) for index, group in enumerate(groups)]
    stages = list({stage.name: stage for stage in chosen}.values())
    final = stages[-1] if tokens is None else None
    return [
        *(LayerCandidate(
            stage.name, "cnn-stage", stage.shape, stage is final,
            "last stage at this resolution" + (" (the last spatial layer)" if stage is stages[-1] else ""),
        ) for stage in stages),
        *([tokens] if tokens is not None else []),
    ]


def _one_row(model: nn.Module, record: ModuleRecord | None) -> bool:
    """Whether a dry run's record (of one image) kept one row: a batch dimension of 1, first, or second for tokens
    ``(N, 1, D)`` next to an attention declared ``batch_first=False``; or no record to tell. MobileViT's folded
    ``(P, N, C)`` (pixels of a patch in the batch) is not one row."""
    shape = record.shape if record is not None else None
    if shape is None or (len(shape) > 0 and shape[0] == 1):
        return True
    return record is not None and len(shape) == 3 and shape[1] == 1 and (
        declared_batch_first(model, record.module) is False)


def _map_like(record: ModuleRecord | None, image_size: tuple[int, int]) -> bool:
    """False for a block norm's 4-D output that is not channel-last maps ``(B, h, w, C)`` of the image (the layout of
    a norm over the channels: Swin), such as NesT's blocks of tokens ``(B, blocks, tokens, C)``; tokens pass."""
    if record is None or record.shape is None or len(record.shape) != 4:
        return True
    return plausible_grid(record.shape[1], record.shape[2], image_size)


def _transformer_candidates(
    model: nn.Module, blocks: list[TransformerBlock], records: list[ModuleRecord] | None, image_size: tuple[int, int]
) -> list[LayerCandidate]:
    ran = {record.name: record for record in records} if records is not None else None
    if ran is not None:  # blocks that ran on the image, with one row per image (not patches folded into the batch)
        blocks = sorted((b for b in blocks if b.name in ran and _one_row(model, ran.get(b.layer))
                         and _map_like(ran.get(b.layer), image_size)),
                        key=lambda b: ran[b.name].order)
    if not blocks:
        return []
    stacks = list(dict.fromkeys(block.stack for block in blocks))
    hierarchical = len(stacks) > 1 and len({re.sub(r"\d+", "#", stack) for stack in stacks}) == 1
    family = "swin" if hierarchical else "vit"
    candidates = []
    for index, block in enumerate(blocks):
        last = index == len(blocks) - 1
        where = ("last " if last else "") + ("stage's " if hierarchical else "") + "block"
        record = ran.get(block.layer) if ran is not None else None
        if ran is not None and _post_norm(model, block, ran):
            candidates.append(LayerCandidate(block.name, f"{family}-block-output", ran[block.name].shape, last,
                                             f"output of the {where} (its {block.norm} follows the attention)"))
            continue
        candidates.append(
            LayerCandidate(block.layer, f"{family}-block-{block.norm}", record.shape if record else None, last,
                           f"first norm of the {where}")
        )
    return candidates


def _post_norm(model: nn.Module, block: TransformerBlock, ran: dict[str, ModuleRecord]) -> bool:
    """Whether the block's first norm runs after its attention: a res-post-norm block (``x + norm1(attn(x))``: Swin
    V2 in timm, torchvision and transformers), whose norm holds the attention's update, not the block's features.
    (A pre-norm block's norm runs before the attention, whatever it reads: CaiT's class attention normalises
    ``cat(cls, x)``.)"""
    norm = ran.get(block.layer)
    names = (f"{block.name}.{child}" if block.name else child
             for child in _attention_children(model.get_submodule(block.name)))
    orders = [ran[name].order for name in names if name in ran]
    return norm is not None and bool(orders) and min(orders) < norm.order


def candidate_layers(
    model: nn.Module, image_size: tuple[int, int] | None = None, *, example: Tensor | None = None
) -> list[LayerCandidate]:
    """The layers ``target_layer="auto"`` considers, in forward order, the chosen one marked ``recommended``.

    Args:
        model: any model, possibly a backbone wrapped with a head.
        image_size: ``(H, W)`` of the dry run's zero image; default: the size the model declares, else 224 x 224.
        example: an input batch for the dry run instead of a zero image (only its first image is used).

    Raises:
        AutoLayerError: no transformer block and no spatial layer was found.
        ModelOutputError: the dry run failed (e.g. the model needs another input size).
    """
    check_model(model)
    size = _check_image_size(image_size)
    if example is not None and not isinstance(example, Tensor):
        raise InvalidTypeError(f"example must be an input batch tensor (B, C, H, W); got {type(example).__name__}")
    blocks = transformer_blocks(model)
    single_stack = bool(blocks) and len({block.stack for block in blocks}) == 1
    records: list[ModuleRecord] | None = None
    synthesized = example is None
    batch = _example_input(model, size) if example is None else example[:1]
    if not single_stack or size is not None or not synthesized:
        records = _run(model, batch, synthesized)
    size_run = (int(batch.shape[-2]), int(batch.shape[-1]))
    candidates = _transformer_candidates(model, blocks, records, size_run) if blocks else []
    if candidates:
        return candidates
    assert records is not None  # without a dry run every block is a candidate
    return _cnn_candidates(model, records, batch)


def auto_layer(model: nn.Module, image_size: tuple[int, int] | None = None, *, example: Tensor | None = None) -> str:
    """The canonical name of the layer ``target_layer="auto"`` picks (see the module's rules).

    A model with a single stack of transformer blocks needs no forward pass; otherwise a dry run at ``image_size``
    (or on ``example``) decides. Arguments and errors are those of :func:`candidate_layers`.
    """
    check_model(model)
    _check_image_size(image_size)
    blocks = transformer_blocks(model)
    if blocks and len({block.stack for block in blocks}) == 1:
        return blocks[-1].layer
    return next(c.name for c in candidate_layers(model, image_size, example=example) if c.recommended)
