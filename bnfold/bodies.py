"""Verifying the folds inside If/Loop/Scan bodies on their own.

The whole-model comparison proves only what the trials execute: a fold in the branch of an
If that no trial takes, or in a Loop that runs zero times, would be claimed on the strength
of the other branch. So every body that holds a fold (or a branch merge) is also extracted as
a model of its own, built the same way from the original body and from the folded one, and the
two are compared on the model's trials:

* inputs: the body's formal inputs, and every runtime value of the enclosing graphs that it
  (or a body nested in it) reads; initializers: its own, and the constants of the enclosing
  graphs it reads (initializers, Constant nodes, constant subexpressions), real values;
  outputs: the body's; opsets, IR version and model-local functions: the model's.
* values: what the body sees when it first runs. The original model runs once more on each
  trial with the values the bodies read added as outputs. An If branch takes them as they
  are; a Loop body gets iteration 0 (counter 0, condition true, the Loop's initial values);
  a Scan body its initial states and the first slice of every scanned input (the last one
  for a reversed input). A body nested in another one reads what the enclosing body, itself
  run on its own in the same way, computes. Every value is one the model really produces:
  realistic statistics (what a BatchNormalization sees) and no guessed shapes, at any depth.
  The original body runs every trial twice: random ops in it (which no trial of the model
  need reach) would make any fold look wrong, so such a body cannot be verified.

A body that cannot be run on its own (onnxruntime rejects the extracted original, a value it
reads is a sequence, it lies in a model-local function...) is *unverified*: the pipeline folds
again without its folds and reports its BatchNormalizations as left, with the reason. Only a
body's own nodes count as its folds: a body nested in it is checked (or not) on its own.
Folds in model-local functions are covered by the model's run when the main graph calls the
function; otherwise no trial runs them and they are withheld too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import RuntimeFailure, first_line
from bnfold.fold import body_scope, function_scope
from bnfold.graph import GraphIndex, attribute, describe, is_standard, node_id, subgraphs
from bnfold.inputs import Trial
from bnfold.io.load import LoadedModel
from bnfold.io.save import stage
from bnfold.io.store import TensorStore, all_tensors, uses_external_data
from bnfold.options import Tolerances
from bnfold.verify import (
    BodyInput,
    BodyVerification,
    Reference,
    UnverifiedBody,
    Verification,
    broken_outputs,
    compare_to_reference,
    open_session,
    run_reference,
    run_session,
)

Route = tuple[tuple[str, str], ...]
"""How to reach a body from the main graph: per level, the first output of the node holding
it and the attribute it is in. Outputs survive folding (no fold rewrites an If, Loop or Scan);
node positions do not."""


@dataclass(frozen=True)
class Body:
    """A subgraph body, as the fold labels name it."""

    label: str
    """``If 'branch' then_branch``, or ``Loop 'l' body / If 'i' else_branch`` when nested."""
    route: Route
    reason: str | None = None
    """Why it cannot be verified, when the model's structure alone says so."""


