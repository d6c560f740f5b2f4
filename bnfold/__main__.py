"""``python -m bnfold`` runs the same command as ``bnfold``."""

from bnfold.cli import run

run()
