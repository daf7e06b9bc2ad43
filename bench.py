"""
Speed benchmarks on a CUDA GPU, one subcommand per benchmark; each prints a markdown table and writes it to
results/ with the command, the commit and the GPU that made it.

    python bench.py scan     the selective scan: scan_triton against the PyTorch path and mamba_ssm's CUDA kernel
    python bench.py train    a whole training step (forward, backward, AdamW; bf16 autocast): tokens/s, memory
    python bench.py decode   greedy decoding: time per new token
    python bench.py methods  prefill of LongMamba, DeciMamba and ReMamba ÷ vanilla prefill; decoding step cost

`train` and `decode` run mamba_ssm's MambaLMHeadModel of the same configuration beside ours, in the same process,
when it imports (README: building mamba_ssm and causal-conv1d from their source distributions).

`scan` and `methods` times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed between runs), in
milliseconds; `train` and `decode` time whole steps, as their tables' notes say.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

import mamba
import scan_triton

# ----------------------------------------------------------------------------------------------------------
# python bench.py scan

SCAN_SHAPES = [(1, 1536, 16384), (8, 1536, 2048), (4, 2048, 8192), (1, 5120, 8192), (16, 1536, 4096),
               (1, 1536, 131072)]  # (batch, d_inner, L), d_state 16
SCAN_D_STATE = 16
REFERENCE_LIMIT_S = 2.0  # the PyTorch path is timed only where one call takes less than this
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def scan_inputs(batch, d_inner, L, dtype, device="cuda"):
    """Mamba-like inputs: softplus(delta + bias) around 0.01 to 0.1, A = -(1..N) (S4D-real)."""
    N = SCAN_D_STATE
    return dict(u=torch.randn(batch, d_inner, L, device=device, dtype=dtype),
                delta=(torch.randn(batch, d_inner, L, device=device) * 0.5).to(dtype),
                A=-torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(d_inner, 1),
                B=torch.randn(batch, N, L, device=device, dtype=dtype),
                C=torch.randn(batch, N, L, device=device, dtype=dtype),
                D=torch.ones(d_inner, device=device), z=torch.randn(batch, d_inner, L, device=device, dtype=dtype),
                delta_bias=torch.full((d_inner,), -3.0, device=device))


def median_ms(fn, **kwargs):
    return triton.testing.do_bench(fn, return_mode="median", **kwargs)


def gpu_ms(fn, runs=10):
    """The GPU's busy time per call of fn: the summed durations of its kernels (from the profiler), which, unlike
    wall time, do not grow when the host is too slow launching them to keep the GPU busy."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in profiler.key_averages()) / 1e3 / runs


def time_scan(scan, x, limit_s=None):
    """(forward ms, backward ms, forward+backward ms) of `scan(**x, delta_softplus=True)`; None where one call
    would take longer than limit_s or does not fit in memory."""
    inputs = {k: v.detach().requires_grad_() for k, v in x.items()}
    grads = list(inputs.values())
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = scan(**inputs, delta_softplus=True)
        dout = torch.randn_like(out)
        torch.autograd.backward(out, dout, retain_graph=True)
        torch.cuda.synchronize()
        if limit_s is not None and time.perf_counter() - start > limit_s:
            return None, None, None
        with torch.no_grad():
            fwd = median_ms(lambda: scan(**inputs, delta_softplus=True))
        bwd = median_ms(lambda: torch.autograd.grad(out, grads, dout, retain_graph=True))
        both = median_ms(lambda: torch.autograd.grad(scan(**inputs, delta_softplus=True), grads, dout))
        return fwd, bwd, both
    except torch.OutOfMemoryError:
        return None, None, None
    finally:
        torch.cuda.empty_cache()