class BodyLayout:
    """Which body holds each node a fold may name, read from the model *before* folding.

    A fold's label is its scope plus its node's id; the layout maps every such label to the
    body whose own nodes include it, or to None when the model's run covers it for certain
    (the main graph, and model-local functions the main graph calls). A node a fold created
    (a MatMul's new bias Add, folded again later) is unknown to it: it lies in the graph of the
    fold that created it, found by the longest scope its label starts with.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self._holders: dict[str, Body | None] = {}
        self._scopes: dict[str, Body | None] = {}
        self.body_labels: dict[Route, str] = {}
        """Every body of the main graph, outer ones before the bodies nested in them."""
        self._walk(model.graph.node, "", (), None, None)
        functions = {(function.domain, function.name): function for function in model.functions}
        called = _functions_called(model.graph.node, functions)
        for key, function in functions.items():
            scope = function_scope(function)
            holder = None if key in called else Body(
                scope.removesuffix(" / "), (), "the main graph itself does not call it, so no trial is sure to run it"
            )
            self._scopes[scope] = holder
            self._walk(function.node, scope, (), holder, function.name)

    def _walk(self, nodes: Iterable[onnx.NodeProto], scope: str, route: Route, holder: Body | None,
              function: str | None) -> None:
        for node in nodes:
            self._holders[scope + node_id(node)] = holder
            for where, graph in subgraphs(node):
                inner_scope = body_scope(scope, node, where)
                label = inner_scope.removesuffix(" / ")
                output = next((name for name in node.output if name), "")
                if function is not None:
                    body = Body(label, (), f"it lies in model-local function '{function}', and only bodies of "
                                           "the main graph are extracted")
                elif not output:
                    body = Body(label, (), f"{describe(node)} has no output to find it by")
                else:
                    body = Body(label, (*route, (output, where)))
                    self.body_labels[body.route] = label
                self._scopes[inner_scope] = body
                self._walk(graph.node, inner_scope, body.route, body, function)

    def holder(self, label: str) -> Body | None:
        """The body holding the node labelled ``label`` (None: the model's run covers it)."""
        if label in self._holders:
            return self._holders[label]
        scopes = [scope for scope in self._scopes if label.startswith(scope)]
        return self._scopes[max(scopes, key=len)] if scopes else None

    def bodies_holding(self, labels: Sequence[str]) -> dict[Body, list[str]]:
        """The bodies that hold some of the folds (or branch merges) labelled ``labels``, each
        with the labels it holds, in the order given."""
        found: dict[Body, list[str]] = {}
        for label in labels:
            body = self.holder(label)
            if body is not None:
                found.setdefault(body, []).append(label)
        return found


def _functions_called(nodes: Iterable[onnx.NodeProto], functions: dict[tuple[str, str], onnx.FunctionProto]
                      ) -> set[tuple[str, str]]:
    """The model-local functions that ``nodes`` call, directly or through other functions."""
    called: set[tuple[str, str]] = set()
    pending = list(nodes)
    while pending:
        node = pending.pop()
        key = (node.domain, node.op_type)
        if key in functions and key not in called:
            called.add(key)
            pending.extend(functions[key].node)
    return called


def outer_names(graph: onnx.GraphProto) -> list[str]:
    """The names ``graph`` reads without defining them (outer-scope values), bodies nested in it
    included, in the order they are first read."""
    defined = {value.name for value in graph.input}
    defined.update(tensor.name for tensor in graph.initializer)
    defined.update(sparse.values.name for sparse in graph.sparse_initializer)
    defined.update(name for node in graph.node for name in node.output if name)
    found: dict[str, None] = {}
    for node in graph.node:
        reads = [name for name in node.input if name]
        reads += [name for _, body in subgraphs(node) for name in outer_names(body)]
        found.update((name, None) for name in reads if name not in defined)
    found.update((output.name, None) for output in graph.output if output.name not in defined)
    return list(found)


class _CannotExtract(Exception):
    """Why a body cannot be made into a model of its own (the message is the reason shown)."""


def _body_of(node: onnx.NodeProto, where: str) -> onnx.GraphProto:
    """The body of ``node`` in attribute ``where`` (as :func:`~bnfold.graph.subgraphs` names it)."""
    for name, graph in subgraphs(node):
        if name == where:
            return graph
    raise _CannotExtract(f"{describe(node)} has no body '{where}'")


def _find_body(model: onnx.ModelProto, top: GraphIndex, route: Route) -> GraphIndex:
    """The index of the body at ``route``, with its enclosing graphs as parents."""
    index = top
    for output, where in route:
        node = index.producer_of(output)
        if node is None:
            raise _CannotExtract(f"no node of the model computes '{output}' any more")
        index = GraphIndex(model, _body_of(node, where), parent=index)
    return index


def _tensor_type(name: str, values: Sequence[np.ndarray]) -> onnx.ValueInfoProto:
    """An input declaration that fits every trial's values: dims that differ between trials
    stay symbolic."""
    first = values[0]
    try:
        elem_type = helper.np_dtype_to_tensor_dtype(first.dtype)
    except (KeyError, TypeError, ValueError):
        raise _CannotExtract(f"'{name}' has a type bnfold cannot declare ({first.dtype})") from None
    if any(value.ndim != first.ndim for value in values):
        return helper.make_tensor_value_info(name, elem_type, None)
    dims = [size if all(value.shape[axis] == size for value in values) else f"{name}_{axis}"
            for axis, size in enumerate(first.shape)]
    return helper.make_tensor_value_info(name, elem_type, dims)


def _outputs_by_name(model: Path | bytes, trials: Sequence[Trial], provider: str, label: str
                     ) -> list[dict[str, np.ndarray]]:
    """A run of ``model`` on every trial that only captures values: each trial's outputs by name,
    whatever their type (a sequence read by a body is refused where it is fed, with its name)."""
    session = open_session(model, label, provider)
    names = [output.name for output in session.get_outputs()]
    return [dict(zip(names, run_session(session, trial.feeds, label))) for trial in trials]


def standalone_model(model: onnx.ModelProto, body: GraphIndex, inputs: Sequence[onnx.ValueInfoProto],
                     extra_outputs: Sequence[str] = ()) -> onnx.ModelProto:
    """The body indexed by ``body`` as a model of its own (see the module docstring), with
    ``inputs`` as its graph inputs and, after the body's outputs, ``extra_outputs``.

    Every tensor is self-contained (external data read through the store), so the model can
    be handed to onnxruntime serialized.

    Raises:
        _CannotExtract: the body reads a runtime value that ``inputs`` does not declare.
    """
    graph = body.graph
    standalone = onnx.GraphProto(name=graph.name or "body")
    standalone.node.extend(graph.node)
    standalone.input.extend(inputs)
    standalone.initializer.extend(graph.initializer)
    standalone.sparse_initializer.extend(graph.sparse_initializer)
    declared = {value.name for value in inputs}
    for name in outer_names(graph):
        if name in declared:
            continue
        value = body.constant_value(name)
        if value is None:
            raise _CannotExtract(f"it reads '{name}', which is neither a constant nor one of its inputs")
        standalone.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    standalone.value_info.extend(graph.value_info)
    standalone.output.extend(graph.output)
    standalone.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs)
    if model.ir_version < 4:  # IR 3 lists every initializer as a graph input
        standalone.input.extend(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            for tensor in standalone.initializer
        )
    result = helper.make_model(standalone, opset_imports=model.opset_import, ir_version=model.ir_version,
                               functions=model.functions)
    for tensor in all_tensors(result):
        if uses_external_data(tensor):
            tensor.CopyFrom(body.store.materialize(tensor))
    return result


