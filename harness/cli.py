"""``python -m harness``: run / report / compare / merge, with honest exit codes.

Contract: each command is a module exposing ``add_cli_args(parser)`` and ``main(args) -> int``
(runner, report, compare, results). Exit codes: 0 everything passed, 1 a threshold failed
(or ``compare`` found a regression, or the two runs' suites differ), 2 bad input
(``error: <one line>`` on stderr, no traceback: any ``EngineError``, which includes
``HarnessError``, e.g. ``compare`` of runs whose numerics-changing settings differ without
``--allow-settings-change``; a command-line value argparse refuses; an unwritable, read-only, full or
file-occupied path, see ``engine.cli.run_guarded``), 3 an unexpected exception (one line
naming a saved traceback file), 130 interrupted (finished cases are kept; rerun with
``--resume``), 141 stdout closed early (``compare ... | head``: quiet, like any Unix tool
that SIGPIPE ends).

    python -m harness run suites/kv_dtype.toml --model smollm2-135m --report
    python -m harness compare results/base results/head --out diff.md
"""
from __future__ import annotations

import argparse

from engine.cli import Parser, run_guarded

from . import compare, report, results, runner

INTERRUPTED = "interrupted: finished cases are kept; rerun with --resume to continue"

COMMANDS = {
    "run": (runner, "run a suite over its matrix of models x KV dtypes x checks"),
    "report": (report, "build reports/<run>/report.md (+ PNGs) from a results directory"),
    "compare": (compare, "markdown diff of two results directories; exit 1 on regressions"),
    "merge": (results, "join shard results directories into one"),
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m harness", description="kvbench harness: declarative "
                                "suites over the engine, results, reports")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        mod.add_cli_args(sp)
        sp.set_defaults(_main=mod.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args._main, args, interrupted=INTERRUPTED)