def time_mamba_ssm(x):
    """(forward ms, backward ms) of mamba_ssm's CUDA kernel, called as mamba_ssm's selective_scan_fn calls it."""
    import selective_scan_cuda
    B, C = x["B"][:, None], x["C"][:, None]  # (batch, 1, N, L): mamba_ssm's "variable B" layout
    args = (x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"])
    fwd = median_ms(lambda: selective_scan_cuda.fwd(*args, True))
    out, saved_x, *rest = selective_scan_cuda.fwd(*args, True)
    dout = torch.randn_like(rest[0])
    bwd = median_ms(lambda: selective_scan_cuda.bwd(*args, dout, saved_x, out, None, True, False))
    return fwd, bwd


def fmt_ms(ms):
    return "-" if ms is None else f"{ms:.2f}"


def fmt_against(other_ms, ms):
    """other_ms and, in brackets, other_ms ÷ ms."""
    ratio = "-" if other_ms is None or ms is None else f"{other_ms / ms:.2f}×"
    return f"{fmt_ms(other_ms)} ({ratio})"


def bench_scan(args):
    try:
        import selective_scan_cuda  # built from mamba-ssm's sources, see README
    except ImportError:
        selective_scan_cuda = None
    rows = table_head("(B, d_inner, L)", "dtype", "triton fwd", "triton bwd", "triton fwd+bwd",
                      "torch chunked (mamba.selective_scan_chunked) fwd", "fwd+bwd", "mamba_ssm fwd", "bwd")
    for dtype_name in args.dtypes:
        for batch, d_inner, L in SCAN_SHAPES:
            x = scan_inputs(batch, d_inner, L, DTYPES[dtype_name])
            fwd, bwd, both = time_scan(scan_triton.selective_scan, x)
            ref_fwd, _, ref_both = time_scan(mamba.selective_scan_chunked, x, limit_s=REFERENCE_LIMIT_S)
            ssm_fwd, ssm_bwd = time_mamba_ssm(x) if selective_scan_cuda else (None, None)
            add_row(rows, f"({batch}, {d_inner}, {L})", dtype_name, fmt_ms(fwd), fmt_ms(bwd), fmt_ms(both),
                    fmt_against(ref_fwd, fwd), fmt_against(ref_both, both),
                    fmt_against(ssm_fwd, fwd), fmt_against(ssm_bwd, bwd))
            del x  # freed before the next shape's inputs are made
    notes = [f"d_state {SCAN_D_STATE}; z, D, delta_bias and softplus on; B, C (batch, N, L). Times in ms (median of "
             "triton.testing.do_bench); in brackets the other implementation's time divided by scan_triton's "
             "(> 1: scan_triton is faster). bwd is the backward alone, from saved forward tensors.",
             f"PyTorch path timed only where one forward+backward takes < {REFERENCE_LIMIT_S:.0f} s and fits in "
             "memory, else '-'."]
    if selective_scan_cuda is None:
        notes.append("`selective_scan_cuda` did not import here (README: how to build it): no mamba_ssm columns.")
    write_result(args.out, "Selective scan", rows, notes)


# ----------------------------------------------------------------------------------------------------------
# python bench.py train / decode: the whole model, ours against mamba_ssm's MambaLMHeadModel

TRAIN_CONFIGS = [  # (d_model, n_layer, vocab_size, batch, L)
    (256, 4, 256, 16, 512),        # the byte testbed
    (256, 4, 256, 64, 512),
    (512, 8, 2048, 32, 1024),
    (768, 24, 50280, 8, 2048),     # mamba-130m
]
DECODE_CONFIGS = [(256, 4, 256), (768, 24, 50280)]  # (d_model, n_layer, vocab_size): testbed, mamba-130m


def mamba_ssm_model(d_model, n_layer, vocab_size, device="cuda"):
    """mamba_ssm's MambaLMHeadModel with Mamba-1 layers and the fused add + RMSNorm, or None if it is missing.
    Without causal-conv1d's extension mamba_ssm silently runs PyTorch's conv instead: refused, as unfair to it."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError:
        return None
    try:
        import causal_conv1d_cuda  # noqa: F401
    except ImportError:
        print("mamba_ssm imports but causal_conv1d_cuda does not (README: how to build it): no mamba_ssm column")
        return None
    config = SSMConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, ssm_cfg={"layer": "Mamba1"},
                       rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
    return MambaLMHeadModel(config, device=device)


def time_training(forward, params, ids, steps, profile_to=None):
    """Median seconds of a training step over `steps` timed steps after 3 warm-ups, and the peak memory (MiB)
    warm-ups included (CUDA graphs allocate their memory while they are recorded); profile_to: a file that gets
    the GPU-time profile of one more step, kernel by kernel."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20
    if profile_to:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            step()
            torch.cuda.synchronize()
        table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        mamba.atomic_write(profile_to, table)
    return statistics.median(times), peak


def bench_train(args):
    models = ("eager", "compiled", "graphs", "mamba_ssm")
    rows = table_head("config (d_model × layers, vocab, batch × L)", "ours eager tok/s", "ours compiled tok/s",
                      "ours compiled + CUDA graphs tok/s", "mamba_ssm tok/s", "graphs ÷ mamba_ssm",
                      "peak MiB: " + " / ".join(models))
    for d_model, n_layer, vocab, batch, L in [TRAIN_CONFIGS[i] for i in args.configs or range(len(TRAIN_CONFIGS))]:
        ids = torch.randint(0, vocab, (batch, L + 1), device="cuda")
        seconds, peak = {}, {}

        def run(name, forward, model):  # one model at a time on the GPU, so that each peak is its own
            print(f"{name}: {torch.cuda.memory_allocated() / 2**20:,.0f} MiB allocated before", flush=True)
            profile_to = args.profile and os.path.join(args.profile, f"train_{d_model}x{n_layer}_b{batch}_{name}.txt")
            seconds[name], peak[name] = time_training(forward, model.parameters(), ids, args.steps, profile_to)
            torch.cuda.empty_cache()

        torch.manual_seed(0)
        ours = mamba.Mamba(mamba.MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab)).cuda()
        run("eager", ours, ours)
        run("compiled", torch.compile(ours), ours)
        torch._dynamo.reset()  # the compiled code holds the model: free it before the next peak is measured
        run("graphs", torch.compile(ours, mode="reduce-overhead"), ours)
        del ours
        torch._dynamo.reset()
        theirs = mamba_ssm_model(d_model, n_layer, vocab)
        if theirs is not None:
            run("mamba_ssm", lambda x: theirs(x).logits, theirs)
        del theirs
        speed = {name: batch * L / s for name, s in seconds.items()}  # tokens/s
        kilo_tokens = [f"{speed[k] / 1e3:,.0f}k" if k in speed else "-" for k in models]
        ratio = f"{speed['graphs'] / speed['mamba_ssm']:.2f}" if "mamba_ssm" in speed else "-"
        memory = " / ".join(f"{peak[k]:,.0f}" if k in peak else "-" for k in models)
        add_row(rows, f"{d_model} × {n_layer}, {vocab}, {batch} × {L}", *kilo_tokens, ratio, memory)
    notes = [f"A training step: forward under bf16 autocast (float32 weights), cross-entropy on float32 logits, "
             f"backward, fused AdamW; tokens/s from the median of {args.steps} steps after 3 warm-up steps (CUDA "
             "events); peak memory from the first warm-up step on. Ours compiled: `torch.compile(model)` (train.py "
             "under torchrun or with --grad-accum); + CUDA graphs: mode=\"reduce-overhead\" (train.py's default "
             "on one GPU); mamba_ssm: MambaLMHeadModel (Mamba-1, fused add + RMSNorm, causal-conv1d), as it runs."]
    write_result(args.out, "Training step: ours against mamba_ssm", rows, notes)


