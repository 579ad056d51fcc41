"""The engine: one forward pass that records the target layers' activations, and gradients of any set of scores with
respect to those activations only.

Guarantees (each is tested):

* The autograd graph starts at the earliest target layer: everything below it runs without recording, so no memory
  or time is spent on it. Parameters and inputs never receive gradients and no ``.grad`` is written.
* Several scores share the forward pass; their gradients come from vector-Jacobian products over the small part of
  the graph above the target layers.
* The model is left exactly as found: every module's train/eval flag, the global grad mode, and no hooks left behind,
  also when an exception is raised. ``requires_grad`` flags are never touched. Frozen models and in-place operations
  on the target layer's output work (the model continues on a copy of the recorded activation), as do in-place
  ReLUs; an in-place change, further up, of a tensor autograd saved is a :class:`ModelOutputError` naming the fix.

:func:`dry_run` records every module's output shape in one pass without gradients, for ``target_layer="auto"``; it
leaves the model as found in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from finercam.errors import FinerCAMError, ModelOutputError
from finercam.layers import TargetLayer, first_tensor, replace_first_tensor
from finercam.torchscript import is_scripted, module_outputs, run_with_taps


@contextmanager
def preserved_model(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with ``model`` in eval mode; restore each module's train/eval flag and the grad mode on exit."""
    modes = [(module, module.training) for module in model.modules()]
    grad_enabled = torch.is_grad_enabled()
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training
        torch.set_grad_enabled(grad_enabled)


