"""Inlining the model-local functions whose BatchNormalization can only fold with their callers.

PyTorch's ``export_modules_as_functions`` makes modules model-local functions: a ``BatchNorm2d``
function's BN reads its scale, bias, mean and var from the function's inputs, which every call
fills with the caller's initializers, and the Conv before it lives in a ``Conv2d`` function (or
in the caller). Inside the function nothing is constant and no layer is in reach, so nothing
folds there. Inlining those calls (:func:`onnx.inliner.inline_selected_functions`) puts the BN
next to its layer with constant parameters, where the ordinary rules fold it.

Only functions that need it are inlined; every other function is kept as it is:

1. a function whose body holds a BN that reads its parameters (or an attribute) from the call,
   or that nothing inside the body can absorb while a neighbour that might lies outside it (its
   data is a function input, its output a function output, or the layer next to it takes its
   weight from the call);
2. a function whose call is a BN's direct neighbour (in any graph or function body) and whose
   body has a layer that might absorb it: the producer's, or else (when the producer is no layer
   that could take the BN) its consumers'.

Inlining a function brings its BNs into its callers, next to other calls, so the selection is
repeated until it chooses nothing. onnx's inliner renames the inlined nodes (``name__2``), which
is how their BNs are reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
import onnx.inliner

from bnfold.graph import GraphIndex, function_view, is_standard, subgraphs
from bnfold.io.store import TensorStore

LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Ops that absorb a BN next to them when their weight (input 1) is a constant."""

FunctionId = tuple[str, str]


def _id(function: onnx.FunctionProto) -> FunctionId:
    return function.domain, function.name


def _batchnorms(graph: GraphIndex) -> Iterator[onnx.NodeProto]:
    return (node for node in graph.nodes if node.op_type == "BatchNormalization" and is_standard(node))


def _absorbs_inside(node: onnx.NodeProto, graph: GraphIndex) -> bool:
    """A layer whose weight is constant where it is: it can take a BN without the caller."""
    return node.op_type in LAYERS and is_standard(node) and graph.constant_value(node.input[1]) is not None


def _weight_from_outside(node: onnx.NodeProto, graph: GraphIndex) -> bool:
    """A layer whose weight is not constant in this body: in a function, it comes from the call."""
    return node.op_type in LAYERS and is_standard(node) and graph.constant_value(node.input[1]) is None


def _needs_callers(function: onnx.FunctionProto, model: onnx.ModelProto) -> bool:
    """Whether a BN of ``function`` could fold only once the function is inlined (rule 1)."""
    body = GraphIndex(function_view(model, function))
    for batchnorm in _batchnorms(body):
        if any(attribute.ref_attr_name for attribute in batchnorm.attribute):
            return True
        if any(body.constant_value(name) is None for name in batchnorm.input[1:5] if name):
            return True
        producer = body.producer_of(batchnorm.input[0])
        consumers = body.consumers_of(batchnorm.output[0])
        absorbed_inside = (producer is not None and _absorbs_inside(producer, body)) or (
            bool(consumers) and batchnorm.output[0] not in function.output
            and all(_absorbs_inside(consumer, body) for consumer in consumers)
        )
        neighbour_outside = (
            batchnorm.input[0] in function.input or batchnorm.output[0] in function.output
            or any(_weight_from_outside(node, body) for node in (producer, *consumers) if node is not None)
        )
        if neighbour_outside and not absorbed_inside:
            return True
    return False


def _graphs(model: onnx.ModelProto, store: TensorStore | None = None) -> Iterator[GraphIndex]:
    """An index of every graph that may hold a BN: the main graph, its bodies, function bodies."""
    pending = [GraphIndex(model, store=store)]
    pending += [GraphIndex(function_view(model, function)) for function in model.functions]
    while pending:
        graph = pending.pop()
        yield graph
        pending += [GraphIndex(model, body, parent=graph) for node in graph.nodes for _, body in subgraphs(node)]


def _has_layer(function: onnx.FunctionProto, local: dict[FunctionId, onnx.FunctionProto], seen: set[FunctionId]) -> bool:
    """Whether the body, or a local function it calls, has a layer or a BN."""
    seen.add(_id(function))
    for node in function.node:
        if (node.op_type in LAYERS | {"BatchNormalization"}) and is_standard(node):
            return True
        called = local.get((node.domain, node.op_type))
        if called is not None and _id(called) not in seen and _has_layer(called, local, seen):
            return True
    return False