def time_decoding(generate, new_tokens):
    """Seconds per new token: (generate(new_tokens) − generate(1)) / (new_tokens − 1), medians of 5 runs."""
    def run(n):
        generate(n)  # warm-up (records graphs)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            generate(n)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return (run(new_tokens) - run(1)) / (new_tokens - 1)


def bench_decode(args):
    rows = table_head("config (d_model × layers, vocab)", "batch", "ours eager ms", "ours ms (CUDA graph)",
                      "mamba_ssm ms (cg=True)", "ours ÷ mamba_ssm")
    for d_model, n_layer, vocab in DECODE_CONFIGS:
        torch.manual_seed(0)
        ours = mamba.Mamba(mamba.MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab)).cuda()
        ours = ours.to(torch.bfloat16).eval()
        theirs = mamba_ssm_model(d_model, n_layer, vocab)
        theirs = theirs and theirs.to(torch.bfloat16).eval()
        for batch in args.batches:
            prompt = torch.randint(0, vocab, (batch, args.prompt), device="cuda")
            ms = {}
            for name, graphs in (("eager", False), ("graph", True)):
                ours.cuda_graph_decoding = graphs
                ms[name] = 1e3 * time_decoding(lambda n: ours.generate(prompt, max_new_tokens=n), args.new_tokens)
            if theirs is not None:
                ms["mamba_ssm"] = 1e3 * time_decoding(
                    lambda n: theirs.generate(prompt, max_length=args.prompt + n, cg=True), args.new_tokens)
            times = [f"{ms[k]:.3f}" if k in ms else "-" for k in ("eager", "graph", "mamba_ssm")]
            ratio = f"{ms['graph'] / ms['mamba_ssm']:.2f}" if "mamba_ssm" in ms else "-"
            add_row(rows, f"{d_model} × {n_layer}, {vocab}", batch, *times, ratio)
        del ours, theirs
        torch.cuda.empty_cache()
    notes = [f"Greedy decoding after a {args.prompt}-token prompt, bf16 weights, random initialisation and token ids; "
             f"per new token: (time of {args.new_tokens} new tokens − time of 1) / {args.new_tokens - 1}, medians "
             "of 5 runs each after a warm-up run (which records the CUDA graphs). Ours eager: `generate` with "
             "`model.cuda_graph_decoding = False`; ours: the default on a GPU, a compiled step replayed as a CUDA "
             "graph; mamba_ssm: `generate(..., cg=True)`."]
    write_result(args.out, "Decoding: time per new token", rows, notes)


