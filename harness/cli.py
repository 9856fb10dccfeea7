"""``python -m harness``: run / report / compare / merge, with honest exit codes.

Contract: each command is a module exposing ``add_cli_args(parser)`` and ``main(args) -> int``
(runner, report, compare, results). Exit codes: 0 everything passed, 1 a threshold failed
(or ``compare`` found a regression), 2 bad input (``error: <one line>`` on stderr, no
traceback: any ``EngineError``, which includes ``HarnessError``), 3 an unexpected exception
(one line naming a saved traceback file), 130 interrupted (finished cases are kept; rerun
with ``--resume``).

    python -m harness run suites/kv_dtype.toml --model smollm2-135m --report
    python -m harness compare results/base results/head --out diff.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback

from engine.errors import EngineError

from . import compare, report, results, runner

COMMANDS = {
    "run": (runner, "run a suite over its matrix of models x KV dtypes x checks"),
    "report": (report, "build reports/<run>/report.md (+ PNGs) from a results directory"),
    "compare": (compare, "markdown diff of two results directories; exit 1 on regressions"),
    "merge": (results, "join shard results directories into one"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description="kvbench harness: declarative "
                                "suites over the engine, results, reports")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        mod.add_cli_args(sp)
        sp.set_defaults(_main=mod.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._main(args))
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cases are kept; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line here, the traceback in a file
        with tempfile.NamedTemporaryFile("w", prefix="kvbench-traceback-", suffix=".txt",
                                         delete=False) as fh:
            fh.write(traceback.format_exc())
        print(f"internal error: {type(e).__name__}: {e} (traceback: {fh.name})", file=sys.stderr)
        return 3
