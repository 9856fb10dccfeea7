"""Format facts, owned here once: KV cache formats, weight storage formats, allocator rounding,
the default wave budget. Like ggml's type-traits table, everything else asks this module
(planner, ledger, KV caches, kernels, synth, harness checks), so a new KV dtype (fp8 e4m3,
q4_0, ...) is one entry here plus its kernels.

Contract: ``KV[name]`` / ``kv_format(name)`` -> ``Format`` (values per block, bytes per block,
``bytes_for(n)``: bytes of ``n`` values, which must fill whole blocks); ``check_kv_geometry``
is the one q8_0-style guard (a row of ``n_kv_heads * head_dim`` values must be whole blocks
on a layer that is narrowed), raising ``KVGeometryError`` naming the layer and the fix.
``WEIGHTS`` are the storage formats of weight matrices (norms stay f32);
``round_alloc(nbytes, device_type)`` is what an allocator really takes; ``Q8_BLOCK``,
``Q8_BYTES``, ``Q8_SCALE_BYTES`` are the q8_0 block geometry the kernels address. A plain
format names its element type (``torch_dtype``); a block format is stored as uint8 bytes
(``engine.kv_layout`` allocates and recognises both from this table). No torch import:
the harness reads this module without loading the engine.

A KV *request* may name more than one format (K and V apart, per-layer overrides): that is a
KV spec (``engine.kv_spec``), whose every component is a format of this table; each K or V
buffer holds exactly one of them.

    kv_format("q8_0").bytes_for(512)        # 544: 16 blocks of 34 bytes
    check_kv_geometry("q8_0", 3, 64, layer=0)
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, KVGeometryError


@dataclass(frozen=True)
class Format:
    name: str
    block: int                # values per block (1: a plain element type)
    block_bytes: int          # bytes per block
    about: str = ""
    torch_dtype: str | None = None   # a plain format's element type (a torch attribute name);
                                     # None: a block format, stored as uint8 bytes
    gguf_type: str | None = None     # the independent reference of its bytes (a gguf
                                     # GGMLQuantizationType name), None when gguf has none

    @property
    def bytes_per_value(self) -> float:
        return self.block_bytes / self.block

    def bytes_for(self, n_values: int, what: str = "") -> int:
        """Exact bytes of ``n_values`` values; KVGeometryError when they are not whole blocks."""
        if n_values % self.block:
            raise KVGeometryError(f"{what or self.name}: {n_values} values are not a whole number of "
                                  f"{self.block}-value {self.name} blocks", "pick a format whose block divides the row")
        return n_values // self.block * self.block_bytes


KV: dict[str, Format] = {f.name: f for f in (
    Format("fp32", 1, 4, "IEEE float32", "float32", "F32"),
    Format("bf16", 1, 2, "bfloat16, round to nearest even from fp32", "bfloat16", "BF16"),
    Format("q8_0", 32, 34, "ggml block_q8_0: fp16 scale d = amax/127 + 32 int8 q = round(x/d), "
                           "blocks along each token's flattened K (or V) row", gguf_type="Q8_0"),
)}
KV_DTYPES = tuple(KV)
WIDEST_KV = "fp32"            # the baseline every narrowed dtype is held against; tail layers keep it

WEIGHTS: dict[str, Format] = {f.name: f for f in (
    Format("f32", 1, 4, torch_dtype="float32"), Format("f16", 1, 2, torch_dtype="float16"),
    Format("bf16", 1, 2, torch_dtype="bfloat16"), Format("q8_0", 32, 34),
)}
WEIGHT_FORMATS = tuple(WEIGHTS)
WEIGHT_FORMAT_CHOICES = ("auto", *WEIGHT_FORMATS)
ENGINE_WEIGHT_FORMATS = ("f32", "bf16", "f16", "q8_0")  # what the engine stores matrices as (q8_0: engine.qweights)
NORM_BYTES = 4                                        # 1-D norms always f32

DEFAULT_WAVE_BUDGET = 256 << 20       # attention wave scratch of a prefill
DEFAULT_RESERVE = 256 << 20           # trunk headroom the planner keeps free (planned, never allocated)
CUDA_ALLOC_ROUND = 512                # the caching allocator's block rounding (default config)

# q8_0 geometry (ggml block_q8_0: one little-endian fp16 scale, then 32 int8 quants), read by the
# kernels that address a block's bytes directly
Q8_BLOCK = KV["q8_0"].block           # 32 values per block
Q8_BYTES = KV["q8_0"].block_bytes     # 34 bytes per block
Q8_SCALE_BYTES = Q8_BYTES - Q8_BLOCK  # 2: the fp16 scale d in front of the quants


def kv_format(name: str) -> Format:
    try:
        return KV[name]
    except KeyError:
        raise ConfigError(f"kv_dtype {name!r} is not one of {', '.join(KV)}", "pick one of those") from None


def weight_format(name: str) -> Format:
    try:
        return WEIGHTS[name]
    except KeyError:
        raise ConfigError(f"weight_format {name!r} is not one of {', '.join(WEIGHTS)}", "pick one of those") from None


def check_kv_geometry(dtype: str, n_kv_heads: int, head_dim: int, layer: int | None = None) -> None:
    """The guard of a narrowed layer: its K (V) row of n_kv_heads*head_dim values must be whole
    blocks of ``dtype``."""
    f = kv_format(dtype)
    n = n_kv_heads * head_dim
    if n % f.block:
        where = f"layer {layer}: " if layer is not None else ""
        raise KVGeometryError(f"{where}kv_dtype {dtype} needs n_kv_heads*head_dim % {f.block} == 0, but "
                              f"{n_kv_heads} x {head_dim} = {n}", "use kv_dtype fp32 or bf16 for this model")


def kv_row_bytes(dtype: str, n_kv_heads: int, head_dim: int) -> int:
    """Bytes of one token's K (or V) row."""
    return kv_format(dtype).bytes_for(n_kv_heads * head_dim, f"a {n_kv_heads} x {head_dim} KV row")


def round_alloc(nbytes: int, device_type: str) -> int:
    """Bytes the allocator really takes for a buffer of ``nbytes`` on a ``device_type`` device:
    none on CPU; CUDA's caching allocator rounds every block up to 512 B."""
    nbytes = int(nbytes)
    if nbytes <= 0:
        return 0
    if device_type == "cuda":
        return -(-nbytes // CUDA_ALLOC_ROUND) * CUDA_ALLOC_ROUND
    return nbytes
