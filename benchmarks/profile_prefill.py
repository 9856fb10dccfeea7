"""Where a long prefill's device time goes: kvbench (exact and fast paths) beside HF transformers.

Contract: on one CUDA device, loads ``--model`` (default smollm2-synth) into HF transformers
(bf16, SDPA; ``logits_to_keep=1``, as bench_peer times it) and into our engine (``--weight-format``,
``--kv`` KV dtype, context for the longest prompt), then for each prefill length in ``--lengths``
profiles one prefill of random in-vocabulary tokens after a warm-up with ``torch.profiler``:
wall time, device time, kernel count, device time by category (bench_moe_decode.categorize) and
the top kernels. Prints a table per run and writes the JSON document to ``--out``.

    python benchmarks/profile_prefill.py --lengths 8192,16384 --out prefill_profile.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402
from bench_moe_decode import profile_step  # noqa: E402
from engine.models import resolve  # noqa: E402


def show(label: str, p: dict) -> None:
    print(f"{label}: wall {p['wall_us'] / 1e3:.2f} ms, device {p['device_us'] / 1e3:.2f} ms, "
          f"{p['kernels']} kernels", flush=True)
    print("  by category: " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in p["by_category_us"].items()))
    for r in p["top"][:12]:
        print(f"    {r['us'] / 1e3:8.3f} ms {r['count']:5d}x  {r['name'][:110]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-synth")
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--kv", default="bf16")
    ap.add_argument("--weight-format", default="bf16")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_prefill: needs a CUDA device (profiles the GPU prefill)", file=sys.stderr)
        return 2
    path = resolve(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    doc = {"model": args.model, "kv": args.kv, "weight_format": args.weight_format, "runs": []}
    eng = engine.load(path, device="cuda", kv_dtype=args.kv, ctx=max(lengths) + 64, weight_format=args.weight_format)
    hi = min(49000, eng.spec.vocab_size)
    toks = {n: torch.randint(min(100, hi - 1), hi, (n,), generator=g).tolist() for n in lengths}
    for n in lengths:
        for pf in ("exact", "fast"):
            eng.set_prefill_path(pf)
            try:
                p = profile_step(lambda: eng.prefill(toks[n]), dev, top=20)
            finally:
                eng.set_prefill_path("exact")
            p.update(impl=f"kvbench w{args.weight_format} {pf}", n=n, waves=eng.last_prefill_stats.get("waves"))
            show(f"kvbench {pf:5s} pp{n}", p)
            doc["runs"].append(p)
    del eng
    torch.cuda.empty_cache()
    if not args.no_hf:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16,
                                                  attn_implementation="sdpa").cuda().eval()
        for n in lengths:
            ids = torch.tensor([toks[n]], device="cuda")
            with torch.no_grad():
                p = profile_step(lambda: hf(ids, logits_to_keep=1), dev, top=20)
            p.update(impl="hf-transformers bf16 sdpa", n=n)
            show(f"hf            pp{n}", p)
            doc["runs"].append(p)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