def batch_coupling(model: nn.Module) -> list[str]:
    """The modules that make ``model``'s eval-mode forward mix the images of a batch: batch norms without running
    statistics, which normalise with the batch's own. Empty for almost every model."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None]


def check_batch_independent(model: nn.Module, batch: int) -> None:
    """Refuse a batch of several images for a model whose eval-mode forward mixes them: a batch norm without running
    statistics normalises with the batch's own, so each image's scores, and the gradients read per image, depend on
    the other images."""
    if batch < 2:
        return
    coupled = batch_coupling(model)
    if coupled:
        raise ModelOutputError(
            f"the model normalises with the statistics of the batch even in eval mode (batch norm without running "
            f"statistics: {coupled[:3]}), so each of the {batch} images' scores depends on the others and its map "
            "would mix theirs. Explain one image at a time (a batch of 1; --batch-size 1 on the command line)"
        )


def extract_logits(output: object) -> Tensor:
    """The class logits ``(B, C)`` in a model's output: a tensor, the first tensor of a tuple, ``.logits`` or
    ``["logits"]``."""
    logits: object = output
    if isinstance(output, dict) and "logits" in output:
        logits = output["logits"]
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise ModelOutputError(
            f"the model returned {type(output).__name__}; expected class logits (B, C) as a tensor, the first "
            "element of a tuple, or an output with a .logits field"
        )
    if logits.ndim != 2:
        raise ModelOutputError(
            f"the model's logits have shape {tuple(logits.shape)}; expected (B, C). Wrap the model so that it "
            "returns one row of class scores per image."
        )
    return logits


def checked_forward(model: nn.Module, images: Tensor) -> object:
    """``model(images)``; an error raised by the model itself names the input it failed on (chained)."""
    try:
        return model(images)
    except FinerCAMError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:  # timm asserts input sizes
        tensors = [*model.parameters(), *model.buffers()]
        if "Inference tensors" in str(error) and any(t.is_inference() for t in tensors):
            raise ModelOutputError(
                "the model's parameters or buffers are inference tensors (the model was created or loaded inside "
                "torch.inference_mode()), and gradients cannot flow through them: build or load the model outside "
                "inference mode (explaining inside it is fine)"
            ) from error
        raise ModelOutputError(
            f"the model's forward pass failed on images of shape {tuple(images.shape)} ({images.dtype}): {error}"
        ) from error


@dataclass(frozen=True)
class Capture:
    """What one forward pass recorded.

    Attributes:
        logits: the class scores ``y`` of shape ``(B, C)``; connected to ``activations`` when a graph was recorded.
        activations: for each target layer, its output ``A`` as emitted (before any token-to-grid reshape).
    """

    logits: Tensor
    activations: tuple[Tensor, ...]


def forward_with_capture(
    model: nn.Module, images: Tensor, layers: Sequence[TargetLayer], *, record_graph: bool
) -> Capture:
    """Run ``model(images)`` once and record the outputs of ``layers``.

    Args:
        model: the classifier, already in the mode it should run in.
        images: the input batch.
        layers: the target layers.
        record_graph: record the autograd graph from the earliest target layer up to the logits, so that
            :func:`vector_jacobian_products` can be called; otherwise nothing is recorded.

    Raises:
        ModelOutputError: a layer did not run or emitted no tensor, or the logits do not depend on the layers.
    """
    captured: list[Tensor | None] = [None] * len(layers)
    calls = [0] * len(layers)

    def make_hook(index: int, layer: TargetLayer) -> Callable[[nn.Module, object, object], object]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> object:
            calls[index] += 1
            tensor = first_tensor(output)
            if tensor is None:
                raise ModelOutputError(
                    f"target layer {layer.name!r} returned {type(output).__name__}; expected a tensor, or a tuple, "
                    "list, dict or ModelOutput holding one"
                )
            if not record_graph:
                captured[index] = tensor.detach().clone()
                return None
            # The graph starts here: below the earliest target layer nothing was recorded.
            torch.set_grad_enabled(True)
            if not tensor.requires_grad:
                tensor = tensor.detach().requires_grad_(True)
            captured[index] = tensor
            # The model continues on a copy, so that in-place operations downstream leave `tensor` intact.
            return replace_first_tensor(output, tensor.clone())

        return hook

    if is_scripted(model):
        return _scripted_capture(model, images, layers, record_graph=record_graph)
    grad_enabled = torch.is_grad_enabled()
    handles = [layer.module.register_forward_hook(make_hook(i, layer)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode(False):
            if images.is_inference():
                images = images.clone()
            torch.set_grad_enabled(False)
            logits = extract_logits(checked_forward(model, images))
    finally:
        torch.set_grad_enabled(grad_enabled)
        for handle in handles:
            handle.remove()

    missing = [layer.name for layer, tensor in zip(layers, captured, strict=True) if tensor is None]
    if missing:
        raise ModelOutputError(f"target layer(s) {missing} did not run during the model's forward pass")
    repeated = [(layer.name, count) for layer, count in zip(layers, calls, strict=True) if count > 1]
    if repeated:
        name, count = repeated[0]
        raise ModelOutputError(
            f"target layer {name!r} ran {count} times in one forward pass (one module used at several places, like "
            "a ResNet block's shared ReLU), so which of its outputs to explain is ambiguous: pick a module that runs "
            "once, e.g. the enclosing block"
        )
    if record_graph and not logits.requires_grad:
        raise ModelOutputError(
            "the logits do not depend on the target layer(s) "
            f"{[layer.name for layer in layers]} as autograd sees them: pick a layer that feeds the classifier. If it "
            "does, the model's forward cuts the graph above it (a .detach(), or the head run under torch.no_grad() "
            "as in some frozen-backbone probes): remove that, or use method='scorecam', which needs no gradients"
        )
    return Capture(logits=logits, activations=tuple(t for t in captured if t is not None))


def _scripted_capture(
    model: nn.Module, images: Tensor, layers: Sequence[TargetLayer], *, record_graph: bool
) -> Capture:
    """:func:`forward_with_capture` for TorchScript, whose layers are read from the graph (no hooks run there).

    The graph cannot be cut at the layer, so it is recorded from the input (whichever parameters are frozen);
    gradients are still taken with respect to the layer outputs only.
    """
    grad_enabled = torch.is_grad_enabled()
    try:
        with torch.inference_mode(False):
            torch.set_grad_enabled(record_graph)
            # Recorded from the input, so that the layer outputs are in the graph whichever parameters are frozen.
            inputs = images.detach().clone().requires_grad_(True) if record_graph else images
            output, activations = run_with_taps(model, inputs, [layer.name for layer in layers])  # type: ignore[arg-type]
            logits = extract_logits(output)
    finally:
        torch.set_grad_enabled(grad_enabled)
    if not record_graph:
        return Capture(logits=logits, activations=tuple(activation.detach() for activation in activations))
    for layer, activation in zip(layers, activations, strict=True):
        if not activation.requires_grad:
            raise ModelOutputError(f"the logits of this TorchScript model do not depend on layer {layer.name!r}")
    return Capture(logits=logits, activations=tuple(activations))


def vector_jacobian_products(scores: Tensor, activations: Sequence[Tensor], names: Sequence[str]) -> list[Tensor]:
    """Gradients of several per-image scores with respect to the recorded activations.

    Because images are independent in eval mode, the gradient of ``sum_b scores[s, b]`` with respect to an
    activation ``A`` holds in row ``b`` exactly ``d scores[s, b] / d A_b``.

    Args:
        scores: ``(S, B)``: ``S`` scores for each of the ``B`` images, all from one forward pass.
        activations: the recorded activations (the graph's leaves of interest).
        names: the layer names, for error messages.

    Returns:
        For each activation, a tensor of shape ``(S, *A.shape)``. The graph is released afterwards.
    """
    rows = scores.shape[0]
    per_row: list[tuple[Tensor | None, ...]] = []
    for row in range(rows):
        try:
            per_row.append(
                torch.autograd.grad(
                    scores[row].sum(), list(activations), retain_graph=row < rows - 1, allow_unused=True
                )
            )
        except RuntimeError as error:
            if "modified by an inplace operation" not in str(error):
                raise
            raise ModelOutputError(
                f"the model changes in place, after target layer(s) {list(names)}, a tensor that the gradient needs "
                "(e.g. y.mul_(2) on a sigmoid's output), so gradients cannot be computed. Make that operation "
                "out-of-place, pick a layer after it, or use method='scorecam' (no gradients)"
            ) from error
    gradients: list[Tensor] = []
    for index, activation in enumerate(activations):
        parts = [grads[index] for grads in per_row]
        if any(part is None for part in parts):
            raise ModelOutputError(
                f"the explained score does not depend on target layer {names[index]!r}: pick a layer that feeds "
                "the classifier"
            )
        gradients.append(torch.stack([part for part in parts if part is not None]))
        assert gradients[-1].shape[1:] == activation.shape
    return gradients


@dataclass
class ModuleRecord:
    """What a dry run saw of one module.

    Attributes:
        name: the module's dotted name (``""`` for the model itself).
        module: the module.
        depth: how deep it sits: ``0`` for the model's children, ``-1`` for the model itself.
        order: when its forward last finished (0, 1, 2... in finishing order).
        calls: how many times it ran (modules reused in one forward, like torchvision's ResNet ReLUs, run twice).
        shape: the shape of its primary output tensor, ``None`` when it emitted none.
        identity: ``(tensor number, version)``: modules with equal identities emitted the very same tensor in the
            same state (an in-place operation after a module changes the version).
    """

    name: str
    module: nn.Module
    order: int = -1
    calls: int = 0
    shape: tuple[int, ...] | None = None
    identity: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def depth(self) -> int:
        return self.name.count(".") if self.name else -1


def dry_run(model: nn.Module, example: Tensor) -> list[ModuleRecord]:
    """Run ``model(example)`` once without gradients and record every module's output shape, in finishing order.

    The model is left exactly as found: its train/eval flags and the grad mode are restored and every hook is
    removed, also when the forward raises. Outputs are kept alive only during the run (to tell tensors apart).

    Raises:
        ModelOutputError: the model's own forward failed on ``example`` (the message names its shape).

    Returns:
        The records of the modules that ran, sorted by ``order``.
    """
    if is_scripted(model):
        return _scripted_dry_run(model, example)
    records = {id(module): ModuleRecord(name, module) for name, module in model.named_modules()}
    alive: list[Tensor] = []  # keeps outputs alive, so that id() identifies tensors during the run
    numbers: dict[int, int] = {}
    finished = [0]

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        record = records[id(module)]
        record.calls += 1
        record.order = finished[0]
        finished[0] += 1
        tensor = first_tensor(output)
        if tensor is None:
            record.shape, record.identity = None, None
            return
        if id(tensor) not in numbers:
            numbers[id(tensor)] = len(alive)
            alive.append(tensor)
        record.shape = tuple(tensor.shape)
        record.identity = (numbers[id(tensor)], tensor._version)

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        with preserved_model(model), torch.inference_mode(False), torch.no_grad():
            checked_forward(model, example.clone() if example.is_inference() else example)
    finally:
        for handle in handles:
            handle.remove()
        alive.clear()
    return sorted((r for r in records.values() if r.calls), key=lambda r: r.order)


def _scripted_dry_run(model: nn.Module, example: Tensor) -> list[ModuleRecord]:
    """:func:`dry_run` for TorchScript: submodule outputs are located in the graph instead of hooked."""
    modules = dict(model.named_modules())
    identities: dict[str, int] = {}
    records = []
    with preserved_model(model), torch.inference_mode(False):
        located = module_outputs(model, example)  # type: ignore[arg-type]
    for name, shape, order, value in located:
        record = ModuleRecord(name, modules[name])
        record.calls, record.order, record.shape = 1, order, shape
        record.identity = (identities.setdefault(value, len(identities)), 0)
        records.append(record)
    return records
