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
Δ_t := 0 (exp(0·A) = 1 keeps the state, 0·B_t x_t adds nothing; the scan sets dt = -inf: softplus(-inf) = 0). It
keeps as many as make its total Δ over the long prompt equal to its total over a training window, found offline
by stretching the window's sorted Δ curve to the prompt length (`_thresholds`). Which tokens a channel skips is
decided in `LongMamba.__call__`, the hook: it hands the scan each channel's bound on dt + dt_bias
(`mamba.SkipBelow`), and the scan skips the tokens below it where it forms Δ. Local channels and decoding steps
are untouched.

    calibration = longmamba.calibrate(model, windows)        # windows (S, L_train) token ids, once per model
    with model.hooked(longmamba.LongMamba(calibration)):     # the method is a hook (mamba.py)
        model.generate(long_prompt_ids, max_new_tokens=8)

Our adaptation. The authors' code is for Mamba-2 (one scalar A per head) and has no Mamba-1 path; what follows
for Mamba-1 is ours. A Mamba-1 channel has n states, each with its own A_{c,n}: `decay_state="slowest"` (default)
takes the slowest, tA_prod = exp(max_n A_{c,n} · Σ_t Δ), since it carries the channel's long memory;
`decay_state="mean"` averages what survives over the states, mean_n exp(A_{c,n} · Σ_t Δ), and calls fewer
channels global. The released calibration script also clamps each channel's Δ at its top-`sc` quantile before
every statistic (sc 0.10 / 0.15 / 0.20 in its loop); `sc=0` (default) is the unclamped form of its earliest code.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

import mamba

# The official length grid for its 2,000-token training length: 1k ... 192k tokens.
OFFICIAL_L_TRAIN = 2000
OFFICIAL_LENGTHS = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 14000, 16000, 20000, 24000,
                    30000, 36000, 44000, 54000, 64000, 80000, 96000, 120000, 144000, 168000, 192000)
FILTER_FROM = 1.5            # filter prefills of ≥ 1.5·L_train tokens (official: int(seqlen / 1e3) > 2 for 2k)
DEFAULT_WINDOWS = 100        # calibration windows of L_train tokens (official S = 100)


def default_lengths(L_train):
    """The official grid scaled to L_train: a model trained on 512 tokens gets the same multiples of its training
    length (0.5×, 1×, 1.5×, ..., 96×) as the 2k models."""
    return sorted({max(1, round(L * L_train / OFFICIAL_L_TRAIN)) for L in OFFICIAL_LENGTHS})


# ----------------------------------------------------------------------------------------------------------
# 1. Calibration (offline, once per model)


def calibration_windows(ids, L_train, n=DEFAULT_WINDOWS):
    """n windows of L_train tokens cut evenly from a long token stream ids (numpy), as (n, L_train) int64 ids."""
    assert len(ids) >= n * L_train, f"{len(ids)} tokens, fewer than {n} windows of {L_train}"
    starts = np.linspace(0, len(ids) - L_train, n).astype(np.int64)
    return torch.from_numpy(np.stack([ids[s:s + L_train] for s in starts]).astype(np.int64))


