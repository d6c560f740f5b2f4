"""How close bnfold's fold+save comes to the I/O floor (plain onnx.load + onnx.save).

    python benchmarks/bench_fold.py [--megabytes 120] [--repeats 3]

Builds a Conv→BN→Relu stack of about the requested size (kept out of git under
benchmarks/_generated/), then times, in one run and on the same file:

* floor: ``onnx.load`` + ``onnx.save`` to a new file;
* bnfold: the whole ``bnfold MODEL --no-verify`` pipeline (load, checker, fold,
  staged save, rename) through the library;
* bnfold + verify: the same with the onnxruntime comparison, for information.

Prints medians and the ratio bnfold / floor. Ratios, not absolute seconds, are
what carries over between machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnfold.pipeline import FoldOptions, fold_file  # noqa: E402
from sample_models.modelkit import GraphBuilder  # noqa: E402

GENERATED = Path(__file__).resolve().parent / "_generated"


def build_conv_bn_stack(megabytes: float, channels: int = 384, spatial: int = 8) -> onnx.ModelProto:
    """Conv(3x3, channels→channels) → BN → Relu blocks until the weights reach ``megabytes``
    (also what benchmarks/bench_big.py saves with external data)."""
    block_bytes = channels * channels * 9 * 4
    blocks = max(1, round(megabytes * 1_000_000 / block_bytes))
    b = GraphBuilder(seed=0)
    x = b.input("x", ["batch", channels, spatial, spatial])
    for _ in range(blocks):
        x = b.node("Relu", [b.batchnorm(b.conv(x, channels, channels, bias=False), channels)])
    b.output(x)
    return b.model("bench_conv_bn")


def interleaved_medians(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per action, after one warm-up each, running the actions in turn
    so that page-cache and allocator state favour none of them."""
    for action in actions.values():
        action()
    timings: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    GENERATED.mkdir(exist_ok=True)
    model_path = GENERATED / f"conv_bn_{args.megabytes}mb.onnx"
    if not model_path.exists():
        onnx.save(build_conv_bn_stack(args.megabytes), str(model_path))
    size_mb = model_path.stat().st_size / 1e6

    with tempfile.TemporaryDirectory(dir=GENERATED) as scratch:
        floor_out = Path(scratch) / "floor.onnx"
        fold_out = Path(scratch) / "folded.onnx"

        def floor() -> None:
            floor_out.unlink(missing_ok=True)
            onnx.save(onnx.load(str(model_path)), str(floor_out))

        def fold(verify: bool) -> None:
            fold_out.unlink(missing_ok=True)
            report = fold_file(model_path, FoldOptions(output=fold_out, verify=verify))
            assert report.exit_code == 0, report.status

        medians = interleaved_medians(
            {"floor": floor, "fold": lambda: fold(False), "verify": lambda: fold(True)}, args.repeats
        )
        floor_s, fold_s, verify_s = medians["floor"], medians["fold"], medians["verify"]

    print(f"model: {model_path.name}, {size_mb:.1f} MB, median of {args.repeats} runs")
    print(f"floor  onnx.load + onnx.save      {floor_s:7.3f} s")
    print(f"bnfold fold + save (--no-verify)  {fold_s:7.3f} s   ratio {fold_s / floor_s:.2f}x")
    print(f"bnfold fold + save + verify       {verify_s:7.3f} s   ratio {verify_s / floor_s:.2f}x")


if __name__ == "__main__":
    main()
