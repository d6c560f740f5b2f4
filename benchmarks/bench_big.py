"""The 1.0 GB external-data model: bnfold against floor A, onnxruntime and other folders.

    python benchmarks/bench_big.py [--repeats 3]

The contenders of bench_fold.py, plus onnxoptimizer's ``fuse_bn_into_conv`` and
onnxslim where installed (they are not dependencies), each doing its own load, fold
and save with external data, as fresh processes paired with floor A runs (see
bench_harness.py). Prints the same markdown table as bench_fold.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import bench_harness

MODEL = "big_1gb"
SAVE_EXTERNAL = (
    "onnx.save_model(model, sys.argv[2], save_as_external_data=True,\n"
    "                location=os.path.basename(sys.argv[2]) + '.data')"
)
PEERS = {
    "onnxoptimizer": bench_harness.python_program(
        "onnxoptimizer fuse_bn_into_conv",
        "import onnx, onnxoptimizer, os, sys\nmodel = onnx.load(sys.argv[1])\n"
        "model = onnxoptimizer.optimize(model, ['fuse_bn_into_conv'])\n" + SAVE_EXTERNAL,
    ),
    "onnxslim": bench_harness.python_program(
        "onnxslim",
        "import onnx, onnxslim, os, sys\nmodel = onnxslim.slim(onnx.load(sys.argv[1]))\n" + SAVE_EXTERNAL,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    peers = tuple(peer for module, peer in PEERS.items() if importlib.util.find_spec(module) is not None)
    bench_harness.build_models([MODEL])
    result = bench_harness.measure_model(MODEL, bench_harness.STANDARD_CONTENDERS + peers, args.repeats)
    print(bench_harness.environment_line(args.repeats, load_at_start))
    print()
    print(bench_harness.markdown_table([result]))


if __name__ == "__main__":
    main()
