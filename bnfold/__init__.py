"""bnfold: fold BatchNormalization into neighbouring ONNX layers and prove the result equivalent.

The Python API (the command ``bnfold`` is a thin layer over it)::

    import bnfold
    result = bnfold.fold(model)          # an onnx.ModelProto (left unmodified) or a path
    result.model                         # the folded ModelProto
    result.report.passed                 # verified equivalent in onnxruntime
    report = bnfold.check(original, folded)

Errors are raised as :class:`InputError` (a bad model or option), :class:`RuntimeFailure`
(onnxruntime cannot run the model) and, with ``raise_on_mismatch=True``,
:class:`NotEquivalent`; all are :class:`BnfoldError` and carry the message the command prints.
``bnfold.fold`` is the function: the fold driver's module is imported as ``from bnfold.fold import ...``.
"""

from bnfold.api import FoldResult, check, fold
from bnfold.errors import BnfoldError, InputError, NotEquivalent, RuntimeFailure
from bnfold.pipeline import CheckReport, FoldReport

__all__ = [
    "BnfoldError",
    "CheckReport",
    "FoldReport",
    "FoldResult",
    "InputError",
    "NotEquivalent",
    "RuntimeFailure",
    "check",
    "fold",
]
