"""`python -m sparsecc` runs the CLI."""

from .cli import main

main()
