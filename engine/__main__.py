"""``python -m engine``: the engine's command line (bench, plan, generate)."""
import sys

from .cli import main

sys.exit(main())
