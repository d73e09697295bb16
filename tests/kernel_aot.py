"""Ahead-of-time compile of every Triton kernel for a Hopper GPU (sm_90), no GPU needed.

The interpreter runs kernels as plain Python, so it accepts code the Triton compiler rejects
(names bound inside a loop body and used after it, loop-carried values changing dtype when
inductor passes Python floats as fp64). Compiling here through to a cubin with Triton's bundled
ptxas catches those on a CPU-only machine. The launches are the launchers' own, recorded on meta
tensors (kernels/_aot.py), at the shapes and dtypes they meet. Run as a script in a process
without TRITON_INTERPRET (tests/test_kernels_compile.py does); prints one JSON line per kernel.
"""
import importlib
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from fastsynth.kernels import _aot  # noqa: E402
from fastsynth.kernels._dispatch import tuned  # noqa: E402


def _mod(name):
    return importlib.import_module(f"fastsynth.kernels.{name}")



def cases():
    """(label, module, launcher call, float type, TUNING overrides)."""
    nce, dn, fb = _mod("info_nce"), _mod("dual_noise"), _mod("feature_bank")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    out = []
    # q / queue dtypes, gradient, Python floats as fp32 (eager) or fp64 (inductor), C, N (8192: one
    # split, the merge's tile of one), K (65535: masked tiles)
    for qt, ut, grad, flt, c, n, k in ((bf16, bf16, True, "fp32", 128, 256, 65536),
                                       (bf16, bf16, False, "fp32", 128, 256, 65536),
                                       (fp16, fp32, True, "fp32", 128, 256, 65535),
                                       (fp32, fp32, True, "fp32", 128, 256, 65536),
                                       (bf16, bf16, True, "fp64", 128, 256, 65536),
                                       (bf16, bf16, True, "fp32", 256, 256, 65536),
                                       (bf16, bf16, True, "fp32", 128, 8192, 4096)):
        q, u = _aot.meta(n, c, dtype=qt), _aot.meta(k, c, dtype=ut)
        out.append((f"info_nce q={qt} queue={ut} grad={grad} floats={flt} C={c} N={n} K={k}", nce,
                    lambda q=q, u=u, grad=grad: nce._launch(q, q, u, 0.2, grad), flt, {}))
    for gt in (bf16, fp16, fp32):  # the backward's scaling of dL/dq by the incoming gradient
        g = _aot.meta(256, 128, dtype=gt)
        out.append((f"info_nce backward scale grad={gt}", nce, lambda g=g: nce._launch_scale(g, _aot.meta(())), "fp32",
                    {}))
    # z dtype, shape, transposed, floats, seed, exact functions: the even single-block row, odd and
    # wide rows (masks, the chunked path), even wide rows, a row of one pair, strided inputs, large
    # seeds (i64), a seed of 1 (the JIT makes it a constant), inductor's fp64
    for zt, (b, d), trans, flt, seed, fast in ((bf16, (8192, 2048), False, "fp32", 0, True),
                                               (fp32, (8192, 2048), False, "fp32", 0, True),
                                               (bf16, (128, 301), True, "fp32", 2 ** 40, False),
                                               (bf16, (64, 10001), False, "fp64", 2 ** 40, True),
                                               (fp16, (64, 10000), True, "fp32", 7, False),
                                               (bf16, (64, 8192), False, "fp32", 1, True),
                                               (fp32, (3, 2), False, "fp32", 5, True)):
        z = _aot.meta(d, b, dtype=zt).t() if trans else _aot.meta(b, d, dtype=zt)
        s = _aot.meta(d, b).t() if trans else _aot.meta(b, d)
        out.append((f"dual_noise z={zt} B={b} d={d} transposed={trans} floats={flt} seed={seed} fast={fast}", dn,
                    lambda z=z, s=s, d=d, seed=seed: dn._launch(z, s, _aot.meta(d), 0.5, 0.5, 0.02, seed), flt,
                    {"fast": fast}))
    # The Philox2x32 generator: the benchmark row, a 64-bit seed (its high word goes into the
    # counter), and a seed of 1, which reaches the generator as a constant.
    for zt, (b, d), flt, seed in ((bf16, (8192, 2048), "fp32", 0), (bf16, (64, 10001), "fp64", 2 ** 40),
                                  (fp32, (3, 2), "fp32", 1)):
        z, s = _aot.meta(b, d, dtype=zt), _aot.meta(b, d)
        out.append((f"dual_noise philox2x32 z={zt} B={b} d={d} floats={flt} seed={seed}", dn,
                    lambda z=z, s=s, d=d, seed=seed: dn._launch(z, s, _aot.meta(d), 0.5, 0.5, 0.02, seed), flt,
                    {"generator": "philox2x32"}))
    # One normal per element (TUNING["draws"] = 1), with each generator, at the benchmark row.
    for gen in ("philox4x32", "philox2x32"):
        z, s = _aot.meta(8192, 2048, dtype=bf16), _aot.meta(8192, 2048)
        out.append((f"dual_noise one draw {gen} z=bf16 B=8192 d=2048", dn,
                    lambda z=z, s=s: dn._launch(z, s, _aot.meta(2048), 0.5, 0.5, 0.02, 0), "fp32",
                    {"generator": gen, "draws": 1}))
    # The seed read from device memory (a CUDA-graph step's per-replay seed).
    z, s = _aot.meta(8192, 2048, dtype=bf16), _aot.meta(8192, 2048)
    out.append(("dual_noise seed from a device tensor z=bf16 B=8192 d=2048", dn,
                lambda z=z, s=s: dn._launch(z, s, _aot.meta(2048), 0.5, 0.5, 0.02, 0, _aot.meta((), dtype=torch.long)),
                "fp32", {}))
    for zt in (fp32, bf16):
        z = _aot.meta(128, 2048, dtype=zt)
        out.append((f"feature_bank update z={zt}", fb,
                    lambda z=z: fb._launch(z, _aot.meta(65536, 2048), _aot.meta((), dtype=torch.long),
                                           _aot.meta(2048, dtype=torch.float64), _aot.meta(2048, dtype=torch.float64),
                                           _aot.meta(2048), _aot.meta(1 + 2048 // fb.MIN_BLOCK_D, dtype=torch.int32)),
                    "fp32", {}))
    return out


def main() -> int:
    failed = 0
    for label, module, call, flt, tuning in cases():
        try:
            with tuned(module, **tuning):
                launches = _aot.launches(module, call)
            assert launches, "the launcher made no launch"
            for kernel, grid, args, kwargs in launches:
                _aot.compile_sm90(kernel, args, kwargs, flt)
                print(json.dumps({"case": f"{label}: {kernel.__name__}", "ok": True}), flush=True)
        except Exception:
            failed += 1
            print(json.dumps({"case": label, "ok": False, "error": traceback.format_exc(limit=3)[-1500:]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
