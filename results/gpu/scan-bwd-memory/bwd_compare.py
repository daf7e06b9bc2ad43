"""Backward of the scan, side by side: HEAD's kernel (a program per work item), resident programs taking items
round-robin (static), and resident programs taking items from a counter (the working tree); registers, spills."""
import sys, importlib, torch
sys.path.insert(0, "."); sys.path.insert(0, ".carry")
import bench
mods = {"old": importlib.import_module("head_scan_triton"), "static": importlib.import_module("static_scan_triton"),
        "dyn": importlib.import_module("scan_triton")}
info = {}
for name, mod in mods.items():
    orig = mod._scan_bwd_kernel
    class Spy:
        def __init__(self, orig, name): self.orig, self.name = orig, name
        def __getitem__(self, grid):
            def launch(*a, **k):
                kern = self.orig[grid](*a, **k)
                info[self.name] = f"{getattr(kern, 'n_regs', '?')}/{getattr(kern, 'n_spills', '?')}"
                return kern
            return launch
    mod._scan_bwd_kernel = Spy(orig, name)
shapes = [(64, 512, 512), (8, 1536, 2048), (16, 1536, 4096), (1, 1536, 131072), (32, 1024, 1024), (16, 512, 512), (4, 2048, 8192)]
print("| (B, d_inner, L) | dtype | bwd ms old / static / dyn | static, dyn ÷ old speed | bwd peak MiB old / static / dyn | regs/spills old, static, dyn |")
for dt in (torch.bfloat16, torch.float32):
    for batch, d_inner, L in shapes:
        x = bench.scan_inputs(batch, d_inner, L, dt)
        res = {}
        for rnd in range(3):
            for name, mod in mods.items():
                inputs = {k: v.detach().requires_grad_() for k, v in x.items()}
                out = mod.selective_scan(**inputs, delta_softplus=True)
                dout = torch.randn_like(out)
                torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
                torch.autograd.grad(out, list(inputs.values()), dout, retain_graph=True)
                torch.cuda.synchronize(); peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                _, bwd, _ = bench.time_scan(mod.selective_scan, x)
                res.setdefault(name, []).append((bwd, peak))
                del out, dout, inputs
        t = {k: min(r[0] for r in v) for k, v in res.items()}
        print(f"| ({batch}, {d_inner}, {L}) | {str(dt)[6:]} | {t['old']:.3f} / {t['static']:.3f} / {t['dyn']:.3f} | "
              f"{t['old']/t['static']:.3f}, {t['old']/t['dyn']:.3f} | " + " / ".join(f"{res[k][0][1]:.0f}" for k in mods)
              + " | " + ", ".join(info.get(k, "?") for k in mods) + " |", flush=True)
        del x; torch.cuda.empty_cache()
