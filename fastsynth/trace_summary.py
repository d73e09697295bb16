"""Where a traced step's GPU sits idle, and what the host was doing then (`profile --trace`).

A step is launch-bound where the GPU finishes its queued work before the host has enqueued the
next kernel. The stage table cannot show that (its marks are GPU events: an idle stretch counts in
whichever stage it falls in), a Chrome trace shows it but is large to bring back from a device
machine. This reduces the trace to a few numbers: kernels per step, the GPU's busy fraction, the
idle time by stage (the innermost `record_function` range, named as the stage table's rows, open
on the host when the GPU resumed) and the longest gaps with the kernel that ended each and the
host's innermost op at that moment. Plus the host ops with the most self time.

The core (`summarize`) takes plain (start_us, end_us, name) tuples, so it is tested without a
GPU; `from_profiler` reads them from a finished torch.profiler run.
"""
from __future__ import annotations

OUTSIDE = "between stages (data, glue, backward)"


def summarize(device: list[tuple[float, float, str]], host: list[tuple[float, float, str]], stages: set[str],
              steps: int, min_gap_us: float = 20.0, top: int = 8) -> dict:
    """device: GPU activities (kernels, copies, sets); host: CPU ranges, the stage ranges among
    them (names in `stages`); steps: how many steps the events cover. Times in microseconds on
    the profiler's common clock."""
    out = {"steps": steps, "device_events_per_step": len(device) / steps}
    if not device:
        return {**out, "gpu_busy_fraction": None, "note": "no device activity recorded (a CPU run)"}
    device = sorted(device)
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = device[0]
    for s, e, name in device[1:]:
        if s > cur_end:  # an idle stretch of the GPU
            busy += cur_end - cur_start
            gaps.append((s - cur_end, cur_end, s, cur_name, name))
            cur_start = s
        if e >= cur_end:
            cur_end, cur_name = e, name
    busy += cur_end - cur_start
    span = cur_end - device[0][0]
    stage_ranges = [(s, e, n) for s, e, n in host if n in stages]
    idle_by_stage: dict[str, float] = {}
    long_gaps = [g for g in gaps if g[0] >= min_gap_us]
    for gap, _, resume, _, _ in long_gaps:
        label = _innermost(stage_ranges, resume) or OUTSIDE
        idle_by_stage[label] = idle_by_stage.get(label, 0.0) + gap
    longest = sorted(long_gaps, reverse=True)[:top]
    others = [(s, e, n) for s, e, n in host if not n.startswith("ProfilerStep")]
    out.update({
        "gpu_busy_ms_per_step": busy / steps / 1e3,
        "gpu_span_ms_per_step": span / steps / 1e3,
        "gpu_busy_fraction": busy / span if span > 0 else None,
        "min_gap_us": min_gap_us,
        "idle_gaps_per_step": len(long_gaps) / steps,
        "idle_ms_per_step": sum(g[0] for g in long_gaps) / steps / 1e3,
        # Gaps under min_gap_us: launch latency between back-to-back kernels, mostly.
        "short_gap_ms_per_step": sum(g[0] for g in gaps if g[0] < min_gap_us) / steps / 1e3,
        "idle_ms_per_step_by_stage": {k: v / steps / 1e3 for k, v in sorted(idle_by_stage.items(),
                                                                             key=lambda kv: -kv[1])},
        "longest_gaps": [{"us": round(gap, 1), "prev": before[:90], "next": after[:90],
                          "stage": _innermost(stage_ranges, resume) or OUTSIDE,
                          "host_op": _innermost(others, resume)}
                         for gap, _, resume, before, after in longest],
    })
    return out


def _innermost(ranges: list[tuple[float, float, str]], t: float) -> str | None:
    """The name of the latest-starting range that contains t (the innermost of nested ranges)."""
    best = None
    for s, e, n in ranges:
        if s <= t <= e and (best is None or s > best[0]):
            best = (s, n)
    return best[1] if best else None


def from_profiler(prof, stages: set[str], steps: int, top_ops: int = 12) -> dict:
    """summarize() over a finished torch.profiler.profile, plus the host ops with the most self
    CPU time per step. Never raises: a profiler without these fields gives an error entry."""
    try:
        from torch.autograd import DeviceType
        device, host = [], []
        for e in prof.events():
            span = (float(e.time_range.start), float(e.time_range.end), str(e.name))
            if e.device_type == DeviceType.CUDA:
                if not is_device_work(e):
                    continue
                device.append(span)
            elif e.device_type == DeviceType.CPU:
                host.append(span)
        out = summarize(device, host, stages, steps)
        ops = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:top_ops]
        out["host_top_self_ms_per_step"] = [{"op": a.key[:90], "ms": a.self_cpu_time_total / steps / 1e3,
                                             "calls": a.count / steps} for a in ops]
        return out
    except Exception as e:  # the figures stay; only the summary is missing
        return {"error": f"{type(e).__name__}: {e}"}


def is_device_work(event) -> bool:
    """A kernel, memcpy or memset, not a user annotation: torch.profiler also reports every
    record_function range (the stage names, ProfilerStep#N) on the GPU timeline, spanning the
    work launched inside it; counted as busy, they covered the idle gaps this summary exists to
    find (GPU busy came out near 100 %)."""
    return not getattr(event, "is_user_annotation", False) and not str(event.name).startswith("ProfilerStep#")


def format_lines(s: dict) -> list[str]:
    if "error" in s:
        return [f"trace summary: failed ({s['error']})"]
    lines = [f"trace: {s['device_events_per_step']:.0f} device activities per step"]
    if s.get("gpu_busy_fraction") is None:
        return lines + [f"  {s.get('note', 'no GPU timeline')}"]
    lines.append(f"  GPU busy {s['gpu_busy_ms_per_step']:.2f} of {s['gpu_span_ms_per_step']:.2f} ms per step "
                 f"({100 * s['gpu_busy_fraction']:.1f} %); idle gaps >= {s['min_gap_us']:.0f} us: "
                 f"{s['idle_gaps_per_step']:.1f} per step, {s['idle_ms_per_step']:.2f} ms; shorter gaps "
                 f"{s['short_gap_ms_per_step']:.2f} ms")
    for stage, ms in s["idle_ms_per_step_by_stage"].items():
        lines.append(f"  idle in {stage:<38} {ms:8.3f} ms/step")
    for g in s["longest_gaps"][:5]:
        lines.append(f"  gap {g['us']:9.1f} us in {g['stage']}: next {g['next'][:50]} (host in {g['host_op']})")
    return lines
