"""Compile a conv kernel for sm_90 offline with launch-like specialisation; print a summary."""
import os, re, sys, json, importlib
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget

TYPES = {"x_ptr": "*bf16", "du_ptr": "*bf16", "g_ptr": "*fp32", "w_ptr": "*fp32", "bias_ptr": "*fp32",
         "dw_part_ptr": "*fp32", "dbias_part_ptr": "*fp32", "dx_ptr": "*bf16", "u_ptr": "*bf16"}

def compile_kernel(kernel, ones, consts, num_warps=4, num_stages=3):
    """ones: int args specialised to 1 (as Triton's launcher does); other ints and all pointers get
    divisibility 16 (true for b=8, L=2048, d=1536 and torch's allocations)."""
    sig, constexprs, attrs = {}, {}, {}
    for i, a in enumerate(kernel.arg_names):
        if a in consts:
            sig[a] = "constexpr"; constexprs[a] = consts[a]
        elif a in ones:
            sig[a] = "constexpr"; constexprs[a] = 1
        elif a.endswith("_ptr"):
            sig[a] = TYPES[a]; attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "i32"; attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": int(os.environ["MAXNREG"])} if os.environ.get("MAXNREG") else {})))

def summary(ck, tag, outdir=os.environ.get("OUTDIR", "out")):
    os.makedirs(outdir, exist_ok=True)
    for ext in ("ttir", "ttgir", "llir", "ptx"):
        with open(f"{outdir}/{tag}.{ext}", "w") as f:
            f.write(ck.asm[ext])
    with open(f"{outdir}/{tag}.sass", "w") as f:
        import subprocess, tempfile
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cb:
            cb.write(ck.asm["cubin"]); cb.flush()
            cuobj = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
            f.write(subprocess.run([cuobj, "-sass", cb.name], capture_output=True, text=True).stdout)
    md = ck.metadata
    ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    sass = open(f"{outdir}/{tag}.sass").read()
    ld = re.findall(r"ld\.global[\w.]*", ptx); st = re.findall(r"st\.global[\w.]*", ptx)
    from collections import Counter
    import subprocess as sp, tempfile as tf
    with tf.NamedTemporaryFile(suffix=".cubin") as cb:
        cb.write(ck.asm["cubin"]); cb.flush()
        cuobj = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        ru = sp.run([cuobj, "-res-usage", cb.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", ru, re.S)
    res = dict(tag=tag, regs=int(m[1]), stack=int(m[2]), local=int(m[4]), shared=md.shared,
               convert_layout=ttgir.count("ttg.convert_layout"),
               local_alloc=ttgir.count("ttg.local_alloc"),
               reduce=ttgir.count('"tt.reduce"') + ttgir.count("tt.reduce("),
               ptx_ld=dict(Counter(ld)), ptx_st=dict(Counter(st)),
               bar_sync=len(re.findall(r"bar\.sync|barrier\.sync", ptx)),
               st_shared=len(re.findall(r"st\.shared", ptx)), ld_shared=len(re.findall(r"ld\.shared", ptx)),
               sass_LDG=dict(Counter(re.findall(r"LDG\.E[\w.]*", sass))),
               sass_STG=dict(Counter(re.findall(r"STG\.E[\w.]*", sass))),
               sass_BAR=len(re.findall(r"\bBAR\.", sass)), sass_STS=len(re.findall(r"\bSTS", sass)),
               sass_LDS=len(re.findall(r"\bLDS", sass)), sass_SHFL=len(re.findall(r"SHFL", sass)),
               sass_insts=len(re.findall(r"/\*[0-9a-f]{4,6}\*/\s+[@A-Z]", sass)))
    print(json.dumps(res))
    return res

if __name__ == "__main__":
    mod = importlib.import_module(sys.argv[1]); kname = sys.argv[2]; case = sys.argv[3]
    BL, BD, nw = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    extra = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    ones = {"tok": {"stride_ul"}, "chan": {"stride_ud"}, "rt": set()}[case]
    k = getattr(mod, kname)
    consts = {a: v for a, v in dict(K=4, BLOCK_L=BL, BLOCK_D=BD, **extra).items() if a in k.arg_names}
    ck = compile_kernel(k, ones, consts, nw, int(os.environ.get("STAGES", 3)))
    st = os.environ.get("STAGES", "3") + (".r" + os.environ["MAXNREG"] if os.environ.get("MAXNREG") else ""); summary(ck, f"{sys.argv[1]}.{kname}.{case}.L{BL}.D{BD}.w{nw}.s{st}" + "".join(f".{a}{v}" for a, v in extra.items()))
