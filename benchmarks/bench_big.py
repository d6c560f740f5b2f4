"""Big models with external data: bnfold against the I/O floor and against other folders.

    python benchmarks/bench_big.py [--gigabytes 1.0] [--repeats 3]

Generates (once, under benchmarks/_generated/, kept out of git) a Conv→BN→Relu
stack whose weights live in an external data file, then runs each contender in
its own subprocess, so that its peak resident memory (VmHWM) is its own:

* floor: ``onnx.load`` + ``onnx.save`` with external data (what any tool pays);
* bnfold: ``bnfold MODEL --no-verify -o OUT`` (load, checker, fold, staged save);
* bnfold + verify: the same with the onnxruntime comparison;
* onnxoptimizer ``fuse_bn_into_conv`` and onnxslim, where installed, each doing its
  own load + fold + save of the same file.

Prints median wall time, its ratio to the floor, peak RSS and its ratio to the
model's size. Ratios, not seconds, carry over between machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = Path(__file__).resolve().parent / "_generated"

# Each contender is a small program run as `python -c`; it prints its wall time as JSON.
PRELUDE = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {repo!r})
    model_path, out_path = sys.argv[1], sys.argv[2]
    start = time.perf_counter()
    """
)
EPILOGUE = textwrap.dedent(
    """
    seconds = time.perf_counter() - start
    # VmHWM is this process's own peak; ru_maxrss would include the parent's from before exec.
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak}))
    """
)
SAVE_EXTERNAL = "onnx.save_model(model, out_path, save_as_external_data=True, location=out_path.split('/')[-1] + '.data')"
CONTENDERS = {
    "floor (onnx.load + onnx.save)": f"import onnx\nmodel = onnx.load(model_path)\n{SAVE_EXTERNAL}",
    "bnfold --no-verify": (
        "from pathlib import Path\nfrom bnfold.pipeline import FoldOptions, fold_file\n"
        "report = fold_file(Path(model_path), FoldOptions(output=Path(out_path), verify=False))\n"
        "assert report.exit_code == 0 and report.after.batchnorms == 0"
    ),
    "bnfold (verified)": (
        "from pathlib import Path\nfrom bnfold.pipeline import FoldOptions, fold_file\n"
        "report = fold_file(Path(model_path), FoldOptions(output=Path(out_path)))\n"
        "assert report.exit_code == 0 and report.after.batchnorms == 0"
    ),
    "onnxoptimizer fuse_bn_into_conv": (
        "import onnx, onnxoptimizer\nmodel = onnx.load(model_path)\n"
        "model = onnxoptimizer.optimize(model, ['fuse_bn_into_conv'])\n" + SAVE_EXTERNAL
    ),
    "onnxslim": "import onnx, onnxslim\nmodel = onnxslim.slim(onnx.load(model_path))\n" + SAVE_EXTERNAL,
}


def build_model(path: Path, gigabytes: float) -> None:
    """bench_fold's Conv(3x3)→BN→Relu stack with about ``gigabytes`` of float32 weights,
    saved with external data (onnx.save needs the whole model in memory anyway)."""
    import onnx
    from bench_fold import build_conv_bn_stack

    model = build_conv_bn_stack(gigabytes * 1000, channels=512, spatial=4)
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")


def run(program: str, model: Path, out: Path) -> dict[str, float] | None:
    code = PRELUDE.format(repo=str(REPO)) + program + EPILOGUE
    completed = subprocess.run(
        [sys.executable, "-c", code, str(model), str(out)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    GENERATED.mkdir(exist_ok=True)
    model = GENERATED / f"big_{args.gigabytes:g}gb.onnx"
    if not model.exists():
        build_model(model, args.gigabytes)
    size = model.stat().st_size + Path(f"{model}.data").stat().st_size

    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory(dir=GENERATED) as scratch:
        for repeat in range(args.repeats):
            # Rotate the order: a run right after a large write pays for its writeback.
            names = list(CONTENDERS)
            names = names[repeat % len(names):] + names[: repeat % len(names)]
            for name in names:
                program = CONTENDERS[name]
                out = Path(scratch) / "out.onnx"
                measured = run(program, model, out)
                if measured is not None:
                    results[name].append(measured)
                for leftover in Path(scratch).iterdir():
                    leftover.unlink()

    print(f"model: {model.name}, {size / 1e9:.2f} GB (external data), median of {args.repeats} runs")
    floor = statistics.median(r["seconds"] for r in results["floor (onnx.load + onnx.save)"])
    for name, runs in results.items():
        if not runs:
            print(f"{name:34s} not available")
            continue
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_bytes"] for r in runs)
        print(f"{name:34s} {seconds:7.2f} s  {seconds / floor:5.2f}x floor   peak RSS {peak / 1e9:5.2f} GB"
              f" = {peak / size:4.2f}x model")


if __name__ == "__main__":
    main()
