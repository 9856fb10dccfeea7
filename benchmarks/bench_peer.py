"""kvbench engine vs HF transformers on the same GGUF, on the GPU, side by side in one run.

Contract: loads SmolLM2-135M from the same GGUF into HF transformers (bf16, SDPA, static
cache) and into our engine (f32 and bf16 weights; fp32/bf16/q8_0 KV), then times greedy
decode of ``--tg`` tokens after a 512-token prompt and prefill of 8192 / 16384 tokens
(medians after warm-up, CUDA-synchronised). Prints a table and one JSON line last.

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


def timed(fn, reps=3, warm=1):
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--prefill", default="8192,16384")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = resolve("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 49000, (512,), generator=g).tolist()
    rows = []

    from transformers import AutoModelForCausalLM, StaticCache  # noqa: F401
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16,
                                              attn_implementation="sdpa").cuda().eval()
    ids = torch.tensor([prompt], device="cuda")

    def hf_decode():
        hf.generate(ids, max_new_tokens=args.tg, min_new_tokens=args.tg, do_sample=False,
                    cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        t, s = timed(hf_decode, reps=3, warm=2)
        # generate includes the 512-token prefill: time it alone and subtract
        tp, _ = timed(lambda: hf(ids), reps=3)
    rows.append({"impl": "hf-transformers bf16 sdpa static", "kv": "bf16", "what": f"tg{args.tg}@512",
                 "tok_s": args.tg / max(t - tp, 1e-9), "samples_s": s})
    for n in [int(x) for x in args.prefill.split(",")]:
        long = torch.randint(100, 49000, (1, n), generator=g).cuda()
        with torch.no_grad():
            t, s = timed(lambda: hf(long, logits_to_keep=1), reps=3)
        rows.append({"impl": "hf-transformers bf16 sdpa", "kv": "bf16", "what": f"pp{n}", "tok_s": n / t,
                     "samples_s": s})
    del hf
    torch.cuda.empty_cache()

    for wf in ("f32", "bf16"):
        for kv in ("fp32", "bf16", "q8_0"):
            eng = engine.load(path, device="cuda", kv_dtype=kv, ctx=16384 + 64, weight_format=wf)

            def dec():
                eng.prefill(prompt)
                tok = prompt[-1]
                for _ in range(args.tg):
                    tok = int(eng.decode(tok).argmax())
            t, s = timed(dec, reps=3)
            tp, _ = timed(lambda: eng.prefill(prompt), reps=3)
            rows.append({"impl": f"kvbench w{wf}", "kv": kv, "what": f"tg{args.tg}@512",
                         "tok_s": args.tg / max(t - tp, 1e-9), "samples_s": s})
            for n in [int(x) for x in args.prefill.split(",")]:
                long = torch.randint(100, 49000, (n,), generator=g).tolist()
                t, s = timed(lambda: eng.prefill(long), reps=2)
                rows.append({"impl": f"kvbench w{wf}", "kv": kv, "what": f"pp{n}", "tok_s": n / t,
                             "samples_s": s, "waves": eng.last_prefill_stats.get("waves")})
            del eng
            torch.cuda.empty_cache()
    for r in rows:
        print(f"{r['impl']:34s} KV {r['kv']:5s} {r['what']:10s} {r['tok_s']:12.1f} tok/s"
              + (f"  waves {r['waves']}" if r.get("waves") else ""))
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                       if k != "samples_s"} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
