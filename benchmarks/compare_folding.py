"""How many BatchNormalizations each tool leaves, on the same models.

    python benchmarks/compare_folding.py [MODEL_OR_FOLDER ...]

Default models: the samples, the PyTorch exports (including the travel fixtures,
whose BNs sit behind pools, reshapes, concats and sibling branches) and the tf2onnx
exports in this repository. For each model it counts the BatchNormalization nodes before,
after bnfold, and after onnxoptimizer's ``fuse_bn_into_conv``, onnxslim's ``slim`` and
onnxsim's ``simplify`` where those are installed (they are not dependencies), plus the
Mul/Add nodes each leaves (a decomposed BN is a Mul → Add chain). Real models that PyPI
packages ship: benchmarks/packaged_models.py. bnfold's count is only taken when its result
verified as equivalent; the others are not verified here.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections import Counter
from pathlib import Path

import onnx
import onnx.inliner

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bnfold.batch import find_models  # noqa: E402
from bnfold.pipeline import FoldOptions, fold_file  # noqa: E402

DEFAULT_FOLDERS = [REPO / "sample_models", REPO / "tests/fixtures/exported", REPO / "tests/fixtures/tf2onnx",
                   REPO / "tests/fixtures/travel"]


def counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(BatchNormalization, Mul + Add) nodes of the top-level graph, with the model-local
    functions' nodes counted once per call (a function body may stand for several BNs)."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    ops = Counter(node.op_type for node in model.graph.node)
    return ops["BatchNormalization"], ops["Mul"] + ops["Add"]


def with_bnfold(path: Path, scratch: Path) -> tuple[int, int] | None:
    output = scratch / "bnfold.onnx"
    report = fold_file(path, FoldOptions(output=output))
    return counts(onnx.load(str(output))) if report.exit_code == 0 else None


def with_other(tool: str, path: Path) -> tuple[int, int] | None:
    """Run onnxoptimizer, onnxslim or onnxsim quietly; None when missing or failing on this model."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = onnx.load(str(path))
            if tool == "onnxoptimizer":
                import onnxoptimizer

                result = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
            elif tool == "onnxslim":
                import onnxslim

                result = onnxslim.slim(model)
            else:
                import onnxsim

                result, _ = onnxsim.simplify(model)
    except Exception:  # noqa: BLE001 - another tool's failure is just "no result"
        return None
    return counts(result)


def main() -> None:
    import tempfile

    paths = find_models([Path(p) for p in sys.argv[1:]] or [f for f in DEFAULT_FOLDERS if f.is_dir()])
    totals: Counter[str] = Counter()
    print(f"{'model':52s} {'BN':>4s} {'bnfold':>8s} {'onnxopt':>8s} {'onnxslim':>8s} {'onnxsim':>8s}"
          "   (BN left / Mul+Add left)")
    with tempfile.TemporaryDirectory() as scratch:
        for path in paths:
            before = counts(onnx.load(str(path)))
            results = {
                "bnfold": with_bnfold(path, Path(scratch)),
                "onnxoptimizer": with_other("onnxoptimizer", path),
                "onnxslim": with_other("onnxslim", path),
                "onnxsim": with_other("onnxsim", path),
            }
            if not before[0] and all(r is None or r == before for r in results.values()):
                continue  # nothing to fold here and nobody changed anything
            totals["BN"] += before[0]
            cells = []
            for tool, result in results.items():
                cells.append("-" if result is None else f"{result[0]}/{result[1]}")
                if result is not None:
                    totals[tool] += result[0]
            name = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
            print(f"{name:52s} {before[0]:4d} " + " ".join(f"{c:>8s}" for c in cells))
    print(f"{'total BatchNormalization left':52s} {totals['BN']:4d} {totals['bnfold']:8d} "
          f"{totals['onnxoptimizer']:8d} {totals['onnxslim']:8d} {totals['onnxsim']:8d}")


if __name__ == "__main__":
    main()
