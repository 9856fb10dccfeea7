"""KV cache: one interface for every dtype (fp32 now; bf16 / q8_0 land with the KV issue).

Contract: a ``LayerKV`` preallocates ``max_tokens`` rows of K and V for one layer.
``write(start, k, v)`` stores rows ``start..start+T-1`` (k, v: [T, Hkv, D] float32) in the
cache's own dtype; ``attend(q, start, scale)`` returns [T, Hq, D] float32 for queries at
positions ``start..start+T-1`` attending causally to cache rows ``[0, start+T)``, reading the
values the cache holds. ``dtype`` is read from the allocated buffers, never from the request.

    cache = LayerKV(0, n_kv_heads=3, head_dim=64, max_tokens=4096, dtype="fp32", device="cpu")
    cache.write(0, k, v); out = cache.attend(q, 0, scale=64 ** -0.5)
"""
from __future__ import annotations

import torch

from .errors import ConfigError, ContextOverflowError

KV_DTYPES = ("fp32",)


class LayerKV:
    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: str = "fp32", device: str | torch.device = "cpu"):
        if dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype {dtype!r} is not supported (supported: {', '.join(KV_DTYPES)})")
        self.layer, self.n_kv_heads, self.head_dim, self.max_tokens = layer, n_kv_heads, head_dim, max_tokens
        self.k = torch.zeros(max_tokens, n_kv_heads, head_dim, dtype=torch.float32, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def dtype(self) -> str:
        return {torch.float32: "fp32"}[self.k.dtype]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[0]
        if start + T > self.max_tokens:
            raise ContextOverflowError(f"layer {self.layer}: {start + T} tokens exceed the KV cache of "
                                       f"{self.max_tokens}", "load the engine with a larger ctx")
        self.k[start:start + T] = k
        self.v[start:start + T] = v

    def attend(self, q: torch.Tensor, start: int, scale: float) -> torch.Tensor:
        T, Hq, D = q.shape
        n = start + T
        g = Hq // self.n_kv_heads
        k = self.k[:n].repeat_interleave(g, dim=1)   # [n, Hq, D]
        v = self.v[:n].repeat_interleave(g, dim=1)
        s = torch.einsum("thd,nhd->htn", q, k) * scale  # [Hq, T, n]
        qpos = torch.arange(start, n, device=q.device)[:, None]
        kpos = torch.arange(n, device=q.device)[None, :]
        s = s.masked_fill(kpos > qpos, float("-inf"))
        p = torch.softmax(s, dim=-1)
        return torch.einsum("htn,nhd->thd", p, v)
