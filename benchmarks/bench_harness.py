"""Timing contenders as fresh processes against floor A, pair by pair.

Every measurement is one child process started from nothing (interpreter start and
imports included, as a user pays them): wall time from start to exit measured here,
peak RSS from ``os.wait4`` on that child alone. ``getrusage(RUSAGE_CHILDREN)`` cannot
give a per-child peak (it is the maximum over all children so far), and a child
inherits the high-water mark of the process that forked it, so this process never
loads a model itself: models are built by a child (``bench_models.py``), and the
versions printed are read from package metadata, not by importing the packages.

Floor A is a python process doing ``onnx.save(onnx.load(src), dst)`` (with external
data when the model has it). Runs alternate floor, contender, floor, contender…; each
contender's ratio is taken against the floor run just before it, and the median of
those pair ratios is reported, so that a slow spell of the machine hits both sides of
a pair. Between runs the outputs are deleted and ``os.sync()`` writes back whatever
is dirty, so no run pays for the previous one's writeback.

Before every measured run a child touches and frees more memory than any run needs
(:func:`prime_memory`). On a virtual machine, memory freed a while ago is handed back to
the host and costs a fault there when touched again, while memory another process just
freed is ready: without the primer each run's time depended on how much memory the run
*before* it had used (a floor run after onnxruntime's offline optimizer, which frees 2 GB,
took 1.4 s; after a bnfold run, which frees almost none, 2.2-2.5 s), which decided the pair
ratios more than the contenders did. Primed, every run starts from the same state; floor A,
which needs the most fresh memory, gains the most from it.
"""

from __future__ import annotations

import datetime
import compileall
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import bench_models

REPO = Path(__file__).resolve().parent.parent

FLOOR = "floor A: onnx.load + onnx.save"
_PRIMED_BYTES = 2**29
"""Fresh memory touched before each run on top of three times the model's size (onnxruntime's
offline optimizer, the hungriest contender, peaks near twice it)."""


@dataclass(frozen=True)
class Contender:
    """One way of reading ``src`` and writing ``dst``: a ``python -c`` program or a command.

    An element of ``argv`` that is exactly ``{python}``, ``{src}`` or ``{dst}`` is
    replaced by the interpreter or path (program text is left as it is).
    """

    name: str
    argv: tuple[str, ...]

    def command(self, src: Path, dst: Path) -> list[str]:
        values = {"{python}": sys.executable, "{src}": str(src), "{dst}": str(dst)}
        return [values.get(part, part) for part in self.argv]


def python_program(name: str, code: str) -> Contender:
    """A contender that runs ``code`` with ``src``/``dst`` as ``sys.argv[1:3]``."""
    return Contender(name, ("{python}", "-c", code, "{src}", "{dst}"))


FLOOR_SELF_CONTAINED = python_program(
    FLOOR, "import onnx, sys\nonnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
)
FLOOR_EXTERNAL = python_program(
    FLOOR,
    "import onnx, os, sys\n"
    "onnx.save(onnx.load(sys.argv[1]), sys.argv[2], save_as_external_data=True,\n"
    "          location=os.path.basename(sys.argv[2]) + '.data')",
)
BNFOLD_VERIFIED = Contender("bnfold (verified)", ("{python}", "-m", "bnfold", "{src}", "-o", "{dst}", "-q"))
BNFOLD_NO_VERIFY = Contender("bnfold --no-verify", (*BNFOLD_VERIFIED.argv, "--no-verify"))
# onnxruntime's own BN fusion (a level-1 "basic" rewrite) while writing the optimized model.
ORT_OFFLINE = python_program(
    "onnxruntime offline (basic)",
    "import onnxruntime as ort, os, sys\n"
    "options = ort.SessionOptions()\n"
    "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
    "options.optimized_model_filepath = sys.argv[2]\n"
    "if os.path.exists(sys.argv[1] + '.data'):\n"
    "    options.add_session_config_entry('session.optimized_model_external_initializers_file_name',\n"
    "                                     os.path.basename(sys.argv[2]) + '.data')\n"
    "    options.add_session_config_entry('session.optimized_model_external_initializers_min_size_in_bytes', '1024')\n"
    "ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])",
)
STANDARD_CONTENDERS = (BNFOLD_NO_VERIFY, BNFOLD_VERIFIED, ORT_OFFLINE)


def floor_for(model: Path) -> Contender:
    """Floor A writes external data exactly when the model has it, as bnfold does."""
    return FLOOR_EXTERNAL if len(bench_models.data_files(model)) > 1 else FLOOR_SELF_CONTAINED


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu_seconds: float
    """User + system time of the child (all its threads): less sensitive than wall time
    to other work on the machine, which only delays it."""
    peak_rss: int
    """Bytes: ``ru_maxrss`` of this child alone."""


