"""bnfold against floor A and onnxruntime, on three models, each run a fresh process.

    python benchmarks/bench_fold.py [--models conv_bn_141mb,big_1gb,vgg11_bn] [--repeats 5]

For each model (generated once under benchmarks/_generated/, see bench_models.py):

* floor A: a python process doing ``onnx.save(onnx.load(src), dst)`` (with external data
  when the model has it): what any tool that reads and writes the model pays;
* ``bnfold MODEL -o OUT --no-verify`` and ``bnfold MODEL -o OUT`` (verified);
* onnxruntime's offline optimization (``optimized_model_filepath`` with
  ``ORT_ENABLE_BASIC``, which fuses Conv+BN), as a peer figure.

Runs alternate floor, contender, floor, contender… after a warm-up round; each ratio is
taken against the floor run just before it and the median of those is printed, with the
same ratio for CPU time (user + system, which other work on the machine disturbs less
than wall time) and the peak RSS of each child relative to the model's size on disk
(see bench_harness.py).
The table is markdown, ready for the README. About 4 minutes with the defaults on an
idle 2-core machine. Building vgg11_bn the first time needs torch.
"""

from __future__ import annotations

import argparse
import os
from importlib.util import find_spec

import bench_harness
import bench_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(bench_models.BUILDERS),
                        help="comma-separated, among: " + ", ".join(bench_models.BUILDERS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    names = [name for name in args.models.split(",") if name]
    unknown = set(names) - set(bench_models.BUILDERS)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    if "vgg11_bn" in names and not bench_models.model_path("vgg11_bn").exists() and not find_spec("torch"):
        parser.error("vgg11_bn is exported once from PyTorch: install torch, or leave it out with --models")

    bench_harness.build_models(names)
    results = [bench_harness.measure_model(name, bench_harness.STANDARD_CONTENDERS, args.repeats) for name in names]
    print(bench_harness.environment_line(args.repeats, load_at_start))
    print()
    print(bench_harness.markdown_table(results))


if __name__ == "__main__":
    main()
