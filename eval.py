"""
Evaluate Mamba and the long-context methods: passkey retrieval, perplexity, LongBench.

    python eval.py --method longmamba                       # bundled testbed: vanilla vs LongMamba, passkey
    python eval.py --method longmamba,decimamba,remamba --samples 20 --device cuda
    python eval.py --task ppl --method longmamba --data data/war_and_peace.txt
    python eval.py --task longbench --data-dir LongBench/data --e --method longmamba --model mamba-1.4b --L-train 2048
    torchrun --nproc_per_node=K eval.py ...                 # samples are sharded across ranks

Every requested method is evaluated on the same samples, with vanilla Mamba beside it as the baseline
(--no-baseline to skip it). A method is a hook on the model (mamba.py), set before the prefill:

    vanilla    no hook
    longmamba  global channels skip unimportant tokens (longmamba.py; calibrated once, saved beside the model)
    decimamba  unimportant tokens are dropped between layers (decimamba.py)
    remamba    two passes: compress the first 30 % of the prompt, re-read (remamba.py; needs remamba.pt)

Passkey: prompt (passkey.py, haystack = held-out prose) -> prefill with the method -> greedy decode with the
recurrent state -> exact match of the digits. Prints a length × depth table per method, writes
results/passkey_<method>.json and a heatmap picture (PNG with matplotlib, else a text heatmap).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import passkey
import tokenizer
from mamba import Mamba, atomic_write
from train import autocast, git_commit, read_L_train, setup_device, torchrun_world

METHODS = ("vanilla", "longmamba", "decimamba", "remamba")
DEFAULT_MODEL = "checkpoints/mamba-testbed"
DEFAULT_DATA = "data/war_and_peace.txt"
CALIBRATION_FILE = "longmamba_calibration.pt"
CALIBRATION_WINDOWS = 100  # LongMamba calibration: windows of L_train tokens (official S = 100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["passkey", "ppl", "longbench"], default="passkey")
    p.add_argument("--method", default="vanilla",
                   help=f"one or more of {', '.join(METHODS)}, comma-separated")
    p.add_argument("--no-baseline", action="store_true", help="do not evaluate vanilla beside the method")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (train.py, state-spaces or -hf)")
    p.add_argument("--L-train", type=int, help="the model's training length (default: its train_info.json)")
    p.add_argument("--lengths", help="comma-separated prompt lengths in tokens (default L_train × 1,2,4,8,16,32)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths")
    p.add_argument("--samples", type=int, help="samples per (length, depth) cell (default 20 on GPU, 1 on CPU)")
    p.add_argument("--filler", choices=passkey.FILLERS, default="prose")
    p.add_argument("--data", default=DEFAULT_DATA, help="prose: passkey haystack (held-out split), ppl text, "
                                                       "LongMamba calibration windows (training split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="results")
    # method settings (defaults: the papers')
    p.add_argument("--c", type=float, default=0.05, help="LongMamba: global channel when tA_prod > c")
    p.add_argument("--b", type=float, default=1.0, help="LongMamba: keep Δ > b·threshold")
    p.add_argument("--variant", choices=["dt_thre", "bound"], default="dt_thre", help="LongMamba filter")
    p.add_argument("--calibration-windows", type=int, default=CALIBRATION_WINDOWS, help="LongMamba: windows of L_train tokens")
    p.add_argument("--decimating-layers", help="DeciMamba: comma-separated layer indices (default n_layer // 2)")
    p.add_argument("--beta", type=float, default=0.5, help="DeciMamba: decay of kept tokens per decimating layer")
    p.add_argument("--min-len", type=int, default=20, help="DeciMamba: fewest tokens kept")
    # ppl
    p.add_argument("--windows", type=int, default=10, help="ppl: windows per length")
    p.add_argument("--predict", type=int, default=100, help="ppl: tokens scored at the end of each window")
    # longbench
    p.add_argument("--data-dir", help="longbench: directory of the official {dataset}.jsonl files")
    p.add_argument("--config-dir", help="longbench: directory of dataset2prompt.json, dataset2maxlen.json "
                                        "(default: --data-dir)")
    p.add_argument("--datasets", help="longbench: comma-separated datasets (default: all found in --data-dir)")
    p.add_argument("--e", action="store_true", help="longbench: LongBench-E ({dataset}_e.jsonl, length buckets)")
    p.add_argument("--max-length", type=int, default=159_500, help="longbench: middle-truncate prompts to this")
    args = p.parse_args(argv)

    def numbers(flag, text, kind):
        try:
            return [kind(x) for x in text.split(",")] if text else None
        except ValueError:
            p.error(f"{flag} {text!r}: expected comma-separated {kind.__name__} values, e.g. 512,1024")

    args.length_list = numbers("--lengths", args.lengths, int)
    args.depth_list = numbers("--depths", args.depths, float)
    args.layer_list = numbers("--decimating-layers", args.decimating_layers, int)
    args.methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"unknown --method {', '.join(bad) or repr(args.method)}: choose from {', '.join(METHODS)}")
    if not args.no_baseline and "vanilla" not in args.methods:
        args.methods.insert(0, "vanilla")
    return args


# ----------------------------------------------------------------------------------------------------------
# Model, tokenizer and methods


def load(args, device):
    if not os.path.isdir(args.model):
        hint = (" (the bundled testbed checkpoint ships with the repository: run from its root)"
                if args.model == DEFAULT_MODEL else "")
        sys.exit(f"eval.py: --model {args.model}: no such directory{hint}")
    model = Mamba.from_pretrained(args.model, device=device).eval()
    encoding = tokenizer.load_tokenizer(args.model)
    return model, encoding, args.L_train or read_L_train(args.model)


def default_lengths(L_train):
    return [L_train * m for m in (1, 2, 4, 8, 16, 32)]


def calibration_windows(encoding, text, L_train, n):
    """LongMamba's calibration text: n windows of L_train tokens cut evenly from the training split."""
    ids = passkey.Haystack(text, "train").tokens(encoding)[0]
    if len(ids) < n * L_train:
        raise ValueError(f"--data has {len(ids)} training tokens, fewer than {n} windows of {L_train}")
    starts = np.linspace(0, len(ids) - L_train, n).astype(np.int64)
    return torch.from_numpy(np.stack([ids[s:s + L_train] for s in starts]).astype(np.int64))


