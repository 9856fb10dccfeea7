"""Results directories: records.jsonl, manifest.json, summary.csv; reading, repair, merge.

Contract: a run directory holds ``records.jsonl`` (one JSON object per line; each finished
case appends its ``metric`` / ``series`` / ``info`` records and last a ``case`` record, in
one write, flushed and fsynced), ``manifest.json`` (suite, git sha, versions, device, seed,
command) and ``summary.csv`` (one row per scalar metric). Manifest and summary are written
atomically (temp file + rename). A case without its ``case`` record (a run killed while
writing) does not count: ``read_records`` drops it and ``repair`` rewrites the file without
it, so ``--resume`` reruns exactly the unfinished cases. ``merge`` joins shard directories.

    res = load_results("results/kv-dtype-smollm2-135m")
    df = res.metrics()          # pandas DataFrame of metric records
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .errors import ResultsError

RECORDS, MANIFEST, SUMMARY = "records.jsonl", "manifest.json", "summary.csv"
SCHEMA = 1
SUMMARY_COLUMNS = ["model", "kv_dtype", "check", "kind", "metric", "value", "unit", "better",
                   "threshold", "op", "passed", "skipped", "status"]
PACKAGES = ("torch", "triton", "numpy", "gguf", "tokenizers", "jinja2", "pandas", "matplotlib",
            "rich", "transformers", "kvbench")


def case_key(rec: dict) -> tuple[str, str, str]:
    return rec["model"], rec["kv_dtype"], rec["check"]


# -- writing -----------------------------------------------------------------------------

def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RecordWriter:
    """Appends one finished case at a time to records.jsonl, durable before returning."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / RECORDS
        self.fh = open(self.path, "a", encoding="utf-8")

    def write_case(self, records: list[dict]) -> None:
        assert records and records[-1]["type"] == "case", "a case ends with its case record"
        self.fh.write("".join(json.dumps(r, allow_nan=True, ensure_ascii=False) + "\n" for r in records))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# -- reading -----------------------------------------------------------------------------

def read_records(run_dir: str | Path) -> list[dict]:
    """Records of finished cases, in file order (unfinished cases and a torn last line dropped)."""
    path = Path(run_dir) / RECORDS
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    recs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:      # torn final write of an interrupted run
                break
            raise ResultsError(f"{path}:{i + 1}: not a JSON record", "the file was edited or corrupted; "
                               "restore it or start a new run") from None
    done = {case_key(r) for r in recs if r.get("type") == "case"}
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


def load_results(run_dir: str | Path) -> Results:
    d = Path(run_dir)
    if not d.is_dir():
        raise ResultsError(f"results directory {d} does not exist", "pass a directory written by "
                           "`python -m harness run`")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ResultsError(f"{d} has no {MANIFEST}: not a kvbench results directory",
                           "pass a directory written by `python -m harness run`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsError(f"{mpath}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return Results(d, manifest, read_records(d))


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


# -- merge -------------------------------------------------------------------------------

def merge(dirs: list[str | Path], out: str | Path) -> Results:
    """Join shard directories of one suite into ``out`` (first occurrence of a case wins)."""
    if len(dirs) < 1:
        raise ResultsError("merge needs at least one results directory")
    parts = [load_results(d) for d in dirs]
    sha = {p.manifest.get("suite", {}).get("sha256") for p in parts}
    if len(sha) > 1:
        raise ResultsError(f"cannot merge runs of different suites ({', '.join(str(p.dir) for p in parts)})",
                           "merge only shards of one suite file")
    out = Path(out)
    if any(out.resolve() == p.dir.resolve() for p in parts):
        raise ResultsError(f"merge output {out} is one of its inputs", "pass a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
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
    manifest = dict(parts[0].manifest)
    manifest.update(run=out.name, shard=None, merged_from=[
        {"dir": str(p.dir), "shard": p.manifest.get("shard"), "git": p.manifest.get("git"),
         "started": p.manifest.get("started"), "finished": p.manifest.get("finished"),
         "cases": len(p.cases())} for p in parts], duplicates_dropped=[list(k) for k in dup],
        command=" ".join(sys.argv))
    write_manifest(out, manifest)
    write_summary(out, records)
    return Results(out, manifest, records)


def _matrix_order(manifest: dict) -> dict:
    m = manifest.get("matrix") or {}
    keys = [(mo, d, c) for mo in m.get("models", []) for d in m.get("dtypes", [])
            for c in m.get("checks", [])]
    return {k: i for i, k in enumerate(keys)}


def add_cli_args(parser) -> None:
    parser.add_argument("dirs", nargs="+", help="results directories (shards of one suite)")
    parser.add_argument("--out", required=True, help="directory to write the merged run into")


def main(args) -> int:
    res = merge(args.dirs, args.out)
    print(f"merged {len(args.dirs)} runs, {len(res.cases())} cases -> {res.dir}")
    return 0
