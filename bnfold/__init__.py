"""bnfold: fold BatchNormalization into neighbouring ONNX layers and prove the result equivalent."""

from bnfold.fold import FoldOutcome, fold_batchnorms
from bnfold.options import VerifyOptions
from bnfold.pipeline import FoldOptions, check_files, fold_file

__all__ = ["FoldOptions", "FoldOutcome", "VerifyOptions", "check_files", "fold_batchnorms", "fold_file"]
