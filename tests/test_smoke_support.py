"""The shared helper itself: a Conv→BN model folds to one Conv and stays equivalent."""

from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count


def test_conv_bn_folds_through_support_helper() -> None:
    b = GraphBuilder(seed=0)
    x = b.input("x", [2, 3, 8, 8])
    b.output(b.batchnorm(b.conv(x, 3, 4), 4))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 0
    assert op_count(check.folded, "Conv") == 1
    assert len(check.outcome.folds) == 1 and not check.outcome.left
