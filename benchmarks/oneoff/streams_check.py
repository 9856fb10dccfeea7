"""The q8_0 streams forms on the GPU against the torch reference (decode_attention_ref), per unpack."""
import json, sys
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_attention import fill_cache
from engine.kernels import decode_attention as dmod
from engine.kv import LayerKV
res = []
for hq, hkv, ctx in ((32, 8, 16384), (32, 8, 1000), (32, 4, 4096)):
    d = 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(hq, d, device="cuda", generator=gen)
    cache = LayerKV(0, hkv, d, ctx, "q8_0", device="cuda")
    fill_cache(cache, ctx, gen)
    ref = dmod.decode_attention_ref(q, cache.k, cache.v, "q8_0", ctx, d ** -0.5, hkv)
    ref = ref[0] if isinstance(ref, tuple) else ref
    for name, cfg in (("rows", {}), ("streams-prmt", {"q8_impl": "streams", "block_n": 16, "q8_unpack": "prmt"}),
                      ("streams-magic", {"q8_impl": "streams", "block_n": 16, "q8_unpack": "magic"}),
                      ("streams2-prmt", {"q8_impl": "streams2", "block_n": 16, "q8_unpack": "prmt"}),
                      ("streams2-magic", {"q8_impl": "streams2", "block_n": 16, "q8_unpack": "magic"})):
        try:
            out = dmod.decode_attention(q, cache.k, cache.v, "q8_0", ctx, d ** -0.5, hkv, cfg=dict(cfg))
            r = {"geo": [hq, hkv, ctx], "v": name, "max_abs": float((out.reshape(ref.shape) - ref).abs().max()),
                 "ref_absmax": float(ref.abs().max())}
        except Exception as e:
            r = {"geo": [hq, hkv, ctx], "v": name, "error": str(e)[:300]}
        print(json.dumps(r), flush=True)
        res.append(r)
Path(sys.argv[1]).write_text(json.dumps(res, indent=1))
