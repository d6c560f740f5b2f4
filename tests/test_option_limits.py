"""Option values that cannot work are refused in one line (exit 2) before any work, never exit 4.

``--seed`` below 0, ``--trials`` or ``--batch`` below 1, and generated inputs larger than the
machine's memory (a huge ``--batch`` or ``--input-shape``, or many ``--trials`` of a large
one) are refused by ``bnfold fold`` (one model or several) and ``bnfold check`` alike, before
onnxruntime is loaded and with nothing written.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.errors import InputError
from bnfold.inputs import InputSpec, check_generated_size
from sample_models.modelkit import GraphBuilder, TensorProto
from tests.support import assert_one_line_error, run_cli

HUGE = 10**12


def two_input_model(dtype: type) -> onnx.ModelProto:
    """x [batch, 4, 6, 6] of ``dtype`` through Conv → BN, and an int64 input ``ids`` [batch, 3]."""
    b = GraphBuilder(seed=1, dtype=dtype)
    x = b.input("x", ["batch", 4, 6, 6])
    ids = b.input("ids", ["batch", 3], elem_type=TensorProto.INT64)
    b.output(b.batchnorm(b.conv(x, 4, 4), 4))
    b.output(b.node("Identity", [ids]))
    b.outputs[-1] = onnx.helper.make_tensor_value_info(b.outputs[-1].name, TensorProto.INT64, None)
    return b.model()


@pytest.fixture(params=[np.float32, np.float16])
def models(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    onnx.save(two_input_model(request.param), str(tmp_path / "a.onnx"))
    onnx.save(two_input_model(request.param), str(tmp_path / "b.onnx"))
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


MODES = {
    "fold": lambda f: [f / "a.onnx"],
    "fold --dry-run": lambda f: [f / "a.onnx", "--dry-run"],
    "batch": lambda f: [f / "a.onnx", f / "b.onnx"],
    "batch -j 2": lambda f: [f, "-j", "2"],
    "check": lambda f: ["check", f / "a.onnx", f / "b.onnx"],
}

BAD_VALUES = [
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--seed", "-1000000000000"], "--seed must be at least 0"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--trials", "-5"], "--trials must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--batch", "-1"], "--batch must be at least 1"),
]

TOO_LARGE = [
    (["--batch", str(HUGE)], f"'x' float32[{HUGE},4,6,6]"),
    (["--input-shape", f"x:{HUGE},4,6,6"], f"[{HUGE},4,6,6]"),
    (["--input-shape", f"ids:{HUGE},3"], f"'ids' int64[{HUGE},3]"),
    (["--input-shape", f"x:{HUGE},4,6,6", "--input-shape", f"ids:{HUGE},3"], "TiB (1 trial; input "),
    (["--batch", "4000000", "--trials", "3000"], "3000 trials"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("args,fragment", BAD_VALUES)
def test_impossible_option_values_are_one_line_errors(models: Path, mode: str, args: list[str],
                                                     fragment: str) -> None:
    before = snapshot(models)
    assert_one_line_error(run_cli(*MODES[mode](models), *args), 2, fragment)
    assert snapshot(models) == before


@pytest.mark.parametrize("args,fragment", BAD_VALUES)
def test_impossible_option_values_are_refused_without_verification_too(models: Path, args: list[str],
                                                                       fragment: str) -> None:
    before = snapshot(models)
    assert_one_line_error(run_cli(models / "a.onnx", "--no-verify", *args), 2, fragment)
    assert snapshot(models) == before


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("args,fragment", TOO_LARGE)
def test_inputs_larger_than_the_machine_are_refused_with_the_size(models: Path, mode: str, args: list[str],
                                                                  fragment: str) -> None:
    before = snapshot(models)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(
        onnx.load(str(models / "a.onnx")).graph.input[0].type.tensor_type.elem_type
    )
    fragment = fragment.replace("float32", np.dtype(dtype).name)
    result = run_cli(*MODES[mode](models), *args)
    if mode.startswith("batch"):  # the size is per model: each model's row says it, the run exits 2
        assert result.exit_code == 2 and result.stderr == ""
        assert result.stdout.count("would need") == 2 and "Traceback" not in result.output
    else:
        assert_one_line_error(result, 2, "the generated inputs would need", fragment, "of memory")
    assert snapshot(models) == before


def test_the_estimate_counts_every_input_and_trial_against_the_limit() -> None:
    specs = [InputSpec("x", (7, 3, 5), "float16"), InputSpec("ids", (7, 2), "int64"), InputSpec("f", (), "bool")]
    needed = 4 * (math.prod((7, 3, 5)) * 2 + math.prod((7, 2)) * 8 + 1)
    check_generated_size(specs, 4, needed)
    check_generated_size(specs, 4, None)
    with pytest.raises(InputError, match="4 trials; input 'x' float16\\[7,3,5\\]"):
        check_generated_size(specs, 4, needed - 1)


def test_refused_sizes_never_load_onnxruntime(models: Path) -> None:
    """The estimate comes before onnxruntime is imported (it costs a second to load)."""
    script = (
        "import sys\nfrom click.testing import CliRunner\nfrom bnfold.cli import main\n"
        f"result = CliRunner().invoke(main, [{str(models / 'a.onnx')!r}, '--batch', '{HUGE}'])\n"
        "print(result.exit_code, 'onnxruntime' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert completed.stdout.split() == ["2", "False"]
