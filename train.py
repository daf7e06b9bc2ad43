"""
Train the passkey testbed: a small Mamba from scratch, or fine-tune one with ReMamba or with ReMamba's control.

    python train.py --out my-testbed                          # the byte-level testbed's recipe (one GPU or the CPU)
    python train.py --out my-testbed --resume                 # continue a stopped run bit for bit
    torchrun --nproc_per_node=2 train.py --out my-testbed     # DistributedDataParallel, the same samples
    python train.py --method remamba --init checkpoints/mamba-testbed --out my-remamba
    python train.py --method sft --init checkpoints/mamba-testbed --out my-sft      # the same without compression

Methods.
  lm       A Mamba from scratch on passkey samples at L_train (prose haystack; loss weight 1 on the key,
           --other-weight elsewhere) mixed with language-model windows of the same prose (the first 90 % of --data;
           eval.py hides needles in the rest): a small Mamba that retrieves at L_train and fails far beyond it.
  remamba  ReMamba's new parameters and, with --train official, the base weights the authors fine-tune (dt_proj
           fully; embeddings, in_proj, out_proj, where they use LoRA), on passkey samples, the answer's loss only.
           Each step draws its compressed region and ratio (remamba.training_region) and prompt length.
  sft      The paper's control, "Mamba (SFT)": the same base weights, data, steps and schedule, no compression.

Determinism. Sample i of step s is drawn from numpy.random.default_rng([seed, s, i]) (and the step's prompt
length and compressed region from default_rng([seed, s])): the data is a pure function of the step, so --resume
(model, optimizer and RNG state restored from train_state.pt, settings from the same file) continues bit for bit,
and K DDP ranks that split each step's global batch see exactly the samples one process would.
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
import remamba
import tokenizer
from mamba import Mamba, MambaConfig, atomic_write, git_commit, training_length

STATE_FILE = "train_state.pt"   # everything --resume needs
# --resume takes the saved run's settings, except those typed again (MAY_CHANGE) and per invocation ones
MAY_CHANGE = ("steps", "save_every", "log_every", "eval_every", "eval_samples")
PER_INVOCATION = ("out", "resume", "overwrite", "time_limit", "device", "compile")
# defaults that depend on --method: from-scratch training, and the authors' fine-tuning recipe (both fine-tunings)
FINE_TUNING = dict(lr=2e-5, min_lr=0.0, warmup=0, steps=1000, eval_lengths="1,2,4")
METHOD_DEFAULTS = {"lm": dict(lr=1e-3, min_lr=1e-4, warmup=500, steps=12000, eval_lengths="1,4,16", L_train=512),
                   "remamba": FINE_TUNING, "sft": FINE_TUNING}


def parse_args(argv):
    # no abbreviated flags: --resume tells the flags typed again from the saved ones by their full names
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.error = lambda message: fail(f"{message} (see --help)")   # one line, not the whole usage
    p.add_argument("--out", required=True, help="checkpoint directory to write (--resume: to continue)")
    p.add_argument("--method", choices=list(METHOD_DEFAULTS), default="lm")
    p.add_argument("--init", help="remamba, sft: the base checkpoint directory")
    p.add_argument("--train", choices=["new", "official", "all"], default="official",
                   help="remamba, sft: base weights trained: none (new), the authors' set (official) or all")
    p.add_argument("--remamba-init", choices=remamba.INITS, default="official",
                   help="remamba: Q/K/V from slices of layer 0 (official) or a zero V_proj output (ablation)")
    p.add_argument("--prompt-lengths", default="1,1", help="remamba, sft: prompt length range, low,high × L_train")
    p.add_argument("--data", default="data/war_and_peace.txt", help="training text (UTF-8 prose)")
    p.add_argument("--tokenizer", default="bytes", help="lm: 'bytes' (256 single bytes), a .tiktoken file, "
                   "'bpe:N' (an N-token BPE trained on --data) or 'bpe-digits:N' (the same, one token per digit)")
    p.add_argument("--filler", choices=passkey.FILLERS, default="prose")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--L-train", type=int, help="lm: training length in tokens (default 512); "
                                               "remamba, sft: the base's (default: its train_info.json)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch, sequences per optimizer step (default 16)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, help="default 12000 (lm), 1000 (remamba, sft)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 for lm, 2e-5 for remamba and sft)")
    p.add_argument("--min-lr", type=float, help="final learning rate (cosine; default 1e-4 for lm, 0 otherwise)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 500 for lm, 0 otherwise)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--passkey-fraction", type=float, default=0.5, help="lm: share of passkey samples")
    p.add_argument("--other-weight", type=float, default=0.05, help="lm: loss weight of non-answer passkey tokens")
    p.add_argument("--curriculum", type=int, default=0, help="lm: steps over which the needle moves from near the "
                                                             "question to anywhere (0: anywhere from the start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=0, help="passkey accuracy every N steps (0: at the end only)")
    p.add_argument("--eval-samples", type=int, default=20, help="validation samples per length (0: no evaluation)")
    p.add_argument("--eval-lengths", help="multiples of L_train evaluated (default 1,4,16 for lm, 1,2,4 otherwise)")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32", help="float16 halves the weights")
    p.add_argument("--time-limit", type=float, default=0, help="minutes for this invocation, then save and stop")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own settings")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace a model already there")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", choices=["auto", "graphs", "on", "off"], default="auto",
                   help="torch.compile the model (--method lm and sft); graphs: also replay each step as CUDA "
                        "graphs, one recorded per sequence length; auto: graphs for one GPU process without "
                        "--grad-accum on sequences of one length, on for other GPU runs, off on a CPU")
    args = p.parse_args(argv)
    given = {action.dest for action in p._actions   # the flags typed on the command line
             if any(a == s or a.startswith(s + "=") for s in action.option_strings for a in argv)}
    return args, given


def fail(message):
    sys.exit(f"train.py: {message}")       # one line that says what to change; exit status 1


def settle(args, given):
    """Fill in the method's defaults, or under --resume the saved run's settings; the saved state or None."""
    state_path = os.path.join(args.out, STATE_FILE)
    if not args.resume:
        for k, v in METHOD_DEFAULTS[args.method].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        if os.path.isfile(state_path):
            fail(f"{args.out} holds a training run: add --resume to continue it, or choose another --out")
        if not args.overwrite and any(os.path.exists(os.path.join(args.out, f))
                                      for f in ("config.json", "pytorch_model.bin", "model.safetensors")):
            fail(f"{args.out} already holds a model: choose another --out, or add --overwrite to replace it")
        return None
    if not os.path.isfile(state_path):
        fail(f"--resume: {state_path} does not exist (nothing to resume; drop --resume to start a run)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        saved = state["args"]
    except Exception as e:
        fail(f"--resume: {state_path} is not a readable training state ({type(e).__name__}); use a new --out")
    clash = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run used {saved.get(k)})" for k in sorted(given)
             if k not in MAY_CHANGE + PER_INVOCATION and getattr(args, k) != saved.get(k)]
    if clash:
        fail(f"--resume continues the run in {args.out} with its own settings; these differ: {'; '.join(clash)}")
    for k, v in saved.items():
        if k not in PER_INVOCATION and not (k in MAY_CHANGE and k in given):
            setattr(args, k, v)
    return state


def check(args):
    """Stop on a bad setting (resumed runs too: MAY_CHANGE flags may be typed again); parse the two length lists."""
    for flag, low in dict(batch_size=1, grad_accum=1, steps=1, save_every=1, log_every=1, warmup=0, eval_every=0,
                          eval_samples=0, curriculum=0, time_limit=0, n_layer=1, d_state=1).items():
        if getattr(args, flag) < low:
            fail(f"--{flag.replace('_', '-')} must be ≥ {low}, got {getattr(args, flag)}")
    if not (args.lr > 0 and 0 <= args.min_lr <= args.lr):
        fail(f"--lr must be > 0 and --min-lr in [0, lr]; got {args.lr} and {args.min_lr}")
    if not 0 <= args.other_weight < 1:
        fail(f"--other-weight must be in [0, 1) (weight 1 marks the answer); got {args.other_weight}")
    if not 0 <= args.passkey_fraction <= 1:
        fail(f"--passkey-fraction must be in [0, 1], got {args.passkey_fraction}")
    try:
        args.lengths_x = [float(x) for x in args.prompt_lengths.split(",")]
        args.eval_x = [float(x) for x in args.eval_lengths.split(",")]
        valid = len(args.lengths_x) == 2 and 1 <= args.lengths_x[0] <= args.lengths_x[1] and min(args.eval_x) > 0
    except ValueError:
        valid = False
    if not valid:
        fail(f"--prompt-lengths takes two multiples of L_train, low,high with 1 ≤ low ≤ high (got "
             f"{args.prompt_lengths!r}); --eval-lengths positive multiples (got {args.eval_lengths!r})")
    if args.method == "lm":
        if args.init:
            fail("--init belongs to --method remamba and sft; --method lm trains a new model from scratch")
        if args.d_model < 16 or args.d_model % 16:
            fail(f"--d-model {args.d_model} must be a positive multiple of 16 (the scan kernel's channel block)")
    else:
        if not args.init or not os.path.isfile(os.path.join(args.init, "config.json")):
            fail(f"--method {args.method} needs --init, a base checkpoint directory (got {args.init!r})")
        if os.path.abspath(args.out) == os.path.abspath(args.init):
            fail("--out must be a new directory: the fine-tuned model is written beside, never over, --init")
        if args.method == "sft" and args.train == "new":
            fail("--method sft --train new trains nothing: the control fine-tunes base weights (official or all)")
        args.L_train = training_length(args.init) if args.L_train is None else args.L_train
        if args.L_train is None:
            fail(f"{args.init} has no train_info.json: pass --L-train, the length the base model was trained at")


def load_encoding(spec, text):
    if spec == "bytes":
        return tokenizer.byte_encoding()
    for prefix, pattern in (("bpe:", tokenizer.GPT2_PATTERN), ("bpe-digits:", tokenizer.DIGITS_PATTERN)):
        if spec.startswith(prefix):
            if not spec[len(prefix):].isdigit():
                fail(f"--tokenizer {spec}: {prefix}N takes a vocabulary size, e.g. {prefix}2048")
            return tokenizer.train_bpe([text], int(spec[len(prefix):]), pattern=pattern)
    if not os.path.isfile(spec):
        fail(f"--tokenizer {spec}: no such file (give a .tiktoken file, 'bytes', 'bpe:N' or 'bpe-digits:N')")
    return tokenizer.load_tiktoken(spec)


def lm_batch(args, encoding, haystack, step, indices):
    """Samples `indices` of `step` for --method lm, a mix of passkey samples and language-model windows of the
    training split: ids (b, L+1), loss weights (b, L), answer mask (b, L)."""
    L, lm_tokens = args.L_train, haystack.tokens(encoding)[0]            # the split as one token stream
    # --curriculum: the needle starts in the filler's last 10 % (near the question), anywhere after those steps
    min_depth = max(0.0, 0.9 * (1 - step / args.curriculum)) if args.curriculum else 0.0
    rows = []
    for i in indices:
        rng = np.random.default_rng([args.seed, step, i])
        if rng.random() < args.passkey_fraction:
            ids, w = passkey.training_example(encoding, haystack, L, rng, args.filler, args.other_weight, min_depth)
            rows.append((ids, w, w == 1.0))
        else:
            start = int(rng.integers(0, len(lm_tokens) - L - 1))
            rows.append((lm_tokens[start:start + L + 1].astype(np.int64), np.ones(L, np.float32), np.zeros(L, bool)))
    return [torch.from_numpy(np.stack(col)) for col in zip(*rows)]


def answer_batch(args, encoding, haystack, step, indices):
    """Samples `indices` of `step` for fine-tuning, passkey samples of one length: ids (b, T+1), weights (b, T)
    (1 on the answer, 0 on the prompt), prompt lengths (b,), and the step's rng (it draws the compressed region)."""
    rng = np.random.default_rng([args.seed, step])
    T = round(args.L_train * rng.uniform(*args.lengths_x))
    rows = []
    for i in indices:
        ids, w = passkey.training_example(encoding, haystack, T, np.random.default_rng([args.seed, step, i]),
                                          args.filler, other_weight=0.0)
        rows.append((ids, w, int(np.argmax(w > 0)) + 1))                # the answer's loss starts after the prompt
    return [torch.from_numpy(np.stack(col)) for col in zip(*rows)] + [rng]


