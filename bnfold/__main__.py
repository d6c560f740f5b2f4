"""``python -m bnfold`` runs the same command as ``bnfold``."""

from bnfold.cli import main

main(prog_name="bnfold")