class Method:
    """A method applied to the model: `generate(prompt_ids (1, L), max_new_tokens)` -> new ids (1, n)."""

    def __init__(self, name, model, encoding, L_train, args, text):
        self.name, self.model, self.encoding = name, model, encoding
        self.remamba = None
        if name == "longmamba":
            import longmamba
            self.calibration = longmamba.load_or_calibrate(
                model, os.path.join(args.model, CALIBRATION_FILE),
                lambda: calibration_windows(encoding, text, L_train, args.calibration_windows), L_train)
            self.setup = lambda: longmamba.apply(model, self.calibration, c=args.c, b=args.b, variant=args.variant)
            self.describe = lambda length: longmamba.describe(self.calibration, args.c, length)
        elif name == "decimamba":
            import decimamba
            self.setup = lambda: decimamba.apply(model, args.layer_list, beta=args.beta, L_base=L_train,
                                                 min_len=args.min_len)
        elif name == "remamba":
            import remamba
            self.remamba = remamba.ReMamba.load(model, os.path.join(args.model, remamba.REMAMBA_FILE))
            self.setup = lambda: model.set_hook(None)
        else:
            self.setup = lambda: model.set_hook(None)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens):
        self.setup()
        try:
            generator = self.remamba if self.remamba is not None else self.model
            return generator.generate(prompt_ids, max_new_tokens, eos_token_id=self.encoding.eot_token)
        finally:
            self.model.set_hook(None)


# ----------------------------------------------------------------------------------------------------------
# Passkey retrieval


def run_passkey(args, methods, encoding, L_train, text, device, rank, world):
    lengths = args.length_list or default_lengths(L_train)
    depths = args.depth_list
    samples = args.samples or (20 if device.startswith("cuda") else 1)
    haystack = passkey.Haystack(text, "eval")
    cells = [(L, d, i) for L in lengths for d in depths for i in range(samples)]
    mine = cells[rank::world]
    correct = {m.name: {} for m in methods}
    start, done_tokens = time.time(), 0
    total_tokens = sum(L for L, _, _ in mine) * len(methods)
    for n, (L, depth, i) in enumerate(mine):
        sample = passkey.make_sample(encoding, haystack, L, depth, seed=args.seed * 1_000_003 + i,
                                     filler=args.filler)
        prompt = torch.tensor([sample.prompt_ids], device=device)
        for method in methods:
            with autocast(device):
                new = method.generate(prompt, len(sample.answer_ids) + 2)
            ok = passkey.score(encoding.decode(new[0].tolist()), sample.answer)
            correct[method.name].setdefault((L, depth), []).append(ok)
        done_tokens += L * len(methods)
        if rank == 0 and (n + 1 == len(mine) or (n + 1 < len(mine) and mine[n + 1][0] != L)):
            elapsed = time.time() - start
            rate = done_tokens / elapsed
            print(f"  length {L:>7}: done | {rate / 1e3:6.1f}k prompt tok/s | "
                  f"ETA {(total_tokens - done_tokens) / rate / 60:5.1f} min", flush=True)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, correct)
        correct = {m: {} for m in correct}
        for part in gathered:
            for m, cells_m in part.items():
                for key, oks in cells_m.items():
                    correct[m].setdefault(key, []).extend(oks)
    accuracy = {m: {str(L): {str(d): float(np.mean(correct[m][(L, d)])) for d in depths} for L in lengths}
                for m in correct}
    return lengths, depths, samples, accuracy


