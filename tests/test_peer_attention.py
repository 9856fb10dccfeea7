"""benchmarks/peer_attention.py's arithmetic on ncu's CSV (no GPU here): the parse, the decode
tokens cut out of a llama-bench run, kvbench's marker groups, and the refusals where the launches
do not split; attnbench-synth's geometry is the one the benchmark prices bytes at."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peer_attention as pa  # noqa: E402


def _csv(kernels: list[tuple[str, float]], noise: str = "") -> str:
    """ncu ``--csv --page raw --print-units base`` as it prints: program lines, a header, a units row."""
    head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","gpu__time_duration.sum"'
    units = '"","","","","","","","nsecond"'
    rows = [f'"{i}","77","llama-bench","h","{name}","1","7","{ns:,.0f}"' for i, (name, ns) in enumerate(kernels)]
    return "\n".join([noise, "==PROF== Connected to process 77", head, units, *rows]) + "\n"


VEC = "void flash_attn_ext_vec<128, 1, (ggml_type)8, (ggml_type)8, false>(const char *, const char *, float, int)"
COMB = "void flash_attn_combine_results<128>(const float *, const float2 *, float *, int)"
PRE = "void flash_attn_ext_f16<128, 128, 64, 1, false, false>(const char *, float, int)"


def test_parse_skips_program_output_and_units_row():
    text = _csv([(VEC, 12345.0), (COMB, 2100.0)], noise='{"model": "x", "n_gen": 4}')
    ks = pa.ncu_kernels(text)
    assert [k["id"] for k in ks] == [0, 1]
    assert [k["ns"] for k in ks] == [12345.0, 2100.0]          # "12,345" read as a number
    assert pa.base_name(ks[0]["name"]) == "flash_attn_ext_vec"
    assert pa.base_name(ks[1]["name"]) == "flash_attn_combine_results"
    assert pa.ncu_kernels("no profile here\n") == []
    # asked-for metric columns come along as printed; one ncu did not print is None, not a number
    ks = pa.ncu_kernels(text, ("Stream", "sm__warps_active.avg.pct_of_peak_sustained_active"))
    assert [(k["Stream"], k["sm__warps_active.avg.pct_of_peak_sustained_active"]) for k in ks] == [("7", None)] * 2


def test_parse_refuses_a_csv_without_the_duration_column():
    with pytest.raises(ValueError, match="lacks a column"):
        pa.ncu_kernels('"ID","Kernel Name","sm__cycles"\n"0","k","5"\n')


def _run(depth_prefill: int, tokens: int, layers: int, tok_ns, per_layer=((VEC, 1.0), (COMB, 0.25))):
    """A llama-bench launch sequence: warm-up token, the depth's prefill, then ``tokens`` decode
    tokens, each layer launching ``per_layer`` (name, share of the token's ns)."""
    seq = [(VEC, 5000.0)] * layers                                        # warm-up
    seq += [(PRE, 900000.0 + 1000 * i) for i in range(depth_prefill)]      # prefill, long kernels
    for t in range(tokens):
        for _ in range(layers):
            seq += [(name, share * tok_ns(t)) for name, share in per_layer]
    return [{"id": i, "name": n, "ns": ns} for i, (n, ns) in enumerate(seq)]


def test_decode_tokens_cut_from_the_tail_and_the_prefill_noise_stays_out():
    tok = lambda t: 20000.0 + 100 * (t % 3)                                # noqa: E731
    a = _run(16, 4, 2, tok)
    b = _run(16, 12, 2, tok)
    b[10]["ns"] *= 1.5                         # a prefill kernel ~450 us slower in the longer run
    assert b[10]["name"] == PRE
    us, kernels, reason = pa.token_layer_us(a, b, 4, 12, 2)
    assert reason == ""
    # a layer's launches: 1.25 x the token's ns (vector kernel + 0.25 combine)
    want = statistics.median([1.25 * tok(t) / 1e3 for t in range(12)])
    assert us == pytest.approx(want)
    assert kernels["flash_attn_ext_vec"] == pytest.approx(statistics.mean(tok(t) for t in range(12)) / 1e3, abs=1e-3)
    assert kernels["flash_attn_combine_results"] == pytest.approx(kernels["flash_attn_ext_vec"] / 4, abs=1e-3)
    assert "flash_attn_ext_f16" not in kernels


def test_decode_split_refused_when_counts_do_not_divide():
    tok = lambda t: 1000.0                                                 # noqa: E731
    a = _run(4, 4, 2, tok)
    b = _run(4, 12, 2, tok)[:-1]                  # one launch lost
    us, _, reason = pa.token_layer_us(a, b, 4, 12, 2)
    assert us is None and "whole number" in reason
    us, _, reason = pa.token_layer_us(a, [], 4, 12, 2)
    assert us is None and "no kernel matched" in reason
    us, _, reason = pa.token_layer_us(a, a, 4, 12, 2)
    assert us is None


def test_kvbench_groups_split_at_markers_into_calls():
    m = {"id": 0, "name": pa.MARKER, "ns": 1.0}
    split = lambda ns: {"id": 0, "name": "_decode_q8_rows_kernel", "ns": ns}   # noqa: E731
    comb = lambda ns: {"id": 0, "name": "_decode_combine_kernel", "ns": ns}    # noqa: E731
    seq = [split(50e3), comb(3e3), m]                                     # warm-up call, marker
    seq += [x for i in range(5) for x in (split(10e3 + i * 1e3), comb(2e3))] + [m]
    seq += [split(70e3), m, split(20e3), split(21e3), m]                  # a group with no combine
    groups = pa.split_groups(seq)
    assert len(groups) == 4
    timed = groups[1::2]
    assert pa.call_times(timed[0], 2) == [12.0, 13.0, 14.0, 15.0, 16.0]
    assert pa.call_times(timed[1], 1) == [20.0, 21.0]


def test_bytes_and_geometry_are_attnbench_synths():
    from engine import synth
    spec = synth.spec_for("attnbench-synth")
    assert (spec.n_kv_heads, spec.head_dim, spec.n_heads) == (
        pa.GEOMETRY["n_kv_heads"], pa.GEOMETRY["head_dim"], pa.GEOMETRY["n_heads"])
    assert spec.n_layers == 2
    from engine.kernels.decode_attention import decode_bytes_read
    for fmt in pa.OURS_KV:
        assert pa.kv_bytes(4096, pa.OURS_KV[fmt]) == decode_bytes_read(4096, 8, 128, fmt)


def test_verdicts_never_invent_a_ratio():
    rows = [{"peer": "kvbench", "kv": "fp32", "ctx": 4096, "us": 20.0},
            {"peer": "kvbench", "kv": "q8_0", "ctx": 4096, "us": 10.0},
            {"peer": "llama.cpp", "kv": "f16", "ctx": 4096, "us": None, "reason": "rc 1"},
            {"peer": "llama.cpp", "kv": "q8_0", "ctx": 4096, "us": 8.0}]
    (v,) = pa.verdicts(rows)
    assert v["kvbench_q8_0_over_fp32"] == 2.0
    assert v["q8_0_kvbench_over_llama"] == 0.8
    assert v["llama_q8_0_over_f16"] is None and v["kvbench_bf16_over_fp32"] is None


def test_cli_refuses_bad_token_counts(capsys):
    assert pa.main(["run", "--na", "8", "--nb", "8"]) == 2
    assert "--na 8" in capsys.readouterr().err


def _doc(device, rows, geometry=None):
    return {"device": device, "geometry": geometry or dict(pa.GEOMETRY), "copy_GBps": 3000.0, "rows": rows}


def test_merge_takes_verdicts_across_runs_and_refuses_what_is_not_one_measurement(tmp_path, capsys):
    ours = _doc("H100", [{"peer": "kvbench", "kv": "q8_0", "ctx": 4096, "us": 10.0, "pct_copy": 30.0}])
    llama = _doc("H100", [{"peer": "llama.cpp", "kv": "q8_0", "ctx": 4096, "us": 25.0},
                          {"peer": "llama.cpp", "kv": "f16", "ctx": 4096, "us": None, "reason": "rc 1"}])
    doc = pa.merge([("ours.json", ours), ("llama.json", llama)])
    (v,) = doc["verdicts"]
    assert v["q8_0_kvbench_over_llama"] == 2.5 and v["llama_q8_0_over_f16"] is None   # unmeasured stays None
    assert [r["source"] for r in doc["rows"]] == ["ours.json", "llama.json", "llama.json"]
    with pytest.raises(pa.MergeError, match="device 'H200' differs"):
        pa.merge([("ours.json", ours), ("other.json", _doc("H200", []))])
    with pytest.raises(pa.MergeError, match="kvbench q8_0 at ctx 4096 is also in ours.json"):
        pa.merge([("ours.json", ours), ("again.json", ours)])
    with pytest.raises(pa.MergeError, match="a row without peer / kv / ctx"):
        pa.merge([("ours.json", ours), ("odd.json", _doc("H100", [{"peer": "kvbench", "us": 1.0}]))])
    with pytest.raises(pa.MergeError, match="geometry"):
        pa.merge([("ours.json", ours), ("g.json", _doc("H100", [], {"n_kv_heads": 4}))])
    # the CLI: one line, exit 2, nothing written; a good merge writes the JSON and the plot
    a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    a.write_text(pa.json.dumps(ours))
    b.write_text(pa.json.dumps(llama))
    bad.write_text("{not json")
    out = tmp_path / "m.json"
    assert pa.main(["merge", str(a), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err and "bad.json" in err and not out.exists()
    assert pa.main(["merge", str(a), str(b), "--out", str(out), "--plot", str(tmp_path / "m.png")]) == 0
    assert pa.json.loads(out.read_text())["verdicts"][0]["q8_0_kvbench_over_llama"] == 2.5
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
