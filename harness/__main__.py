"""Entry point: ``python -m harness COMMAND ...`` (see ``harness.cli``)."""
import sys

from .cli import main

sys.exit(main())