def _called_next_to_a_batchnorm(model: onnx.ModelProto, local: dict[FunctionId, onnx.FunctionProto],
                                store: TensorStore | None) -> set[FunctionId]:
    """Functions whose call is a BN's producer, or else its consumers, and whose body might
    absorb it (rule 2). The consumers' functions only when the producer is not a layer that can
    take the BN already: a backward fold is tried first and needs nothing else inlined."""

    def absorbing_call(node: onnx.NodeProto | None) -> FunctionId | None:
        called = None if node is None else local.get((node.domain, node.op_type))
        return _id(called) if called is not None and _has_layer(called, local, set()) else None

    chosen: set[FunctionId] = set()
    for graph in _graphs(model, store):
        for batchnorm in _batchnorms(graph):
            producer = graph.producer_of(batchnorm.input[0])
            called = absorbing_call(producer)
            if called is not None:
                chosen.add(called)
            elif producer is None or not _absorbs_inside(producer, graph):
                chosen.update(key for node in graph.consumers_of(batchnorm.output[0])
                              if (key := absorbing_call(node)) is not None)
    return chosen


def _called(model: onnx.ModelProto) -> set[FunctionId]:
    """Every (domain, op type) some node of the model calls, bodies and functions included."""
    calls: set[FunctionId] = set()
    for graph in _graphs(model):
        calls.update((node.domain, node.op_type) for node in graph.nodes)
    return calls


@dataclass
class Inlined:
    """What :func:`inline_for_folding` did."""

    functions: list[str] = field(default_factory=list)
    """The functions inlined, in order."""
    origins: dict[str, str] = field(default_factory=dict)
    """The name each inlined node had in its function's body, by the name the inliner gave it
    (``bn__3`` → ``bn``): ``--skip`` / ``--only`` patterns match it as they would in the function."""


INLINED_NAME = re.compile(r"(.+?)(?:__\d+)+")
"""onnx's inliner names a node of an inlined body ``name__N`` (once per level of nesting)."""


def _node_names(model: onnx.ModelProto) -> set[str]:
    return {node.name for graph in _graphs(model) for node in graph.nodes if node.name}


def _state_default_attributes(model: onnx.ModelProto, functions: dict[FunctionId, onnx.FunctionProto]) -> None:
    """Write on every call of ``functions`` the attributes it leaves to the function's defaults
    (``attribute_proto``): onnx's inliner drops a reference to an attribute the call does not
    pass instead of taking the default, so a BN's ``epsilon`` or ``training_mode`` would fall
    back to the operator's own default. Stated on the call, the value is the same either way."""
    pending = [*model.graph.node, *(node for function in model.functions for node in function.node)]
    while pending:
        node = pending.pop()
        pending += [inner for _, body in subgraphs(node) for inner in body.node]
        function = functions.get((node.domain, node.op_type))
        if function is not None:
            given = {attribute.name for attribute in node.attribute}
            node.attribute.extend(default for default in function.attribute_proto if default.name not in given)


def inline_for_folding(model: onnx.ModelProto, store: TensorStore | None = None) -> Inlined:
    """Inline, in place, the model-local functions whose BNs need their callers to fold (none,
    and the model untouched, when no function does).

    A model onnx's inliner cannot handle keeps its functions: their BNs are then left with the
    reason they had. ``store`` is where the model's weights are read (a loaded model leaves its
    large weights in the file).
    """
    inlined = Inlined()
    if not model.functions:
        return inlined
    before = _node_names(model)
    while model.functions:
        local = {_id(function): function for function in model.functions}
        called = _called(model)
        chosen = {key for key, function in local.items() if key in called and _needs_callers(function, model)}
        chosen |= _called_next_to_a_batchnorm(model, local, store)
        if not chosen:
            break
        _state_default_attributes(model, {key: local[key] for key in chosen})
        try:
            result = onnx.inliner.inline_selected_functions(model, sorted(chosen))
        except Exception:  # noqa: BLE001 - the inliner's failure only means "kept as functions"
            break
        if len(result.functions) >= len(model.functions):
            break  # nothing was inlined after all: asking again would not change that
        model.CopyFrom(result)
        inlined.functions += [name for _, name in sorted(chosen)]
    if inlined.functions:
        for name in _node_names(model) - before:
            match = INLINED_NAME.fullmatch(name)
            if match is not None and match.group(1) in before:
                inlined.origins[name] = match.group(1)
    return inlined
