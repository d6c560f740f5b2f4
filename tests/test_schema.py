"""The JSON report (bnfold.schema): the document is exactly what the README's schema says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bnfold.pipeline import FoldOptions, fold_file
from sample_models.generate import SAMPLES

README = Path(__file__).resolve().parent.parent / "README.md"


def _schema_block() -> dict[str, str]:
    """The README's ``bnfold.fold/1`` block: each top-level key with the text that describes it."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"`bnfold\.fold/1`, for one model:\n\n```text\n(.*?)```", text, re.S)
    assert block, "the README lost its JSON schema block"
    entries: dict[str, str] = {}
    keys: list[str] = []
    for line in block.group(1).splitlines():
        if line and not line[0].isspace():
            keys_part, _, description = re.split(r"(\s{2,})", line, maxsplit=1)
            keys = [key.strip() for key in keys_part.split(",")]
            entries.update((key, description) for key in keys)
        else:
            entries.update((key, entries[key] + " " + line.strip()) for key in keys)
    return entries


def _fields(description: str) -> set[str]:
    """The names at the first level of the first ``{...}`` in a description."""
    start = description.index("{")
    depth, names, current = 0, set(), ""
    for char in description[start:]:
        if char in "{[":
            depth += 1
            if depth == 1:
                continue
        elif char in "}]":
            depth -= 1
            if depth == 0:
                break
        if depth == 1 and char == ",":
            names.add(current.split(":")[0].strip())
            current = ""
        elif depth == 1:
            current += char
    names.add(current.split(":")[0].strip())
    return {name for name in names if name}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The JSON report of a real run on a sample with folds and a BN left in place."""
    folder = tmp_path_factory.mktemp("schema")
    path = folder / "refused_bn.onnx"
    path.write_bytes(SAMPLES["refused_bn"]().SerializeToString())
    report = fold_file(path, FoldOptions())
    return json.loads(json.dumps(report.to_dict()))


def test_top_level_keys_are_the_documented_ones(document: dict) -> None:
    assert set(document) == set(_schema_block())


@pytest.mark.parametrize("key", ["before", "folds", "left", "verification", "timings"])
def test_nested_fields_are_the_documented_ones(document: dict, key: str) -> None:
    value = document[key]
    sample = value[0] if isinstance(value, list) else value
    assert set(sample) == _fields(_schema_block()[key])


def test_verification_items_are_the_documented_ones(document: dict) -> None:
    described = _schema_block()["verification"]
    trials = described[described.index("trials:"):]
    outputs = described[described.index("outputs:"):]
    assert set(document["verification"]["trials"][0]) == _fields(trials)
    assert set(document["verification"]["outputs"][0]) == _fields(outputs)