def _serialized(model: onnx.ModelProto) -> bytes:
    """An extracted body as onnxruntime takes it: one protobuf, which cannot exceed 2 GiB."""
    try:
        return model.SerializeToString()
    except ValueError as error:  # above protobuf's 2 GiB
        raise _CannotExtract(f"it is too large to hold in one protobuf ({first_line(error)})") from None


@dataclass
class _Check:
    """A body ready to be compared: its inputs, the trials' values and what the original computes."""

    label: str
    route: Route
    inputs: list[onnx.ValueInfoProto]
    described: list[BodyInput]
    trials: list[Trial]
    reference: Reference


@dataclass
class BodyChecks:
    """The bodies holding folds, extracted from the original model and run once: compared with
    each folded model that :meth:`compare` is given (the run's, and attribution's partial ones)."""

    checks: list[_Check] = field(default_factory=list)
    unverified: list[UnverifiedBody] = field(default_factory=list)

    @property
    def withheld(self) -> dict[str, str]:
        """The folds that must not be applied, each with the reason to report."""
        return {label: f"{body.label} could not be verified on its own: {body.reason}"
                for body in self.unverified for label in body.withheld}

    @property
    def prepared(self) -> set[str]:
        """Labels of the bodies already checked or found unverifiable."""
        return {check.label for check in self.checks} | {body.label for body in self.unverified}

    def merge(self, other: BodyChecks) -> None:
        self.checks += other.checks
        self.unverified += other.unverified

    def compare(self, folded: Path, *, tolerances: Tolerances, provider: str) -> list[BodyVerification]:
        """Extract every checked body from the model file ``folded`` (as written) and compare it
        with the original body on the same values."""
        if not self.checks:
            return []
        model = onnx.load_model(str(folded), load_external_data=False)
        top = GraphIndex(model, store=TensorStore(folded.parent))
        results = []
        for check in self.checks:
            try:
                index = _find_body(model, top, check.route)
                candidate = _serialized(standalone_model(model, index, check.inputs))
            except _CannotExtract as problem:
                outputs = broken_outputs(check.reference, f"the folded body cannot be extracted: {problem}",
                                         tolerances)
            else:
                outputs, _ = compare_to_reference(candidate, check.reference, check.trials,
                                                  tolerances=tolerances, provider=provider)
            results.append(BodyVerification(check.label, check.described, outputs))
        return results

    def add_to(self, verification: Verification, folded: Path, *, tolerances: Tolerances, provider: str) -> None:
        """Complete ``verification`` (of the model file ``folded``) with the bodies: each one
        compared on its own, and those that could not be."""
        verification.bodies = self.compare(folded, tolerances=tolerances, provider=provider)
        verification.unverified_bodies = list(self.unverified)