def weighted_lm_loss(model, ids, weights):
    """Per-sample weighted next-token loss, averaged over samples, and the per-token losses (b, L), detached:
    ids (b, L+1), weights (b, L)."""
    logits = model(ids[:, :-1])
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(weights)
    return ((ce * weights).sum(1) / weights.sum(1)).mean(), ce.detach()


def build(args, device, text, haystack):
    """The method, chosen once: (encoding, the module trained (the base Mamba, or a ReMamba around it), the
    optimizer's parameter groups, loss, save). loss(model, step, indices) -> (loss with a graph, the answer
    tokens' mean loss or None, tokens) of samples `indices` of `step`, model being the trained module as the
    step calls it (compiled, in DDP); save(directory, dtype) writes the checkpoint."""
    if args.method == "lm":
        encoding = tokenizer.load_tokenizer(args.out) if args.resume else load_encoding(args.tokenizer, text)
        config = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=encoding.n_vocab,
                             d_state=args.d_state)
        base = trained = Mamba(config).to(device)
        params = list(base.parameters())
    else:
        try:
            base = Mamba.from_pretrained(args.init, device=device)
            encoding = tokenizer.load_tokenizer(args.init)
        except (OSError, ValueError) as e:
            fail(f"--init {args.init}: {e}")
        base.requires_grad_(False)
        params = list(base.parameters()) if args.train == "all" else []
        if args.train == "official":    # the authors' set (lm_head is tied to the embeddings)
            params = [base.backbone.embedding.weight]
            for m in (layer.mixer for layer in base.backbone.layers):
                params += [m.dt_proj.weight, m.dt_proj.bias, m.in_proj.weight, m.out_proj.weight]
        for p in params:
            p.requires_grad_(True)
        trained = base
        if args.method == "remamba":
            trained = remamba.ReMamba(base, init=args.remamba_init)
            params = trained.new_parameters() + params
    if args.L_train <= passkey.prompt_overhead(encoding):
        fail(f"--L-train {args.L_train} leaves no room for filler: the passkey prompt's fixed parts take "
             f"{passkey.prompt_overhead(encoding)} tokens with this tokenizer")
    n_tokens = len(haystack.tokens(encoding)[0])           # tokenizes the training split once, before step 0
    if args.method == "lm" and n_tokens <= args.L_train + 1:
        fail(f"--data has {n_tokens} training tokens, fewer than one window of L_train + 1")

    def lm_loss(model, step, indices):
        ids, weights, answer_mask = (t.to(device) for t in lm_batch(args, encoding, haystack, step, indices))
        loss, ce = weighted_lm_loss(model, ids, weights)
        return loss, ce[answer_mask].mean() if answer_mask.any() else None, ids.numel()

    def sft_loss(model, step, indices):             # all the weight is on the answer: the loss is the answer's
        ids, weights, _, _ = answer_batch(args, encoding, haystack, step, indices)
        loss, _ = weighted_lm_loss(model, ids.to(device), weights.to(device))
        return loss, loss.detach(), ids.numel()

    def remamba_loss(model, step, indices):         # model is the ReMamba: it trains uncompiled, on one process
        ids, weights, prompt_lengths, rng = answer_batch(args, encoding, haystack, step, indices)
        region = remamba.training_region(int(prompt_lengths.min()), args.L_train, rng)
        loss = model.training_loss(ids.to(device), weights.to(device), prompt_lengths.to(device), region)
        return loss, loss.detach(), ids.numel()

    def save(directory, dtype):
        base.save_pretrained(directory, encoding, dtype=dtype)
        if args.method == "remamba":                # its new parameters, beside the base
            trained.save(os.path.join(directory, remamba.REMAMBA_FILE))

    decayed = {id(p) for n, p in trained.named_parameters() if p.dim() >= 2 and not n.endswith("A_log")}
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": args.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    loss = {"lm": lm_loss, "sft": sft_loss, "remamba": remamba_loss}[args.method]
    return encoding, trained, groups, loss, save


