"""Verification sessions of a self-contained model read its large weights where they lie in the
file (bnfold.verify._mapped_session): they must compute exactly what onnxruntime's own reading
of the file computes, for every way a model can hold and read its weights, since both the
original and the folded model are run this way and a shared misreading would hide a bad fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import verify

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "sample_models").glob("*.onnx"))
_RNG = np.random.default_rng(7)


def _weight(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    return _RNG.standard_normal(shape).astype(dtype)


def _branch_only_weight() -> onnx.ModelProto:
    """A 16 KiB weight that only an If branch reads (from the outer scope)."""
    then_branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 64])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 64])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)], "branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(_weight((64, 64)), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul(ir_version: int, opset: int, *, weight_is_input: bool, dtype: type = np.float32,
            unused: bool = False) -> onnx.ModelProto:
    """x · W with a 16 KiB W: declared as a graph input too (IR 3 requires it; IR 4+ makes it
    overridable), in float16, or beside a large initializer nothing reads."""
    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info("x", element, [1, 64])]
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("W", element, [64, 64]))
    initializers = [numpy_helper.from_array(_weight((64, 64), dtype), "W")]
    if unused:
        initializers.append(numpy_helper.from_array(_weight((1024,)), "unused"))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul", inputs,
                              [helper.make_tensor_value_info("y", element, [1, 64])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


CASES = {
    "branch-only weight": _branch_only_weight,
    "IR 3, weight declared as input": lambda: _matmul(3, 8, weight_is_input=True),
    "IR 8, overridable weight": lambda: _matmul(8, 17, weight_is_input=True),
    "float16 weight": lambda: _matmul(8, 17, weight_is_input=False, dtype=np.float16),
    "unused large initializer": lambda: _matmul(8, 17, weight_is_input=False, unused=True),
}


def _feeds(session: ort.InferenceSession, condition: bool) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for value in session.get_inputs():
        if value.type == "tensor(bool)":
            feeds[value.name] = np.array(condition)
            continue
        shape = [dim if isinstance(dim, int) else 2 for dim in value.shape]
        dtype = np.float16 if value.type == "tensor(float16)" else np.float32
        feeds[value.name] = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    return feeds


def _plain(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=verify._session_options(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("model", [*CASES.values(), *SAMPLES], ids=[*CASES, *(path.stem for path in SAMPLES)])
def test_a_verification_session_computes_what_onnxruntimes_own_reading_computes(tmp_path: Path, model) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(model() if callable(model) else onnx.load(str(model)), str(path))
    session = verify.open_session(path, "original", "CPUExecutionProvider")
    plain = _plain(path)
    for condition in (True, False):
        feeds = _feeds(session, condition)
        plain_feeds = {**_feeds(plain, condition), **feeds}
        for got, want in zip(session.run(None, feeds), plain.run(None, plain_feeds), strict=True):
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_large_weights_of_a_self_contained_model_are_handed_over_uncopied(tmp_path: Path) -> None:
    """The session reads the weights from the file's map (onnxruntime's add_initializer), not
    from copies: the arrays it holds are views of the mapping."""
    path = tmp_path / "m.onnx"
    onnx.save(_matmul(8, 17, weight_is_input=False), str(path))
    session = verify.open_session(path, "original", "CPUExecutionProvider")
    mapping, _view, arrays, _values, _options = session.bnfold_mapped_weights
    assert len(arrays) == 1 and not arrays[0].flags.owndata and not arrays[0].flags.writeable
    assert not mapping.closed
