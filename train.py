"""
Train the passkey testbed: a small Mamba from scratch (or fine-tune ReMamba on top of one).

    python train.py --out checkpoints/mamba-testbed                        # one GPU (or the CPU)
    torchrun --nproc_per_node=4 train.py --out ...                         # DistributedDataParallel
    python train.py --out ... --resume                                     # continue where it stopped
    python train.py --method remamba --init checkpoints/mamba-testbed      # ReMamba's new parameters

The recipe that makes a small Mamba show the long-context failure (shared/methods/passkey.md): every batch
mixes passkey samples at L_train, whose haystack is natural prose and whose loss is weighted toward the answer
(1 on the key's tokens, 0.05 elsewhere), with plain language-model windows of the same prose (weight 1).
The prose is the first 90 % of --data (passkey.Haystack "train"); evaluation hides needles in the last 10 %.

Determinism. Sample i of step s is drawn from numpy.random.default_rng([seed, s, i]): the data order is a pure
function of the step, so --resume (model, optimizer and RNG state restored from train_state.pt) continues
bit for bit, and K DDP ranks that split each step's global batch see exactly the samples one process would.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import passkey
import tokenizer
from mamba import Mamba, MambaConfig, atomic_write

STATE_FILES = {"lm": "train_state.pt", "remamba": "remamba_train_state.pt"}  # all --resume needs, one file
INFO_FILE = "train_info.json"   # what the checkpoint is: L_train, data, steps, time (read by eval.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="checkpoint directory (created; --resume reads it); remamba: default --init")
    p.add_argument("--method", choices=["lm", "remamba"], default="lm",
                   help="lm: train a Mamba from scratch; remamba: train ReMamba's parameters on --init")
    p.add_argument("--init", help="base checkpoint for --method remamba")
    p.add_argument("--train-base", action="store_true", help="remamba: train the base model too")
    p.add_argument("--data", default="data/war_and_peace.txt", help="training text (UTF-8 prose)")
    p.add_argument("--tokenizer", default="bytes",
                   help="'bytes' (256 single bytes: the testbed's), a .tiktoken file (e.g. data/bpe2048.tiktoken), "
                        "or 'bpe:N' to train an N-token BPE on --data")
    p.add_argument("--filler", choices=passkey.FILLERS, default="prose")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--L-train", type=int,
                   help="training length in tokens (lm: default 512; remamba: default the base model's)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences per optimizer step)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--passkey-fraction", type=float, default=0.5, help="share of passkey samples (rest: LM windows)")
    p.add_argument("--other-weight", type=float, default=0.05,
                   help="lm: loss weight of non-answer passkey tokens (ReMamba is trained on the answer only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=20, help="passkey samples at L_train checked at the end")
    p.add_argument("--time-limit", type=float, default=0,
                   help="minutes of this invocation; then save and stop (0: none)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def fail(message):
    """Stop before any work with a message that says what to change."""
    sys.exit(f"train.py: {message}")


def load_encoding(spec, text):
    if spec == "bytes":
        return tokenizer.byte_encoding()
    if spec.startswith("bpe:"):
        return tokenizer.train_bpe([text], int(spec[4:]))
    if not os.path.isfile(spec):
        fail(f"--tokenizer {spec}: no such file (give a .tiktoken file, 'bytes' or 'bpe:N')")
    return tokenizer.load_tiktoken(spec)


# what a resumed run must share with the run that wrote the state (anything else, e.g. --steps, may change)
RESUME_FIXED = ("method", "init", "train_base", "data", "tokenizer", "filler", "d_model", "n_layer", "d_state",
                "L_train", "batch_size", "grad_accum", "passkey_fraction", "other_weight", "seed")


def validate(args, world_size):
    for flag in ("grad_accum", "save_every", "log_every"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if args.batch_size % (args.grad_accum * world_size):
        fail(f"--batch-size {args.batch_size} must be divisible by --grad-accum ({args.grad_accum}) × "
             f"processes ({world_size})")
    if args.method == "remamba":
        if not args.init:
            fail("--method remamba needs --init <base checkpoint directory>")
        if world_size > 1:
            fail("--method remamba trains on one process; run it with python, not torchrun")
        args.out = args.out or args.init
        if args.L_train is None and os.path.isdir(args.init):
            args.L_train = read_L_train(args.init)
        if args.train_base and os.path.abspath(args.out) == os.path.abspath(args.init):
            fail("--train-base changes the base model: give an --out other than --init")
    else:
        if not args.out:
            fail("--out is required: the checkpoint directory to write")
        if args.init or args.train_base:
            fail("--init and --train-base belong to --method remamba; --method lm trains a new model from scratch")
        if args.d_model % 16:
            fail(f"--d-model {args.d_model} must be a multiple of 16 (dt_rank = d_model/16; expand 2 keeps "
                 f"d_inner a multiple of the scan kernel's channel block)")
        args.L_train = args.L_train or 512
    if not 0 <= args.other_weight < 1:
        fail(f"--other-weight must be in [0, 1): weight 1 marks the answer tokens; got {args.other_weight}")
    if not 0 <= args.passkey_fraction <= 1:
        fail(f"--passkey-fraction must be in [0, 1], got {args.passkey_fraction}")
    if args.steps < 1 or args.warmup < 0:
        fail("--steps must be ≥ 1 and --warmup ≥ 0")


def lr_at(step, args):
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class Batches:
    """The training data: sample i of step s is a pure function of (seed, s, i)."""

    def __init__(self, args, encoding, text):
        self.args, self.encoding = args, encoding
        self.haystack = passkey.Haystack(text, "train")
        self.lm_tokens = self.haystack.tokens(encoding)[0]        # the train split as one token stream
        if len(self.lm_tokens) <= args.L_train + 1:
            fail(f"--data has {len(self.lm_tokens)} training tokens, fewer than one window of L_train+1")

    def sample(self, step, index):
        """ids (L+1,) int64, loss weights (L,) float32, answer start (index of the first answer token or -1)."""
        rng = np.random.default_rng([self.args.seed, step, index])
        L = self.args.L_train
        if rng.random() < self.args.passkey_fraction:
            ids, weights = passkey.training_example(self.encoding, self.haystack, L, rng, self.args.filler,
                                                    self.args.other_weight)
            return ids, weights, int(np.argmax(weights == 1.0)) + 1
        start = int(rng.integers(0, len(self.lm_tokens) - L - 1))
        return self.lm_tokens[start:start + L + 1].astype(np.int64), np.ones(L, np.float32), -1

    def passkey_only(self, step, index):
        """ReMamba is fine-tuned on passkey samples only (the answer is its SFT target)."""
        rng = np.random.default_rng([self.args.seed, step, index])
        ids, weights = passkey.training_example(self.encoding, self.haystack, self.args.L_train, rng,
                                                self.args.filler, self.args.other_weight)
        return ids, int(np.argmax(weights == 1.0)) + 1, rng


def weighted_lm_loss(model, ids, weights):
    """Per-sample weighted next-token loss, averaged over samples: ids (B, L+1), weights (B, L)."""
    logits = model(ids[:, :-1])
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(weights)
    return ((ce * weights).sum(1) / weights.sum(1)).mean()


def git_commit():
    """The repository's commit; $MAMBA_COMMIT where the tree was copied without .git (a remote GPU machine)."""
    if os.environ.get("MAMBA_COMMIT"):
        return os.environ["MAMBA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def passkey_accuracy(generate, encoding, text, L, n, device):
    """Greedy passkey retrieval at length L on the held-out split (a quick check; eval.py does the full grid)."""
    haystack = passkey.Haystack(text, "eval")
    correct = 0
    for i in range(n):
        sample = passkey.make_sample(encoding, haystack, L, depth=i / max(1, n - 1), seed=10_000 + i)
        new = generate(torch.tensor([sample.prompt_ids], device=device), 8)
        correct += passkey.score(encoding.decode(new[0].tolist()), sample.answer)
    return correct / n


def torchrun_world():
    """(distributed, rank, world size), from the environment torchrun sets."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    return (True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (False, 0, 1)


def setup_device(requested, distributed):
    """The device to run on ('auto': CUDA when there is one); under torchrun, this rank's GPU and the process
    group (NCCL on GPUs, gloo on CPUs)."""
    device = requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if distributed:
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def autocast(device):
    """bf16 autocast on GPUs (weights, state and residual stream stay fp32); plain fp32 on CPUs."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)


def main(argv=None):
    args = parse_args(argv)
    distributed, rank, world_size = torchrun_world()
    validate(args, world_size)
    for path, what in [(args.data, "--data")] + ([(args.init, "--init")] if args.init else []):
        if not os.path.exists(path):
            fail(f"{what} {path}: not found")
    device = setup_device(args.device, distributed)
    log = print if rank == 0 else (lambda *a, **k: None)
    text = open(args.data, encoding="utf-8").read()
    state_path = os.path.join(args.out, STATE_FILES[args.method])
    if args.resume and not os.path.isfile(state_path):
        fail(f"--resume: {state_path} does not exist (nothing to resume; drop --resume to start)")
    if not args.resume and os.path.isfile(state_path):
        fail(f"{args.out} already holds a training run: add --resume to continue it, or choose another --out")
    state = None
    if args.resume:
        state = torch.load(state_path, map_location=device, weights_only=False)
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run used {state['args'][k]})"
                   for k in RESUME_FIXED if state["args"].get(k) != getattr(args, k)]
        if changed:
            fail(f"--resume: these settings differ from the run in {args.out}: {'; '.join(changed)}")

    torch.manual_seed(args.seed)
    if args.method == "lm":
        encoding = tokenizer.load_tokenizer(args.out) if args.resume else load_encoding(args.tokenizer, text)
        overhead = passkey.prompt_overhead(encoding)
        if args.L_train <= overhead:
            fail(f"--L-train {args.L_train} leaves no room for filler: the passkey prompt's fixed parts take "
                 f"{overhead} tokens with this tokenizer")
        config = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=encoding.n_vocab,
                             d_state=args.d_state)
        model = Mamba(config).to(device)
        trained = model
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("A_log")]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.endswith("A_log")]
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        import remamba
        base = Mamba.from_pretrained(args.init, device=device)
        encoding = tokenizer.load_tokenizer(args.init)
        trained = remamba.ReMamba(base).to(device)
        groups = [{"params": list(trained.trainable_parameters(args.train_base)), "weight_decay": 0.0}]
    batches = Batches(args, encoding, text)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    ddp_model = torch.nn.parallel.DistributedDataParallel(trained) if distributed else trained

    step, elapsed_before = 0, 0.0
    if args.resume:
        trained.load_state_dict(state["model"])
        if args.method == "remamba" and args.train_base:
            base.load_state_dict(state["base"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        step, elapsed_before = state["step"], state["elapsed"]
        log(f"resumed {args.out} at step {step}")

    n_params = sum(p.numel() for g in groups for p in g["params"])
    per_rank = args.batch_size // args.grad_accum // world_size
    tokens_per_step = args.batch_size * args.L_train
    log(f"{args.method}: {n_params / 1e6:.2f}M trainable parameters, vocab {encoding.n_vocab}, L_train "
        f"{args.L_train}, {args.batch_size} sequences/step, {args.steps} steps, device {device}"
        f"{f', {world_size} processes' if distributed else ''}")

    def save(final=False):
        if rank != 0:
            return
        os.makedirs(args.out, exist_ok=True)
        elapsed = elapsed_before + time.time() - t_start
        state = {"model": trained.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "step": step, "elapsed": elapsed, "args": vars(args)}
        if args.method == "remamba" and args.train_base:
            state["base"] = base.state_dict()  # ReMamba's state_dict holds only its new parameters
        atomic_write(state_path, lambda f: torch.save(state, f))
        if args.method == "lm":
            model.save_pretrained(args.out, encoding)
            info = {"L_train": args.L_train, "data": args.data, "tokenizer": args.tokenizer, "steps": step,
                    "train_seconds": round(elapsed, 1), "tokens_per_second": round(step * tokens_per_step / elapsed),
                    "commit": git_commit(), "device": torch.cuda.get_device_name() if device.startswith("cuda")
                    else "cpu", "command": "python train.py " + " ".join(argv or sys.argv[1:]),
                    "finished": final and step >= args.steps}
            atomic_write(os.path.join(args.out, INFO_FILE), lambda f: f.write(json.dumps(info, indent=2).encode()))
        else:
            trained.save(args.out)  # remamba.pt in the checkpoint directory
            if args.train_base:
                base.save_pretrained(args.out, encoding)

    t_start = last_log = time.time()
    loss_sum = loss_count = 0
    while step < args.steps:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(args.grad_accum):
            first = (micro * world_size + rank) * per_rank        # this rank's slice of the global batch
            indices = range(first, first + per_rank)
            with autocast(device):
                if args.method == "lm":
                    samples = [batches.sample(step, i) for i in indices]
                    ids = torch.from_numpy(np.stack([s[0] for s in samples])).to(device)
                    weights = torch.from_numpy(np.stack([s[1] for s in samples])).to(device)
                    loss = weighted_lm_loss(ddp_model, ids, weights)
                else:
                    samples = [batches.passkey_only(step, i) for i in indices]
                    loss = trained.training_loss([torch.from_numpy(s[0]).to(device) for s in samples],
                                                 [s[1] for s in samples], samples[0][2],
                                                 train_length=args.L_train)
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach().float() / args.grad_accum
        loss_count += 1
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = loss_sum / loss_count
            if distributed:
                dist.all_reduce(mean_loss)
                mean_loss /= world_size
            now = time.time()
            tok_s = loss_count * tokens_per_step / (now - last_log)
            eta = (args.steps - step) * tokens_per_step / tok_s
            log(f"step {step:6d}/{args.steps} | loss {mean_loss.item():.4f} | lr {lr:.2e} | "
                f"{tok_s / 1e3:7.1f}k tok/s | ETA {eta / 60:5.1f} min", flush=True)
            loss_sum, loss_count, last_log = 0, 0, now
        if step % args.save_every == 0 or step == args.steps:
            save(final=step == args.steps)
        out_of_time = torch.tensor(float(bool(args.time_limit) and time.time() - t_start > args.time_limit * 60),
                                   device=device)
        if distributed:  # every rank stops at the same step, or the others would wait in DDP forever
            dist.all_reduce(out_of_time, op=dist.ReduceOp.MAX)
        if out_of_time.item() and step < args.steps:
            save()
            log(f"time limit reached at step {step}: saved; continue with --resume")
            break

    if rank == 0 and step == args.steps and args.eval_samples:
        trained.eval()
        generate = (lambda ids, n: model.generate(ids, n, eos_token_id=encoding.eot_token)) if args.method == "lm" \
            else (lambda ids, n: trained.generate(ids, n, eos_token_id=encoding.eot_token))
        with autocast(device):
            acc = passkey_accuracy(generate, encoding, text, args.L_train, args.eval_samples, device)
        log(f"passkey accuracy at L_train={args.L_train} on {args.eval_samples} held-out samples: {acc:.1%}")
    if distributed:
        dist.destroy_process_group()


def read_L_train(checkpoint_dir):
    """The length a checkpoint was trained at, from the train_info.json that train.py writes beside it."""
    path = os.path.join(checkpoint_dir, INFO_FILE)
    if not os.path.isfile(path):
        sys.exit(f"{path} not found: pass --L-train (the length the model was trained at, e.g. 2048 for the "
                 f"state-spaces models)")
    with open(path) as f:
        return json.load(f)["L_train"]


if __name__ == "__main__":
    main()
