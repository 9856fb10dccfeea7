"""Which placement computes the host layers' experts fastest on this machine (``host_experts="auto"``).

Contract: ``measure(spec, device, reps)`` builds one MoE layer of random Q4_0 expert stacks in
``spec``'s geometry in page-locked host memory, and times a decode step's k experts two ways,
with fresh random experts every step (a layer's bytes exceed the last-level cache, as a decode's
do): ``cpu_us``, the host CPU's path a cpu-tier step takes (torch's int4 kernel,
``engine.cpu_experts.HostQ4Experts``, or ``engine.native`` where the tier takes it:
``KVBENCH_CPU_MOE_NATIVE``, by default its AVX2 build; torch's threads; ``cpu_path`` says which);
``pcie_us``, the device's blocks kernel reading the pinned blocks in place over PCIe
(``engine.kernels.moe_blocks``, CUDA events); ``dma_us``, the k chosen experts' blocks copied to a
device staging stack by the copy engines and the kernel run there (``engine.model.DmaExperts``'
step after its routing sync). It returns them with the thread count, or raises ``ConfigError``
where it cannot measure (no CUDA device). ``choose(probe, roundtrip_us)`` returns ``(tier,
reason)``: the tier with the least time a host layer, where "cpu" and "dma" pay a round trip on
top (``ROUNDTRIP_US``: the routing sync, the copies, a graph boundary) and "pcie" none (one
graph, no host sync); "cpu" pays the doorbell's hand-off instead (``DOORBELL_US``) where its
step would run as a host node rung by the graph (``cpu_handoff``); a tie goes to "pcie". The
reason states the numbers.

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
# The same with the doorbell (KVBENCH_HOST_NODES with KVBENCH_HOST_NODES_RUN=doorbell, the default
# where the tier computes through engine.native): reports/h100-2026-12-06d call 4 decoded 20 cpu-tier
# layers in 6.80-7.00 ms a step against 8.99-9.18 split at each layer, 100-119 us a layer less.
DOORBELL_US = 30.0


def cpu_handoff(cpu_path: str) -> str:
    """How a cpu-tier layer's step would hand its row to the CPU and back, read from the settings
    now: "doorbell" where a captured step would run it as a host node rung by the graph (native
    path, no GPU share, KVBENCH_HOST_NODES on with KVBENCH_HOST_NODES_RUN=doorbell), else "round
    trip" (a routing sync and a graph boundary each layer)."""
    from . import settings
    if (cpu_path == "native" and settings.get("KVBENCH_HOST_NODES") and not settings.get("KVBENCH_CPU_MOE_GPU_SHARE")
            and settings.get("KVBENCH_HOST_NODES_RUN") == "doorbell"):
        return "doorbell"
    return "round trip"


def _random_stack(shape, gen: torch.Generator, pinned: bool):
    from .kernels.moe_blocks import BlockStack
    st = BlockStack.empty("q4_0", shape, pinned=pinned)
    st.qs.copy_(torch.randint(0, 256, st.qs.shape, generator=gen, dtype=torch.int32).to(st.qs.dtype))
    st.d.copy_(((torch.rand(st.d.shape, generator=gen) + 0.5) / (8 * shape[2] ** 0.5)).half())
    return st


