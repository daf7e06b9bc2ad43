"""
LongMamba: training-free long context for Mamba, by filtering the tokens its global channels take in.

    Ye et al., "LongMamba: Enhancing Mamba's Long-Context Capabilities via Training-Free Receptive Field
    Enlargement", ICLR 2025 (arXiv 2504.16053).

Why Mamba forgets beyond its training length. Channel c of a layer multiplies its state by exp(Δ_t A_c) at every
token, so after a window of L_train tokens the first token survives with weight

    tA_prod_c = exp(A_c · Σ_t Δ_{c,t})                                     (the paper's "total decay")

Where tA_prod is tiny the channel is *local*: it forgets within a few tokens at any length. Where it is large
(> c = 0.05) the channel is *global*: it was trained to remember the whole window. On a prompt 16× longer a
global channel's Σ_t Δ is about 16× larger, the early tokens decay away, and its state leaves the range the
model was trained on.

The fix: a global channel takes in only its critical tokens, those with a large Δ_t, and skips the others with
Δ_t := 0 (exp(0·A) = 1 keeps the state, 0·B_t x_t adds nothing). It keeps as many as make its total Δ over the
long prompt equal to its total over a training window, found offline by stretching the window's sorted Δ curve
to the prompt length. Local channels and decoding steps are untouched.

Usage:

    calibration = longmamba.calibrate(model, windows)        # windows (S, L_train) token ids, once per model
    longmamba.apply(model, calibration)                       # sets the model's hook (see mamba.py)
    model.generate(long_prompt_ids, max_new_tokens=8)
    longmamba.remove(model)                                   # vanilla Mamba again, bit for bit

Reading order: 1. calibration (offline), 2. the filter (the hook), 3. describe (what a calibration says).

Mamba-1 adaptation (the authors' code is for Mamba-2, one scalar A per head): a Mamba-1 channel has N states,
each with its own A_{c,n}. `decay_state="slowest"` (default) takes the slowest one, tA_prod = exp(max_n A_{c,n}
· Σ_t Δ), since the slowest state is what carries a channel's long memory; `decay_state="mean"` averages what
survives over the states, tA_prod = mean_n exp(A_{c,n} · Σ_t Δ), which calls fewer channels global.
"""

import hashlib
import math
import os
import sys
from dataclasses import dataclass, fields

import torch

import mamba

# The official length grid (load_align_target.py) for its 2,000-token training length: 1k ... 192k.
OFFICIAL_L_TRAIN = 2000
OFFICIAL_LENGTHS = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 14000, 16000, 20000, 24000,
                    30000, 36000, 44000, 54000, 64000, 80000, 96000, 120000, 144000, 168000, 192000)
AGGREGATES = ("avg", "max")
DECAY_STATES = ("slowest", "mean")
VARIANTS = ("dt_thre", "bound")
FILTER_FROM = 1.5  # filter prefills of ≥ 1.5·L_train tokens (official: int(seqlen / 1e3) > 2, i.e. ≥ 3k for 2k)
TOKENS_PER_FORWARD = 16384  # calibration windows are run in batches of about this many tokens
FILE_FORMAT = "longmamba-calibration-v1"


def default_lengths(L_train):
    """The official grid scaled to L_train (grid_i = official_i / 2000 · L_train, rounded): a model trained on
    512 tokens gets the same multiples of its training length (0.5×, 1×, 1.5×, ..., 96×) as the 2k models."""
    return sorted({max(1, round(L * L_train / OFFICIAL_L_TRAIN)) for L in OFFICIAL_LENGTHS})


