"""Every Triton kernel compiles for a Hopper GPU (sm_90), here on the CPU: the interpreter runs kernels as
Python and accepts what Triton's compiler refuses (a generator expression, a tuple multiplied by an int), so
without this a kernel can pass every test in the interpreter and fail on its first GPU launch. The compiler runs
in a subprocess: with TRITON_INTERPRET=1 (the suite's setting) the kernels are not compilable objects."""
import os
import subprocess
import sys

import pytest

if __name__ != "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conv_triton  # noqa: E402
import scan_triton  # noqa: E402

HALF = "*bf16"  # the sequences as a bf16 training step passes them; states, parameters and sums are float32
SEQUENCES = {"u_ptr", "delta_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "x_ptr",
             "g_ptr", "dx_ptr", "rows_ptr"}
COUNTERS = {"next_item_ptr"}  # int32
FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_DELTA_BIAS=True, DELTA_SOFTPLUS=True, SEG=64, BLOCK_N=16)
KERNELS = {  # name: (kernel, constexpr arguments, num_warps)
    "scan forward (pass 3)": (scan_triton._scan_fwd_kernel, dict(
        STATES_ONLY=False, FROM_CHUNK_STATE=True, SAVE_SEGMENTS=True, T=scan_triton.FWD_T,
        STAGES=scan_triton.FWD_STAGES, BLOCK_D=32 * scan_triton.FWD_WARPS, **FLAGS), scan_triton.FWD_WARPS),
    "scan forward (pass 1)": (scan_triton._scan_fwd_kernel, dict(
        STATES_ONLY=True, FROM_CHUNK_STATE=False, SAVE_SEGMENTS=False, T=scan_triton.FWD_T,
        STAGES=scan_triton.FWD_STAGES, BLOCK_D=32 * scan_triton.FWD_WARPS, **FLAGS), scan_triton.FWD_WARPS),
    "carry": (scan_triton._chunk_carry_kernel, dict(REVERSE=True, HAS_INITIAL=True, BLOCK=scan_triton.CARRY_BLOCK,
                                                    BLOCK_N=16, GROUP=scan_triton.CARRY_GROUP), 4),
    "adjoint summaries": (scan_triton._adjoint_summary_kernel, dict(
        T=scan_triton.BWD_T, BLOCK_D=32 * scan_triton.BWD_WARPS, **FLAGS), scan_triton.BWD_WARPS),
    "scan backward": (scan_triton._scan_bwd_kernel, dict(T=scan_triton.BWD_T, BLOCK_D=32 * scan_triton.BWD_WARPS,
                                                         **FLAGS), scan_triton.BWD_WARPS),
    "transposing copy into rows": (scan_triton._rows_kernel, dict(BLOCK=scan_triton.ROWS_BLOCK), 4),
    "conv forward": (conv_triton._conv_fwd_kernel, dict(K=4, BLOCK_L=conv_triton.BLOCK_L,
                                                        BLOCK_D=conv_triton.BLOCK_D), 4),
    "conv backward": (conv_triton._conv_bwd_kernel, dict(K=4, BLOCK_L=conv_triton.BLOCK_L,
                                                         BLOCK_D=conv_triton.BLOCK_D), 4),
}


def compile_for_sm90(name):
    kernel, constants, num_warps = KERNELS[name]
    signature = {arg: "constexpr" if arg in constants else (HALF if arg in SEQUENCES else "*i32" if arg in COUNTERS
                                                            else "*fp32") if arg.endswith("_ptr") else "i32"
                 for arg in kernel.arg_names}
    constants = {arg: value for arg, value in constants.items() if arg in signature}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_for_sm90(name):
    run = subprocess.run([sys.executable, __file__, name], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True)
    assert run.returncode == 0 and "cubin" in run.stdout, run.stderr[-3000:]


if __name__ == "__main__":
    print("cubin" if compile_for_sm90(sys.argv[1]).asm["cubin"] else "no cubin")
