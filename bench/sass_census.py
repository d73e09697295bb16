"""Static census of the Triton kernels as a real launch on an H100/H200 compiles them (sm_90).

No GPU needed: the launchers' launches are recorded on meta tensors and compiled for sm_90
exactly as the JIT would on a device (fastsynth/kernels/_aot.py), then disassembled with
Triton's bundled nvdisasm and cuobjdump.

It shows registers, spills (local memory), shared memory and an instruction histogram: the
memory instructions' widths (LDG.E.128 moves 16 bytes), the quarter-rate MUFU and conversion
instructions, Philox's integer multiplies (IMAD.HI), the tensor-core HGMMAs, and the same for
the largest loop body (dual_noise: one row; info_nce: one queue tile). Counts are static, so
compare variants of one kernel at one shape: a proxy for an instruction-bound kernel's time,
never a timing; the GPU benchmark (bench/gpu_bench.py) decides.

    python bench/sass_census.py                       # every kernel at the benchmark shapes
    python bench/sass_census.py dual_noise --json out.json
    python bench/sass_census.py dual_noise --tune dual_noise.generator=philox2x32   # a TUNING choice
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the simulation

import torch  # noqa: E402
import triton  # noqa: E402

from fastsynth.kernels import _aot  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Instruction families worth a line of their own (prefix match on the opcode and its modifiers).
FAMILIES = ("MUFU", "I2F", "F2F", "IMAD.HI", "HGMMA", "LDG", "STG", "LDS", "STS", "LDGSTS", "SHFL", "BAR")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def _families(ops: collections.Counter) -> dict:
    return {f: n for f in FAMILIES if (n := sum(c for op, c in ops.items() if op.startswith(f)))}


def parse_sass(sass: str):
    """(opcodes in order, [(start, end)] of loops): a loop is a backward branch to a label."""
    instrs, labels, loops = [], {}, []
    for line in sass.splitlines():
        if (label := _LABEL.match(line)):
            labels[label.group(1)] = len(instrs)
        elif (m := _OP.match(line)):
            instrs.append(m.group(1))
            target = _TARGET.search(line)
            if m.group(1).startswith("BRA") and target and target.group(1) in labels:
                loops.append((labels[target.group(1)], len(instrs)))
    return instrs, loops


def census(kernel, args, kwargs) -> dict:
    compiled = _aot.compile_sm90(kernel, args, kwargs)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path],
                              capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path],
                               capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    instrs, loops = parse_sass(sass)
    ops = collections.Counter(instrs)
    start, end = max(loops, key=lambda x: x[1] - x[0]) if loops else (0, 0)
    body = collections.Counter(instrs[start:end])
    return {"kernel": kernel.__name__, "regs": int(res.get("REG", -1)), "spill_bytes": int(res.get("LOCAL", -1)),
            "shared_bytes": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "instructions": len(instrs), "families": _families(ops),
            "memory_ops": {op: n for op, n in sorted(ops.items()) if op.split(".")[0] in ("LDG", "STG")},
            "loop_body": end - start, "loop_families": _families(body), "opcodes": dict(ops.most_common())}



def cases(only=None):
    """(label, module, launcher call) at the benchmark shapes."""
    nce = importlib.import_module("fastsynth.kernels.info_nce")
    dn = importlib.import_module("fastsynth.kernels.dual_noise")
    out = []
    for n in (256, 128):
        q, u = _aot.meta(n, 128, dtype=torch.bfloat16), _aot.meta(65536, 128, dtype=torch.bfloat16)
        out.append((f"info_nce N={n} K=65536 C=128 bf16", nce, lambda q=q, u=u: nce._launch(q, q, u, 0.2, True)))
    for b, zt in ((128, torch.bfloat16), (8192, torch.bfloat16), (8192, torch.float32)):
        z, s = _aot.meta(b, 2048, dtype=zt), _aot.meta(b, 2048)
        out.append((f"dual_noise B={b} d=2048 z={str(zt)[6:]}", dn,
                    lambda z=z, s=s: dn._launch(z, s, _aot.meta(2048), 1.0, 1.0, 0.02, 0)))
    fb = importlib.import_module("fastsynth.kernels.feature_bank")
    z = _aot.meta(128, 2048)
    out.append(("feature_bank M=65536 d=2048 B=128 z=float32", fb,
                lambda z=z: fb._launch(z, _aot.meta(65536, 2048), _aot.meta((), dtype=torch.long),
                                       _aot.meta(2048, dtype=torch.float64), _aot.meta(2048, dtype=torch.float64),
                                       _aot.meta(2048), _aot.meta(1 + 2048 // fb.MIN_BLOCK_D, dtype=torch.int32))))
    return [c for c in out if only is None or c[0].startswith(only)]


def run(only=None) -> list:
    report = []
    for label, module, call in cases(only):
        for kernel, grid, args, kwargs in _aot.launches(module, call):
            r = census(kernel, args, kwargs)
            r.update(case=label, grid=list(grid))
            report.append(r)
    return report


def _set_tuning(item: str) -> None:
    try:
        target, value = item.split("=", 1)
        name, key = target.split(".", 1)
    except ValueError:
        raise SystemExit(f"--tune {item!r}: expected MODULE.KEY=VALUE, e.g. dual_noise.philox_rounds=7") from None
    try:
        tuning = importlib.import_module(f"fastsynth.kernels.{name}").TUNING
    except (ModuleNotFoundError, AttributeError):
        raise SystemExit(f"--tune {item!r}: fastsynth.kernels.{name} has no TUNING (try info_nce, dual_noise, feature_bank)") from None
    if key not in tuning:
        raise SystemExit(f"--tune {item!r}: {name}.TUNING has no {key!r} (it has {', '.join(tuning)})")
    try:
        tuning[key] = json.loads(value)
    except json.JSONDecodeError:
        tuning[key] = value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("only", nargs="?", help="label prefix, e.g. dual_noise")
    ap.add_argument("--json", help="write the full census here")
    ap.add_argument("--tune", action="append", default=[], metavar="MODULE.KEY=VALUE",
                    help="set a kernel module's TUNING entry first (value read as JSON, else a string)")
    a = ap.parse_args(argv)
    for item in a.tune:
        _set_tuning(item)
    report = run(a.only)
    for r in report:
        print(f"{r['case']:32s} {r['kernel']:24s} grid={tuple(r['grid'])} warps={r['num_warps']} regs={r['regs']} "
              f"spill={r['spill_bytes']}B smem={r['shared_bytes']}B instructions={r['instructions']} "
              f"largest loop={r['loop_body']}\n    all:  {r['families']}\n    loop: {r['loop_families']}\n"
              f"    memory: {r['memory_ops']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"target": "sm_90", "triton": triton.__version__, "torch": torch.__version__,
                       "tune": a.tune, "kernels": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
