"""Conv kernels' tile sizes: forward and backward time (ms, median of do_bench) per (BLOCK_L, BLOCK_D, warps)."""
import sys, torch, triton
sys.path.insert(0, ".")
import conv_triton as ct
shapes = [(8, 2048, 1536), (32, 1024, 1024), (64, 512, 512)]
configs = [(32, 128, 4), (64, 128, 4), (128, 128, 4), (64, 64, 4), (128, 64, 4), (64, 256, 4), (128, 128, 8), (256, 64, 4), (32, 256, 4), (64, 128, 8)]
fwd_k, bwd_k, tr_k = ct._conv_fwd_kernel, ct._conv_bwd_kernel, ct._conv_transpose_kernel
warps = {"n": 4}
class W:
    def __init__(self, k): self.k = k
    def __getitem__(self, grid):
        return lambda *a, **kw: self.k[grid](*a, num_warps=warps["n"], **kw)
ct._conv_fwd_kernel, ct._conv_bwd_kernel, ct._conv_transpose_kernel = W(fwd_k), W(bwd_k), W(tr_k)
for b, L, d in shapes:
    xz = torch.randn(b, L, 2 * d, device="cuda", dtype=torch.bfloat16)
    x = xz[..., :d]
    w = torch.randn(d, 4, device="cuda") * 0.3; bias = torch.randn(d, device="cuda")
    du = torch.randn(b, L, d, device="cuda", dtype=torch.bfloat16)
    ref = None
    for BL, BD, nw in configs:
        ct.BLOCK_L, ct.BLOCK_D, warps["n"] = BL, BD, nw
        u = ct._conv_fwd(x, w, bias); dx, dw, db = ct._conv_bwd(x, w, bias, du)
        if ref is None: ref = (u, dx, dw, db)
        err = max((a.float() - r.float()).abs().max().item() / (r.float().abs().max().item() + 1e-9) for a, r in zip((u, dx, dw, db), ref))
        f = triton.testing.do_bench(lambda: ct._conv_fwd(x, w, bias), return_mode="median")
        g = triton.testing.do_bench(lambda: ct._conv_bwd(x, w, bias, du), return_mode="median")
        print(f"({b},{L},{d}) BLOCK_L {BL} BLOCK_D {BD} warps {nw}: fwd {f*1e3:.1f} us, bwd {g*1e3:.1f} us, rel diff {err:.1e}", flush=True)
