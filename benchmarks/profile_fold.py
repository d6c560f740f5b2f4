"""Where a bnfold run spends its time, by phase and by function (cProfile).

    python benchmarks/profile_fold.py MODEL_NAME [--verify] [--top 25]

Runs ``fold_file`` once in this process on a model of bench_models.py (built if
missing), under cProfile, and prints the cumulative time of the functions that make
up each phase (load, checker, fold math, rewrite, save, verify: session creation vs
run), then the functions with the most time of their own. Measured in-process, so
interpreter start and imports, which a fresh ``bnfold`` process also pays, are shown
apart (timed once as ``python -c "import bnfold.cli"``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_harness
import bench_models

sys.path.insert(0, str(bench_models.REPO))

# (label, module file fragment, function name): the calls that make up each phase. cProfile
# sees the main thread only: the fold arithmetic runs in worker threads, where the main thread
# shows as waiting ("acquire" of a lock) inside the phase that asked for it.
PHASES = (
    ("load: load_model (structure parsed, large weights left in the file)", "bnfold/io/load.py", "load_model"),
    ("  of which _check_data_sizes", "bnfold/io/load.py", "_check_data_sizes"),
    ("load + save: checker_complaint (checker on a weight-less copy)", "bnfold/io/load.py", "checker_complaint"),
    ("  of which weightless_copy", "bnfold/io/load.py", "weightless_copy"),
    ("fold: fold_batchnorms (all passes)", "bnfold/fold.py", "fold_batchnorms"),
    ("  planning: rules' plan()", "bnfold/fold.py", "_plan_for"),
    ("    of which scale_with_effect (bound or product of each weight)", "bnfold/fold_math.py", "scale_with_effect"),
    ("  rewrite: apply_plans", "bnfold/rewrite.py", "apply_plans"),
    ("  GraphIndex construction", "bnfold/graph.py", "__init__"),
    ("save: stage (write the output)", "bnfold/io/save.py", "stage"),
    ("  folded weights computed as written (ScaledWeight.pieces)", "bnfold/fold_math.py", "pieces"),
    ("  write_buffer (into the page cache)", "bnfold/io/protostream.py", "write_buffer"),
    ("verify: verify_equivalence", "bnfold/verify.py", "verify_equivalence"),
    ("  open_session (InferenceSession creation)", "bnfold/verify.py", "open_session"),
    ("  run_session (inference)", "bnfold/verify.py", "run_session"),
    ("  compare_output", "bnfold/verify.py", "compare_output"),
    ("model_stats (before/after tables)", "bnfold/pipeline.py", "model_stats"),
)


def cumulative(stats: pstats.Stats, fragment: str, function: str) -> tuple[float, int]:
    """Cumulative seconds and calls of the function (outermost calls only, as cProfile counts)."""
    total, calls = 0.0, 0
    for (filename, _line, name), (_cc, primitive_calls, _tt, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name == function and fragment in filename:
            total += cumtime
            calls += primitive_calls
    return total, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(bench_models.BUILDERS))
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    bench_harness.build_models([args.model])
    path = bench_models.model_path(args.model)

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import bnfold.cli"], check=True, cwd=bench_models.REPO)
    print(f"fresh process: python -c 'import bnfold.cli' {time.perf_counter() - start:.3f} s")

    from bnfold.pipeline import FoldOptions, fold_file

    with tempfile.TemporaryDirectory(dir=bench_models.GENERATED) as scratch:
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        report = fold_file(path, FoldOptions(output=Path(scratch) / "out.onnx", verify=args.verify))
        profile.disable()
        wall = time.perf_counter() - start
    assert report.exit_code == 0, report.status
    print(f"{args.model}, verify={args.verify}: fold_file {wall:.3f} s under cProfile; "
          f"pipeline timings: " + ", ".join(f"{k} {v:.3f}" for k, v in report.timings.items()))
    stats = pstats.Stats(profile)
    for label, fragment, function in PHASES:
        seconds, calls = cumulative(stats, fragment, function)
        if calls:
            print(f"  {label:58s} {seconds:7.3f} s  ({calls} calls)")
    print()
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
