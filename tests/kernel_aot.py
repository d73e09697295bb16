"""Ahead-of-time compile of every Triton kernel for a Hopper GPU (sm_90), no GPU needed.

The interpreter runs kernels as plain Python, so it accepts code the Triton compiler rejects
(names bound inside a loop body and used after it, loop-carried values changing dtype when
inductor passes Python floats as fp64). Compiling here through to a cubin with Triton's bundled
ptxas catches those on a CPU-only machine. Run as a script in a process without TRITON_INTERPRET
(tests/test_kernels_compile.py does); prints one JSON line per case.
"""
import importlib
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _mod(name):
    return importlib.import_module(f"fastsynth.kernels.{name}")


def cases():
    """(label, kernel, signature, constexprs, options): launch shapes the launchers use, with Python
    floats typed fp32 (eager launch) and fp64 (inductor's launch)."""
    nce, dn, fb = _mod("info_nce"), _mod("dual_noise"), _mod("feature_bank")
    out = []
    # fp64 floats (inductor) for one case per kernel with float arguments; dtypes under fp32 floats.
    combos = [("bf16", "bf16", False, True, "fp32", 128), ("bf16", "bf16", False, False, "fp32", 128),
              ("fp16", "fp32", False, True, "fp32", 128), ("fp32", "fp32", True, True, "fp32", 128),
              ("bf16", "bf16", False, True, "fp64", 128), ("bf16", "bf16", False, True, "fp32", 256)]
    for qt, ut, ieee, need_grad, flt, block_c in combos:
        sig = {"q_ptr": f"*{qt}", "u_ptr": f"*{ut}", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
               "N": "i32", "K": "i32", "C": "i32", "chunk": "i32", "stride_qn": "i32", "stride_qc": "i32",
               "stride_un": "i32", "stride_uc": "i32", "scale": flt,
               "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_C": "constexpr",
               "NEED_GRAD": "constexpr", "IEEE": "constexpr"}
        # the launcher's wide-row setting: C in (128, 256] halves block_k and uses 8 warps
        out.append((f"info_nce split q={qt} queue={ut} grad={need_grad} floats={flt} C<={block_c}",
                    nce._info_nce_split_kernel, sig,
                    {"BLOCK_N": 64, "BLOCK_K": 64 if block_c == 128 else 32, "BLOCK_C": block_c,
                     "NEED_GRAD": need_grad, "IEEE": ieee},
                    {"num_warps": 4 if block_c == 128 else 8, "num_stages": 3}))
    for qt, flt in (("bf16", "fp32"), ("fp32", "fp64")):
        sig = {"q_ptr": f"*{qt}", "k_ptr": f"*{qt}", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
               "loss_ptr": "*fp32", "grad_ptr": f"*{qt}", "N": "i32", "C": "i32", "S": "i32",
               "stride_qn": "i32", "stride_qc": "i32", "stride_kn": "i32", "stride_kc": "i32",
               "scale": flt, "grad_scale": flt, "BLOCK_N": "constexpr", "BLOCK_C": "constexpr",
               "NEED_GRAD": "constexpr"}
        out.append((f"info_nce merge q={qt} floats={flt}", nce._info_nce_merge_kernel, sig,
                    {"BLOCK_N": 16, "BLOCK_C": 256, "NEED_GRAD": True}, {"num_warps": 4}))
    # seed is i32 for small eager seeds, i64 for large ones
    for rows, single, fast, flt, seed in ((1, True, True, "fp32", "i32"), (4, True, False, "fp32", "i64"),
                                          (2, False, True, "fp64", "i64")):
        sig = {"z_ptr": "*bf16", "s_ptr": "*fp32", "v_ptr": "*fp32", "out_ptr": "*bf16", "B": "i32", "D": "i32",
               "stride_zb": "i32", "stride_zd": "i32", "stride_sb": "i32", "stride_sd": "i32", "stride_v": "i32",
               "stride_ob": "i32", "sigma_g": flt, "sigma_v": flt, "lam": flt, "seed": seed,
               "ROWS": "constexpr", "BLOCK_D": "constexpr", "SINGLE": "constexpr", "FAST": "constexpr"}
        out.append((f"dual_noise rows={rows} single={single} fast={fast} floats={flt} seed={seed}",
                    dn._dual_noise_kernel, sig,
                    {"ROWS": rows, "BLOCK_D": 2048 if single else 512, "SINGLE": single, "FAST": fast},
                    {"num_warps": 4 if rows == 1 else 8}))
    for zt in ("fp32", "bf16"):
        sig = {"z_ptr": f"*{zt}", "bank_ptr": "*fp32", "count_ptr": "*i64", "mean_ptr": "*fp64", "m2_ptr": "*fp64",
               "var_ptr": "*fp32", "done_ptr": "*i32", "B": "i32", "M": "i32", "D": "i32", "stride_zb": "i32",
               "stride_zd": "i32", "BLOCK_B": "constexpr", "BLOCK_D": "constexpr"}
        out.append((f"feature_bank update z={zt}", fb._bank_update_kernel, sig, {"BLOCK_B": 32, "BLOCK_D": 64},
                    {"num_warps": 4}))
    return out


def main() -> int:
    failed = 0
    for label, kernel, sig, constexprs, options in cases():
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32), options=options)
            print(json.dumps({"case": label, "ok": True}), flush=True)
        except Exception:
            failed += 1
            print(json.dumps({"case": label, "ok": False, "error": traceback.format_exc(limit=2)[-1500:]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
