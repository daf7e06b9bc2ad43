"""Where the training step's memory goes at its peak: live CUDA blocks grouped by the line that allocated them."""
import collections, linecache, sys, torch, torch.nn.functional as F
sys.path.insert(0, ".")
import bench, mamba

idx, kind = int(sys.argv[1]), sys.argv[2]
d_model, n_layer, vocab, batch, L = bench.TRAIN_CONFIGS[idx]
U = batch * L * 2 * d_model * 2  # one (b, l, d_inner) bf16 tensor
torch.manual_seed(0)
ids = torch.randint(0, vocab, (batch, L + 1), device="cuda")
if kind == "mamba_ssm":
    m = bench.mamba_ssm_model(d_model, n_layer, vocab); fwd = lambda x: m(x).logits
else:
    m = mamba.Mamba(mamba.MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab)).cuda()
    fwd = torch.compile(m) if kind == "compiled" else m
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

def forward():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = fwd(ids[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

def step():
    forward().backward(); opt.step(); opt.zero_grad(set_to_none=True)

for _ in range(3):
    step()
torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
torch.cuda.memory._record_memory_history(max_entries=500000, stacks="python")

def where(frames):
    keep = []
    for f in frames:
        fn = f["filename"]
        if "torchinductor" in fn or "/work" in fn or "/root" in fn or "mamba_ssm" in fn or "causal_conv1d" in fn \
                or (".build_ssm" in fn) or fn.endswith(("mamba.py", "scan_triton.py", "conv_triton.py", "mem.py")):
            src = linecache.getline(fn, f["line"]).strip()[:110]
            keep.append(f"{fn.split('/')[-1]}:{f['line']} {f['name']}: {src}")
        if len(keep) == 2:
            break
    return " <- ".join(keep) or (frames[0]["filename"].split("/")[-1] + ":" + frames[0]["name"] if frames else "?")

loss = forward()
torch.cuda.synchronize()
snap = torch.cuda.memory._snapshot()
saved = collections.Counter()
for seg in snap["segments"]:
    for blk in seg["blocks"]:
        if blk["state"] == "active_allocated":
            saved[where(blk.get("frames", []))] += blk["size"]
print(f"== {kind} config {idx} {bench.TRAIN_CONFIGS[idx]}: U = {U/2**20:.1f} MiB; before step {base/2**20:.0f} MiB; "
      f"after forward {torch.cuda.memory_allocated()/2**20:.0f} MiB")
for k, v in saved.most_common(25):
    print(f"  {v/U:6.2f} U  {k}")
loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
torch.cuda.synchronize()
peak = torch.cuda.max_memory_allocated()
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
trace = snap["device_traces"][0]
live, cur, best, best_live = {}, 0, -1, None
for e in trace:
    if e["action"] == "alloc":
        live[e["addr"]] = (e["size"], e.get("frames", [])); cur += e["size"]
        if cur > best:
            best, best_live = cur, dict(live)
    elif e["action"] in ("free_completed",) and e["addr"] in live:
        cur -= live.pop(e["addr"])[0]
print(f"-- peak {peak/2**20:.0f} MiB (max_memory_allocated); replay: base + {best/2**20:.0f} MiB in step blocks "
      f"= {best/U:.2f} U; blocks live at the peak by line:")
byline = collections.Counter()
for size, frames in best_live.values():
    byline[where(frames)] += size
for k, v in byline.most_common(40):
    print(f"  {v/U:6.2f} U  {k}")