def lr_at(step, args):
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / (args.steps - args.warmup)           # in [0, 1): warmup ≤ step < steps
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def setup_device(args):
    """Device and, under torchrun, the process group: (device, rank, world size). Checked before any work."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ           # started by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    if args.batch_size % (args.grad_accum * world):
        fail(f"--batch-size {args.batch_size} must be divisible by --grad-accum × ranks ({args.grad_accum * world})")
    if distributed and args.method != "lm":
        fail(f"--method {args.method} trains on one process; run it with python, not torchrun")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: this machine has no CUDA GPU (use --device cpu)")
    try:
        torch.device(device)
    except RuntimeError:
        fail(f"--device {args.device}: not a device (use auto, cpu, cuda or cuda:N)")
    if args.compile == "graphs" and (not device.startswith("cuda") or world > 1 or args.grad_accum > 1):
        fail("--compile graphs needs one GPU process and --grad-accum 1: use --compile on")
    if distributed:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, rank, world


class Run:
    """One training run: the model, its optimizer and data, the training loop, saving, evaluating."""

    def __init__(self, args, argv, state):
        self.args, self.argv = args, argv
        self.device, self.rank, self.world = setup_device(args)
        cuda = self.device.startswith("cuda")
        self.amp = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda)
        try:
            with open(args.data, encoding="utf-8") as f:
                text = f.read()
            self.haystack = passkey.Haystack(text, "train")   # the first 90 %: eval.py hides needles in the rest
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--data {args.data}: not a readable UTF-8 text file ({type(e).__name__})")
        except ValueError as e:
            fail(f"--data {args.data}: {e}")
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            fail(f"--out {args.out}: not writable")
        self.log_file = open(os.path.join(args.out, "train_log.txt"), "a") if self.rank == 0 else None
        torch.manual_seed(args.seed)
        self.encoding, self.trained, groups, self.loss, self.save_model = build(args, self.device, text, self.haystack)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=cuda)
        model = torch.nn.parallel.DistributedDataParallel(self.trained) if self.world > 1 else self.trained
        # ReMamba trains uncompiled: its stage-2 hook is made anew every step. CUDA graphs replay a step in one
        # launch (small models are bound by launching kernels), but each replay overwrites the last one's outputs,
        # which rules out gradients kept across micro-batches or handed to DDP, and a graph is recorded per
        # sequence length: sft's range of prompt lengths would record one per step.
        mode = args.compile
        if mode == "auto":
            one_graph = self.world == 1 and args.grad_accum == 1 and (
                args.method == "lm" or args.lengths_x[0] == args.lengths_x[1])
            mode = "off" if not cuda else "graphs" if one_graph else "on"
        if mode == "off" or args.method == "remamba":
            self.forward_model = model
        else:
            self.forward_model = torch.compile(model, mode="reduce-overhead" if mode == "graphs" else None)
        self.step, self.elapsed_before = 0, 0.0
        if state is not None:
            self.trained.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
            self.step, self.elapsed_before = state["step"], state["elapsed"]
            self.log(f"resumed {args.out} at step {self.step}")
        self.log(f"{args.method}: {sum(p.numel() for p in self.params) / 1e6:.2f}M trainable parameters, vocab "
                 f"{self.encoding.n_vocab}, L_train {args.L_train}, {args.batch_size} sequences/step, {args.steps} "
                 f"steps, device {self.device}" + (f", {self.world} processes" if self.world > 1 else ""))
        self.t_start = time.time()

    def log(self, line):
        if self.rank == 0:
            print(line, flush=True)
            print(line, file=self.log_file, flush=True)

    def save(self, final=False):
        if self.rank != 0:
            return
        args = self.args
        elapsed = self.elapsed_before + time.time() - self.t_start
        atomic_write(os.path.join(args.out, STATE_FILE), lambda f: torch.save(
            {"model": self.trained.state_dict(), "optimizer": self.optimizer.state_dict(),
             "rng_cpu": torch.get_rng_state(), "step": self.step, "elapsed": elapsed, "args": vars(args)}, f))
        self.save_model(args.out, torch.float16 if args.save_dtype == "float16" else None)
        info = {"L_train": args.L_train, "method": args.method, "steps": self.step, "finished": final,
                "train_seconds": round(elapsed, 1), "commit": git_commit(),
                "device": torch.cuda.get_device_name() if self.device.startswith("cuda") else "cpu",
                "command": "python train.py " + " ".join(self.argv),
                "settings": {k: v for k, v in vars(args).items() if k not in ("lengths_x", "eval_x")}}
        atomic_write(os.path.join(args.out, "train_info.json"), json.dumps(info, indent=2))

    @torch.no_grad()
    def evaluate(self):
        """Log passkey accuracy at each --eval-lengths multiple: new needles in the training split's prose."""
        n, enc, acc = self.args.eval_samples, self.encoding, []
        if self.rank != 0 or n == 0:
            return
        self.trained.eval()
        for m in self.args.eval_x:
            correct = 0
            for i in range(n):
                sample = passkey.make_sample(enc, self.haystack, round(m * self.args.L_train),
                                             depth=i / max(1, n - 1), seed=900_000 + i)
                with self.amp:
                    new = self.trained.generate(torch.tensor([sample.prompt_ids], device=self.device),
                                                len(sample.answer_ids) + 2, eos_token_id=enc.eot_token)
                correct += passkey.score(enc.decode(new[0].tolist()), sample.answer)
            acc.append(f"{m:g}×L_train {100 * (correct / n):3.0f}%")
        self.trained.train()
        self.log(f"eval step {self.step:6d} | passkey accuracy on {n} validation samples: " + "  ".join(acc))

    def out_of_time(self):
        """Whether --time-limit has passed, agreed by every rank (or the others would wait in DDP forever)."""
        limit = self.args.time_limit
        late = torch.tensor(float(bool(limit) and time.time() - self.t_start > limit * 60), device=self.device)
        if self.world > 1:
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late.item())

    def train(self):
        args = self.args
        per_rank = args.batch_size // args.grad_accum // self.world
        last_log, last_log_step, losses, answers, tokens = time.time(), self.step, [], [], 0
        while self.step < args.steps:
            lr = lr_at(self.step, args)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for micro in range(args.grad_accum):
                first = (micro * self.world + self.rank) * per_rank          # this rank's slice of the global batch
                with self.amp:
                    loss, answer, n = self.loss(self.forward_model, self.step, range(first, first + per_rank))
                (loss / args.grad_accum).backward()
                losses.append(loss.detach().float())
                if answer is not None:                              # None: no answer tokens in this micro-batch
                    answers.append(answer.float())
                tokens += n * self.world
            torch.nn.utils.clip_grad_norm_(self.params, args.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.step % args.log_every == 0 or self.step == args.steps:
                # summed over ranks: the mean loss, and the answer loss and count of micro-batches that had one
                zero = torch.zeros_like(losses[0])
                sums = torch.stack([torch.stack(losses).mean(), sum(answers, zero), zero + len(answers)])
                if self.world > 1:
                    dist.all_reduce(sums)
                loss_mean, answer_sum, n_answers = sums.tolist()
                answer = f"{answer_sum / n_answers:.4f}" if n_answers else "     -"
                now = time.time()
                eta = (args.steps - self.step) * (now - last_log) / (self.step - last_log_step)
                self.log(f"step {self.step:6d}/{args.steps} | loss {loss_mean / self.world:.4f} | answer loss "
                         f"{answer} | lr {lr:.2e} | {tokens / (now - last_log) / 1e3:7.1f}k tok/s | "
                         f"ETA {eta / 60:5.1f} min")
                last_log, last_log_step, losses, answers, tokens = now, self.step, [], [], 0
            if args.eval_every and self.step % args.eval_every == 0 and self.step < args.steps:
                self.evaluate()
            if self.step % args.save_every == 0 or self.step == args.steps:
                self.save(final=self.step == args.steps)
            if self.out_of_time() and self.step < args.steps:
                self.save()
                self.log(f"time limit reached at step {self.step}: saved; continue with --resume")
                return
        self.evaluate()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, given = parse_args(argv)
    state = settle(args, given)
    check(args)
    run = Run(args, argv, state)
    try:
        run.train()
    except KeyboardInterrupt:
        if not run.step:
            sys.exit("\ntrain.py: interrupted at step 0")
        run.save()                                                      # rank 0 saves
        sys.exit(f"\ntrain.py: interrupted at step {run.step}; saved, continue with: python train.py --out {args.out} "
                 "--resume")
    if run.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