def prepare_body_checks(original: LoadedModel, layout: BodyLayout, labels: Sequence[str], trials: Sequence[Trial],
                        *, tolerances: Tolerances, provider: str, skip: Iterable[str] = ()) -> BodyChecks:
    """Extract and run, from the unfolded ``original``, every body that holds some of the folds
    (or branch merges) labelled ``labels``, except the bodies labelled in ``skip`` (prepared
    before).

    Raises:
        RuntimeFailure: onnxruntime cannot run the original model itself.
    """
    skipped = set(skip)
    holders = {body: held for body, held in layout.bodies_holding(labels).items() if body.label not in skipped}
    checks = BodyChecks()
    for body, held in holders.items():
        if body.reason is not None:
            checks.unverified.append(UnverifiedBody(body.label, body.reason, tuple(held)))
    wanted = {body.route: held for body, held in holders.items() if body.reason is None}
    if wanted:
        _Extraction(original, layout, wanted, trials, tolerances, provider, checks).run()
    return checks


@dataclass
class _Level:
    """A graph that ran on every trial, with the values it had (inputs, and what it computed
    that the bodies in it read)."""

    route: Route
    label: str
    index: GraphIndex
    values: list[dict[str, np.ndarray]]
    """Per trial, by name."""
    sources: dict[str, str]
    """Where each value came from, as the report says it."""
    run_with: Callable[[list[str]], list[dict[str, np.ndarray]]]
    """Runs the graph again on every trial with the named values as outputs; their values per trial."""


@dataclass
class _Plan:
    """What a body needs from the graph around it."""

    index: GraphIndex
    node: onnx.NodeProto
    runtime_reads: list[str]
    control_inputs: list[str]
    """Inputs of the node holding the body that its formal inputs are made of."""

    @property
    def needs(self) -> list[str]:
        return list(dict.fromkeys((*self.runtime_reads, *self.control_inputs)))


