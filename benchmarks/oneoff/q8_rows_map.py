"""Where the q8_0 rows kernel's 8.47e-5 (compiled, head_dim 128) sits: the magnitude test's exact
instance (tests/test_kernels.py::test_q8_decode_kernel_across_magnitudes..., same generator
sequence), its error per (query head, 32-value output block) for the rows form with each
combination of float16 terms of q and p (``q8_terms``) and for the batched form, with each head's
q magnitude and each block's V magnitude beside the worst cells. A one-off for one GPU call:

    python benchmarks/oneoff/q8_rows_map.py [--d 128]

If the worst cell moves with p's terms, the defect is in P.V; with q's, in the scores; with
neither, elsewhere (the normaliser, the combine).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_kernels import DEV, dequant, oracle, q8_magnitude_instance  # noqa: E402

from engine.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    D = ap.parse_args().d
    inst = q8_magnitude_instance(D)
    Hq, Hkv, n, cache, q, qmag, vmag, scale = (inst[x] for x in ("Hq", "Hkv", "n", "cache", "q", "qmag", "vmag", "scale"))
    kd, vd = dequant(cache)
    want = oracle(q[None], kd, vd, n - 1, scale)[0]
    size = oracle(q[None], kd, vd.abs(), n - 1, scale)[0]
    blk = lambda t: t.reshape(Hq, D // 32, 32).abs().amax(2)   # noqa: E731
    g = Hq // Hkv
    # the softmax of each head in float64: how peaked (its largest p and how many keys hold 99%)
    s = torch.einsum("hd,nhd->hn", q.double(), kd[:n].double().repeat_interleave(g, 1)) * scale
    p = s.softmax(-1)
    for h in range(Hq):
        ps = p[h].sort(descending=True).values
        print(f"head {h}: |q| scale {qmag[h].item():.1e}, max p {ps[0].item():.3e}, "
              f"keys for 99% {(ps.cumsum(0) < 0.99).sum().item() + 1}, score range {s[h].max().item() - s[h].min().item():.1f}")
    perm = torch.tensor([0, 1, 2, 3, 7, 6, 5, 4], device=DEV)  # the large heads at other rows of the tile
    cases = [("reference", None)]
    for terms in ((2, 2), (1, 2), (2, 1), (1, 1)):
        cases.append((f"rows q8_terms {terms}", {"block_n": 64, "q8_terms": terms}))
    # the one-s guards (l per row, s in float64): both off is the kernel the H100 measured at 8.5e-5
    for guards in ((False, False), (True, False), (False, True), (True, True)):
        cases.append((f"rows guards l/row {int(guards[0])} s64 {int(guards[1])}", {"block_n": 64, "q8_guards": guards}))
    cases.append(("batched (2, 2)", {"block_n": 16, "q8_impl": "batched"}))
    cases.append(("blocks (2, 2)", {"block_n": 64, "q8_impl": "blocks"}))
    cases.append(("rows (2, 2) block_n 16", {"block_n": 16}))
    for qn, pn in ((8192, 2048), (8192, 256), (2048, 8192), (2048, 2048)):
        cases.append((f"rows (2, 2) norms q {qn} p {pn}", {"block_n": 64, "q8_norms": (qn, pn)}))
    cases.append(("rows (2, 2) 2 warps", {"block_n": 64, "num_warps": 2}))
    cases.append(("rows (2, 2) 8 warps", {"block_n": 64, "num_warps": 8}))
    cases.append(("rows (2, 2) heads 4-7 reversed", {"block_n": 64, "perm": True}))
    cases.append(("batched heads 4-7 reversed", {"block_n": 16, "q8_impl": "batched", "perm": True}))
    for label, cfg in cases:
        cfg = None if cfg is None else dict(cfg)
        pm = cfg is not None and cfg.pop("perm", False)
        qq = q[perm] if pm else q
        out = decode_attention_ref(q, cache.k, cache.v, "q8_0", n, scale, Hkv) if cfg is None else \
            decode_attention(qq, cache.k, cache.v, "q8_0", n, scale, Hkv, cfg=cfg)
        if pm:                                      # back in the original head order
            out = out.reshape(Hq, D)[perm.argsort()].reshape(out.shape)
        rel = blk(out - want) / blk(size)
        worst = rel.flatten().topk(4)
        cells = []
        for val, idx in zip(worst.values.tolist(), worst.indices.tolist()):
            h, b = divmod(idx, D // 32)
            cells.append(f"(head {h}, block {b}: {val:.2e}, v block scale {vmag[h // g, b * 32].item():.1e})")
        print(f"{label:26s} max {rel.max().item():.2e}; worst " + " ".join(cells), flush=True)
        if cfg is not None:
            print("  per head (max over blocks): " + " ".join(f"{x:.1e}" for x in rel.amax(1).tolist()))
            print("  head 7 per block: " + " ".join(f"{x:.1e}" for x in rel[7].tolist()))


if __name__ == "__main__":
    main()
