"""
Evaluate Mamba and the long-context methods: passkey retrieval, perplexity, LongBench.

    python eval.py --method longmamba                       # the demo: vanilla vs LongMamba on the bundled testbed
    python eval.py --method longmamba,decimamba,remamba --samples 20 --device cuda --out-dir results/gpu/mamba-testbed
    python eval.py --task ppl --method longmamba
    python eval.py --task longbench --data-dir LongBench/data --e --method longmamba --model mamba-1.4b --L-train 2048
    torchrun --nproc_per_node=K eval.py ...                 # passkey samples and LongBench lines are split over ranks

Every method runs on the same samples, beside vanilla Mamba (--no-baseline to skip it):
    longmamba  global channels skip unimportant tokens (longmamba.py; calibrated once, saved beside the model)
    decimamba  unimportant tokens are dropped inside the network (decimamba.py)
    remamba    two passes: compress the start of the prompt, re-read (remamba.py; the model's remamba.pt)

Passkey: greedy decoding, exact match of the digits; a length × depth table per method (% correct),
<out-dir>/passkey_<label>.json (accuracy 0-1, every setting) and a heatmap. Perplexity: <out-dir>/ppl_<labels>.json.
LongBench: predictions and scores.json in <out-dir>/longbench[_e]/<label>_<settings hash>/.
Finished passkey and perplexity cells are kept in <out-dir>/cells/ (<out-dir>/rank<r>/cells/ under torchrun), LongBench
predictions line by line: an interrupted run continues where it stopped, with any number of processes; other
settings never reuse them.
"""

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import decimamba
import longbench
import longmamba
import passkey
import remamba
import tokenizer
from mamba import Mamba, atomic_write, git_commit, training_length

METHODS = ("vanilla", "longmamba", "decimamba", "remamba")
DEFAULT_MODEL = "checkpoints/mamba-testbed"
CALIBRATION_FILE = "longmamba_calibration.pt"
# the paper's LongMamba settings, except b = 1.5 (chosen on validation samples; results/README.md)
LONGMAMBA = dict(c=0.05, b=1.5, variant="dt_thre", sc=0.0, decay_state="slowest")
DECIMAMBA = dict(beta=0.5, min_len=20)   # decimating the middle layer, L_base = L_train


def comma_separated(kind):
    """An argparse type: "0,0.5,1,1" -> [0.0, 0.5, 1.0], each value once."""
    parse = lambda text: list(dict.fromkeys(kind(x) for x in text.split(",")))  # noqa: E731
    parse.__name__ = f"comma-separated {kind.__name__}"       # argparse names the type in its error
    return parse


