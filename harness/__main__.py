"""Entry point: ``python -m harness COMMAND ...`` (see ``harness.cli``)."""
import sys

try:
    from .cli import main
except Exception as exc:  # noqa: BLE001  a malformed KVBENCH_* setting raises while the package imports
    if type(exc).__module__ in ("engine.errors", "harness.errors"):
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    raise

sys.exit(main())
