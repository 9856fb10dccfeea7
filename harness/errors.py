"""Harness errors: bad suites, bad results dirs, bad command lines; one-line messages.

Contract: every user-facing harness failure is a ``HarnessError`` (an ``EngineError``, so
the CLI handles engine and harness mistakes the same way: ``error: <one line>`` on stderr,
exit code 2). ``SuiteError`` names the suite file, the key path inside it, what was wrong
and what is allowed.

    from harness.errors import SuiteError
    raise SuiteError("suites/x.toml", "check[1].top_k", "must be >= 1, got 0")
"""
from __future__ import annotations

from engine.errors import EngineError


class HarnessError(EngineError):
    """Base class of harness errors (bad input: CLI exit code 2)."""


class SuiteError(HarnessError):
    """A suite file that cannot be read or does not describe a runnable suite."""

    def __init__(self, path, key: str | None, problem: str, allowed: str | None = None):
        self.path, self.key = str(path), key
        where = f"{path}: {key}" if key else f"{path}"
        msg = f"{where}: {problem}"
        if allowed:
            msg += f" (allowed: {allowed})"
        super().__init__(msg)


class ResultsError(HarnessError):
    """A results directory that is missing, unreadable, or does not match the request."""


class UsageError(HarnessError):
    """A command-line value that cannot be used (bad --shard, missing directory, ...)."""
