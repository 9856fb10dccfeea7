"""benchmarks/profile_load.py: a real load of a synthetic model under cProfile writes its wall
time, the file's size and the profile's top functions (engine.load among them); a model that
does not exist is one line and exit 2."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from engine import synth

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_load.py"


def _mod():
    spec = importlib.util.spec_from_file_location("profile_load", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_load_writes_the_load_and_its_top_functions(tmp_path, capsys):
    out = tmp_path / "load.json"
    assert _mod().main(["--model", "tiny-llama", "--device", "cpu", "--top", "40", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["file_bytes"] == synth.ensure("tiny-llama").stat().st_size
    assert doc["load_s"] > 0 and doc["device"] == "cpu" and doc["weight_format"] == "f32"
    names = [r["function"] for r in doc["top_cumulative"]]
    assert any("(load)" in n for n in names), names             # engine.load is what was profiled
    assert (tmp_path / "load.json.prof").stat().st_size > 0
    assert "loaded in" in capsys.readouterr().out


def test_profile_load_of_an_unknown_model_is_one_line_and_exit_2(capsys):
    assert _mod().main(["--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model 'no-such-model'")