def model_fingerprint(model):
    """What a calibration depends on: the config, and a hash of the weights that set Δ's decay (A_log, dt_proj)."""
    digest = hashlib.sha256()
    for layer in model.backbone.layers:
        mixer = layer.mixer
        for weight in (mixer.A_log, mixer.dt_proj.weight, mixer.dt_proj.bias):
            digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    return {"config": model.config.to_json_dict(), "weights_sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------------------------------------
# 1. Calibration


@dataclass
class LongMambaCalibration:
    """Per-layer numbers from S windows of L_train tokens; the (n_layer, d_inner) tensors hold layer i in row i."""
    L_train: int                       # tokens per calibration window: the model's training length
    lengths: list                      # prompt lengths the thresholds are for, ascending
    tA_prod: torch.Tensor              # (n_layer, d_inner): what survives of a window's first token
    decay: torch.Tensor                # (n_layer, d_inner): Σ_t Δ_t over a window
    threshold: dict                    # {L: (n_layer, d_inner)}: in a prompt of L tokens keep Δ > threshold
    alpha: dict                        # {L: (n_layer, d_inner)}: the fraction of those tokens kept, min(k/L, 1)
    aggregate: str                     # "avg" | "max": how the per-window numbers were combined
    decay_state: str                   # "slowest" | "mean": how a channel's N states make its tA_prod
    n_windows: int
    model: dict                        # model_fingerprint() of the model it was computed on

    def settings(self):
        return {"L_train": self.L_train, "lengths": list(self.lengths), "aggregate": self.aggregate,
                "decay_state": self.decay_state}

    def save(self, path):
        """Atomically write a small torch file (tensors and plain Python values only)."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["format"] = FILE_FORMAT
        mamba.atomic_write(path, lambda f: torch.save(record, f))

    @classmethod
    def load(cls, path, model):
        """Read a calibration and check that it was computed on `model` (same config and A_log/dt_proj weights)."""
        calibration = cls._read(path)
        problem = calibration.mismatch(model)
        if problem:
            raise ValueError(f"{path}: {problem}. Delete the file to recalibrate (longmamba.load_or_calibrate "
                             f"does it for you), or pass the model it was computed on.")
        return calibration

    @classmethod
    def _read(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no LongMamba calibration at {path}; compute one with longmamba.calibrate "
                                    f"or longmamba.load_or_calibrate")
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable LongMamba calibration file ({type(e).__name__}: {e}); "
                             f"delete it to recalibrate") from None
        if not isinstance(record, dict) or record.pop("format", None) != FILE_FORMAT:
            raise ValueError(f"{path} is not a LongMamba calibration file (expected format {FILE_FORMAT!r}); "
                             f"delete it to recalibrate")
        return cls(**record)

    def mismatch(self, model):
        """None if this calibration belongs to `model`, else what differs."""
        mine, theirs = self.model, model_fingerprint(model)
        if mine["config"] != theirs["config"]:
            differ = sorted(k for k in set(mine["config"]) | set(theirs["config"])
                            if mine["config"].get(k) != theirs["config"].get(k))
            return f"the calibration was computed on another model (config differs in {differ})"
        if mine["weights_sha256"] != theirs["weights_sha256"]:
            return ("the calibration was computed on another model (same config, other A_log/dt_proj weights: "
                    "another checkpoint or a fine-tune)")
        return None


@torch.no_grad()
def calibrate(model, token_windows, lengths=None, aggregate="avg", decay_state="slowest"):
    """Run the vanilla model on S windows of L_train tokens and compute per layer and channel (load_align_target.py):

        decay_c      = Σ_t Δ_{c,t}                              the channel's total Δ over a window
        tA_prod_c    = exp(A_c · decay_c)                       A_c per `decay_state` (module docstring)
        threshold_c(L), alpha_c(L) for each prompt length L     see _crossing; 0 and 1 for L ≤ L_train

    per window, then combined over the windows by their mean ("avg") or element-wise max ("max").
    token_windows: (S, L_train) integer tensor. lengths: default the scaled official grid, default_lengths(L_train).
    """
    if not torch.is_tensor(token_windows) or token_windows.dim() != 2 or token_windows.dtype.is_floating_point:
        raise ValueError("token_windows must be an integer tensor (S windows, L_train tokens), got "
                         + (f"{token_windows.dtype} of shape {tuple(token_windows.shape)}"
                            if torch.is_tensor(token_windows) else type(token_windows).__name__))
    n_windows, L_train = token_windows.shape
    if n_windows < 1 or L_train < 2:
        raise ValueError(f"token_windows must hold at least one window of at least 2 tokens, "
                         f"got shape {tuple(token_windows.shape)}")
    _check_choice("aggregate", aggregate, AGGREGATES)
    _check_choice("decay_state", decay_state, DECAY_STATES)
    lengths = default_lengths(L_train) if lengths is None else _check_lengths(lengths)

    device = model.lm_head.weight.device
    stretches = [_Stretch(L_train, L, device) if L > L_train else None for L in lengths]
    combine = torch.add if aggregate == "avg" else torch.maximum
    totals = [None] * model.config.n_layer  # per layer: [decay, tA_prod, threshold, alpha] combined so far

    def record(layer_idx, hidden_states, dt, delta, is_step):
        A = -torch.exp(model.backbone.layers[layer_idx].mixer.A_log.float())
        per_window = _window_statistics(delta, A, stretches, decay_state)
        batch = [x.sum(0) if aggregate == "avg" else x.amax(0) for x in per_window]
        old = totals[layer_idx]
        totals[layer_idx] = batch if old is None else [combine(a, b) for a, b in zip(old, batch)]
        return delta

    previous_hook = model.hook  # calibrate the vanilla model even when a method is applied
    model.set_hook(record)
    try:
        for windows in token_windows.split(max(1, TOKENS_PER_FORWARD // L_train)):
            model.hidden_states(windows.to(device))
    finally:
        model.set_hook(previous_hook)

    if aggregate == "avg":
        totals = [[x / n_windows for x in layer] for layer in totals]
    decay, tA_prod, threshold, alpha = (torch.stack([layer[i] for layer in totals]).cpu() for i in range(4))
    return LongMambaCalibration(
        L_train=L_train, lengths=lengths, tA_prod=tA_prod, decay=decay,
        threshold={L: threshold[:, i].contiguous() for i, L in enumerate(lengths)},
        alpha={L: alpha[:, i].contiguous() for i, L in enumerate(lengths)},
        aggregate=aggregate, decay_state=decay_state, n_windows=n_windows, model=model_fingerprint(model))


def load_or_calibrate(model, path, token_windows_fn, L_train, lengths=None, aggregate="avg", decay_state="slowest"):
    """The calibration saved at `path` if it was computed on `model` with these settings; otherwise calibrate on
    token_windows_fn() (called only then, it returns (S, L_train) token ids) and save the result to `path`.
    The windows' text is not part of the check: delete the file to recalibrate on other text. A file that is not
    a readable calibration is an error (it is not silently replaced)."""
    if isinstance(L_train, bool) or not isinstance(L_train, int) or L_train < 2:
        raise ValueError(f"L_train must be the model's training length in tokens (an integer ≥ 2), got {L_train!r}")
    _check_choice("aggregate", aggregate, AGGREGATES)
    _check_choice("decay_state", decay_state, DECAY_STATES)
    settings = {"L_train": L_train, "lengths": default_lengths(L_train) if lengths is None else
                _check_lengths(lengths), "aggregate": aggregate, "decay_state": decay_state}
    if os.path.exists(path):
        saved = LongMambaCalibration._read(path)
        problem = saved.mismatch(model) or ", ".join(
            f"saved with {key}={value!r}, asked for {settings[key]!r}" for key, value in saved.settings().items()
            if value != settings[key])
        if not problem:
            return saved
        print(f"longmamba: {path}: {problem}; recalibrating", file=sys.stderr)
    windows = token_windows_fn()
    if not torch.is_tensor(windows) or windows.dim() != 2 or windows.shape[1] != L_train:
        shape = tuple(windows.shape) if torch.is_tensor(windows) else type(windows).__name__
        raise ValueError(f"token_windows_fn must return (S, L_train={L_train}) token ids, got {shape}")
    calibration = calibrate(model, windows, settings["lengths"], aggregate, decay_state)
    calibration.save(path)
    return calibration


def _window_statistics(delta, A, stretches, decay_state):
    """One layer, B windows: delta (B, C, n) Δ after softplus, A (C, N) = -exp(A_log), stretches one per length
    (None for L ≤ n). Returns decay (B, C), tA_prod (B, C), threshold (B, n_lengths, C), alpha (B, n_lengths, C)."""
    batch, channels, n = delta.shape
    decay = delta.sum(-1)                                                     # Σ_t Δ_{c,t}
    if decay_state == "slowest":
        tA_prod = torch.exp(A.amax(-1) * decay)                               # exp(max_n A_{c,n} · Σ_t Δ)
    else:
        tA_prod = torch.exp(A * decay[..., None]).mean(-1)                    # mean_n exp(A_{c,n} · Σ_t Δ)
    curve = _Curve(delta.reshape(batch * channels, n).sort(-1, descending=True).values)
    thresholds, alphas = [], []
    for stretch in stretches:
        if stretch is None:  # a prompt no longer than a training window: keep every token
            thresholds.append(decay.new_zeros(batch, channels))
            alphas.append(decay.new_ones(batch, channels))
            continue
        _, threshold, alpha = _crossing(curve, decay.reshape(-1), stretch)
        thresholds.append(threshold.reshape(batch, channels))
        alphas.append(alpha.reshape(batch, channels))
    return decay, tA_prod, torch.stack(thresholds, 1), torch.stack(alphas, 1)


class _Curve:
    """A window's Δ sorted descending, one row per channel, as the stretches read it: left[:, j] = curve[j],
    right[:, j] = curve[j + 1] (curve[n] := curve[n - 1], F.interpolate's right edge), and right_cumsum."""

    def __init__(self, sorted_delta):                                         # (R, n)
        self.left = sorted_delta
        self.right = torch.cat([sorted_delta[:, 1:], sorted_delta[:, -1:]], dim=1)
        self.right_cumsum = self.right.cumsum(-1)                             # Σ_{j' ≤ j} curve[j' + 1]


class _Stretch:
    """Where F.interpolate(curve (R, 1, n), size=L, mode="linear", align_corners=False) reads a curve of n values:

        output i = (1 - λ_i)·curve[j_i] + λ_i·curve[j_i + 1],   x_i = max((i + 0.5)·n/L - 0.5, 0),
        j_i = ⌊x_i⌋, λ_i = x_i - j_i,  and curve[n] := curve[n - 1] at the right edge.

    For L > n consecutive x_i are less than 1 apart, so each source segment j is read by a run of consecutive
    outputs, first[j] ... first[j] + count[j] - 1 (count ≥ 1), whose sum is
    w_left[j]·curve[j] + w_right[j]·curve[j + 1].
    """

    def __init__(self, n, L, device):
        scale = torch.tensor(float(n), device=device) / L                    # float32 n/L, as F.interpolate does
        x = ((torch.arange(L, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
        self.n, self.L = n, L
        self.j = x.floor().long()                                             # (L,) ≤ n - 1 since L > n
        self.lam = x - self.j                                                 # (L,)
        self.count = torch.bincount(self.j, minlength=n)                      # (n,)
        self.first = self.count.cumsum(0) - self.count                        # (n,)
        self.w_left = torch.zeros(n, device=device).index_add_(0, self.j, 1 - self.lam)
        self.w_right = torch.zeros(n, device=device).index_add_(0, self.j, self.lam)
        self.min_count, self.max_count = int(self.count.min()), int(self.count.max())


def _crossing(curve, decay, stretch):
    """The official rule for one prompt length L, per row (a window's channel):

        v = F.interpolate(sorted_Δ[:, None], size=L, mode="linear", align_corners=False)[:, 0]   (R, L) descending
        k = 1 + argmax(cumsum(v) > decay)       # the first position where the long prompt's largest Δ, kept,
                                                # would sum to more than the training window's total
        threshold = v[k],  alpha = min(k / L, 1)

    (argmax of an all-False row is 0, so a row whose cumsum never exceeds its decay gets k = 1; k = L, a crossing at
    the very last output, reads v[L - 1].) It is computed without building v, which at L = 96·L_train would be
    gigabytes: the cumsum at each source segment's end is a cumsum of segment sums (_Stretch), a binary search
    finds the segment where cumsum(v) first exceeds decay, and only that segment's outputs are summed one by one.
    Equal to the formula above up to float rounding (the tests compare them).
    curve: _Curve of R rows, decay (R,) -> k (R,) long, threshold (R,), alpha (R,).
    """
    s, n, L = stretch, stretch.n, stretch.L
    # Only the first segments can hold the crossing: the outputs reading segment j are ≥ curve[j + 1] and there
    # are at least min_count of them, so cumsum(v) at segment j's end ≥ min_count·Σ_{j'≤j} curve[j' + 1]. Sum the
    # segments up to where that bound passes decay in every row: about n·n/L of them instead of n.
    bound = torch.searchsorted(s.min_count * curve.right_cumsum, decay[:, None], right=True)
    used = min(n, int(bound.max()) + 2)
    segment, at_segment_end = _crossing_segment(curve, decay, s, used)
    if used < n and int(segment.max()) == used:  # float rounding put a crossing past the bound: sum them all
        used = n
        segment, at_segment_end = _crossing_segment(curve, decay, s, used)
    crossed = segment[:, 0] < used
    segment = segment.clamp_max(n - 1)                                        # (R, 1)
    # inside that segment, output by output
    offsets = torch.arange(s.max_count, device=decay.device)                  # (Q,)
    count = s.count[segment]                                                  # (R, 1)
    inside = offsets < count                                                  # (R, Q)
    lam = s.lam[(s.first[segment] + offsets).clamp_max(L - 1)]               # (R, Q)
    v = (1 - lam) * curve.left.gather(1, segment) + lam * curve.right.gather(1, segment)
    before = torch.where(segment > 0, at_segment_end.gather(1, (segment - 1).clamp(0, used - 1)), 0.0)
    over = ((before + (v * inside).cumsum(-1)) > decay[:, None]) & inside
    # float rounding can leave the step-by-step sum a hair under decay at the segment end: cross at its last output
    q = torch.where(over.any(-1, keepdim=True), over.int().argmax(-1, keepdim=True), count - 1)
    k = torch.where(crossed, (s.first[segment] + q + 1)[:, 0], 1)             # (R,)
    at = k.clamp_max(L - 1)
    j, lam_k = s.j[at][:, None], s.lam[at]
    threshold = (1 - lam_k) * curve.left.gather(1, j)[:, 0] + lam_k * curve.right.gather(1, j)[:, 0]
    return k, threshold, (k / L).clamp_max(1.0)


def _crossing_segment(curve, decay, s, used):
    """cumsum(v) at the ends of the first `used` segments (R, used), and per row the first of them that ends
    above decay (R, 1), or `used` where none does."""
    segment_sum = torch.addcmul(curve.left[:, :used] * s.w_left[:used], curve.right[:, :used], s.w_right[:used])
    at_segment_end = segment_sum.cumsum(-1)
    return torch.searchsorted(at_segment_end, decay[:, None], right=True), at_segment_end


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_lengths(lengths):
    if (not isinstance(lengths, (list, tuple)) or not lengths
            or any(isinstance(L, bool) or not isinstance(L, int) or L < 1 for L in lengths)):
        raise ValueError(f"lengths must be a list of positive integers (prompt lengths in tokens), got {lengths!r}")
    return sorted(set(lengths))


# ----------------------------------------------------------------------------------------------------------
# 2. The filter


def apply(model, calibration, c=0.05, b=1.0, variant="dt_thre"):
    """Set the model's hook to LongMamba with a calibration computed on this model.

    c: a channel is global when tA_prod > c (official 0.05; c ≥ 1 makes none global: vanilla Mamba).
    b: scales the threshold, keep Δ > b·threshold (official 1.0; larger keeps fewer tokens).
    variant: "dt_thre" (the released method) or "bound" (keep each global channel's largest Δ while their sum
    stays ≤ decay_c: needs no length grid)."""
    if not isinstance(calibration, LongMambaCalibration):
        raise TypeError(f"calibration must be a LongMambaCalibration (longmamba.calibrate or "
                        f"LongMambaCalibration.load), got {type(calibration).__name__}")
    problem = calibration.mismatch(model)
    if problem:
        raise ValueError(f"cannot apply LongMamba: {problem}; calibrate this model first (longmamba.calibrate)")
    for name, value in (("c", c), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    _check_choice("variant", variant, VARIANTS)
    model.set_hook(LongMambaFilter(calibration, c, b, variant, model.lm_head.weight.device))


def remove(model):
    """Vanilla Mamba again: clears the model's hook."""
    model.set_hook(None)


def nearest_length(lengths, seqlen):
    """The calibrated length closest to seqlen (the smaller one on a tie)."""
    return min(lengths, key=lambda L: abs(L - seqlen))


class LongMambaFilter:
    """The hook (mamba.py's contract): filters Δ in global channels during a prefill of ≥ 1.5·L_train tokens."""

    def __init__(self, calibration, c, b, variant, device):
        self.variant = variant
        self.lengths = list(calibration.lengths)
        self.filter_from = FILTER_FROM * calibration.L_train
        is_global = calibration.tA_prod > c                                   # (n_layer, d_inner)
        self.any_global = is_global.any(-1).tolist()
        if variant == "dt_thre":
            # per length, the Δ a token must exceed to enter: b·threshold in global channels, -inf in local ones
            # (every Δ passes), so one comparison filters exactly the global channels
            self.floor = {L: torch.where(is_global, b * thr, -math.inf).to(device)
                          for L, thr in calibration.threshold.items()}
        else:  # bound: per layer the global channels (G,) and their decay (G,)
            self.global_channels = [g.nonzero()[:, 0].to(device) for g in is_global]
            self.global_decay = [decay[g].to(device) for decay, g in zip(calibration.decay, is_global)]

    def __call__(self, layer_idx, hidden_states, dt, delta, is_step):
        seqlen = delta.shape[-1]
        if is_step or seqlen < self.filter_from or not self.any_global[layer_idx]:
            return delta                                                      # decoding steps, short prompts
        if self.variant == "dt_thre":
            floor = self.floor[nearest_length(self.lengths, seqlen)][layer_idx].to(delta.device)
            return torch.where(delta > floor[:, None], delta, 0.0)            # Δ := 0 where Δ ≤ b·threshold(L)
        channels = self.global_channels[layer_idx].to(delta.device)           # bound
        d = delta.index_select(1, channels)                                   # (B, G, L)
        ranked, order = d.sort(-1, descending=True)
        kept_ranked = ranked.cumsum(-1) <= self.global_decay[layer_idx][:, None].to(delta.device)
        kept = torch.empty_like(kept_ranked).scatter_(-1, order, kept_ranked)
        return delta.index_copy(1, channels, torch.where(kept, d, 0.0))


# ----------------------------------------------------------------------------------------------------------
# 3. What a calibration says


def describe(calibration, c=0.05, length=None):
    """A short table: global channels per layer, and, for a prompt of `length` tokens, the fraction of tokens a
    global channel keeps (alpha at the nearest calibrated length: mean, min and max over the global channels)."""
    is_global = calibration.tA_prod > c
    d_inner = is_global.shape[1]
    lines = [f"LongMamba calibration: {calibration.n_windows} windows of {calibration.L_train} tokens, "
             f"aggregate {calibration.aggregate}, decay_state {calibration.decay_state}; global: tA_prod > {c}"]
    key = None
    if length is not None:
        key = nearest_length(calibration.lengths, length)
        lines.append(f"tokens kept per global channel in a {length}-token prompt (calibrated length {key}"
                     + ("; below 1.5·L_train nothing is filtered)" if length < FILTER_FROM * calibration.L_train
                        else ")"))
    lines.append(f"{'layer':>5}  {'global channels':>17}" + ("  kept: mean [min, max]" if key is not None else ""))
    for layer, g in enumerate(is_global):
        n_global = int(g.sum())
        line = f"{layer:>5}  {n_global:>5} / {d_inner:<5} ({n_global / d_inner:4.0%})"
        if key is not None and n_global:
            kept = calibration.alpha[key][layer][g]
            line += f"  {kept.mean():6.2%} [{kept.min():.2%}, {kept.max():.2%}]"
        lines.append(line)
    return "\n".join(lines)
