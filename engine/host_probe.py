"""Which placement computes the host layers' experts faster on this machine (``host_experts="auto"``).

Contract: ``measure(spec, device, reps)`` builds one MoE layer of random Q4_0 expert stacks in
``spec``'s geometry in page-locked host memory, and times a decode step's k experts two ways,
with fresh random experts every step (a layer's bytes exceed the last-level cache, as a decode's
do): ``cpu_us``, the host CPU's int4 path (``engine.cpu_experts.HostQ4Experts``, torch's threads)
and ``pcie_us``, the device's blocks kernel reading the pinned blocks in place over PCIe
(``engine.kernels.moe_blocks``, CUDA events). It returns both with the thread count, or raises
``ConfigError`` where it cannot measure (no CUDA device). ``choose(probe, roundtrip_us)`` returns
``(tier, reason)``: ``"cpu"`` when the CPU's time plus a cpu-tier layer's round trip
(``ROUNDTRIP_US``: the routing sync, the copies, a graph boundary) is below the PCIe reads',
else ``"pcie"``; the reason states the numbers.

The two placements' speeds move with the host independently: the `pcie` placement decoded
coder30b-synth at 84-88 tok/s on hosts whose PCIe reads ran ~45 GB/s and at 53.6 on one at
26 GB/s whose CPU was fast; the CPU's one-layer time ranged 414-1107 us over the H100 hosts seen
(reports/h100-2026-12-05c..f). Hence a measurement at load, not a rule.

    probe = host_probe.measure(spec, torch.device("cuda"))
    tier, reason = host_probe.choose(probe)
"""
from __future__ import annotations

import statistics
import time

import torch

from .errors import ConfigError

# A cpu-tier layer's cost beyond its experts: reports/h100-2026-12-05e call 2 decoded 20 cpu-tier
# layers at 42.4 tok/s (23.6 ms a step) where one layer's experts took 917 us and the rest of the
# step ~2.5 ms: (23.6 - 2.5) / 20 - 0.917 = ~0.14 ms a layer.
ROUNDTRIP_US = 140.0


def _random_stack(shape, gen: torch.Generator, pinned: bool):
    from .kernels.moe_blocks import BlockStack
    st = BlockStack.empty("q4_0", shape, pinned=pinned)
    st.qs.copy_(torch.randint(0, 256, st.qs.shape, generator=gen, dtype=torch.int32).to(st.qs.dtype))
    st.d.copy_(((torch.rand(st.d.shape, generator=gen) + 0.5) / (8 * shape[2] ** 0.5)).half())
    return st


def measure(spec, device: torch.device, reps: int = 24) -> dict:
    """One layer's k experts on the host CPU (int4) and over PCIe (blocks kernel): median us a
    step over ``reps`` steps of fresh random experts, after one untimed step each."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"host_experts 'auto' measures the GPU's PCIe reads, which needs a CUDA device, not {device}",
                          "pass host_experts='cpu' or 'pcie'")
    from .cpu_experts import HostQ4Experts
    from .kernels.moe_blocks import moe_decode_blocks
    E, ff, d, k = spec.n_experts, spec.d_ff_expert, spec.d_model, spec.n_experts_used
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    stacks = (_random_stack((E, ff, d), gen, True), _random_stack((E, ff, d), gen, True),
              _random_stack((E, d, ff), gen, True))
    host = HostQ4Experts.from_blocks(*stacks)
    x = torch.randn(1, d, generator=gen)
    ids = [torch.randperm(E, generator=gen)[:k] for _ in range(reps + 1)]
    w = [1.0 / k] * k
    cpu = []
    for i, sel in enumerate(ids):
        t = time.perf_counter()
        host(x, sel.tolist(), w)
        if i:
            cpu.append(time.perf_counter() - t)
    xd = x.to(device)
    pd = torch.full((k,), 1.0 / k, device=device)
    ids_d = [sel.to(device) for sel in ids]
    moe_decode_blocks(xd, *stacks, ids_d[0], pd)
    torch.cuda.synchronize(device)
    pcie = []
    for sel in ids_d[1:]:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        moe_decode_blocks(xd, *stacks, sel, pd)
        b.record()
        b.synchronize()
        pcie.append(a.elapsed_time(b) * 1e-3)
    return {"cpu_us": round(1e6 * statistics.median(cpu), 1), "pcie_us": round(1e6 * statistics.median(pcie), 1),
            "threads": torch.get_num_threads(), "experts": k, "reps": reps,
            "seconds": round(time.perf_counter() - t0, 2)}


def choose(probe: dict, roundtrip_us: float = ROUNDTRIP_US) -> tuple[str, str]:
    """``("cpu" | "pcie", reason)`` from ``measure``'s numbers: the faster per host layer."""
    cpu = probe["cpu_us"] + roundtrip_us
    pcie = probe["pcie_us"]
    tier = "cpu" if cpu < pcie else "pcie"
    reason = (f"auto: a host layer's {probe['experts']} experts take {probe['cpu_us']:.0f} us on the CPU "
              f"({probe['threads']} threads) + {roundtrip_us:.0f} us round trip = {cpu:.0f} us, against "
              f"{pcie:.0f} us read over PCIe by the GPU: {tier}")
    return tier, reason
