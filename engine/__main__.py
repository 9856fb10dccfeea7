"""``python -m engine``: the engine's command line (bench, plan, generate)."""
import sys

try:
    from .cli import main
except Exception as exc:  # noqa: BLE001  a malformed KVBENCH_* setting raises while the package imports
    if type(exc).__module__ in ("engine.errors", "harness.errors"):
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    raise

sys.exit(main())