class _Extraction:
    """Walks the bodies to check from the main graph inwards, running each level once."""

    def __init__(self, original: LoadedModel, layout: BodyLayout, wanted: dict[Route, list[str]],
                 trials: Sequence[Trial], tolerances: Tolerances, provider: str, checks: BodyChecks) -> None:
        self.model = original.model
        self.original = original
        self.layout = layout
        self.wanted = wanted
        self.trials = list(trials)
        self.tolerances = tolerances
        self.provider = provider
        self.checks = checks
        self.needed = {route[:depth] for route in wanted for depth in range(1, len(route) + 1)}

    def run(self) -> None:
        top = GraphIndex(self.model, store=self.original.store)
        level = _Level((), "the model", top, [dict(trial.feeds) for trial in self.trials],
                       {name: "input of the model" for name in self.trials[0].feeds}, self._run_model_with)
        self._descend(level)

    def _run_model_with(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        """The original model on every trial with ``names`` among its outputs; initializers that
        a caller may override (IR 4+ graph inputs) are read, not computed."""
        initializers = {tensor.name: tensor for tensor in self.model.graph.initializer}
        declared = {output.name for output in self.model.graph.output}
        computed = [name for name in names if name not in initializers]
        results: list[dict[str, np.ndarray]] = [{} for _ in self.trials]
        if computed:
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in computed if name not in declared)
            with tempfile.TemporaryDirectory(prefix="bnfold-bodies-") as folder:
                target = Path(folder) / self.original.path.name
                external = bool(self.original.external_data_files)
                with stage(model, target, self.original.store, external_data=external) as staged:
                    results = _outputs_by_name(staged.staged_path, self.trials, self.provider, "original")
        return [{name: values[name] if name in values else self.original.store.read(initializers[name])
                 for name in names} for values in results]

    def _children(self, route: Route) -> list[Route]:
        return [inner for inner in self.layout.body_labels if inner in self.needed and inner[:-1] == route]

    def _descend(self, level: _Level) -> None:
        children = self._children(level.route)
        plans: dict[Route, _Plan | str] = {}
        for route in children:
            try:
                plans[route] = self._plan(level, route)
            except _CannotExtract as problem:
                plans[route] = str(problem)
        missing = list(dict.fromkeys(
            name for plan in plans.values() if isinstance(plan, _Plan) for name in plan.needs
            if name not in level.values[0]
        ))
        capture_problem = self._capture(level, missing)
        for route in children:
            plan = plans[route]
            try:
                if isinstance(plan, str):
                    raise _CannotExtract(plan)
                if capture_problem:
                    raise _CannotExtract(capture_problem)
                child = self._enter(level, route, plan)
            except _CannotExtract as problem:
                self._give_up(route, str(problem))
                continue
            self._descend(child)

    def _capture(self, level: _Level, names: list[str]) -> str | None:
        """Add ``names`` to the level's values by running it again; the reason if it cannot run."""
        if not names:
            return None
        try:
            outputs = level.run_with(names)
        except RuntimeFailure as failure:
            if not level.route:
                raise  # the model itself cannot run: an error, as in the model's verification
            return f"the enclosing {level.label} cannot run on its own ({failure})"
        except _CannotExtract as problem:
            return f"the enclosing {level.label} cannot be extracted ({problem})"
        for values, computed in zip(level.values, outputs):
            values.update(computed)
        source = "computed by the model" if not level.route else f"computed by {level.label}"
        level.sources.update((name, source) for name in names)
        return None

    def _plan(self, level: _Level, route: Route) -> _Plan:
        output, where = route[-1]
        node = level.index.producer_of(output)
        if node is None:
            raise _CannotExtract(f"no node of {level.label} computes '{output}'")
        index = GraphIndex(self.model, _body_of(node, where), parent=level.index)
        reads = [name for name in outer_names(index.graph) if index.constant_value(name) is None]
        control = [name for name in _control_inputs(node) if level.index.constant_value(name) is None]
        return _Plan(index, node, reads, control)

    def _value(self, level: _Level, trial: int, name: str) -> np.ndarray:
        value = level.values[trial].get(name)
        if value is None:
            value = level.index.constant_value(name)
        if not isinstance(value, np.ndarray):
            raise _CannotExtract(f"'{name}' is not a tensor (a sequence, map or optional value)")
        return value

    def _enter(self, level: _Level, route: Route, plan: _Plan) -> _Level:
        """Build the body's standalone model, run the original on every trial, and record the
        check when the body holds folds: the level of the body, for the bodies nested in it."""
        label = self.layout.body_labels[route]
        formal_names = formal_inputs(plan.index.graph)
        feeds: list[dict[str, np.ndarray]] = []
        for trial in range(len(self.trials)):
            resolve = partial(self._value, level, trial)
            formal = _formal_values(plan.node, len(formal_names), plan.index.default_opset(), resolve)
            values = dict(zip(formal_names, formal))
            values.update((name, resolve(name)) for name in plan.runtime_reads)
            feeds.append(values)
        names = list(feeds[0])
        inputs = [_tensor_type(name, [values[name] for values in feeds]) for name in names]
        trials = [Trial(trial.label, values, seed=trial.seed) for trial, values in zip(self.trials, feeds)]
        first_run = f"first run of {describe(plan.node)}"
        sources = {name: first_run if name in formal_names else level.sources.get(name, "computed by the model")
                   for name in names}
        original = _serialized(standalone_model(self.model, plan.index, inputs))
        try:
            # Every trial is run twice: a body's random ops (which no trial of the model may
            # reach) would make any fold in it look wrong.
            reference = run_reference(original, trials, self.provider, "extracted original body",
                                      self.tolerances, rerun=len(trials))
        except RuntimeFailure as failure:  # NotDeterministic included
            raise _CannotExtract(str(failure)) from None
        if route in self.wanted:
            described = [BodyInput(name, tuple(feeds[0][name].shape), feeds[0][name].dtype.name, sources[name])
                         for name in names]
            self.checks.checks.append(_Check(label, route, inputs, described, trials, reference))

        def run_with(wanted: list[str]) -> list[dict[str, np.ndarray]]:
            extra = [name for name in wanted if name not in reference.output_names]
            model = _serialized(standalone_model(self.model, plan.index, inputs, extra))
            outputs = _outputs_by_name(model, trials, self.provider, "extracted original body")
            return [{name: values[name] for name in wanted} for values in outputs]

        return _Level(route, label, plan.index, [dict(values) for values in feeds], sources, run_with)

    def _give_up(self, route: Route, reason: str) -> None:
        """The body at ``route`` cannot be checked: neither can the bodies nested in it that
        read what it computes."""
        for inner, labels in self.wanted.items():
            if inner[:len(route)] != route:
                continue
            label = self.layout.body_labels[inner]
            why = reason if inner == route else (
                f"the enclosing {self.layout.body_labels[route]} could not be verified on its own ({reason})"
            )
            self.checks.unverified.append(UnverifiedBody(label, why, tuple(labels)))