# ----------------------------------------------------------------------------------------------------------
# python bench.py methods

def bench_methods(args):
    """Prefill time of each long-context method ÷ vanilla prefill on a checkpoint at long prompt lengths, the
    prefill's peak memory, and the cost of one recurrent decoding step (no method changes decoding)."""
    import decimamba
    import longmamba
    import remamba

    model = mamba.Mamba.from_pretrained(args.model, device="cuda").eval()
    L_train = mamba.training_length(args.model)
    calibration = torch.load(os.path.join(args.model, "longmamba_calibration.pt"), weights_only=True)  # eval.py's
    remamba_model = remamba.ReMamba.load(mamba.Mamba.from_pretrained(args.remamba, device="cuda").eval(),
                                         os.path.join(args.remamba, remamba.REMAMBA_FILE))
    methods = {  # name: (what runs the prefill, its hook)
        "vanilla": (model, None),
        "longmamba": (model, longmamba.LongMamba(calibration, b=1.5)),
        "decimamba": (model, decimamba.DeciMamba([model.config.n_layer // 2], L_base=L_train)),
        "remamba": (remamba_model, None),  # stage 1 + stage 2
    }
    rows = table_head("prompt tokens", "method", "prefill ms", "÷ vanilla", "GPU ms", "GPU ÷ vanilla",
                      "prompt tokens/ms", "peak MiB")
    vocab = model.config.vocab_size
    for L in args.lengths:
        ids = torch.randint(0, vocab, (1, L), device="cuda")
        times, busy = {}, {}
        for name, (runner, hook) in methods.items():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), model.hooked(hook):
                torch.cuda.reset_peak_memory_stats()  # one prefill alone: do_bench's L2-flush buffer is not counted
                runner.prefill(ids)
                peak = torch.cuda.max_memory_allocated() / 2**20
                times[name] = median_ms(lambda: runner.prefill(ids), warmup=25, rep=200)
                busy[name] = gpu_ms(lambda: runner.prefill(ids))
            add_row(rows, L, name, f"{times[name]:.2f}", f"{times[name] / times['vanilla']:.2f}",
                    f"{busy[name]:.2f}", f"{busy[name] / busy['vanilla']:.2f}", f"{L / times[name]:.0f}",
                    f"{peak:.0f}")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        _, caches = model.prefill(torch.randint(0, vocab, (1, 1024), device="cuda"))
        token = torch.zeros(1, dtype=torch.long, device="cuda")
        step_ms = median_ms(lambda: model.step(token, caches), warmup=25, rep=200)
    notes = [f"Model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, L_train "
             f"{L_train}; batch 1, bf16 autocast, random token ids; prefill ms: medians of triton.testing.do_bench; "
             "GPU ms: the summed durations of the prefill's kernels (torch.profiler, mean of 10 prefills), which a "
             "host too slow to launch a small model's kernels does not inflate.",
             "LongMamba: dt_thre, c = 0.05, b = 1.5 (its calibration is loaded, not timed). DeciMamba: the middle "
             f"layer, beta 0.5, L_base = L_train. ReMamba ({args.remamba}): stage 1 (full forward) + stage 2 "
             "(re-forward of the compressed prompt).",
             f"Decoding: one recurrent step (any method) takes {step_ms:.3f} ms."]
    write_result(args.out, "Long-context methods: prefill overhead", rows, notes)


# ----------------------------------------------------------------------------------------------------------
# Shared: the tables and where they came from

def table_head(*columns):
    """The first two lines of a markdown table: its column names and the line under them."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def add_row(rows, *cells):
    """Append a row to the table and print it at once: a long benchmark shows its progress."""
    rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    print(rows[-1], flush=True)


def cpu_model():
    """The host CPU's name: it launches every kernel, so a step timed without CUDA graphs depends on it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def write_result(path, title, rows, notes):
    """The table under what made it: the command, the commit, the GPU, the CPU that launched it and its load."""
    provenance = [f"Command: `python bench.py {' '.join(sys.argv[1:])}`  ",  # two spaces: a markdown line break
                  f"Commit: {mamba.git_commit()}  ",
                  f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}  ",
                  f"CPU: {cpu_model()}; load when written (1-minute average) {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} cores"]
    text = "\n".join([f"# {title}", "", *provenance, "", *rows, "", *notes, ""])
    mamba.atomic_write(path, text)  # it makes the folder
    print(f"wrote {path}")


def int_list(text):  # "1,16" -> [1, 16]
    return [int(x) for x in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = parser.add_subparsers(dest="section", required=True)
    scan = sections.add_parser("scan", help="selective-scan kernels, forward and backward")
    scan.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    train = sections.add_parser("train", help="a training step of the whole model, ours and mamba_ssm's")
    train.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    train.add_argument("--profile", help="a folder: the GPU-time profile of one step of each model goes there")
    train.add_argument("--configs", type=int_list, help="rows of the table to run (0-based; default all)")
    decode = sections.add_parser("decode", help="greedy decoding per new token, ours and mamba_ssm's")
    decode.add_argument("--batches", type=int_list, default=[1, 16])
    decode.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    decode.add_argument("--new-tokens", type=int, default=129)
    methods = sections.add_parser("methods", help="prefill time of LongMamba, DeciMamba, ReMamba ÷ vanilla")
    methods.add_argument("--model", default="checkpoints/mamba-testbed", help="with its longmamba_calibration.pt")
    methods.add_argument("--remamba", default="checkpoints/mamba-testbed-remamba", help="a ReMamba checkpoint")
    methods.add_argument("--lengths", type=int_list, default=[16384, 65536])
    for name, section in sections.choices.items():
        section.add_argument("--out", default=f"results/{name}_bench.md", help="markdown table written here")
    args = parser.parse_args()
    if args.section == "train" and not all(0 <= i < len(TRAIN_CONFIGS) for i in args.configs or []):
        parser.error(f"--configs: rows 0 to {len(TRAIN_CONFIGS) - 1} of the table, got {args.configs}")
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    # Kernel launches run on the CPU: timings taken while other work holds it (a compiler left by an interrupted
    # build) are not comparable. Say so before timing.
    load = os.getloadavg()[0]
    if load > 0.5 * os.cpu_count():
        print(f"warning: CPU load {load:.1f} on {os.cpu_count()} cores: other work may slow the timings down")
    dict(scan=bench_scan, train=bench_train, decode=bench_decode, methods=bench_methods)[args.section](args)


if __name__ == "__main__":
    main()
