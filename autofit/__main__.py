"""`python -m autofit ...` (what `accelerate launch -m autofit` and `torchrun -m autofit` run): the CLI."""

from autofit.cli import main

main()
