"""The models the benchmarks fold, generated once under benchmarks/_generated/ (kept out of git).

    python benchmarks/bench_models.py NAME...   # build the named models if missing

* ``conv_bn_141mb``: a self-contained Conv(3x3, 384→384) → BN → Relu stack of about 141 MB;
* ``big_1gb``: the same kind of stack (512 channels) with 1.0 GB of weights in an external
  data file;
* ``vgg11_bn``: VGG11 with BatchNorm (about 531 MB), defined here with plain ``torch.nn``
  layers from its configuration, random seeded weights and BN statistics, exported by
  PyTorch's classic exporter with ``TrainingMode.PRESERVE`` so that every BN stays in the
  graph. torch is imported only to build this model.

The harness builds models in a child process (``python bench_models.py NAME``): a
process that has held a model would otherwise lend its own peak RSS to the children it
starts, and the harness measures theirs.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = Path(__file__).resolve().parent / "_generated"

# VGG11 ("configuration A"): channels of the 3x3 Convs, "M" a 2x2 max-pool.
VGG11_LAYERS: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def build_conv_bn_stack(megabytes: float, channels: int = 384, spatial: int = 8):  # noqa: ANN201 - onnx.ModelProto
    """Conv(3x3, channels→channels) → BN → Relu blocks until the weights reach ``megabytes``."""
    sys.path.insert(0, str(REPO))
    from sample_models.modelkit import GraphBuilder

    block_bytes = channels * channels * 9 * 4
    blocks = max(1, round(megabytes * 1_000_000 / block_bytes))
    b = GraphBuilder(seed=0)
    x = b.input("x", ["batch", channels, spatial, spatial])
    for _ in range(blocks):
        x = b.node("Relu", [b.batchnorm(b.conv(x, channels, channels, bias=False), channels)])
    b.output(x)
    return b.model("bench_conv_bn")


def write_conv_bn_141mb(path: Path) -> None:
    """The issue's self-contained model: about 141 MB in one protobuf."""
    import onnx

    onnx.save(build_conv_bn_stack(141), str(path))


def write_big_1gb(path: Path) -> None:
    """1.0 GB of float32 weights saved with external data (``<name>.data`` beside it)."""
    import onnx

    model = build_conv_bn_stack(1000, channels=512, spatial=4)
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")


def write_vgg11_bn(path: Path) -> None:
    """VGG11-BN for 224x224 images, exported with every BatchNormalization kept."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG11_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(item, int)
        batchnorm = nn.BatchNorm2d(item)
        # Statistics as a trained network has them, so that the fold changes every weight.
        with torch.no_grad():
            batchnorm.running_mean.normal_(0.0, 0.5)
            batchnorm.running_var.uniform_(0.5, 2.0)
            batchnorm.weight.uniform_(0.5, 1.5)
            batchnorm.bias.normal_(0.0, 0.2)
        layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), batchnorm, nn.ReLU(inplace=True)]
        channels = item
    model = nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d((7, 7)),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, 1000),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE, input_names=["image"], output_names=["logits"],
        )


BUILDERS: dict[str, Callable[[Path], None]] = {
    "conv_bn_141mb": write_conv_bn_141mb,
    "big_1gb": write_big_1gb,
    "vgg11_bn": write_vgg11_bn,
}


def model_path(name: str) -> Path:
    return GENERATED / f"{name}.onnx"


def data_files(path: Path) -> list[Path]:
    """The model file and its external data file, when it has one."""
    data = path.with_name(f"{path.name}.data")
    return [path, data] if data.exists() else [path]


def model_bytes(path: Path) -> int:
    """Size on disk of the model with its external data: what peak RSS is compared with."""
    return sum(file.stat().st_size for file in data_files(path))


def ensure_built(name: str) -> Path:
    """Build the model in this process if it is missing (see the module docstring).

    It is written under its final name in a scratch folder (an external data file's
    name is recorded in the model) and moved into place, data file first, so an
    interrupted build never leaves a model that looks complete."""
    path = model_path(name)
    if not path.exists():
        GENERATED.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=GENERATED) as scratch:
            built = Path(scratch) / path.name
            BUILDERS[name](built)
            for file in reversed(data_files(built)):
                file.replace(GENERATED / file.name)
    return path


if __name__ == "__main__":
    for requested in sys.argv[1:] or list(BUILDERS):
        print(ensure_built(requested))