def _thresholds(delta, decay, L):
    """The official rule (load_align_target.py) for a prompt of L > n tokens, per channel:

        v = the channel's n Δ values sorted descending, stretched to L values (linear interpolation)
        k = 1 + argmax(cumsum(v) > decay)   the first position where the long prompt's largest Δ, kept, would sum
                                            to more than a training window's total (argmax of all-False is 0)
        threshold = v[k],  alpha = min(k / L, 1)

    delta (C, n), decay (C,) -> threshold (C,), alpha (C,). Channels are taken in blocks to bound memory."""
    thresholds, alphas = [], []
    for rows, row_decay in zip(delta.split(max(1, 2**25 // L)), decay.split(max(1, 2**25 // L))):
        v = F.interpolate(rows.sort(-1, descending=True).values[:, None], size=L, mode="linear",
                          align_corners=False)[:, 0]                                            # (C, L)
        k = 1 + (v.cumsum(-1) > row_decay[:, None]).int().argmax(-1)
        thresholds.append(v.gather(1, k.clamp_max(L - 1)[:, None])[:, 0])
        alphas.append((k / L).clamp_max(1.0))
    return torch.cat(thresholds), torch.cat(alphas)


def window_statistics(delta, A, lengths, decay_state="slowest", sc=0.0):
    """One layer, one window: delta (C, n) Δ after softplus, A (C, N). Returns decay (C,), tA_prod (C,) and
    threshold, alpha (len(lengths), C); prompts no longer than a window keep every token (threshold 0)."""
    n = delta.shape[1]
    if sc > 0:  # clamp each channel's Δ at its k-th largest value, k = ⌊sc·n⌋ (the released script)
        delta = delta.clamp(max=delta.topk(max(1, int(n * sc)), dim=1).values[:, -1:])
    decay = delta.sum(-1)                                                     # Σ_t Δ_{c,t}
    if decay_state == "slowest":
        tA_prod = torch.exp(A.amax(-1) * decay)                               # exp(max_n A_{c,n} · Σ_t Δ)
    else:
        tA_prod = torch.exp(A * decay[:, None]).mean(-1)                      # mean_n exp(A_{c,n} · Σ_t Δ)
    stats = [_thresholds(delta, decay, L) if L > n else (torch.zeros_like(decay), torch.ones_like(decay))
             for L in lengths]
    return decay, tA_prod, torch.stack([t for t, _ in stats]), torch.stack([a for _, a in stats])


@torch.no_grad()
def calibrate(model, windows, lengths=None, aggregate="avg", decay_state="slowest", sc=0.0, progress=None):
    """Run the vanilla model on S windows (S, L_train) of token ids and compute, per layer and channel, the
    window statistics above, combined over the windows by their mean ("avg") or element-wise max ("max").

    Returns a dict: {"settings": {...}, "tA_prod", "decay": (n_layer, C), "threshold", "alpha": {L: (n_layer, C)}}.
    progress(done, total) is called after each window."""
    S, L_train = windows.shape
    lengths = lengths or default_lengths(L_train)
    device = model.lm_head.weight.device
    per_window = []   # per window: per layer (decay, tA_prod, threshold, alpha)

    def record(layer_idx, dt, dt_bias):
        A = -torch.exp(model.backbone.layers[layer_idx].mixer.A_log.float())
        per_window[-1].append(window_statistics(mamba.delta_of(dt, dt_bias)[0], A, lengths, decay_state, sc))
        return dt

    with model.hooked(record):
        for i, window in enumerate(windows):
            per_window.append([])
            model.hidden_states(window[None].to(device))
            if progress:
                progress(i + 1, S)
    combine = (lambda xs: torch.stack(xs).mean(0)) if aggregate == "avg" else (lambda xs: torch.stack(xs).amax(0))
    decay, tA_prod, threshold, alpha = (
        torch.stack([combine([w[layer][i] for w in per_window]) for layer in range(model.config.n_layer)]).cpu()
        for i in range(4))                                                    # (n_layer, [lengths,] C)
    return {"settings": dict(L_train=L_train, windows=S, lengths=lengths, aggregate=aggregate,
                             decay_state=decay_state, sc=sc, model=fingerprint(model)),
            "tA_prod": tA_prod, "decay": decay,
            "threshold": {L: threshold[:, i] for i, L in enumerate(lengths)},
            "alpha": {L: alpha[:, i] for i, L in enumerate(lengths)}}


@torch.no_grad()
def fingerprint(model):
    """A short number that changes when the weights that set Δ's decay change (another checkpoint, a fine-tune)."""
    return sum(float(m.A_log.double().sum() + m.dt_proj.weight.double().abs().sum() + m.dt_proj.bias.double().sum())
               for m in (layer.mixer for layer in model.backbone.layers))


# ----------------------------------------------------------------------------------------------------------
# 2. The filter: the hook


class LongMamba:
    """The hook (mamba.py's contract): in a prefill of ≥ FILTER_FROM·L_train tokens, global channels
    (tA_prod > c) keep only their tokens with Δ > b·threshold(L) and skip the others (Δ := 0).

    c: official 0.05 (c ≥ 1 makes no channel global: vanilla Mamba). b: official 1.0 (larger keeps fewer tokens).
    variant "dt_thre" (the released method) or "bound": keep each global channel's largest Δ while their sum stays
    ≤ its decay over a training window (no length grid)."""

    def __init__(self, calibration, c=0.05, b=1.0, variant="dt_thre"):
        assert variant in ("dt_thre", "bound"), variant
        self.variant, self.b = variant, b
        self.lengths = sorted(calibration["threshold"])
        self.filter_from = FILTER_FROM * calibration["settings"]["L_train"]
        self.is_global = calibration["tA_prod"] > c                          # (n_layer, C)
        self.any_global = self.is_global.any(-1).tolist()                    # per layer, known without the GPU
        self.decay = calibration["decay"]
        # Δ = softplus(dt + dt_bias) > b·threshold  <=>  dt + dt_bias > softplus⁻¹(b·threshold), as softplus
        # increases: the scan tests dt + dt_bias, before its softplus. Local channels keep every token (-inf).
        self.dt_bound = {L: torch.where(self.is_global, inverse_softplus(b * t), -math.inf)
                         for L, t in calibration["threshold"].items()}      # (n_layer, C) per length
        self._copies = {}

    def __call__(self, layer_idx, dt, dt_bias):
        seqlen = dt.shape[-1]
        if seqlen < self.filter_from or not self.any_global[layer_idx]:
            return dt                                                         # short prompts
        if self.variant == "dt_thre":
            nearest = min(self.lengths, key=lambda L: abs(L - seqlen))       # the calibrated length nearest seqlen
            return mamba.SkipBelow(dt, self._on(dt.device, self.dt_bound[nearest])[layer_idx])
        ranked, order = mamba.delta_of(dt, dt_bias).sort(-1, descending=True)
        kept_ranked = ranked.cumsum(-1) <= self._on(dt.device, self.decay)[layer_idx][:, None]
        skip = self._on(dt.device, self.is_global)[layer_idx][:, None] & ~torch.empty_like(kept_ranked).scatter_(
            -1, order, kept_ranked)
        return dt.masked_fill(skip, -math.inf)

    def _on(self, device, x):
        """x (n_layer, ...) on `device` as a list of its layers, copied there once per hook (a copy per call would
        make the CPU wait for the GPU)."""
        key = (id(x), device)
        if key not in self._copies:
            self._copies[key] = list(x.to(device))
        return self._copies[key]


def inverse_softplus(y):
    """x with softplus(x) = y (float64 inside): y + log(1 − e^−y); −inf for y = 0."""
    y64 = y.double()
    return (y64 + torch.log(-torch.expm1(-y64))).to(y.dtype)


def describe(calibration, c=0.05, length=None):
    """A short table: global channels per layer and, for a prompt of `length` tokens, the fraction of tokens a
    global channel keeps (alpha at the nearest calibrated length: mean [min, max] over the global channels)."""
    s = calibration["settings"]
    is_global = calibration["tA_prod"] > c
    lines = [f"LongMamba calibration: {s['windows']} windows of {s['L_train']} tokens, aggregate {s['aggregate']}, "
             f"decay_state {s['decay_state']}, sc {s['sc']}; global channels: tA_prod > {c}"]
    nearest = length and min(calibration["alpha"], key=lambda L: abs(L - length))
    if length:
        lines.append(f"tokens kept per global channel in a {length}-token prompt (calibrated length {nearest}"
                     + ("; nothing is filtered below 1.5·L_train)" if length < FILTER_FROM * s["L_train"] else ")"))
    lines.append(f"{'layer':>5}  {'global channels':>17}" + ("  kept: mean [min, max]" if length else ""))
    for layer, g in enumerate(is_global):
        line = f"{layer:>5}  {int(g.sum()):>5} / {len(g):<5} ({float(g.float().mean()):4.0%})"
        if length and g.any():
            kept = calibration["alpha"][nearest][layer][g]
            line += f"  {kept.mean():6.2%} [{kept.min():.2%}, {kept.max():.2%}]"
        lines.append(line)
    return "\n".join(lines)