def measure(spec, device: torch.device, reps: int = 24) -> dict:
    """One layer's k experts on the host CPU (the cpu tier's path), over PCIe (blocks kernel) and
    by DMA: median us a step over ``reps`` steps of fresh random experts, after one untimed step each."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"host_experts 'auto' measures the GPU's PCIe reads, which needs a CUDA device, not {device}",
                          "pass host_experts='cpu' or 'pcie'")
    from .cpu_experts import HostQ4Experts
    from .kernels.moe_blocks import BlockStack, moe_decode_blocks
    E, ff, d, k = spec.n_experts, spec.d_ff_expert, spec.d_model, spec.n_experts_used
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    stacks = (_random_stack((E, ff, d), gen, True), _random_stack((E, ff, d), gen, True),
              _random_stack((E, d, ff), gen, True))
    from .model import CpuExperts
    x = torch.randn(1, d, generator=gen)
    ids = [torch.randperm(E, generator=gen)[:k] for _ in range(reps + 1)]
    w = [1.0 / k] * k
    cpu_path = "native" if CpuExperts.native_requested() else "int4"   # the path a cpu-tier step would take
    if cpu_path == "native":
        from . import native
        host = lambda sel: native.moe_q4_decode(x, sel, w, *stacks)          # noqa: E731
    else:
        packed = HostQ4Experts.from_blocks(*stacks)
        host = lambda sel: packed(x, sel, w)                                 # noqa: E731
    cpu = []
    for i, sel in enumerate(ids):
        t = time.perf_counter()
        host(sel.tolist())
        if i:
            cpu.append(time.perf_counter() - t)
    xd = x.to(device)
    pd = torch.full((k,), 1.0 / k, device=device)
    ids_d = [sel.to(device) for sel in ids]
    stage = (BlockStack.empty("q4_0", (k, ff, d), device=device), BlockStack.empty("q4_0", (k, ff, d), device=device),
             BlockStack.empty("q4_0", (k, d, ff), device=device))
    slots = torch.arange(k, device=device)

    def pcie_step(i):
        moe_decode_blocks(xd, *stacks, ids_d[i], pd)

    def dma_step(i):
        for j, e in enumerate(ids[i].tolist()):
            for src, dst in zip(stacks, stage):
                dst.qs[j].copy_(src.qs[e], non_blocking=True)
                dst.d[j].copy_(src.d[e], non_blocking=True)
        moe_decode_blocks(xd, *stage, slots, pd)

    def device_us(step):
        step(0)
        torch.cuda.synchronize(device)
        out = []
        for i in range(1, reps + 1):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(i)
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) * 1e3)
        return round(statistics.median(out), 1)
    out = {"cpu_us": round(1e6 * statistics.median(cpu), 1), "pcie_us": device_us(pcie_step),
           "dma_us": device_us(dma_step), "cpu_path": cpu_path, "cpu_handoff": cpu_handoff(cpu_path),
           "threads": torch.get_num_threads(),
           "experts": k, "reps": reps}
    del stage, ids_d, xd, pd, slots
    torch.cuda.empty_cache()          # the staging stacks' device memory back before the load places anything
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def choose(probe: dict, roundtrip_us: float = ROUNDTRIP_US) -> tuple[str, str]:
    """``(tier, reason)`` from ``measure``'s numbers: the least time a host layer ("dma" only where
    the probe timed it), "pcie" on a tie. The CPU pays ``DOORBELL_US`` where the probe's
    ``cpu_handoff`` is "doorbell", ``roundtrip_us`` otherwise; DMA always pays the round trip."""
    k = probe["experts"]
    bell = probe.get("cpu_handoff") == "doorbell"
    cpu_extra = DOORBELL_US if bell else roundtrip_us
    cost = {"pcie": probe["pcie_us"], "cpu": probe["cpu_us"] + cpu_extra}
    said = [f"{probe['pcie_us']:.0f} us read over PCIe by the GPU (pcie)",
            f"{probe['cpu_us']:.0f} us on the CPU ({probe['threads']} threads"
            + (f", {probe['cpu_path']} path" if probe.get("cpu_path") else "") + f") + {cpu_extra:.0f} us "
            + ("doorbell hand-off" if bell else "round trip") + f" = {cost['cpu']:.0f} us (cpu)"]
    if probe.get("dma_us") is not None:
        cost["dma"] = probe["dma_us"] + roundtrip_us
        said.append(f"{probe['dma_us']:.0f} us copied up and computed + {roundtrip_us:.0f} us round trip "
                    f"= {cost['dma']:.0f} us (dma)")
    tier = min(cost, key=lambda t: (cost[t], t != "pcie"))
    return tier, f"auto: a host layer's {k} experts take " + "; ".join(said) + f": {tier}"
