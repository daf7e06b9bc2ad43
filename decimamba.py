"""
DeciMamba: the baseline LongMamba compares against. Drops the tokens with the smallest Δ between layers.

    Ben-Kish et al., "DeciMamba: Exploring the Length Extrapolation Potential of Mamba" (arXiv 2406.14528).

Mamba's effective receptive field ends near its training length L_train. DeciMamba shortens the sequence inside
the network: at a few decimating layers it keeps only the tokens whose Δ is largest (the ones the selective scan
lets in most, i.e. treats as most important), so deeper layers see a sequence close to what they were trained on.

The "max_p" rule at the s-th decimating layer (s = 0, 1, ...), on a prefill of L tokens:

    importance_t = ‖Δ_{:,t}‖₂                         the norm of Δ (after softplus) over the d_inner channels
    k = min(L, max(⌊L_base · β^s⌋, min_len))          tokens kept: the notes' max(min(L, L_base·β^s), min_len),
                                                      at most L; k = L keeps all (prompts shorter than min_len)
    keep the k most important tokens, in their original order

The layer scans the full sequence; its output and the residual stream are then gathered at the kept positions
(mamba.py does that when the hook returns `keep`), so every later layer and the logits see k positions only.
The last prompt position is always kept, because generation continues from it: when it is not among the top k,
it replaces the least important of them (the official code keeps the response tokens instead; in a prefill the
prompt's last token plays that role). Decoding steps are never decimated: they continue from the recurrent
states the shorter prefill left (mamba.py's step uses each layer's cache as its prefill wrote it).

Usage:

    decimamba.apply(model, L_base=L_train)      # decimate in layer n_layer // 2, beta 0.5, min_len 20
    model.generate(long_prompt_ids, max_new_tokens=8)
    decimamba.remove(model)                     # vanilla Mamba again, bit for bit
"""

import torch


def default_decimating_layers(n_layer):
    """One decimating layer in the middle of the network, n_layer // 2 (the official config names one layer,
    12; the paper decimates in middle layers)."""
    return [n_layer // 2]


def apply(model, decimating_layers=None, beta=0.5, L_base=None, min_len=20):
    """Set the model's hook to DeciMamba.

    decimating_layers: layer indices, default default_decimating_layers(n_layer); beta in (0, 1]: each later
    decimating layer keeps β times as many tokens; L_base: the tokens the first one keeps, the model's training
    length (official 2,000); min_len: never keep fewer tokens than this."""
    n_layer = model.config.n_layer
    if decimating_layers is None:
        decimating_layers = default_decimating_layers(n_layer)
    if (not isinstance(decimating_layers, (list, tuple)) or not decimating_layers
            or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer for i in decimating_layers)
            or len(set(decimating_layers)) != len(decimating_layers)):
        raise ValueError(f"decimating_layers must be a non-empty list of distinct layer indices in [0, {n_layer}), "
                         f"got {decimating_layers!r}")
    if L_base is None:
        raise ValueError("DeciMamba needs L_base, the number of tokens the first decimating layer keeps: pass the "
                         "model's training length (train_info.json's L_train for a checkpoint of train.py)")
    for name, value in (("L_base", L_base), ("min_len", min_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (tokens), got {value!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise ValueError(f"beta must be a number in (0, 1], got {beta!r}")
    model.set_hook(Decimator(sorted(decimating_layers), beta, L_base, min_len))


def remove(model):
    """Vanilla Mamba again: clears the model's hook."""
    model.set_hook(None)


class Decimator:
    """The hook (mamba.py's contract): returns (delta, keep) at the decimating layers of a prefill."""

    def __init__(self, decimating_layers, beta, L_base, min_len):
        # the s-th decimating layer keeps L_base·β^s tokens (at least min_len)
        self.budget = {layer: max(int(L_base * beta ** s), min_len) for s, layer in enumerate(decimating_layers)}

    def __call__(self, layer_idx, hidden_states, dt, delta, is_step):
        if is_step or layer_idx not in self.budget:
            return delta
        L = delta.shape[-1]
        k = min(L, self.budget[layer_idx])
        if k == L:
            return delta                                                      # nothing to drop
        importance = delta.norm(dim=1)                                        # (B, L): ‖Δ_{:,t}‖₂
        top = importance.topk(k, dim=-1).indices                              # (B, k), most important first
        has_last = (top == L - 1).any(-1)
        top[:, -1] = torch.where(has_last, top[:, -1], L - 1)                 # the last token replaces the k-th
        return delta, top.sort(-1).values                                     # kept positions in original order
