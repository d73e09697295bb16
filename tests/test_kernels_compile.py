"""Every Triton kernel compiles for an H100/H200 (sm_90) down to a cubin, on this CPU machine.

The interpreter-based tests check what the kernels compute; this one checks that the Triton
compiler accepts them at all (see tests/kernel_aot.py for the cases and why).
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend to compile with")
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "kernel_aot.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    # 7 info_nce cases x (split, merge), 3 of its backward's scaling, 7 + 3 + 2 + 1 dual_noise
    # (Philox4x32, Philox2x32, one draw per element, the seed from a device tensor), 2
    # feature_bank: a launch gone missing from a launcher shows up here.
    assert len(results) == 32, proc.stdout + proc.stderr
    assert not failed, "\n".join(f"{r['case']}:\n{r['error']}" for r in failed)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend to compile with")
def test_sass_census_reads_the_launches_a_gpu_would_compile():
    """bench/sass_census.py specialises like the JIT: contiguous bfloat16 rows are moved 16 bytes
    per instruction (a stride left unspecialised would give 2-byte loads), and it finds the
    per-row loop of dual_noise's persistent programs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "sass_census.py")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "census.json")
        proc = subprocess.run([sys.executable, script, "dual_noise B=8192 d=2048 z=bf", "--json", out],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with open(out) as f:
            (r,) = json.load(f)["kernels"]
    assert r["kernel"] == "_dual_noise_kernel" and r["regs"] > 0
    assert r["grid"][0] < 8192                                 # programs walk over rows
    assert set(r["memory_ops"]) == {"LDG.E.128", "STG.E.128"}
    assert 0 < r["loop_body"] < r["instructions"]
    assert r["loop_families"]["MUFU"] >= 64                  # Box-Muller: 16 elements a thread, 4 MUFU each


def test_host_overhead_script_times_the_eager_calls():
    """bench/host_overhead.py (run in its own process: it replaces the kernels with no-ops) times
    the three public calls with positive figures, and refuses an unknown part."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "host_overhead.py")
    proc = subprocess.run([sys.executable, script, "kernels"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("info_nce", "dual_noise", "FeatureBank"))]
    assert len(rows) == 3 and all(float(r.split()[-1]) > 0 for r in rows), proc.stdout
    bad = subprocess.run([sys.executable, script, "kernel"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part" in bad.stderr