def parse_args(argv):
    # no abbreviated flags: a flag added later cannot change what an abbreviation meant (--data, --data-dir)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.error = lambda message: fail(f"{message} (see --help)")   # one line, not the whole usage
    p.add_argument("--task", choices=["passkey", "ppl", "longbench"], default="passkey")
    p.add_argument("--method", default="vanilla", help=f"one or more of {', '.join(METHODS)}, comma-separated")
    p.add_argument("--no-baseline", action="store_true", help="do not evaluate vanilla beside the method")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (train.py, state-spaces or -hf)")
    p.add_argument("--L-train", type=int, help="the model's training length (default: its train_info.json)")
    p.add_argument("--lengths", help="prompt lengths: tokens (4096) or multiples of L_train (4x), comma-separated "
                                     "(default 1x,2x,4x,8x,16x,32x; on a CPU 1x,4x,16x)")
    p.add_argument("--depths", type=comma_separated(float), default="0,0.25,0.5,0.75,1",
                   help="passkey: needle depths in [0, 1]")
    p.add_argument("--samples", type=int, help="passkey: samples per cell (default 20 on a GPU, 3 on a CPU)")
    p.add_argument("--filler", choices=passkey.FILLERS, default="prose")
    p.add_argument("--data", default="data/war_and_peace.txt", help="the model's training prose: LongMamba's "
                   "calibration windows (training split), and the haystack unless --haystack is given")
    p.add_argument("--haystack", help="prose for passkey haystacks and perplexity windows (default --data)")
    p.add_argument("--split", choices=["eval", "train"], default="eval",
                   help="haystack: the held-out last 10 %% of --data (eval), or the training part (train: validation)")
    p.add_argument("--seed", type=int, default=0, help="passkey: which samples (keys, haystack excerpts)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out-dir", help="where results go (default runs/<model directory name>)")
    p.add_argument("--tag", default="", help="appended to every method's label in file names and tables, e.g. _sft")
    p.add_argument("--report", metavar="DIR", help="only: a markdown table and heatmap of the passkey results in DIR")
    g = p.add_argument_group("LongMamba")
    g.add_argument("--c", type=float, default=LONGMAMBA["c"], help="global channel when tA_prod > c")
    g.add_argument("--b", type=float, default=LONGMAMBA["b"], help="keep Δ > b·threshold")
    g.add_argument("--variant", choices=["dt_thre", "bound"], default=LONGMAMBA["variant"])
    g.add_argument("--sc", type=float, default=LONGMAMBA["sc"], help="calibration: clamp Δ at its top-sc quantile "
                                                                     "(the released script: 0.1-0.2; 0 = none)")
    g.add_argument("--decay-state", choices=["slowest", "mean"], default=LONGMAMBA["decay_state"])
    g.add_argument("--calibration-windows", type=int, default=100, help="windows of L_train tokens")
    g = p.add_argument_group("DeciMamba")
    g.add_argument("--decimating-layers", type=comma_separated(int),
                   help="comma-separated layer indices (default n_layer // 2)")
    g.add_argument("--beta", type=float, default=DECIMAMBA["beta"],
                   help="each later decimating layer keeps β times as many")
    g.add_argument("--L-base", type=int, help="tokens the first decimating layer keeps (default L_train)")
    g.add_argument("--min-len", type=int, default=DECIMAMBA["min_len"], help="fewest tokens kept")
    g = p.add_argument_group("perplexity")
    g.add_argument("--windows", type=int, default=10, help="windows per length")
    g.add_argument("--predict", type=int, default=100, help="tokens scored at the end of each window")
    g = p.add_argument_group("LongBench")
    g.add_argument("--data-dir", help="directory of the official {dataset}.jsonl files")
    g.add_argument("--config-dir", help="directory of dataset2prompt.json, dataset2maxlen.json (default --data-dir)")
    g.add_argument("--datasets", help="comma-separated datasets (default: all found in --data-dir)")
    g.add_argument("--e", action="store_true", help="LongBench-E ({dataset}_e.jsonl, length buckets)")
    g.add_argument("--max-length", type=int, default=159_500, help="middle-truncate prompts to this many tokens")
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys(m.strip() for m in args.method.split(",") if m.strip()))
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"unknown --method {', '.join(bad) or repr(args.method)}: choose from {', '.join(METHODS)}")
    if not args.no_baseline and "vanilla" not in args.methods:
        args.methods.insert(0, "vanilla")
    for flag, low in (("samples", 1), ("windows", 1), ("predict", 1), ("calibration_windows", 1), ("min_len", 1),
                      ("max_length", 2), ("L_train", 1), ("L_base", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            p.error(f"--{flag.replace('_', '-')} must be ≥ {low}, got {value}")
    if any(not 0 <= d <= 1 for d in args.depths):
        p.error(f"--depths must lie in [0, 1], got {args.depths}")
    if not 0 < args.beta <= 1 or args.c < 0 or args.b < 0 or not 0 <= args.sc < 1:
        p.error("--beta must be in (0, 1], --c and --b ≥ 0, --sc in [0, 1)")
    if "/" in args.tag or os.sep in args.tag:
        p.error(f"--tag {args.tag!r}: it becomes part of file names, so it cannot hold a '/'")
    if args.task == "ppl" and "remamba" in args.methods:
        fail("--task ppl does not apply to remamba (it compresses a prompt before answering)")
    return args


def fail(message):
    """Stop with one line that names the flag or file and says what to do (exit status 1)."""
    sys.exit(f"eval.py: {message}")


def read_text(flag, path):
    """A prose file, checked to give both the training and the held-out split sentences."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        passkey.Haystack(text, "train")   # the smaller share: where it has a sentence, 'eval' has one too
        return text
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{flag} {path}: not a readable UTF-8 text file ({type(e).__name__})")
    except ValueError as e:
        fail(f"{flag} {path}: {e}")


def build_methods(args, model, encoding, L_train, text):
    """One dict per method: name, label (the name, the settings that differ from the defaults, --tag), settings,
    runner (prefills and generates), hook (set on the runner around each call), describe (a summary or None)."""
    n_layer = model.config.n_layer
    defaults = {**LONGMAMBA, **DECIMAMBA, "layers": [n_layer // 2], "L_base": L_train}
    methods = []
    for name in args.methods:
        settings, runner, hook, describe = {}, model, None, None
        if name == "longmamba":
            others_wait = dist.is_initialized() and dist.get_rank() > 0
            if others_wait:                    # under torchrun rank 0 calibrates; the others then read its file
                dist.barrier()
            calibration = load_calibration(args, model, encoding, L_train, text)
            if dist.is_initialized() and not others_wait:
                dist.barrier()
            settings = dict(c=args.c, b=args.b, variant=args.variant, **calibration["settings"])
            del settings["model"]
            hook = longmamba.LongMamba(calibration, args.c, args.b, args.variant)
            describe = lambda length: longmamba.describe(calibration, args.c, length)  # noqa: E731
        elif name == "decimamba":
            layers = args.decimating_layers or [n_layer // 2]
            if any(not 0 <= i < n_layer for i in layers):
                fail(f"--decimating-layers {','.join(map(str, layers))}: this model has layers 0..{n_layer - 1}")
            settings = dict(layers=layers, beta=args.beta, L_base=args.L_base or L_train, min_len=args.min_len)
            hook = decimamba.DeciMamba(layers, settings["L_base"], args.beta, args.min_len)
        elif name == "remamba":
            try:
                runner = remamba.ReMamba.load(model, os.path.join(args.model, remamba.REMAMBA_FILE))
            except ValueError as e:
                fail(str(e))
            settings = dict(ratio=runner.ratio, compress_ratio=runner.compress_ratio, start_ratio=runner.start_ratio)
        label = name + "".join(f"_{k}{'-'.join(map(str, v)) if isinstance(v, list) else v}"
                               for k, v in settings.items() if k in defaults and v != defaults[k]) + args.tag
        methods.append(dict(name=name, label=label, settings=settings, runner=runner, hook=hook, describe=describe))
    return methods


def load_calibration(args, model, encoding, L_train, text):
    """LongMamba's calibration beside the model, recomputed (and saved) when any of its settings differ."""
    path = os.path.join(args.model, CALIBRATION_FILE)
    ids = passkey.Haystack(text, "train").tokens(encoding)[0]
    n = args.calibration_windows
    if len(ids) < n * L_train:
        fail(f"--data has {len(ids)} training tokens, fewer than {n} calibration windows of {L_train}")
    windows = longmamba.calibration_windows(ids, L_train, n)
    wanted = dict(L_train=L_train, windows=n, lengths=longmamba.default_lengths(L_train), aggregate="avg",
                  decay_state=args.decay_state, sc=args.sc, model=longmamba.fingerprint(model),
                  text=hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16])
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["settings"] == wanted:
                return saved
            print(f"longmamba: {path} was computed with other settings or another model; recalibrating")
        except Exception as e:
            print(f"longmamba: {path} is not a readable calibration ({type(e).__name__}); recalibrating")
    if not os.access(args.model, os.W_OK):
        fail(f"--model {args.model}: not writable, so LongMamba's calibration cannot be saved beside it")
    print(f"longmamba: calibrating on {n} windows of {L_train} tokens of the training prose ...")
    start = time.time()

    def progress(done, total):
        if done % 10 == 0 or done == total:
            rate = done / (time.time() - start)
            print(f"  calibration: {done}/{total} windows | ETA {(total - done) / rate:5.0f} s", flush=True)

    calibration = longmamba.calibrate(model, windows, wanted["lengths"], "avg", args.decay_state, args.sc, progress)
    calibration["settings"] = wanted
    atomic_write(path, lambda f: torch.save(calibration, f))
    return calibration


def autocast(device):
    """bf16 autocast on GPUs (weights, state and residual stream stay fp32); plain fp32 on CPUs."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else \
        torch.autocast("cpu", enabled=False)


@torch.no_grad()
def generate(method, prompt, max_new_tokens, stops, min_new_tokens=0):
    """The method's greedy continuation of prompt (1, L): new token ids (1, ≤ max_new_tokens)."""
    hooked = method["runner"].hooked(method["hook"]) if method["hook"] else contextlib.nullcontext()
    with hooked, autocast(prompt.device.type):
        return method["runner"].generate(prompt, max_new_tokens, eos_token_id=stops, min_new_tokens=min_new_tokens)


def digest(key):
    """A short hash of the settings that shape a result, in the names of the files that keep it."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


class Cells:
    """A method's finished cells, appended to a jsonl whose name hashes every setting that shapes them. Each
    process appends to its own file (<out-dir>/cells/, or <out-dir>/rank<r>/cells/ under torchrun) and reads the
    cells of every such file, so a run continues whatever the number of processes that started it."""

    def __init__(self, out_dir, task, method, meta, args, rank_dir="", **task_settings):
        key = dict(task=task, label=method["label"], settings=method["settings"], model=meta["model"],
                   weights=meta["weights"], haystack=args.haystack or args.data, split=args.split, **task_settings)
        name = f"{task}_{method['label']}_{digest(key)}.jsonl"
        self.path = os.path.join(out_dir, rank_dir, "cells", name)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.done, tail = {}, ""
        out = glob.escape(out_dir)
        for path in glob.glob(os.path.join(out, "cells", name)) + glob.glob(os.path.join(out, "rank*", "cells", name)):
            with open(path) as f:
                lines = f.read().split("\n")
            for line in lines:
                try:
                    record = json.loads(line)
                    self.done[tuple(record["cell"])] = record["value"]
                except ValueError:
                    pass   # the empty last line, or a line cut by a kill
            tail = lines[-1] if path == self.path else tail
        self.file = open(self.path, "a")
        if tail:
            self.file.write("\n")   # after a cut line, so that the next record is a line of its own

    def add(self, cell, value):
        self.done[cell] = value
        self.file.write(json.dumps({"cell": list(cell), "value": value}) + "\n")
        self.file.flush()


def run_passkey(args, methods, encoding, lengths, text, device, rank, world, meta):
    """Every method on this rank's share of the (length, depth, sample) cells; then, on rank 0, each method's JSON,
    the tables side by side and one heatmap."""
    haystack = passkey.Haystack(text, args.split)
    mine = [(L, d, i) for L in lengths for d in args.depths for i in range(args.samples)][rank::world]
    stores = {m["label"]: Cells(args.out_dir, "passkey", m, meta, args, f"rank{rank}" if world > 1 else "",
                                filler=args.filler, seed=args.seed) for m in methods}
    todo = [c for c in mine if any(c not in s.done for s in stores.values())]
    if rank == 0 and len(todo) < len(mine):
        cells = os.path.dirname(next(iter(stores.values())).path)
        print(f"  {len(mine) - len(todo)} of {len(mine)} cells already done (kept in {cells})")
    total = sum(c[0] for c in todo for s in stores.values() if c not in s.done)   # prompt tokens to prefill
    start = last_print = time.time()
    prefilled = 0
    for n, (L, depth, i) in enumerate(todo):
        sample = passkey.make_sample(encoding, haystack, L, depth, seed=args.seed * 1_000_003 + i, filler=args.filler)
        prompt = torch.tensor([sample.prompt_ids], device=device)
        for m in methods:
            store = stores[m["label"]]
            if (L, depth, i) in store.done:
                continue
            new = generate(m, prompt, len(sample.answer_ids) + 2, encoding.eot_token)
            correct = passkey.score(encoding.decode(new[0].tolist()), sample.answer)
            store.add((L, depth, i), {"correct": correct, **mechanism(m, sample, prompt)})
            prefilled += L
        if rank == 0 and (n + 1 == len(todo) or todo[n + 1][0] != L or time.time() - last_print > 30):
            last_print = time.time()
            rate = prefilled / (last_print - start)
            print(f"  length {L:>7} | {n + 1}/{len(todo)} prompts | {rate / 1e3:6.1f}k prompt tok/s | "
                  f"ETA {(total - prefilled) / rate / 60:5.1f} min", flush=True)
    results = {m["label"]: stores[m["label"]].done for m in methods}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = {label: {k: v for part in gathered for k, v in part[label].items()} for label in results}
    if rank != 0:
        return
    accuracy = {}
    for m in methods:
        accuracy[m["label"]], counts = passkey_summary(results[m["label"]], lengths, args.depths, args.samples)
        atomic_write(os.path.join(args.out_dir, f"passkey_{m['label']}.json"), json.dumps(
            {"method": m["name"], "settings": m["settings"], **meta, "split": args.split, "seed": args.seed,
             "filler": args.filler, "haystack": args.haystack or args.data, "lengths": lengths,
             "depths": args.depths, "samples": args.samples, "units": "accuracy: fraction of samples correct, 0-1",
             "accuracy": accuracy[m["label"]], "mechanism": counts}, indent=2))
    print(passkey_tables(accuracy, lengths, args.depths))
    for m in methods:
        if m["describe"]:
            print("\n" + m["describe"](lengths[-1]))
    title = (f"passkey retrieval, {os.path.basename(os.path.normpath(args.model))}, L_train {meta['L_train']}, "
             f"{args.samples} samples per cell, {args.split} haystack, seed {args.seed}")
    png = heatmap(os.path.join(args.out_dir, "passkey_" + "_".join(accuracy) + ".png"), accuracy, lengths,
                  args.depths, title)
    print(f"wrote {args.out_dir}/passkey_<method>.json" + (f" and {png}" if png else "") +
          f" in {time.time() - start:.0f} s")


def mechanism(method, sample, prompt):
    """Where a method looked, for one sample: did ReMamba's stage 1 keep a token of the key when the needle lay in
    its compressed region; did every token of one copy of the key survive DeciMamba's decimation."""
    key = sample.key_positions
    if method["name"] == "remamba":
        rm = method["runner"]
        s, e, _ = remamba.compression_region(prompt.shape[1], rm.ratio, rm.compress_ratio, rm.start_ratio)
        return {"key_in_region": any(s <= p < e for p in key), "key_kept": bool(set(rm.kept[0].tolist()) & set(key))}
    if method["name"] == "decimamba" and method["hook"].survivors is not None:
        survivors, half = set(method["hook"].survivors[0].tolist()), len(key) // 2
        return {"key_survived": set(key[:half]) <= survivors or set(key[half:]) <= survivors,
                "question_survived": set(range(sample.question_start, prompt.shape[1])) <= survivors}
    return {}


def passkey_summary(cells, lengths, depths, samples):
    """accuracy {length: {depth: fraction}}, and per length the counts of the mechanism checks (ReMamba,
    DeciMamba) with how many of those samples were answered correctly."""
    accuracy = {str(L): {str(d): float(np.mean([cells[(L, d, i)]["correct"] for i in range(samples)]))
                         for d in depths} for L in lengths}
    first = next(iter(cells.values()))
    if "key_kept" in first:                                   # ReMamba: samples whose needle was compressed
        counts = {"needle_in_region": ["key_in_region"], "key_token_kept": ["key_in_region", "key_kept"],
                  "correct_when_in_region": ["key_in_region", "correct"]}
    elif "key_survived" in first:                             # DeciMamba
        counts = {"key_survived": ["key_survived"], "correct_when_key_survived": ["key_survived", "correct"],
                  "question_survived": ["question_survived"]}
    else:
        return accuracy, None
    per_length = {}   # each count: the samples where all of its checks hold
    for L in lengths:
        rows = [cells[(L, d, i)] for d in depths for i in range(samples)]
        per_length[str(L)] = {k: sum(all(r[c] for c in checks) for r in rows) for k, checks in counts.items()}
        per_length[str(L)]["samples"] = len(rows)
    return accuracy, per_length


def passkey_tables(accuracy, lengths, depths):
    """Each method's length × depth table (% correct, and each length's mean), side by side."""
    blocks = []
    for label, cells in accuracy.items():
        block = [f"{label}: passkey accuracy (%)", f"{'length':>8} " + " ".join(f"{d:>6g}" for d in depths) + "   mean"]
        for L in lengths:
            row = [100 * cells[str(L)][str(d)] for d in depths]
            block.append(f"{L:>8} " + " ".join(f"{a:6.0f}" for a in row) + f" {np.mean(row):6.1f}")
        blocks.append(block)
    width = max(len(line) for block in blocks for line in block) + 4
    return "\n".join("".join(line.ljust(width) for line in lines).rstrip() for lines in zip(*blocks))


def heatmap(path, accuracies, lengths, depths, title):
    """PNG heatmaps (length × depth, % correct) side by side, or a text heatmap when matplotlib is missing.

    accuracies: {label: {str(length): {str(depth): fraction correct}}}, as in the passkey JSON files."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        shades = " ░▒▓█"
        print("(matplotlib not installed: a text heatmap, darker = more correct: ' ' 0-20 %, █ 80-100 %)")
        for m in accuracies:
            print(f"{m}:\n{'depth':>8}  " + "".join(f"{d:<4g}"[:4] for d in depths))
            for L in lengths:
                print(f"{L:>8} |" + "".join(shades[min(4, int(accuracies[m][str(L)][str(d)] * 4.999))] * 4
                                            for d in depths) + "|")
        return None
    fig, axes = plt.subplots(1, len(accuracies), figsize=(2.7 * len(accuracies) + 1.5, 0.42 * len(lengths) + 1.9),
                             squeeze=False, sharey=True)
    for ax, m in zip(axes[0], accuracies):
        grid = 100 * np.array([[accuracies[m][str(L)][str(d)] for d in depths] for L in lengths])
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=9, color="white" if v < 25 else "black")
        ax.set_title(f"{m}\nmean {grid.mean():.0f} %", fontsize=9)
        ax.set_xlabel("needle depth")
    axes[0][0].set_ylabel("prompt length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), label="% correct", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


@torch.no_grad()
def run_ppl(args, methods, encoding, lengths, text, device, meta):
    """Perplexity of the last --predict tokens of --windows windows per length (the papers' PG19 protocol, adapted):
    each window's prefix is prefilled with the method, then the scored tokens are fed one recurrent step at a time,
    as in generation, so they are never filtered or decimated (the papers apply the method to the whole window)."""
    ids = passkey.Haystack(text, args.split).tokens(encoding)[0]
    if max(lengths) > len(ids) or min(lengths) <= args.predict:
        fail(f"--lengths must exceed --predict {args.predict} and fit the {len(ids)} tokens of the haystack's "
             f"{args.split} split")
    stores = {m["label"]: Cells(args.out_dir, "ppl", m, meta, args, predict=args.predict) for m in methods}
    results, start, prefilled = {}, time.time(), 0
    total = sum(L for s in stores.values() for L in lengths for w in range(args.windows) if (L, w) not in s.done)
    for m in methods:
        store = stores[m["label"]]
        for L in lengths:
            starts = np.linspace(0, len(ids) - L, args.windows).astype(np.int64)
            for w, s in enumerate(starts):
                if (L, w) in store.done:
                    continue
                window = torch.from_numpy(ids[s:s + L].astype(np.int64)).to(device)[None]
                prefix, scored = window[:, :-args.predict], window[0, -args.predict:]
                nll = []
                with m["runner"].hooked(m["hook"]), autocast(device):
                    logits, caches = m["runner"].prefill(prefix)
                    for t in range(args.predict):
                        nll.append(F.cross_entropy(logits.float(), scored[t:t + 1]).item())
                        if t + 1 < args.predict:
                            logits = m["runner"].step(scored[t:t + 1], caches)
                store.add((L, w), float(np.mean(nll)))
                prefilled += L
            ppl = results.setdefault(m["label"], {})[str(L)] = math.exp(
                np.mean([store.done[(L, w)] for w in range(args.windows)]))
            rate = prefilled / max(time.time() - start, 1e-9)
            print(f"  {m['label']:>12} length {L:>7}: perplexity {ppl:8.3f} | " + (
                f"{rate / 1e3:6.1f}k tok/s | ETA {(total - prefilled) / rate / 60:5.1f} min" if prefilled else
                "windows kept from an earlier run"), flush=True)
    path = os.path.join(args.out_dir, f"ppl_{'_'.join(results)}.json")
    atomic_write(path, json.dumps({**meta, "haystack": args.haystack or args.data, "split": args.split,
                                   "windows": args.windows, "predict": args.predict, "lengths": lengths,
                                   "units": "perplexity per token",
                                   "settings": {m["label"]: m["settings"] for m in methods},
                                   "perplexity": results}, indent=2))
    print(f"wrote {path} in {time.time() - start:.0f} s")


def run_longbench(args, methods, encoding, device, rank, world, meta):
    """Every method's predictions for the LongBench datasets (this rank's share of the lines), scored on rank 0."""
    if not args.data_dir or not os.path.isdir(args.data_dir):
        fail(f"--task longbench needs --data-dir, the directory of the official LongBench jsonl files "
             f"(got {args.data_dir!r})")
    try:
        dataset2prompt, dataset2maxlen = longbench.load_config(args.config_dir or args.data_dir)
    except (OSError, ValueError) as e:
        fail(str(e))
    suffix = "_e.jsonl" if args.e else ".jsonl"
    pool = longbench.LONGBENCH_E_DATASETS if args.e else longbench.DATASETS
    found = [d for d in pool if os.path.isfile(os.path.join(args.data_dir, d + suffix))]
    datasets = found if args.datasets is None else [d.strip() for d in args.datasets.split(",")]
    unknown = [d for d in datasets if d not in found]
    if unknown or not datasets:
        fail(f"--datasets: no {{dataset}}{suffix} file in {args.data_dir} for "
             f"{', '.join(map(repr, unknown)) or 'any dataset'}; found: {', '.join(found) or 'none'}")
    encode = lambda text: encoding.encode(text, allowed_special="all")  # noqa: E731  (as Hugging Face tokenizers)
    tables = {}
    for m in methods:
        key = dict(settings=m["settings"], model=meta["model"], weights=meta["weights"], max_length=args.max_length)
        run_dir = os.path.join(args.out_dir, "longbench" + ("_e" if args.e else ""), f"{m['label']}_{digest(key)}")

        def generate_fn(prompt_ids, max_new_tokens, stops, min_new_tokens, m=m):
            prompt = torch.tensor([prompt_ids], device=device)
            return generate(m, prompt, max_new_tokens, stops, min_new_tokens)[0].tolist()

        scores = {}
        for dataset in datasets:
            if reason := longbench.skip_reason(dataset):
                if rank == 0:
                    print(reason)
                continue
            out_path = os.path.join(run_dir, dataset + ".jsonl")
            try:
                samples = longbench.load_samples(args.data_dir, dataset, e=args.e)
                longbench.predict(samples, dataset, generate_fn, encode, encoding.decode, out_path, args.max_length,
                                  dataset2prompt, dataset2maxlen, encoding.eot_token, rank, world,
                                  progress=print if rank == 0 else (lambda *a: None))
                if world > 1:
                    dist.barrier()
                if rank == 0:
                    longbench.merge_rank_files(out_path, samples)
                    scores[dataset] = longbench.score_file(out_path, dataset, e=args.e)
            except ValueError as e:   # a malformed data, config or prediction file, named in the message
                fail(str(e))
        if rank == 0:   # one score file per run folder; a --datasets subset adds to the scores already there
            path = os.path.join(run_dir, "scores.json")
            old = json.load(open(path))["scores"] if os.path.exists(path) else {}
            tables[m["label"]] = {**old, **scores}
            atomic_write(path, json.dumps({"method": m["name"], "settings": m["settings"], **meta, "e": args.e,
                                           "max_length": args.max_length, "units": "score 0-100 (LongBench's)",
                                           "scores": tables[m["label"]]}, indent=2))
    for label, scores in tables.items():
        print(f"{label}: LongBench{'-E' if args.e else ''} scores\n" +
              "\n".join(f"  {d:>22}: {s}" for d, s in scores.items()))


def report(directory):
    """A markdown table (mean accuracy per length, %) and one heatmap of every passkey_*.json in a directory."""
    paths = sorted(glob.glob(os.path.join(directory, "passkey_*.json")), key=lambda p: "vanilla.json" not in p)
    results = {os.path.basename(p)[8:-5]: json.load(open(p)) for p in paths}
    if not results:
        fail(f"--report {directory}: no passkey_*.json files there")
    first = next(iter(results.values()))
    lengths, L_train = first["lengths"], first["L_train"]
    print("| mean passkey accuracy (%) | " + " | ".join(f"{L} ({L / L_train:g}×)" for L in lengths) + " |")
    print("|---" * (len(lengths) + 1) + "|")
    for label, r in results.items():
        row = [r["accuracy"].get(str(L)) for L in lengths]
        print(f"| {label} | " + " | ".join("-" if a is None else f"{100 * np.mean(list(a.values())):.0f}"
                                           for a in row) + " |")
    same = {label: r["accuracy"] for label, r in results.items()   # the heatmap's grid is the first file's
            if r["lengths"] == lengths and r["depths"] == first["depths"]}
    heatmap(os.path.join(directory, "passkey_all.png"), same, lengths, first["depths"],
            f"passkey retrieval, {os.path.basename(os.path.normpath(first['model']))} (L_train {L_train}), "
            f"{first['samples']} samples per cell, {first['split']} haystack, seed {first['seed']}")


def start(args):
    """This process's device, rank and world size: one process, or torchrun's, each with its own GPU."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ           # started by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        fail(f"--device {args.device}: not a device (use auto, cpu, cuda or cuda:N)")
    if distributed and args.task == "ppl":
        fail("--task ppl runs on one process (python, not torchrun)")
    if device != "cpu":
        if distributed:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        gpus = torch.cuda.device_count()
        if not gpus:
            fail(f"--device {args.device}: this machine has no CUDA GPU (use --device cpu)")
        device = f"cuda:{int(device[5:] or 0)}"                     # set_device needs the index
        if int(device[5:]) >= gpus:
            fail(f"--device {args.device}: this machine has {gpus} CUDA GPU{'s' * (gpus > 1)}"
                 + (", fewer than torchrun's processes" if distributed else ""))
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:   # a busy machine: do not oversubscribe its cores
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, min(cores, round(cores - os.getloadavg()[0] + 0.5))))
    if distributed:
        dist.init_process_group("gloo" if device == "cpu" else "nccl")
    return device, rank, world


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    device, rank, world = start(args)
    cpu = device == "cpu"
    if not os.path.isdir(args.model):
        fail(f"--model {args.model}: no such directory" + (" (run eval.py from the repository's root)"
                                                           if args.model == DEFAULT_MODEL else ""))
    args.out_dir = args.out_dir or os.path.join("runs", os.path.basename(os.path.normpath(args.model)))
    with contextlib.suppress(OSError):
        os.makedirs(args.out_dir, exist_ok=True)
    if not (os.path.isdir(args.out_dir) and os.access(args.out_dir, os.W_OK)):
        fail(f"--out-dir {args.out_dir}: cannot write there")
    try:
        model = Mamba.from_pretrained(args.model, device=device).eval()
        encoding = tokenizer.load_tokenizer(args.model)
    except (OSError, ValueError) as e:
        fail(f"--model {args.model}: {e}")
    L_train = args.L_train or training_length(args.model)
    if not L_train:
        fail(f"{args.model} has no train_info.json: pass --L-train, the length the model was trained at "
             f"(2048 for the state-spaces models)")
    # the training prose: LongMamba's calibration windows, and the haystack unless --haystack is given
    needed = "longmamba" in args.methods or not (args.haystack or args.task == "longbench")
    text = read_text("--data", args.data) if needed else None
    haystack_text = read_text("--haystack", args.haystack) if args.haystack else text
    spec = ("1x,4x,16x" if cpu else "1x,2x,4x,8x,16x,32x") if args.lengths is None else args.lengths
    try:
        lengths = list(dict.fromkeys(round(float(x[:-1]) * L_train) if x.endswith("x") else int(x)
                                     for x in spec.split(",")))
    except (ValueError, OverflowError):
        lengths = []
    if not lengths or min(lengths) < 1:
        fail(f"--lengths {spec!r}: expected comma-separated token counts (4096) or multiples of L_train (4x)")
    if args.task == "passkey":
        args.samples = args.samples or (3 if cpu else 20)
        if min(lengths) < passkey.prompt_overhead(encoding):
            fail(f"--lengths {min(lengths)}: a passkey prompt needs at least {passkey.prompt_overhead(encoding)} "
                 f"tokens with this tokenizer")
    weights = os.path.join(args.model, "pytorch_model.bin")
    weights = weights if os.path.exists(weights) else os.path.join(args.model, "model.safetensors")
    meta = {"model": args.model,
            "weights": f"{os.path.getsize(weights)} bytes, modified {os.path.getmtime(weights):.0f}",
            "L_train": L_train, "command": "python eval.py " + shlex.join(argv), "commit": git_commit(),
            "device": torch.cuda.get_device_name(device) if not cpu else f"cpu ({os.cpu_count()} cores)"}
    methods = build_methods(args, model, encoding, L_train, text)
    if rank == 0:
        print(f"{args.task}: {', '.join(m['label'] for m in methods)} on {args.model} (L_train {L_train}), "
              f"{meta['device']}")
    try:
        if args.task == "passkey":
            run_passkey(args, methods, encoding, lengths, haystack_text, device, rank, world, meta)
        elif args.task == "ppl":
            run_ppl(args, methods, encoding, lengths, haystack_text, device, meta)
        else:
            run_longbench(args, methods, encoding, device, rank, world, meta)
    except KeyboardInterrupt:
        sys.exit(f"\neval.py: interrupted; what was finished is kept in {args.out_dir} and the same command "
                 f"continues from it")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
