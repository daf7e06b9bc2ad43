"""Conv kernels' tile sizes, channels-first layout (x a slice of a (2d, b·l) matrix, ∂u a (d, b·l) matrix):
forward and backward time (us, median of do_bench) per (BLOCK_L, BLOCK_D, warps); causal-conv1d beside."""
import sys, torch, triton
sys.path.insert(0, ".")
import conv_triton as ct
try:
    from causal_conv1d import causal_conv1d_fn
except Exception as e:
    print("no causal_conv1d:", e); causal_conv1d_fn = None
shapes = [(8, 2048, 1536), (32, 1024, 1024), (64, 512, 512)]
configs = [(128, 16, 4), (64, 32, 4), (256, 8, 4), (128, 32, 4), (256, 16, 4), (512, 8, 4), (128, 16, 2),
           (256, 16, 8), (64, 16, 2), (512, 4, 4), (256, 32, 8), (512, 16, 8)]
fwd_k, bwd_k, tr_k = ct._conv_fwd_kernel, ct._conv_bwd_kernel, ct._conv_transpose_kernel
warps = {"n": 4}
class W:
    def __init__(self, k): self.k = k
    def __getitem__(self, grid):
        return lambda *a, **kw: self.k[grid](*a, num_warps=warps["n"], **kw)
ct._conv_fwd_kernel, ct._conv_bwd_kernel, ct._conv_transpose_kernel = W(fwd_k), W(bwd_k), W(tr_k)
for b, L, d in shapes:
    xz = torch.randn(2 * d, b * L, device="cuda", dtype=torch.bfloat16)
    x = xz[:d].view(d, b, L).transpose(0, 1)
    w = torch.randn(d, 4, device="cuda") * 0.3; bias = torch.randn(d, device="cuda")
    du = torch.randn(d, b * L, device="cuda", dtype=torch.bfloat16).view(d, b, L).transpose(0, 1)
    ref = None
    if causal_conv1d_fn is not None:
        xr = x.detach().clone().requires_grad_()  # contiguous? keep layout of x
        xr = torch.empty_strided(x.shape, x.stride(), device="cuda", dtype=x.dtype).copy_(x).requires_grad_()
        wr, br = w.clone().requires_grad_(), bias.clone().requires_grad_()
        f = triton.testing.do_bench(lambda: causal_conv1d_fn(xr, wr, br, activation="silu"), return_mode="median")
        out = causal_conv1d_fn(xr, wr, br, activation="silu")
        g = triton.testing.do_bench(lambda: torch.autograd.grad(out, (xr, wr, br), du, retain_graph=True), return_mode="median")
        print(f"({b},{L},{d}) causal_conv1d: fwd {f*1e3:.1f} us, bwd {g*1e3:.1f} us", flush=True)
    for BL, BD, nw in configs:
        ct.BLOCK_L, ct.BLOCK_D, warps["n"] = BL, BD, nw
        u = ct._conv_fwd(x, w, bias); dx, dw, db = ct._conv_bwd(x, w, bias, du)
        if ref is None: ref = (u, dx, dw, db)
        err = max((a.float() - r.float()).abs().max().item() / (r.float().abs().max().item() + 1e-9) for a, r in zip((u, dx, dw, db), ref))
        f = triton.testing.do_bench(lambda: ct._conv_fwd(x, w, bias), return_mode="median")
        g = triton.testing.do_bench(lambda: ct._conv_bwd(x, w, bias, du), return_mode="median")
        print(f"({b},{L},{d}) BLOCK_L {BL} BLOCK_D {BD} warps {nw}: fwd {f*1e3:.1f} us, bwd {g*1e3:.1f} us, rel diff {err:.1e}", flush=True)
