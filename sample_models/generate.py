"""Build the sample models shipped in this folder (deterministic: seeded weights).

    python sample_models/generate.py            # rewrite every sample beside this file
    python sample_models/generate.py OUT_DIR    # or write them elsewhere

Each sample shows one situation a user meets; the tests fold every one of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import onnx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sample_models.modelkit import GraphBuilder  # noqa: E402


def cnn_residual() -> onnx.ModelProto:
    """A small ResNet/MobileNet-style CNN: Conv→BN→Relu blocks, a residual Add, a
    depthwise Conv, a pointwise Conv and a Gemm head. All 6 BNs fold."""
    b = GraphBuilder(seed=1)
    x = b.input("image", ["batch", 3, 32, 32])
    stem = b.node("Relu", [b.batchnorm(b.conv(x, 3, 16, strides=[2, 2]), 16)])
    branch = b.node("Relu", [b.batchnorm(b.conv(stem, 16, 16), 16)])
    branch = b.batchnorm(b.conv(branch, 16, 16, bias=False), 16)
    merged = b.node("Relu", [b.node("Add", [branch, stem])])
    depthwise = b.node("Relu", [b.batchnorm(b.conv(merged, 16, 16, group=16, bias=False), 16)])
    pointwise = b.node("Relu", [b.batchnorm(b.conv(depthwise, 16, 32, kernel=(1, 1)), 32)])
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [pointwise])])
    logits = b.batchnorm(b.gemm(pooled, 32, 10), 10)
    b.output(logits)
    return b.model("cnn_residual")


def conv_no_bias() -> onnx.ModelProto:
    """Conv1d layers without bias, as most frameworks export Conv→BN: the fold creates the bias."""
    b = GraphBuilder(seed=2)
    x = b.input("signal", ["batch", 4, 64])
    y = b.node("Relu", [b.batchnorm(b.conv(x, 4, 8, kernel=(5,), bias=False), 8)])
    y = b.batchnorm(b.conv(y, 8, 8, kernel=(3,), bias=False, dilations=[2], pads=[2, 2]), 8)
    b.output(y)
    return b.model("conv_no_bias")


def mlp_gemm_bn() -> onnx.ModelProto:
    """A tabular MLP: Gemm→BN with transB=1, with transB=0/alpha/beta, and with no C."""
    b = GraphBuilder(seed=3)
    x = b.input("features", ["batch", 20])
    h = b.node("Relu", [b.batchnorm(b.gemm(x, 20, 32), 32)])
    h = b.node("Relu", [b.batchnorm(b.gemm(h, 32, 16, trans_b=0, alpha=0.5, beta=2.0), 16)])
    out = b.batchnorm(b.gemm(h, 16, 3, bias=False), 3)
    b.output(out)
    return b.model("mlp_gemm_bn")


def refused_bn() -> onnx.ModelProto:
    """Three BNs that must stay, each for a different reason, next to one that folds."""
    b = GraphBuilder(seed=4)
    x = b.input("x", ["batch", 8, 16, 16])
    on_input = b.batchnorm(x, 8)  # nothing before it to fold into
    conv = b.conv(on_input, 8, 8)
    shared = b.batchnorm(conv, 8)  # the Conv output also feeds the Add below
    after_relu = b.batchnorm(b.node("Relu", [shared]), 8)  # a Relu is in the way
    folds = b.batchnorm(b.conv(after_relu, 8, 8), 8)
    b.output(b.node("Add", [folds, conv]))
    return b.model("refused_bn")


def legacy_opset9() -> onnx.ModelProto:
    """Opset 9 / IR 4 with BN parameters given as Constant nodes, as older exporters wrote."""
    b = GraphBuilder(seed=5)
    x = b.input("x", [1, 3, 16, 16])
    y = b.node("Relu", [b.batchnorm(b.conv(x, 3, 8), 8, constant_nodes=True)])
    y = b.batchnorm(b.conv(y, 8, 8, group=2), 8, constant_nodes=True)
    b.output(y)
    return b.model("legacy_opset9", opset=9, ir_version=4)


def classifier_head_bn() -> onnx.ModelProto:
    """A CNN classifier whose head normalizes *before* its linear layers, as
    BatchNorm → Flatten → Linear and BatchNorm1d → Linear heads do: no layer precedes
    those BNs (a Relu is in the way), so they fold forward into the next Gemm."""
    b = GraphBuilder(seed=6)
    x = b.input("image", ["batch", 3, 8, 8])
    features = b.node("Relu", [b.batchnorm(b.conv(x, 3, 8, strides=[2, 2]), 8)])
    flat = b.node("Flatten", [b.batchnorm(features, 8)])
    hidden = b.node("Relu", [b.gemm(flat, 8 * 4 * 4, 32)])
    b.output(b.gemm(b.batchnorm(hidden, 32), 32, 10))
    return b.model("classifier_head_bn")


def input_bn_conv() -> onnx.ModelProto:
    """Input normalization as a BN on the raw image, then an unpadded Conv → BN → Relu:
    the BN after the Conv folds backward into it, then the input BN forward."""
    b = GraphBuilder(seed=7)
    x = b.input("image", ["batch", 3, 16, 16])
    conv = b.conv(b.batchnorm(x, 3), 3, 8, pads=[0, 0, 0, 0])
    b.output(b.node("Relu", [b.batchnorm(conv, 8)]))
    return b.model("input_bn_conv")


def tf_style_decomposed() -> onnx.ModelProto:
    """BatchNormalization as tf2onnx writes Keras layers: Conv → Mul → Add by [C, 1, 1]
    constants, and a Dense (MatMul → Add) followed by Mul → Add by [C]. Every Mul and
    every BN Add folds; the Dense keeps one bias Add."""
    b = GraphBuilder(seed=6)
    x = b.input("image", ["batch", 3, 16, 16])

    def keras_batchnorm(y: str, shape: list[int]) -> str:
        scale = b.const("bn_multiplier", b.rng.uniform(0.5, 1.5, shape).astype(b.dtype))
        return b.node("Add", [b.node("Mul", [y, scale]), b.random("bn_offset", shape, scale=0.2)])

    y = b.node("Relu", [keras_batchnorm(b.conv(x, 3, 8, bias=False), [8, 1, 1])])
    y = b.node("Relu", [keras_batchnorm(b.conv(y, 8, 8, group=8, bias=False), [8, 1, 1])])
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [y])])
    dense = b.node("Add", [b.node("MatMul", [pooled, b.random("kernel", [8, 4])]), b.random("bias", [4], scale=0.1)])
    b.output(keras_batchnorm(dense, [4]))
    return b.model("tf_style_decomposed")


def convtranspose_decoder() -> onnx.ModelProto:
    """A small decoder: ConvTranspose → BN → Relu upsampling blocks (grouped, strided,
    with output_padding; with and without bias). Both BNs fold."""
    b = GraphBuilder(seed=7)
    x = b.input("latent", ["batch", 8, 4, 4])
    y = b.conv_transpose(x, 8, 8, group=2, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    y = b.node("Relu", [b.batchnorm(y, 8)])
    y = b.conv_transpose(y, 8, 3, kernel=(4, 4), bias=False, strides=[2, 2], pads=[1, 1, 1, 1])
    b.output(b.node("Sigmoid", [b.batchnorm(y, 3)]))
    return b.model("convtranspose_decoder")


SAMPLES: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn_residual": cnn_residual,
    "conv_no_bias": conv_no_bias,
    "mlp_gemm_bn": mlp_gemm_bn,
    "refused_bn": refused_bn,
    "legacy_opset9": legacy_opset9,
    "classifier_head_bn": classifier_head_bn,
    "input_bn_conv": input_bn_conv,
    "tf_style_decomposed": tf_style_decomposed,
    "convtranspose_decoder": convtranspose_decoder,
}


def write_samples(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in SAMPLES.items():
        path = folder / f"{name}.onnx"
        onnx.save_model(build(), str(path))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for written_path in write_samples(target):
        print(written_path)
