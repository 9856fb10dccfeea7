"""kvbench engine vs HF transformers on the same GGUF, on the GPU, side by side in one run.

Contract: loads ``--model`` (default SmolLM2-135M; ``smollm2-synth`` is the same geometry
with Q8_0 weights, the file llama.cpp runs in benchmarks/bench_llamacpp.py) into HF
transformers (bf16, SDPA, static cache) and into our engine (f32 and bf16 weights;
fp32/bf16/q8_0 KV, the weights loaded once and taken over per KV dtype; decode path as the
engine chooses it, plus one eager row), then times greedy decode of ``--tg`` tokens after
prompts of ``--ctx`` tokens (16 / 4096 / 16384: llama-bench's ``-d`` depths) and prefill of
8192 / 16384 tokens (ours on the exact path and on the fast one, ``Engine.set_prefill_path``:
bfloat16 SDPA, each row's ``prefill_path`` recorded, plus the fast-vs-exact max abs logit
over 2048 teacher-forced tokens per weight format x KV dtype): the median of ``--reps`` (>= 5) repetitions after warm-up, with every
sample and the quartiles kept (CUDA-synchronised). Each decode row carries the bytes one token moves (weights
read + KV read at that context), the achieved GB/s and the roofline tok/s against the measured
device-to-device copy bandwidth. Prints a table and one JSON line last.

    python benchmarks/bench_peer.py --out peer.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.models import resolve  # noqa: E402


REPS = 5


def timed(fn, reps=None, warm=1):
    reps = reps or REPS
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out), out


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 5."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t, _ = timed(lambda: b.copy_(a), reps=5, warm=2)
    del a, b
    return 2 * nbytes / t


def kv_read_bytes(spec, ctx: int, fmt: str) -> int:
    from engine.kernels.decode_attention import decode_bytes_read
    return spec.n_layers * decode_bytes_read(ctx, spec.n_kv_heads, spec.head_dim, fmt)


def with_roofline(row: dict, bytes_per_token: int, bw: float) -> dict:
    row.update(bytes_per_token=bytes_per_token, gb_s=row["tok_s"] * bytes_per_token / 1e9,
               roofline_tok_s=bw / bytes_per_token, roofline_frac=row["tok_s"] * bytes_per_token / bw)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ctx", default="16,4096,16384", help="decode after prompts of these lengths")
    ap.add_argument("--prefill", default="8192,16384")
    ap.add_argument("--weight-formats", default="f32,bf16", help="our engine's weight formats (comma list)")
    ap.add_argument("--kv", default="fp32,bf16,q8_0", help="our engine's KV dtypes (comma list)")
    ap.add_argument("--no-decode", action="store_true", help="prefill rows only (both engines)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bad = [w for w in args.weight_formats.split(",") if w not in ("f32", "bf16")] + \
          [k for k in args.kv.split(",") if k not in ("fp32", "bf16", "q8_0")]
    if bad:
        print(f"bench_peer: unknown weight format or KV dtype {', '.join(bad)}: weight formats f32,bf16; "
              "KV fp32,bf16,q8_0", file=sys.stderr)
        return 2
    global REPS
    REPS = max(5, args.reps)
    path = resolve(args.model)
    g = torch.Generator().manual_seed(0)
    ctxs = [int(x) for x in args.ctx.split(",")]
    # token ids inside the model's vocabulary (a synth file made without SmolLM2 at hand has a
    # byte-level one: ids past it are a device-side assert, reported later as a cuBLAS error)
    hi_id = min(49000, spec_of(path).vocab_size)
    prompts = {c: torch.randint(min(100, hi_id - 1), hi_id, (c,), generator=g).tolist() for c in ctxs}
    prompt = prompts[ctxs[0]]
    rows = []
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s", flush=True)

    from transformers import AutoModelForCausalLM, StaticCache  # noqa: F401
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16,
                                              attn_implementation="sdpa").cuda().eval()
    hf_weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    for c in ctxs if not args.no_decode else []:
        ids = torch.tensor([prompts[c]], device="cuda")

        def hf_decode():
            hf.generate(ids, max_new_tokens=args.tg, min_new_tokens=args.tg, do_sample=False,
                        cache_implementation="static", pad_token_id=0)
        with torch.no_grad():
            t, s = timed(hf_decode, warm=2)
            # generate includes the prompt's prefill: time it alone and subtract
            tp, _ = timed(lambda: hf(ids, logits_to_keep=1))
        rows.append(with_roofline({"impl": "hf-transformers bf16 sdpa static", "kv": "bf16",
                                   "what": f"tg{args.tg}@{c}", "tok_s": args.tg / max(t - tp, 1e-9),
                                   "samples_s": s, "prefill_s": tp}, hf_weights + kv_read_bytes(spec_of(path), c, "bf16"), bw))
    for n in [int(x) for x in args.prefill.split(",")]:
        long = torch.randint(min(100, hi_id - 1), hi_id, (1, n), generator=g).cuda()
        with torch.no_grad():
            t, s = timed(lambda: hf(long, logits_to_keep=1))
        rows.append({"impl": "hf-transformers bf16 sdpa", "kv": "bf16", "what": f"pp{n}", "tok_s": n / t,
                     "samples_s": s})
    del hf
    torch.cuda.empty_cache()

    for wf in args.weight_formats.split(","):
        eng = None
        for kv in args.kv.split(","):
            eng = engine.load(path, device="cuda", kv_dtype=kv, ctx=max(ctxs + [16384]) + args.tg + 64,
                              weight_format=wf, weights_from=eng)
            weights = eng.ledger.current("weights", "trunk")   # every trunk matrix is read once per token
            modes = [eng.decode_path] + (["eager"] if (wf, kv) == ("bf16", "bf16") and eng.decode_path != "eager" else [])
            for mode in modes if not args.no_decode else []:
                eng.set_decode_mode(mode)
                for c in ctxs if mode != "eager" else ctxs[:1]:
                    p = prompts[c]

                    def dec():
                        eng.prefill(p)
                        tok = p[-1]
                        for _ in range(args.tg):
                            tok = int(eng.decode(tok).argmax())
                    t, s = timed(dec)
                    tp, _ = timed(lambda: eng.prefill(p))
                    rows.append(with_roofline({"impl": f"kvbench w{wf} {mode}", "kv": kv, "what": f"tg{args.tg}@{c}",
                                               "tok_s": args.tg / max(t - tp, 1e-9), "samples_s": s,
                                               "prefill_s": tp,
                                               "decode_path": eng.decode_path,
                                               "compiled": getattr(eng._static, "compiled", False)},
                                              weights + kv_read_bytes(eng.spec, c, kv), bw))
            eng.set_decode_mode("auto")
            for n in [int(x) for x in args.prefill.split(",")]:
                long = torch.randint(min(100, hi_id - 1), hi_id, (n,), generator=g).tolist()
                for pf in ("exact", "fast"):           # issue 14.3: the fast path beside the exact one
                    eng.set_prefill_path(pf)
                    try:
                        t, s = timed(lambda: eng.prefill(long))
                    finally:
                        eng.set_prefill_path("exact")
                    rows.append({"impl": f"kvbench w{wf}" + (" fast" if pf == "fast" else ""), "kv": kv,
                                 "what": f"pp{n}", "tok_s": n / t, "samples_s": s, "prefill_path": pf,
                                 "waves": eng.last_prefill_stats.get("waves")})
            # what the fast path costs in accuracy, once per weight format x KV dtype
            probe = torch.randint(min(100, hi_id - 1), hi_id, (2048,), generator=g).tolist()
            exact_l = eng.logits(probe)
            eng.set_prefill_path("fast")
            try:
                fast_l = eng.logits(probe)
            finally:
                eng.set_prefill_path("exact")
            rows.append({"impl": f"kvbench w{wf}", "kv": kv, "what": "fast-vs-exact max abs logit (2048 tokens)",
                         "tok_s": 0.0, "fast_vs_exact_max_abs": (fast_l - exact_l).abs().max().item()})
            del exact_l, fast_l
        del eng
        torch.cuda.empty_cache()
    for r in rows:
        if "fast_vs_exact_max_abs" in r:
            print(f"{r['impl']:34s} KV {r['kv']:5s} {r['what']}: {r['fast_vs_exact_max_abs']:.4f}")
            continue
        print(f"{r['impl']:34s} KV {r['kv']:5s} {r['what']:10s} {r['tok_s']:12.1f} tok/s"
              + (f"  {r['gb_s']:7.1f} GB/s  {100 * r['roofline_frac']:5.1f}% of roofline" if "gb_s" in r else "")
              + (f"  waves {r['waves']}" if r.get("waves") else ""))
    for r in rows:       # spread over the repetitions (tok/s of each sample; decode: prefill subtracted)
        if "samples_s" in r:
            n = args.tg if r["what"].startswith("tg") else int(r["what"][2:])
            ts = sorted(n / max(x - r.get("prefill_s", 0.0), 1e-9) for x in r["samples_s"])
            r.update(tok_s_min=ts[0], tok_s_max=ts[-1], tok_s_q1=ts[len(ts) // 4], tok_s_q3=ts[(3 * len(ts)) // 4],
                     tok_s_samples=ts)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw_bytes_s": bw,
           "model": str(path), "reps": REPS, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                       if k != "samples_s"} for r in rows]))
    return 0


def spec_of(path):
    from engine.gguf_io import open_gguf
    from engine.spec import ModelSpec
    return ModelSpec.from_gguf(open_gguf(path))


if __name__ == "__main__":
    sys.exit(main())
