"""Writing new weights: protobuf's way (``raw_data`` + ``onnx.save``) against protostream.

    python benchmarks/bench_protostream.py [--model conv_bn_141mb] [--repeats 5]

Each contender is a fresh process that loads the model, computes a new array for every
initializer (as a fold does: the old values times a constant, in the tensor's dtype),
and then writes the model with those arrays as its weights; only that last step is
timed (by the child), and its peak RSS is read with ``os.wait4``:

* ``raw_data`` + ``onnx.save``: each array is copied into its tensor (``tobytes``, then
  into the message), then the whole model is serialized into one bytes object and written;
* ``protostream.write_model``: the arrays are written to the file from their own memory;

and, for reference, writing the model as loaded: ``onnx.save`` and ``write_model`` with no
payload (each tensor serialized by protobuf). Runs are interleaved, outputs deleted and
``os.sync()`` called between runs; medians and the highest peak RSS are printed, with
throughput in MB/s and the ratio of each time to ``onnx.save`` of the unchanged model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import bench_harness
import bench_models

PRELUDE = """
import json, sys, time
import numpy as np, onnx
from onnx import numpy_helper
from bnfold.io.protostream import write_model
model = onnx.load(sys.argv[1])
arrays = {t.name: (numpy_helper.to_array(t) * 1.0001).astype(numpy_helper.to_array(t).dtype)
          for t in model.graph.initializer}
start = time.perf_counter()
"""
EPILOGUE = """
print(json.dumps({"seconds": time.perf_counter() - start}))
"""
WRITERS = {
    "onnx.save, model as loaded": "onnx.save(model, sys.argv[2])",
    "write_model, no payload": "with open(sys.argv[2], 'wb') as f:\n    write_model(model, f, lambda t: None)",
    "new weights: raw_data + onnx.save": (
        "for t in model.graph.initializer:\n    t.raw_data = arrays[t.name].tobytes()\n"
        "onnx.save(model, sys.argv[2])"
    ),
    "new weights: write_model": (
        "with open(sys.argv[2], 'wb') as f:\n    write_model(model, f, lambda t: arrays[t.name])"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="conv_bn_141mb", choices=["conv_bn_141mb", "vgg11_bn"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    bench_harness.build_models([args.model])
    model = bench_models.model_path(args.model)
    size = bench_models.model_bytes(model)

    seconds: dict[str, list[float]] = {name: [] for name in WRITERS}
    peaks: dict[str, list[int]] = {name: [] for name in WRITERS}
    with tempfile.TemporaryDirectory(dir=bench_models.GENERATED, prefix="scratch-") as scratch_name:
        scratch = Path(scratch_name)
        log = scratch.parent / f".{scratch.name}.log"
        try:
            for repeat in range(args.repeats + 1):  # the first round warms the page cache
                for name, code in WRITERS.items():
                    program = bench_harness.python_program(name, PRELUDE + code + EPILOGUE)
                    run = bench_harness.run_child(program.command(model, scratch / "out.onnx"), log)
                    bench_harness.settle(scratch)
                    if repeat:
                        seconds[name].append(json.loads(log.read_text().splitlines()[-1])["seconds"])
                        peaks[name].append(run.peak_rss)
        finally:
            log.unlink(missing_ok=True)

    print(bench_harness.environment_line(args.repeats, load_at_start))
    print(f"\nWriting {args.model} ({size / 1e6:,.0f} MB); time of the write step only, in a fresh process.\n")
    print("| writer | median time | throughput | time / onnx.save (as loaded) | peak RSS / model file |")
    print("| --- | --- | --- | --- | --- |")
    baseline = statistics.median(seconds["onnx.save, model as loaded"])
    for name in WRITERS:
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.3f} s | {size / median / 1e6:,.0f} MB/s | {median / baseline:.2f}× "
              f"| {max(peaks[name]) / size:.2f}× |")


if __name__ == "__main__":
    main()