def _control_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs of an If/Loop/Scan that its body's formal inputs are made of."""
    if not is_standard(node):
        return []
    if node.op_type == "Loop":
        return [name for name in node.input[2:] if name]
    if node.op_type == "Scan":
        return [name for name in node.input if name]
    return []


def formal_inputs(body: onnx.GraphProto) -> list[str]:
    """The inputs the node holding ``body`` feeds: before IR 4 a body also lists its own
    initializers as inputs, and those are not fed."""
    initializers = {tensor.name for tensor in body.initializer}
    return [value.name for value in body.input if value.name not in initializers]


def _formal_values(node: onnx.NodeProto, declared: int, opset: int,
                   resolve: Callable[[str], np.ndarray]) -> list[np.ndarray]:
    """The values of the ``declared`` formal inputs of a body of ``node`` on its first run.

    Raises:
        _CannotExtract: for a node whose bodies bnfold does not know how to feed.
    """
    operator = node.op_type if is_standard(node) else None
    if operator == "If":
        values: list[np.ndarray] = []
    elif operator == "Loop":
        values = [np.array(0, dtype=np.int64), np.array(True), *(resolve(name) for name in node.input[2:])]
    elif operator == "Scan" and opset >= 9:
        values = _first_scan_step(node, resolve)
    else:
        raise _CannotExtract(f"bnfold does not know what {describe(node)} feeds its bodies")
    if len(values) != declared:
        raise _CannotExtract(f"{describe(node)} gives its body {len(values)} inputs, the body declares {declared}")
    return values


def _first_scan_step(node: onnx.NodeProto, resolve: Callable[[str], np.ndarray]) -> list[np.ndarray]:
    """A Scan's initial states, then the first element of every scanned input along its axis."""
    scanned = int(attribute(node, "num_scan_inputs", 0))
    states = list(node.input[:len(node.input) - scanned])
    inputs = list(node.input[len(node.input) - scanned:])
    axes = list(attribute(node, "scan_input_axes", [0] * scanned))
    directions = list(attribute(node, "scan_input_directions", [0] * scanned))
    values = [resolve(name) for name in states]
    for name, axis, direction in zip(inputs, axes, directions):
        sequence = resolve(name)
        if sequence.ndim == 0 or sequence.shape[axis % sequence.ndim] == 0:
            raise _CannotExtract(f"{describe(node)} scans an empty '{name}'")
        step = np.take(sequence, -1 if direction else 0, axis=axis % sequence.ndim)
        values.append(np.ascontiguousarray(step))
    return values