def passkey_table(method, lengths, depths, accuracy):
    lines = [f"{method}: passkey accuracy (%)", f"{'length':>8} " + " ".join(f"{d:>6g}" for d in depths) + "   mean"]
    for L in lengths:
        row = [100 * accuracy[str(L)][str(d)] for d in depths]
        lines.append(f"{L:>8} " + " ".join(f"{a:6.0f}" for a in row) + f" {np.mean(row):6.1f}")
    return lines


def side_by_side(blocks):
    width = max(len(line) for block in blocks for line in block) + 4
    rows = max(len(b) for b in blocks)
    return "\n".join("".join(b[i].ljust(width) if i < len(b) else " " * width for b in blocks).rstrip()
                     for i in range(rows))


def heatmap(path, methods, lengths, depths, accuracies, title):
    """PNG heatmaps (length × depth) side by side, or a text heatmap when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        shades = " ░▒▓█"
        print("(matplotlib not installed: text heatmap, darker = higher accuracy)")
        for m in methods:
            print(f"{m}:")
            for L in lengths:
                row = "".join(shades[min(4, int(accuracies[m][str(L)][str(d)] * 4.999))] * 2 for d in depths)
                print(f"{L:>8} |{row}|")
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 0.45 * len(lengths) + 1.6),
                             squeeze=False)
    for ax, m in zip(axes[0], methods):
        grid = np.array([[accuracies[m][str(L)][str(d)] for d in depths] for L in lengths])
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{m} (mean {100 * grid.mean():.0f}%)", fontsize=10)
        ax.set_xlabel("needle depth")
    axes[0][0].set_ylabel("prompt length (tokens)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Perplexity (adapted from the PG19 protocol of the LongMamba and DeciMamba papers)


@torch.no_grad()
def run_ppl(args, methods, encoding, L_train, text, device):
    """Perplexity of the last `--predict` tokens of windows of growing length, `--windows` per length, cut
    from the held-out last 10 % of --data.

    Each window's prefix is prefilled with the method (LongMamba filters it, DeciMamba shortens it), then
    the last tokens are scored one recurrent step at a time, as they would be generated. This differs from
    the papers, which score the window in one forward with the method applied to all of it: here the scored
    tokens are never filtered or decimated, the same rule as for generation."""
    ids = passkey.Haystack(text, "eval").tokens(encoding)[0]
    lengths = args.length_list or default_lengths(L_train)
    results = {m.name: {} for m in methods}
    for L in lengths:
        if L <= args.predict:
            sys.exit(f"eval.py: --lengths {L} must exceed --predict {args.predict}")
        if L > len(ids):
            sys.exit(f"eval.py: the held-out part of --data has {len(ids)} tokens, fewer than a window of {L}")
        starts = np.linspace(0, max(0, len(ids) - L), args.windows).astype(np.int64)
        for method in methods:
            if method.remamba is not None:
                sys.exit("eval.py: --task ppl does not apply to remamba (it compresses a prompt before answering)")
            nll = []
            for s in starts:
                window = torch.from_numpy(ids[s:s + L].astype(np.int64)).to(device)[None]
                prefix, scored = window[:, :-args.predict], window[0, -args.predict:]
                method.setup()
                try:
                    with autocast(device):
                        h, caches = method.model.hidden_states(prefix, return_cache=True)
                        logits = method.model.lm_head(h[:, -1])
                        for t in range(args.predict):
                            nll.append(F.cross_entropy(logits.float(), scored[t:t + 1]).item())
                            if t + 1 < args.predict:
                                logits = method.model.step(scored[t:t + 1], caches)
                finally:
                    method.model.set_hook(None)
            results[method.name][str(L)] = math.exp(float(np.mean(nll)))
        print(f"  length {L:>7}: " + "  ".join(f"{m}: {results[m][str(L)]:8.2f}" for m in results), flush=True)
    return lengths, results


# ----------------------------------------------------------------------------------------------------------
# LongBench


def run_longbench(args, methods, encoding, device, rank, world):
    import longbench
    if not args.data_dir or not os.path.isdir(args.data_dir):
        sys.exit(f"eval.py: --task longbench needs --data-dir, the directory of the official LongBench jsonl files "
                 f"(got {args.data_dir!r})")
    dataset2prompt, dataset2maxlen = longbench.load_config(args.config_dir or args.data_dir)
    suffix = "_e.jsonl" if args.e else ".jsonl"
    if args.datasets:
        datasets = [d.strip() for d in args.datasets.split(",")]
    else:
        pool = longbench.LONGBENCH_E_DATASETS if args.e else longbench.DATASETS
        datasets = [d for d in pool if os.path.isfile(os.path.join(args.data_dir, d + suffix))]
        if not datasets:
            sys.exit(f"eval.py: no {{dataset}}{suffix} files of LongBench in {args.data_dir}")
    model_name = os.path.basename(os.path.normpath(args.model))
    tables = {}
    for method in methods:
        def generate_fn(prompt_ids, max_new_tokens, eos_token_id, method=method):
            with autocast(device):
                return method.generate(torch.tensor([prompt_ids], device=device), max_new_tokens)[0].tolist()

        scores = {}
        for dataset in datasets:
            reason = longbench.skip_reason(dataset)
            if reason:
                print(reason)
                continue
            samples = longbench.load_samples(args.data_dir, dataset, e=args.e)
            out_path = os.path.join(args.out_dir, "longbench", f"{model_name}_{method.name}",
                                    dataset + ("_e" if args.e else "") + ".jsonl")
            # special-token text in a context is encoded as the special token, as Hugging Face tokenizers do
            encode = lambda text: encoding.encode(text, allowed_special="all")  # noqa: E731
            longbench.predict(samples, dataset, generate_fn, encode, encoding.decode, out_path,
                              args.max_length, dataset2prompt, dataset2maxlen, encoding.eot_token, rank, world,
                              progress=print if rank == 0 else (lambda *a: None))
            if world > 1:
                dist.barrier()
            if rank == 0:
                longbench.merge_rank_files(out_path, samples)
                scores[dataset] = longbench.score_file(out_path, dataset, e=args.e)
        tables[method.name] = scores
    return datasets, tables


# ----------------------------------------------------------------------------------------------------------


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def main(argv=None):
    args = parse_args(argv)
    distributed, rank, world = torchrun_world()
    device = setup_device(args.device, distributed)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.task != "longbench" and not os.path.isfile(args.data):
        sys.exit(f"eval.py: --data {args.data}: no such file")
    model, encoding, L_train = load(args, device)
    text = open(args.data, encoding="utf-8").read() if os.path.isfile(args.data) else ""
    methods = [Method(name, model, encoding, L_train, args, text) for name in args.methods]
    device_name = (torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)")
    meta = {"model": args.model, "L_train": L_train, "command": "python eval.py " + " ".join(argv or sys.argv[1:]),
            "commit": git_commit(), "device": device_name}
    log(f"{args.task}: {', '.join(args.methods)} on {args.model} (L_train {L_train}), device {device_name}")
    t0 = time.time()

    if args.task == "passkey":
        lengths, depths, samples, accuracy = run_passkey(args, methods, encoding, L_train, text, device, rank, world)
        if rank == 0:
            print(side_by_side([passkey_table(m, lengths, depths, accuracy[m]) for m in args.methods]))
            for m in methods:
                if m.name == "longmamba":
                    print("\n" + m.describe(lengths[len(lengths) // 2]))
            for m in args.methods:
                write_json(os.path.join(args.out_dir, f"passkey_{m}.json"),
                           {"method": m, **meta, "lengths": lengths, "depths": depths, "samples": samples,
                            "accuracy": accuracy[m], "seconds": round(time.time() - t0, 1)})
            shown = args.methods[-1]
            png = heatmap(os.path.join(args.out_dir, f"passkey_{shown}.png"), args.methods, lengths, depths,
                          accuracy, f"passkey retrieval, {os.path.basename(os.path.normpath(args.model))}, "
                                    f"L_train {L_train}, {samples} sample(s) per cell")
            print(f"wrote {', '.join(f'{args.out_dir}/passkey_{m}.json' for m in args.methods)}"
                  + (f" and {png}" if png else "") + f" in {time.time() - t0:.0f} s")
    elif args.task == "ppl":
        if distributed:
            sys.exit("eval.py: --task ppl runs on one process")
        lengths, results = run_ppl(args, methods, encoding, L_train, text, device)
        write_json(os.path.join(args.out_dir, f"ppl_{'_'.join(args.methods)}.json"),
                   {**meta, "data": args.data, "windows": args.windows, "predict": args.predict,
                    "lengths": lengths, "perplexity": results})
    else:
        datasets, tables = run_longbench(args, methods, encoding, device, rank, world)
        if rank == 0:
            model_name = os.path.basename(os.path.normpath(args.model))
            for m, scores in tables.items():
                print(f"{m}: LongBench{'-E' if args.e else ''} scores")
                for d, s in scores.items():
                    print(f"  {d:>22}: {s}")
                write_json(os.path.join(args.out_dir, f"longbench{'_e' if args.e else ''}_{model_name}_{m}.json"),
                           {"method": m, **meta, "e": args.e, "max_length": args.max_length, "scores": scores})
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
