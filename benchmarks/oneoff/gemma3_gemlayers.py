"""One-off diagnosis of the gemma3-270m bf16 wave_prefill spike (2026-12-01, 2-core CPU);
its output is quoted in reports/cpu-2026-11-25/gemma3-270m/README.md. Run: .venv/bin/python THIS_FILE"""
import torch, engine
from engine import kv as kvmod
from harness.text import prompt_tokens
torch.set_num_threads(2)
base=engine.load("gemma3-270m", kv_dtype="fp32", ctx=32768, wave_budget_bytes=8<<20)
spec=base.spec; swa=set(spec.swa_layers)
toks=prompt_tokens(base.tokenizer, 6169, 0)[:4700]
P=[4611,4665,4680, 4700-1]
def run(name, dt_of):
    base.caches=[kvmod.make_layer_kv(spec,i,32768,dt_of(i),"cpu",wave_budget_bytes=8<<20) for i in range(spec.n_layers)]
    with torch.inference_mode():
        lg=base.logits(toks)
    r=lg[P].clone(); del lg
    return r
ref=run("fp32", lambda i:"fp32")
for name,f in [("bf16 all",lambda i:"bf16"),("bf16 global only",lambda i:"fp32" if i in swa else "bf16"),("bf16 swa only",lambda i:"bf16" if i in swa else "fp32"),("q8_0 all",lambda i:"q8_0")]:
    r=run(name,f)
    d=(r-ref).abs().max(-1).values
    kl=torch.nn.functional.kl_div(r.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction='none').sum(-1)
    print(f"{name:18s} maxabs", [round(x,2) for x in d.tolist()], "kld", [round(x,3) for x in kl.tolist()], flush=True)
# per global layer
for g in sorted(set(range(spec.n_layers))-swa):
    r=run(f"bf16 L{g}", lambda i,g=g:"bf16" if i==g else "fp32")
    d=(r-ref).abs().max(-1).values
    print(f"bf16 only layer {g:2d} maxabs", [round(x,2) for x in d.tolist()], flush=True)
