"""One-off diagnosis of the gemma3-270m bf16 wave_prefill spike (2026-12-01, 2-core CPU);
its output is quoted in reports/cpu-2026-11-25/gemma3-270m/README.md. Run: .venv/bin/python THIS_FILE"""
import torch, engine
from engine import kv as kvmod
from engine.kv import LayerKV
from harness.text import prompt_tokens
torch.set_num_threads(2)
base=engine.load("gemma3-270m", kv_dtype="fp32", ctx=32768, wave_budget_bytes=8<<20)
spec=base.spec; swa=set(spec.swa_layers)
toks=prompt_tokens(base.tokenizer, 6169, 0)[:4700]
P=[4611,4665,4680, 4699]
def run(mk):
    base.caches=[mk(i) for i in range(spec.n_layers)]
    with torch.inference_mode():
        lg=base.logits(toks)
    r=lg[P].clone(); del lg
    return r
ref=run(lambda i: kvmod.make_layer_kv(spec,i,32768,"fp32","cpu",wave_budget_bytes=8<<20))
def rep(name, r):
    d=(r-ref).abs().max(-1).values
    print(f"{name:28s} maxabs", [round(x,2) for x in d.tolist()], flush=True)
rep("bf16 ring", run(lambda i: kvmod.make_layer_kv(spec,i,32768,"bf16","cpu",wave_budget_bytes=8<<20)))
rep("bf16 full-length (no ring)", run(lambda i: LayerKV(i, spec.n_kv_heads, spec.head_dim, 4700, "bf16", "cpu", wave_budget_bytes=8<<20)))
rep("fp32 full-length (no ring)", run(lambda i: LayerKV(i, spec.n_kv_heads, spec.head_dim, 4700, "fp32", "cpu", wave_budget_bytes=8<<20)))
for L in sorted(swa):
    rep(f"bf16 only swa layer {L}", run(lambda i,L=L: kvmod.make_layer_kv(spec,i,32768,"bf16" if i==L else "fp32","cpu",wave_budget_bytes=8<<20)))
