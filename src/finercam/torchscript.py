"""Recording layer outputs of TorchScript models, which run no Python forward hooks.

A private copy of the scripted ``forward`` graph is inlined; every node keeps its module hierarchy
(``SELF(ResNet).layer4(Sequential).1(BasicBlock)...``), so the output of a submodule is the tensor produced inside
it and consumed outside it. That tensor is added to the graph's outputs and the graph is compiled into a function
``(module, images) -> (output, activations...)``. The loaded model itself is never modified.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from finercam.errors import ModelOutputError

_SEGMENT = re.compile(r"(?:^|\.)([^.()]+)\(")
_HELPER_KINDS = frozenset({"aten::size", "aten::dim", "aten::len", "prim::shape", "aten::numel"})
_CACHE: weakref.WeakKeyDictionary[torch.jit.ScriptModule, dict[tuple[str, ...], object]] = (
    weakref.WeakKeyDictionary()
)


def is_scripted(model: object) -> bool:
    """Whether ``model`` is a TorchScript module."""
    return isinstance(model, torch.jit.ScriptModule)


def _path(node: torch._C.Node) -> list[str]:
    """The submodule path of a node (``["layer4", "1", "relu"]``); ``[]`` for the model's own forward."""
    return [part for part in _SEGMENT.findall(node.getModuleHierarchy()) if part not in ("SELF", "UNKNOWN_INSTANCE")]


def _layer_output(graph: torch._C.Graph, name: str) -> torch._C.Value:
    """The tensor value that submodule ``name`` emits in an inlined graph."""
    target = name.split(".")

    def inside(node: torch._C.Node) -> bool:
        return _path(node)[: len(target)] == target

    returned = set(graph.return_node().inputs())
    candidates = []
    for node in graph.nodes():
        if not inside(node):
            continue
        for value in node.outputs():
            if value.type().kind() != "TensorType":
                continue
            # Uses by nodes without a module hierarchy of their own (helpers inlined into a module, such as the
            # shape checks of batch norm) carry an empty path and must not count as "outside".
            used_outside = any(
                not inside(use.user) and (_path(use.user) or use.user.kind() not in _HELPER_KINDS)
                for use in value.uses()
            )
            if used_outside or value in returned:
                candidates.append(value)
    if not candidates:
        raise ModelOutputError(
            f"target layer {name!r} emits no tensor used by the rest of this TorchScript model; "
            "pick another layer (finercam layers MODEL lists them)"
        )
    return candidates[-1]


def _snapshot(graph: torch._C.Graph, value: torch._C.Value) -> None:
    """Make the rest of the graph work on a copy of ``value`` (``aten::clone``), so that in-place operations after
    the layer (``out += identity``, ``relu_``) leave the recorded output intact, as the eager hook's copy does."""
    none = graph.create("prim::Constant")
    none.output().setType(torch._C.NoneType.get())
    clone = graph.create("aten::clone", [value, none.output()])
    clone.output().setType(value.type())
    none.insertAfter(value.node())
    clone.insertAfter(none)
    value.replaceAllUsesAfterNodeWith(clone, clone.output())


def _tapped_graph(
    model: torch.jit.ScriptModule, names: Sequence[str], *, skip_missing: bool = False
) -> tuple[torch._C.Graph, list[tuple[str, torch._C.Value]]]:
    """An inlined copy of ``forward`` that also returns the outputs of the submodules ``names`` (those that cannot be
    located are skipped with ``skip_missing``, else raise); returns the graph and the located values in order."""
    graph = model.forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    located = []
    for name in names:
        try:
            located.append((name, _layer_output(graph, name)))
        except ModelOutputError:
            if not skip_missing:
                raise
    for value in dict.fromkeys(value for _, value in located):
        _snapshot(graph, value)
    for _, value in located:
        graph.registerOutput(value)
    graph.makeMultiOutputIntoTuple()
    return graph, located


def _compile(model: torch.jit.ScriptModule, names: tuple[str, ...]) -> object:
    graph, _ = _tapped_graph(model, names)
    return torch._C._create_function_from_graph(f"finercam_taps_{len(_CACHE)}", graph)


def run_with_taps(model: torch.jit.ScriptModule, images: Tensor, names: Sequence[str]) -> tuple[object, list[Tensor]]:
    """Run a scripted model and return its output and the outputs of the submodules ``names``."""
    key = tuple(names)
    compiled = _CACHE.setdefault(model, {})
    if key not in compiled:
        compiled[key] = _compile(model, key)
    output, *activations = compiled[key](model._c, images)  # type: ignore[operator]
    return output, list(activations)


def module_outputs(model: torch.jit.ScriptModule, example: Tensor) -> list[tuple[str, tuple[int, ...], int, str]]:
    """What a dry run of a scripted model records: for each submodule whose output can be located in the graph,
    ``(name, output shape, finishing order, identity of the output value)``, in finishing order."""
    names = [name for name, _ in model.named_modules() if name]
    graph, located = _tapped_graph(model, names, skip_missing=True)
    order = {node: index for index, node in enumerate(graph.nodes())}
    function = torch._C._create_function_from_graph("finercam_dry_run", graph)
    with torch.no_grad():
        _, *outputs = function(model._c, example)  # type: ignore[operator]
    records = [
        (name, tuple(output.shape), order[value.node()], value.debugName())
        for (name, value), output in zip(located, outputs, strict=True)
    ]
    return sorted(records, key=lambda record: record[2])
