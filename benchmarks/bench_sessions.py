"""What bnfold's verification costs in onnxruntime, and two ways it could cost less.

    python benchmarks/bench_sessions.py [--model vgg11_bn] [--repeats 5]

Verification opens a session on the original and one on the folded model (graph
optimizations off), runs each once and compares. This times, in fresh processes,
creating and running those two sessions:

* one after the other, as bnfold does (the first session is dropped before the second);
* with ``session.disable_prepacking`` = "1" (onnxruntime then keeps Conv/Gemm weights
  as they are instead of repacking them at session creation);
* both sessions created concurrently in two threads, then run;
* both, concurrently and without prepacking.

The folded model is made once by ``bnfold --no-verify``. Prints, per variant, the
median seconds to create both sessions, to run both, the total, and the highest peak
RSS relative to the model file. CPU time of creation (all threads) against its wall
time shows how much of it could overlap with a second session on a free core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_harness
import bench_models

PROGRAM = """
import json, sys, time, threading
import numpy as np
import onnxruntime as ort
original, folded, mode = sys.argv[1], sys.argv[2], sys.argv[3]

def options():
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if "noprepack" in mode:
        o.add_session_config_entry("session.disable_prepacking", "1")
    return o

def open_session(path):
    return ort.InferenceSession(path, sess_options=options(), providers=["CPUExecutionProvider"])

def feeds(session):
    rng = np.random.default_rng(0)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}

create = run = 0.0
cpu_start = time.process_time()
if "threads" in mode:
    sessions = {}
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda p=p: sessions.__setitem__(p, open_session(p)))
               for p in (original, folded)]
    for t in threads: t.start()
    for t in threads: t.join()
    create = time.perf_counter() - start
    create_cpu = time.process_time() - cpu_start
    start = time.perf_counter()
    outputs = [sessions[p].run(None, feeds(sessions[p])) for p in (original, folded)]
    run = time.perf_counter() - start
else:
    outputs, create_cpu = [], 0.0
    for path in (original, folded):
        start, cpu_start = time.perf_counter(), time.process_time()
        session = open_session(path)
        create += time.perf_counter() - start
        create_cpu += time.process_time() - cpu_start
        start = time.perf_counter()
        outputs.append(session.run(None, feeds(session)))
        run += time.perf_counter() - start
        del session
assert np.allclose(outputs[0][0], outputs[1][0], atol=1e-3, rtol=1e-3)
print(json.dumps({"create": create, "create_cpu": create_cpu, "run": run}))
"""
MODES = ("sequential", "sequential-noprepack", "threads", "threads-noprepack")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg11_bn", choices=list(bench_models.BUILDERS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    bench_harness.build_models([args.model])
    original = bench_models.model_path(args.model)
    size = bench_models.model_bytes(original)

    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    peaks: dict[str, list[int]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=bench_models.GENERATED, prefix="scratch-") as scratch_name:
        folded = Path(scratch_name) / "folded.onnx"
        subprocess.run([sys.executable, "-m", "bnfold", str(original), "-o", str(folded), "--no-verify", "-q"],
                       check=True, cwd=bench_models.REPO)
        log = Path(scratch_name) / "log"
        for repeat in range(args.repeats + 1):  # the first round warms the page cache
            for mode in MODES:
                run = bench_harness.run_child([sys.executable, "-c", PROGRAM, str(original), str(folded), mode], log)
                if repeat:
                    results[mode].append(json.loads(log.read_text().splitlines()[-1]))
                    peaks[mode].append(run.peak_rss)

    print(bench_harness.environment_line(args.repeats, load_at_start))
    print(f"\nTwo onnxruntime sessions (original and folded {args.model}, {size / 1e6:,.0f} MB), optimizations off.\n")
    print("| variant | create both | CPU time creating | run both | total | peak RSS / model file |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        create = statistics.median(r["create"] for r in results[mode])
        create_cpu = statistics.median(r["create_cpu"] for r in results[mode])
        run_seconds = statistics.median(r["run"] for r in results[mode])
        total = statistics.median(r["create"] + r["run"] for r in results[mode])
        peak = max(peaks[mode]) / size
        print(f"| {mode} | {create:.2f} s | {create_cpu:.2f} s | {run_seconds:.2f} s | {total:.2f} s | {peak:.2f}× |")


if __name__ == "__main__":
    main()