def run_child(command: list[str], log: Path) -> Run:
    """Run one child to completion; its stdout and stderr go to ``log``.

    The child is reaped with ``os.wait4`` (not ``Popen.wait``) to get its own rusage.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as output:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    if child.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(command[:4])}… exited {child.returncode}: {' / '.join(tail)}")
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)  # Linux reports kilobytes


def prime_memory(size: int) -> None:
    """Have a child touch ``size`` bytes of fresh memory and exit (see the module docstring)."""
    subprocess.run([sys.executable, "-c", "import sys\nblock = bytearray(int(sys.argv[1]))\n"
                    "block[::4096] = b'\\1' * len(range(0, len(block), 4096))", str(size)], check=True)


def settle(scratch: Path) -> None:
    """Delete every output and write back what is dirty, so the next run starts clean."""
    for leftover in scratch.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    os.sync()


@dataclass
class ModelResult:
    """All runs of one model: the floor's, and each contender's paired with a floor run."""

    name: str
    path: Path
    size: int
    floor: list[Run] = field(default_factory=list)
    runs: dict[str, list[Run]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    """Contender seconds / seconds of the floor run just before it, one per pair."""
    cpu_ratios: dict[str, list[float]] = field(default_factory=dict)
    """The same for CPU time."""


def compile_bnfold() -> None:
    """Byte-compile the package, as ``pip install`` does: an installed bnfold imports from
    ``.pyc`` files, while a source tree run with PYTHONDONTWRITEBYTECODE (set on some
    machines) would compile every module in every child and measure the compiler."""
    compileall.compile_dir(str(REPO / "bnfold"), quiet=1)


def measure_model(name: str, contenders: tuple[Contender, ...], repeats: int) -> ModelResult:
    """Warm-up round (not counted), then ``repeats`` rounds of floor, contender pairs."""
    compile_bnfold()
    path = bench_models.model_path(name)
    result = ModelResult(name, path, bench_models.model_bytes(path))
    floor = floor_for(path)
    with tempfile.TemporaryDirectory(dir=bench_models.GENERATED, prefix="scratch-") as scratch_name:
        scratch = Path(scratch_name)
        out = scratch / "out" / "model.onnx"
        log = scratch.parent / f".{scratch.name}.log"

        def once(contender: Contender) -> Run:
            out.parent.mkdir(exist_ok=True)
            prime_memory(_PRIMED_BYTES + 3 * result.size)
            try:
                return run_child(contender.command(path, out), log)
            finally:
                settle(scratch)

        try:
            for contender in (floor, *contenders):  # page cache and lazy imports warmed for all
                once(contender)
            for _ in range(repeats):
                for contender in contenders:
                    floor_run = once(floor)
                    run = once(contender)
                    result.floor.append(floor_run)
                    result.runs.setdefault(contender.name, []).append(run)
                    result.ratios.setdefault(contender.name, []).append(run.seconds / floor_run.seconds)
                    result.cpu_ratios.setdefault(contender.name, []).append(run.cpu_seconds / floor_run.cpu_seconds)
        finally:
            log.unlink(missing_ok=True)
    return result


def build_models(names: list[str]) -> None:
    """Build missing models in a child process (see the module docstring)."""
    missing = [name for name in names if not bench_models.model_path(name).exists()]
    if missing:
        print(f"building {', '.join(missing)} under {bench_models.GENERATED} …", file=sys.stderr)
        subprocess.run([sys.executable, str(Path(bench_models.__file__)), *missing], check=True, cwd=REPO)


def environment_line(repeats: int, load_at_start: float) -> str:
    """Date, machine, versions, and the load average at the start and end of the runs:
    anything else running on the machine shows there (and widens the ranges)."""
    versions = ", ".join(f"{package} {metadata.version(package)}" for package in ("onnx", "onnxruntime", "numpy"))
    return (
        f"Measured on {datetime.date.today().isoformat()}, {platform.machine()} Linux with "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {versions}; "
        f"fresh process per run, median of {repeats} runs; load average {load_at_start:.1f} "
        f"at the start, {os.getloadavg()[0]:.1f} at the end."
    )


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def markdown_table(results: list[ModelResult]) -> str:
    """One row per model and contender: seconds, pair ratios to floor A, peak RSS / file."""
    lines = [
        "| model | contender | median time | time / floor A (median of pairs, range) "
        "| CPU time / floor A's | peak RSS / model file (highest run) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        external = ", external data" if len(bench_models.data_files(result.path)) > 1 else ""
        label = f"{result.name} ({result.size / 1e6:,.0f} MB{external})"
        floor_seconds = statistics.median(run.seconds for run in result.floor)
        floor_peak = max(run.peak_rss for run in result.floor)
        lines.append(f"| {label} | {FLOOR} | {floor_seconds:.2f} s | 1 | 1 | {floor_peak / result.size:.2f}× |")
        for name, runs in result.runs.items():
            seconds = statistics.median(run.seconds for run in runs)
            ratios = result.ratios[name]
            peak = max(run.peak_rss for run in runs)
            lines.append(
                f"| | {name} | {seconds:.2f} s | **{statistics.median(ratios):.2f}×** ({_spread(ratios)}) "
                f"| {statistics.median(result.cpu_ratios[name]):.2f}× | {peak / result.size:.2f}× |"
            )
    return "\n".join(lines)
