"""Results directories: records.jsonl, manifest.json, summary.csv; reading, repair, merge, lock.

Contract: a run directory holds ``records.jsonl`` (one JSON object per line; each finished
case appends its ``metric`` / ``series`` / ``info`` records and last a ``case`` record, in
one write, flushed and fsynced; a write that fails, e.g. on a full disk, is cut back to the
last whole case), ``manifest.json`` (schema, suite, git sha, versions, device, seed, command)
and ``summary.csv`` (one row per scalar metric). Manifest and summary are written atomically
(temp file + fsync + rename; a special file such as /dev/null is written in place). A case
without its ``case`` record (a run killed while writing) does not count: ``read_records``
drops it and a torn last line (no newline), and ``repair`` rewrites the file without them,
so ``--resume`` reruns exactly the unfinished cases.

Readers validate what they read and raise ``ResultsError`` naming the file (and line): the
manifest is a JSON object whose ``schema`` is one this code reads (``READABLE_SCHEMAS``);
every record is a UTF-8 JSON object with ``type``, ``model``, ``kv_dtype``, ``check`` as
strings and the keys its type needs (``REQUIRED``), of the right types.

One writer at a time: ``RunLock(dir)`` holds an exclusive ``fcntl.flock`` on ``<dir>/.lock``
for as long as it is entered; a second process is refused with the holder's pid (the OS
drops the lock when its holder dies, even by SIGKILL). ``merge`` joins shard directories
under that lock, refuses an ``--out`` that holds a run unless ``force`` (and then names what
it replaced), and writes ``manifest.json`` last: it is the commit point of the merged run.

    res = load_results("results/kv-dtype-smollm2-135m")
    df = res.metrics()          # pandas DataFrame of metric records
    with RunLock("results/x"):  # around a whole run of the same directory
        ...
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .errors import ResultsError

RECORDS, MANIFEST, SUMMARY, LOCK = "records.jsonl", "manifest.json", "summary.csv", ".lock"
SCHEMA = 1                      # what the runner writes
READABLE_SCHEMAS = (1,)         # what these readers understand
FIX_CORRUPT = "the file was edited or corrupted; restore it or start a new run"
SUMMARY_COLUMNS = ["model", "kv_dtype", "check", "kind", "metric", "value", "unit", "better",
                   "threshold", "op", "passed", "skipped", "status"]
PACKAGES = ("torch", "triton", "numpy", "gguf", "tokenizers", "jinja2", "pandas", "matplotlib",
            "rich", "transformers", "kvbench")


def case_key(rec: dict) -> tuple[str, str, str]:
    return rec["model"], rec["kv_dtype"], rec["check"]


# -- writing -----------------------------------------------------------------------------

def nothing_measured(statuses) -> bool:
    """True when a run's cases are all ``n/a`` (or there are none): nothing was measured, so
    nothing passed. The CLI's verdict and the report both read it from here."""
    return all(s == "n/a" for s in statuses)


