"""
DeciMamba: the baseline LongMamba compares against. Drops the tokens with the smallest Δ inside the network.

    Ben-Kish et al., "DeciMamba: Exploring the Length Extrapolation Potential of Mamba" (arXiv 2406.14528).

Mamba's effective receptive field ends near its training length L_train. DeciMamba shortens the sequence inside
the network: at a few decimating layers it keeps only the tokens whose Δ is largest (the ones the selective scan
lets in most, i.e. treats as most important), so the deeper layers see a sequence close to what they were
trained on. The "max_p" rule at the s-th decimating layer (s = 0, 1, ...), on a prefill of L tokens of which the
last `tail` are protected (the response; in generation the last prompt token, from which decoding continues):

    importance_t = ‖Δ_{:,t}‖₂                       the norm of Δ (after softplus) over the d_inner channels
    k = min(L - tail, max(⌊L_base · β^s⌋, min_len))  tokens kept among the L - tail unprotected ones
    keep the k most important of them and the tail, in their original order

The decimating layer gathers x, dt, B, C and z at the kept positions *before* its own selective scan (mamba.py
does that when the hook returns `keep`), so its SSM, its recurrent state for decoding, the residual stream and
every later layer see the k + tail kept tokens only. Decoding steps are never decimated.

Training with decimation on (the paper fine-tunes this way for passkey retrieval) changes nothing when the
training length is at most L_base + tail: every token is kept. A model trained at L_train with L_base = L_train
is therefore already "fine-tuned with decimation".

    with model.hooked(decimamba.DeciMamba([n_layer // 2], L_base=L_train)):
        model.generate(long_prompt_ids, max_new_tokens=8)
"""

import torch

import mamba


class DeciMamba:
    """The hook (mamba.py's contract): returns (dt, keep) at the decimating layers of a prefill.

    layers: decimating layer indices; beta in (0, 1]: each later decimating layer keeps β times as many tokens;
    L_base: the tokens the first one keeps (official: the training length, 2,000); min_len: never fewer."""

    def __init__(self, layers, L_base, beta=0.5, min_len=20, tail=1):
        self.budget = {layer: max(int(L_base * beta ** s), min_len) for s, layer in enumerate(sorted(layers))}
        self.tail = tail
        self.survivors = None   # after a prefill: the prompt positions (b, k) every decimating layer kept

    def __call__(self, layer_idx, dt, dt_bias):
        if layer_idx not in self.budget:
            return dt
        batch, _, L = dt.shape
        if layer_idx == min(self.budget):
            self.survivors = torch.arange(L, device=dt.device).expand(batch, -1)
        candidates = L - self.tail
        k = min(candidates, self.budget[layer_idx])
        if k == candidates:
            return dt                                                         # nothing to drop
        importance = mamba.delta_of(dt[..., :candidates], dt_bias).norm(dim=1)   # (b, L - tail): ‖Δ_{:,t}‖₂
        top = importance.topk(k, dim=-1).indices.sort(-1).values              # (b, k), in original order
        keep = torch.cat([top, torch.arange(candidates, L, device=dt.device).expand(batch, -1)], dim=-1)
        self.survivors = self.survivors.gather(1, keep)
        return dt, keep
