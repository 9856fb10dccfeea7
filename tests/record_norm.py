"""What legitimately differs between two runs of the same suite, set aside before comparing
records: wall-clock fields (run name, ``seconds``, ``finished``/``started``, tok/s values,
every metric of a throughput check (spread, CV, unstable flag, load: all timing) and
throughput timing samples), the case record's ``memory`` (this process's peak RSS, sampled
by a thread), the case record's ``process`` (which process measured it: pid, start, host) and
what the planner read of the machine's free host RAM (``host_ram``
readings and the weight-format reason that quotes them). Everything else must be equal."""
from __future__ import annotations

TIMING_KEYS = {"run", "seconds", "finished", "started", "memory", "process"}
MACHINE_KEYS = {"weight_format_reason"}
HOST_RAM_READINGS = {"available", "total", "source"}


def _drop(v):
    if isinstance(v, dict):
        return {k: (_drop({a: b for a, b in x.items() if a not in HOST_RAM_READINGS})
                    if k == "host_ram" and isinstance(x, dict) else _drop(x))
                for k, x in v.items() if k not in TIMING_KEYS | MACHINE_KEYS}
    if isinstance(v, list):
        return [_drop(x) for x in v]
    return v


def stable(rec: dict) -> dict:
    """A record without the run-dependent fields (at any depth)."""
    out = _drop(rec)
    if out["type"] == "metric" and (out.get("unit") == "tok/s" or out.get("kind") == "throughput"):
        for k in ("value", "passed", "detail"):
            out.pop(k, None)
    if out["type"] == "series" and (out.get("kind") == "throughput" or str(out.get("name", "")).endswith("_samples")):
        out.pop("values")
    if out["type"] == "info":
        out["info"] = {k: v for k, v in out["info"].items() if k != "prefill_stats"}
    return out