def _named(exc: OSError, path) -> OSError:
    """``exc`` naming ``path`` (the file the user asked for), not a temp file or nothing."""
    exc.filename, exc.filename2 = str(path), None
    return exc


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory + fsync + rename, so a
    crash or a full disk leaves the old file or the new one, never a torn one. A path that is
    a directory is refused (EISDIR); an existing special file (/dev/null, a FIFO) is written in
    place, as a rename would replace the device node itself. An ``OSError`` names ``path``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if path.exists() and not path.is_file():
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            return
        except OSError as e:
            raise _named(e, path) from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise _named(e, path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _named(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RecordWriter:
    """Appends one finished case at a time to records.jsonl, durable before returning."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / RECORDS
        self.fh = open(self.path, "a", encoding="utf-8")

    def write_case(self, records: list[dict]) -> None:
        """Append one case (its records, ``case`` last) durably; if the write fails (a full
        disk), cut the file back to where it was, so no partial case is left behind."""
        assert records and records[-1]["type"] == "case", "a case ends with its case record"
        data = "".join(json.dumps(r, allow_nan=True, ensure_ascii=False) + "\n" for r in records)
        self.fh.flush()
        start = os.fstat(self.fh.fileno()).st_size
        try:
            self.fh.write(data)
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except OSError as e:
            self._cut_back(start)
            raise _named(e, self.path) from None

    def _cut_back(self, size: int) -> None:
        try:
            self.fh.close()      # drops what the failed flush left buffered (it may raise again)
        except OSError:
            pass
        try:
            os.truncate(self.path, size)
        except OSError:
            pass                 # the reader still drops an unfinished case and a torn line
        self.fh = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self.fh.close()


# -- reading -----------------------------------------------------------------------------

_STR = (str,)
_OPT_STR = (str, type(None))
_NUM = (int, float, type(None))
# keys every record holds, then the keys (and their types) each record type needs
COMMON = {"type": _STR, "model": _STR, "kv_dtype": _STR, "check": _STR}
REQUIRED = {
    "case": {"status": _STR},
    "metric": {"metric": _STR},
    "series": {"name": _STR, "values": (list,)},
    "info": {"info": (dict,)},
}
# optional keys whose type readers rely on (compare joins failures; report prints them)
OPTIONAL = {
    "case": {"failures": (list,), "unmeasured": (list,), "error": _OPT_STR, "reason": _OPT_STR},
    "metric": {"threshold": _NUM, "passed": (bool, type(None)),
               "better": _OPT_STR, "unit": _OPT_STR, "op": _OPT_STR},
}


def _type_names(types: tuple) -> str:
    names = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object",
             bool: "true/false", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def validate_record(rec, where: str) -> dict:
    """``rec`` if it is a well-formed record, else ``ResultsError`` naming ``where`` (file:line)."""
    if not isinstance(rec, dict):
        raise ResultsError(f"{where}: a record must be a JSON object, got {type(rec).__name__}", FIX_CORRUPT)
    kind = rec.get("type")
    need = {**COMMON, **REQUIRED.get(kind, {})} if isinstance(kind, str) else COMMON
    for key, types in need.items():
        if key not in rec:
            raise ResultsError(f"{where}: {kind or 'a'} record lacks the key {key!r} (a kvbench record "
                               f"holds {', '.join(need)})", FIX_CORRUPT)
        if not isinstance(rec[key], types) or isinstance(rec[key], bool) and bool not in types:
            raise ResultsError(f"{where}: {key!r} must be {_type_names(types)}, got {rec[key]!r:.60}",
                               FIX_CORRUPT)
    for key, types in OPTIONAL.get(kind, {}).items():
        v = rec.get(key)
        if key in rec and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
            raise ResultsError(f"{where}: {key!r} must be {_type_names(types)}, got {v!r:.60}", FIX_CORRUPT)
    if kind == "case":
        for key in ("failures", "unmeasured"):
            if any(not isinstance(x, str) for x in rec.get(key) or []):
                raise ResultsError(f"{where}: {key!r} must be a list of strings", FIX_CORRUPT)
    return rec


def read_records(run_dir: str | Path) -> list[dict]:
    """Records of finished cases, in file order (unfinished cases and a torn last line, one
    without its newline, dropped). Any other line that is not UTF-8, not JSON or not a valid
    record is a ``ResultsError`` naming the file and line."""
    path = Path(run_dir) / RECORDS
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()          # b"" when the file ends with a newline, else the torn tail
    recs = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ResultsError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})",
                               FIX_CORRUPT) from None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}:{i}: not a JSON record ({e.msg} at column {e.colno})",
                               FIX_CORRUPT) from None
        recs.append(validate_record(rec, f"{path}:{i}"))
    del torn                    # an interrupted write: its case has no case record either
    done = {case_key(r) for r in recs if r["type"] == "case"}
    return [r for r in recs if case_key(r) in done]


def repair(run_dir: str | Path) -> list[dict]:
    """Drop unfinished cases from records.jsonl (atomically); returns the records kept."""
    recs = read_records(run_dir)
    path = Path(run_dir) / RECORDS
    if path.is_file():
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return recs


@dataclass
class Results:
    dir: Path
    manifest: dict
    records: list[dict]
    replaced: str | None = None      # merge --force: what the directory held before

    def of_type(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("type") == kind]

    def metrics(self):
        import pandas as pd
        rows = self.of_type("metric")
        df = pd.DataFrame.from_records(rows)
        if df.empty:
            df = pd.DataFrame(columns=SUMMARY_COLUMNS)
        return df

    def cases(self) -> list[dict]:
        return self.of_type("case")

    def series(self, model: str, kv_dtype: str, check: str) -> dict[str, list]:
        return {r["name"]: r["values"] for r in self.of_type("series")
                if case_key(r) == (model, kv_dtype, check)}

    def info(self, model: str, kv_dtype: str, check: str) -> dict:
        for r in self.of_type("info"):
            if case_key(r) == (model, kv_dtype, check):
                return r["info"]
        return {}

    @property
    def name(self) -> str:
        return self.manifest.get("run") or self.dir.name


def read_manifest(path: str | Path) -> dict:
    """``manifest.json`` at ``path``, validated: UTF-8 JSON, an object, a readable ``schema``,
    and the types of the keys readers use (``suite``, ``matrix``, ``run``)."""
    mpath = Path(path)
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ResultsError(f"{mpath}: not UTF-8 text (byte at offset {e.start})", FIX_CORRUPT) from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{mpath}:{e.lineno}: not valid JSON ({e.msg})", FIX_CORRUPT) from None
    if not isinstance(manifest, dict):
        raise ResultsError(f"{mpath}: a manifest must be a JSON object, got {type(manifest).__name__}",
                           FIX_CORRUPT)
    schema = manifest.get("schema")
    if "schema" not in manifest:
        raise ResultsError(f"{mpath}: no 'schema' key: not a kvbench manifest",
                           "pass a directory written by `python -m harness run`")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema not in READABLE_SCHEMAS:
        newer = isinstance(schema, int) and not isinstance(schema, bool) and schema > max(READABLE_SCHEMAS)
        raise ResultsError(f"{mpath}: results schema {schema!r} is "
                           + ("newer than this kvbench reads" if newer else "not a kvbench schema")
                           + f" (readable: {', '.join(map(str, READABLE_SCHEMAS))})",
                           "read it with the kvbench version that wrote it" if newer else FIX_CORRUPT)
    for key, types in {"suite": (dict,), "matrix": (dict,), "run": _OPT_STR, "shard": _OPT_STR}.items():
        if key in manifest and not isinstance(manifest[key], types):
            raise ResultsError(f"{mpath}: {key!r} must be {_type_names(types)}, got {manifest[key]!r:.60}",
                               FIX_CORRUPT)
    for key in ("models", "dtypes", "checks"):
        v = (manifest.get("matrix") or {}).get(key)
        if v is not None and (not isinstance(v, list) or any(not isinstance(x, str) for x in v)):
            raise ResultsError(f"{mpath}: 'matrix.{key}' must be a list of strings, got {v!r:.60}", FIX_CORRUPT)
    return manifest


def load_results(run_dir: str | Path) -> Results:
    d = Path(run_dir)
    if not d.is_dir():
        what = "is a file, not a results directory" if d.exists() else "does not exist"
        raise ResultsError(f"results directory {d} {what}", "pass a directory written by "
                           "`python -m harness run`")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ResultsError(f"{d} has no {MANIFEST}: not a kvbench results directory",
                           "pass a directory written by `python -m harness run`")
    return Results(d, read_manifest(mpath), read_records(d))


# -- manifest and summary ----------------------------------------------------------------

def git_info(cwd: str | Path | None = None) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    sha = git("rev-parse", "HEAD")
    return {"sha": sha or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if sha else None, "branch": git("rev-parse", "--abbrev-ref", "HEAD") or None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def device_info(device: str) -> dict:
    info = {"requested": device, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor() or None
    try:
        import torch
        if torch.cuda.is_available():
            idx = torch.device(device).index or 0 if device.startswith("cuda") else 0
            props = torch.cuda.get_device_properties(idx)
            info["gpu"] = props.name
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 2)
            info["cuda"] = torch.version.cuda
    except Exception:   # device description is best effort; the run itself checks the device
        pass
    return info


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- which process measured a case ---------------------------------------------------------------
# A resumed run holds cases measured by several processes, possibly on other commits or machines
# (a nightly shard resumed over days): speeds from different ones are not comparable, and the
# report must say so rather than set them side by side as if one run had measured them.

# Variables outside kvbench's own settings that change what a run measures: the CUDA allocator's
# configuration (memory figures), thread counts and OpenMP's wait policy (speeds), the GPU chosen.
RUNTIME_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
               "MKL_NUM_THREADS")


def runtime_env() -> dict:
    """The ``RUNTIME_ENV`` variables set in this process (unset ones left out)."""
    return {k: os.environ[k] for k in RUNTIME_ENV if k in os.environ}


def process_identity(device_info_: dict, git: dict | None = None) -> dict:
    """This process, as each case record names it (``process``): pid, start, git sha and
    whether the tree was dirty, host name, GPU and the ``runtime_env`` it ran under."""
    import socket
    git = git_info() if git is None else git
    return {"pid": os.getpid(), "started": now(), "git": git.get("sha"), "dirty": git.get("dirty"),
            "host": socket.gethostname(), "gpu": device_info_.get("gpu"), "cpu": device_info_.get("cpu"),
            "env": runtime_env()}


def case_origin(manifest: dict, case: dict) -> dict:
    """Which process measured ``case``: its own ``process`` tag (records written since the
    twenty-first session), or for older records the session of the run in force when the case
    finished (the run's start or one of its ``resumed`` entries, by time), whose git is known but
    not the host. Adds ``key`` (equal keys: comparable) and ``label``."""
    p = case.get("process")
    if isinstance(p, dict) and p.get("pid") is not None:
        o = dict(p)
        # a dirty tree's contents are not named by its sha: only the same process vouches for them
        env = tuple(sorted((o.get("env") or {}).items()))
        o["key"] = (o.get("git"), bool(o.get("dirty")), o.get("host"), o.get("gpu"), env,
                    (o.get("pid"), o.get("started")) if o.get("dirty") or not o.get("git") else None)
    else:
        sessions = [{"at": manifest.get("started"), "git": manifest.get("git") or {}}]
        sessions += [r for r in manifest.get("resumed") or [] if isinstance(r, dict)]
        fin = str(case.get("finished") or "")
        cur = sessions[0]
        for s in sessions:
            if s.get("at") and fin and str(s["at"]) <= fin:
                cur = s
        g = cur.get("git") or {}
        o = {"git": g.get("sha"), "dirty": g.get("dirty"), "host": None, "gpu": None,
             "started": cur.get("at"), "session": True}
        o["key"] = ("session", cur.get("at"))
    sha = (o.get("git") or "no git")[:7] + ("+dirty" if o.get("dirty") else "")
    where = f" on {o['host']}" if o.get("host") else ""
    where += f" ({o['gpu']})" if o.get("gpu") else ""
    where += "".join(f", {k}={v}" for k, v in sorted((o.get("env") or {}).items()))
    o["label"] = (f"git {sha}{where}, " + ("run session started " if o.get("session") else "process started ")
                  + str(o.get("started")))
    return o


def origins_note(manifest: dict, cases: dict) -> str | None:
    """One line for a table whose rows (``cases``: row label -> case record) were measured by more
    than one process: bold "not comparable" where the code, the machine or the runtime environment
    differ (or cannot be told apart: older records, dirty trees), a plain note where only the
    process did (a resumed run, same clean commit, machine and environment). None when one process
    measured them all."""
    origins = {row: case_origin(manifest, c) for row, c in cases.items() if c is not None}
    if (len({o["key"] for o in origins.values()}) <= 1
            and len({(o.get("pid"), o.get("started")) for o in origins.values()}) <= 1):
        return None
    groups: dict = {}
    for row, o in origins.items():
        groups.setdefault(o["label"], []).append(str(row))
    where = "; ".join(f"{', '.join(rows)}: {label}" for label, rows in groups.items())
    if len({o["key"] for o in origins.values()}) > 1:
        return (f"**Rows not comparable**: measured by different processes of this (resumed) run whose "
                f"code, machine or runtime environment differ or cannot be shown equal ({where}). A speed "
                f"difference between them may be those, not the KV dtype.")
    return (f"Rows measured by different processes of this resumed run, same clean commit, machine and "
            f"runtime environment ({where}).")


def write_manifest(run_dir: str | Path, manifest: dict) -> None:
    atomic_write(Path(run_dir) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def write_summary(run_dir: str | Path, records: list[dict]) -> None:
    status = {case_key(r): r["status"] for r in records if r.get("type") == "case"}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        if r.get("type") == "metric":
            w.writerow({**r, "status": status.get(case_key(r))})
    atomic_write(Path(run_dir) / SUMMARY, buf.getvalue())


# -- the lock ----------------------------------------------------------------------------

class RunLock:
    """Exclusive, non-blocking ``fcntl.flock`` on ``<run_dir>/.lock`` for one writer of a
    results directory (the directory is created if needed). Entered while another process
    holds it: ``ResultsError`` naming the holder's pid and the fix. The lock file holds the
    holder's pid, start time and command; it is left in place (deleting it would let a third
    process lock a new inode while the first still runs). The OS releases the lock when its
    holder exits or dies, so a killed run never leaves the directory locked.

        with RunLock(out_dir):
            ...   # prepare the directory, run every case, write the manifest
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK
        self.fd: int | None = None

    def holder(self) -> str:
        """What the lock file says about its holder ("pid 123 since ..."), or "unknown"."""
        try:
            first = self.path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0].split()
        except OSError:
            return "unknown"
        return f"pid {first[0]} since {first[1]}" if len(first) >= 2 else "unknown"

    def __enter__(self) -> "RunLock":
        if self.dir.exists() and not self.dir.is_dir():
            raise ResultsError(f"results directory {self.dir} is a file, not a directory",
                               "pass a directory path as --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = self.holder()
            pid = who.split()[1] if who.startswith("pid ") else None
            raise ResultsError(f"{self.dir} is in use by another kvbench process ({who}; lock {self.path})",
                               "wait for it to finish" + (f", or stop it (kill {pid})" if pid else "")
                               + ", or pass another --out; two writers would lose records") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {now()} {' '.join(sys.argv)}\n".encode("utf-8", "replace"))
        except OSError:
            pass                 # the lock holds without the note (e.g. a full disk)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        return False


# -- merge -------------------------------------------------------------------------------

def describe_run(d: str | Path) -> str:
    """A short description of the run in ``d`` (cases, suite, start), for a replace message."""
    d = Path(d)
    try:
        res = load_results(d)
    except ResultsError as e:
        return f"an unreadable run ({str(e)[:80]})"
    suite = (res.manifest.get("suite") or {}).get("path") or "unknown suite"
    return f"{len(res.cases())} cases of {suite}, started {res.manifest.get('started') or 'unknown'}"


def holds_run(d: Path) -> bool:
    return (d / MANIFEST).exists() or (d / RECORDS).exists()


def merge(dirs: list[str | Path], out: str | Path, force: bool = False) -> Results:
    """Join shard directories of one suite into ``out`` (first occurrence of a case wins).
    ``out`` must not hold a run unless ``force``; then that run's files (records, manifest,
    summary, errors/) are removed first and ``Results.replaced`` describes what they held."""
    if len(dirs) < 1:
        raise ResultsError("merge needs at least one results directory")
    parts = [load_results(d) for d in dirs]
    sha = {(p.manifest.get("suite") or {}).get("sha256") for p in parts}
    if len(sha) > 1:
        raise ResultsError(f"cannot merge runs of different suites ({', '.join(str(p.dir) for p in parts)})",
                           "merge only shards of one suite file")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ResultsError(f"merge --out {out} is a file, not a directory", "pass a directory path as --out")
    if any(out.resolve() == p.dir.resolve() for p in parts):
        raise ResultsError(f"merge output {out} is one of its inputs", "pass a new --out directory")
    with RunLock(out):
        replaced = None
        if holds_run(out):
            if not force:
                raise ResultsError(f"merge --out {out} already holds a run ({describe_run(out)})",
                                   "pass --force to replace it, or a new --out directory")
            replaced = describe_run(out)
            # the manifest goes first: a crash below leaves a directory no reader trusts
            for name in (MANIFEST, RECORDS, SUMMARY):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "errors", ignore_errors=True)
        res = _merge_into(parts, out)
        res.replaced = replaced
        return res


def _merge_into(parts: list["Results"], out: Path) -> "Results":
    seen, records, dup = set(), [], []
    for p in parts:
        for key in dict.fromkeys(case_key(r) for r in p.records):
            if key in seen:
                dup.append(key)
                continue
            seen.add(key)
            records += [r for r in p.records if case_key(r) == key]
    order = _matrix_order(parts[0].manifest)
    records.sort(key=lambda r: order.get(case_key(r), len(order)))
    atomic_write(out / RECORDS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_summary(out, records)
    manifest = dict(parts[0].manifest)
    manifest.update(run=out.name, shard=None, merged_from=[
        {"dir": str(p.dir), "shard": p.manifest.get("shard"), "git": p.manifest.get("git"),
         "started": p.manifest.get("started"), "finished": p.manifest.get("finished"),
         "cases": len(p.cases())} for p in parts], duplicates_dropped=[list(k) for k in dup],
        command=" ".join(sys.argv))
    write_manifest(out, manifest)          # last: the commit point of the merged run
    return Results(out, manifest, records)


def _matrix_order(manifest: dict) -> dict:
    m = manifest.get("matrix") or {}
    keys = [(mo, d, c) for mo in m.get("models", []) for d in m.get("dtypes", [])
            for c in m.get("checks", [])]
    return {k: i for i, k in enumerate(keys)}


def add_cli_args(parser) -> None:
    parser.add_argument("dirs", nargs="+", help="results directories (shards of one suite)")
    parser.add_argument("--out", required=True, help="directory to write the merged run into "
                        "(must not hold a run, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace a run that --out already holds")


def main(args) -> int:
    res = merge(args.dirs, args.out, force=args.force)
    if res.replaced:
        print(f"replaced the run in {res.dir} ({res.replaced})")
    print(f"merged {len(args.dirs)} runs, {len(res.cases())} cases -> {res.dir}")
    return 0
