"""
Mamba-1 language model in plain PyTorch, one file.

    Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752).

Parameter names follow `mamba_ssm`'s `MambaLMHeadModel`, so an original `state-spaces/mamba-*` checkpoint
loads without renaming (the Hugging Face `-hf` names are mapped on load). Reading order:

    1. MambaConfig                   sizes, and the two config.json dialects (state-spaces, Hugging Face)
    2. selective scans               the recurrence, three implementations with one signature
    3. RMSNorm, MambaMixer, Block    one layer
    4. Mamba                         the language model: forward, prefill, step, generate, the method hook
    5. checkpoints                   from_pretrained / save_pretrained, a dependency-free safetensors reader
    6. GraphedStep                   decoding on a GPU: the compiled recurrent step replayed as a CUDA graph

Glossary (the names in shape comments):

    b        batch size                    l        sequence length in tokens
    d_model  width of the residual stream  d_inner  channels of the SSM, expand · d_model (2 · d_model)
    n        states per channel (d_state)  dt_rank  rank of the projection that makes Δ

The selective SSM (paper, Algorithm 2), per channel d of the d_inner channels; x_proj(x_t) is split into
dt_low (dt_rank), B_t and C_t (n each):

    Δ_t = softplus(dt_proj.weight @ dt_low + dt_bias)     Δ (b, d_inner, l)    the "selection": a time step per token
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t              h (b, d_inner, n)    eq. (2a), discretised by eq. (4)
    y_t = C_t · h_t + D ⊙ x_t                             y (b, d_inner, l)    eq. (2b), plus the skip D

A = -exp(A_log) (d_inner, n) is a fixed matrix of negative decay rates; B_t and C_t (n,) are the SSM's input and
output matrices (as tensors: B, C (b, n, l)). That Δ, B and C depend on the token is what makes the scan
"selective". Eq. (4) discretises with a zero-order hold: Ā = exp(ΔA) as above, while B̄ is simplified to ΔB, as
in mamba_ssm. The state h is always accumulated in float32.

The method hook is the only way a long-context method changes Mamba. LongMamba, DeciMamba and ReMamba
(longmamba.py, decimamba.py, remamba.py) change what the scan sees, and this file knows nothing of them. A method
may also wrap the model (ReMamba runs it twice), but inside the model it acts through this hook, called once per
mixer per parallel forward (training, a prompt's prefill) after the selection is computed and before the scan:

    def hook(layer_idx, dt, dt_bias):
        # dt       (b, d_inner, l): dt_proj.weight @ dt_low; the scan makes Δ = softplus(dt + dt_bias)
        # dt_bias  (d_inner,) float32; delta_of(dt, dt_bias) is that Δ, for a method that needs to see it
        return dt                      # the dt to scan with (same shape; -inf gives Δ = 0: the token is skipped)
        return SkipBelow(dt, bound)    # bound (d_inner,) float32: channel c skips (Δ := 0) every token whose
                                       # dt + dt_bias <= bound[c]; the scan applies this test where it forms Δ,
                                       # so skipping costs no pass over dt
        return dt, keep                # keep (b, k): sorted positions. The mixer gathers x, dt, B, C and z at them
                                       # before its scan, so this layer's SSM, the residual stream and every later
                                       # layer see only these k tokens

The scan forms Δ itself (the bias add and the softplus are fused into it), so Δ is never written to memory
unless a method asks for it.

Decoding steps are not hooked: every method here changes how a prompt is read, and generation continues from
the state that reading left, with plain Mamba steps (as in each method's paper and code).

    with model.hooked(hook):           # apply a method; the hook that was set before comes back afterwards
        model.generate(prompt_ids)
    model(ids)                         # no hook: vanilla Mamba, bit for bit
"""

import contextlib
import json
import math
import os
import struct
import subprocess
import tempfile
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

try:                    # the Triton kernels, used for CUDA tensors: the scan, and the conv with its SiLU
    import conv_triton
    import scan_triton
except ImportError:     # no triton package: PyTorch only
    conv_triton = scan_triton = None


# ----------------------------------------------------------------------------------------------------------
# 1. Configuration


_SSM_FIELDS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor")  # a config's ssm_cfg
# mamba_ssm's other Mamba-1 options, at the values this model implements
_SSM_DEFAULTS = {"dt_init": "random", "dt_scale": 1.0, "conv_bias": True, "bias": False}


@dataclass
class MambaConfig:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto" = ceil(d_model / 16)
    pad_vocab_size_multiple: int = 8
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    # initialisation of Δ (only used for a freshly initialised model)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4

    def __post_init__(self):
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (m - self.vocab_size % m) % m

    # state-spaces `config.json` (what mamba_ssm's MambaConfig writes)
    def to_json_dict(self):
        return {
            "d_model": self.d_model,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {name: getattr(self, name) for name in _SSM_FIELDS},
            "rms_norm": True,
            "norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def from_json_dict(cls, d):
        """Read either dialect: state-spaces (`d_model`, `ssm_cfg`) or Hugging Face (`hidden_size`, ...).
        Raises ValueError saying what is missing or unsupported."""
        if "hidden_size" in d:  # transformers' MambaConfig
            if d.get("use_bias", False) or not d.get("use_conv_bias", True):
                raise ValueError("use_bias=True or use_conv_bias=False is not supported (no Mamba checkpoint has them)")
            kw = dict(d_model=d["hidden_size"], n_layer=d.get("num_hidden_layers"), vocab_size=d.get("vocab_size"),
                      d_state=d.get("state_size", 16), d_conv=d.get("conv_kernel", 4), expand=d.get("expand", 2),
                      dt_rank=d.get("time_step_rank", "auto"), pad_vocab_size_multiple=1,
                      norm_eps=d.get("layer_norm_epsilon", 1e-5), residual_in_fp32=d.get("residual_in_fp32", True),
                      tie_embeddings=d.get("tie_word_embeddings", True))
        else:
            ssm = dict(d.get("ssm_cfg") or {})
            if ssm.pop("layer", "Mamba1") != "Mamba1" or not d.get("rms_norm", True) \
                    or d.get("d_intermediate", 0) or d.get("attn_layer_idx"):
                raise ValueError("only Mamba-1 layers with RMSNorm are supported (no Mamba-2, LayerNorm, MLP or "
                                 "attention layers)")
            ssm.pop("use_fast_path", None)                     # mamba_ssm's choice of kernel: any value loads
            for key, default in _SSM_DEFAULTS.items():         # what mamba_ssm writes with its defaults, ours
                value = ssm.get(key, default)
                if value == default and isinstance(value, bool) == isinstance(default, bool):
                    ssm.pop(key, None)
            unknown = set(ssm) - set(_SSM_FIELDS)
            if unknown:
                fixed = ", ".join(f"{k}={v!r}" for k, v in _SSM_DEFAULTS.items())
                raise ValueError(f"unsupported ssm_cfg keys {sorted(unknown)} (it may hold {', '.join(_SSM_FIELDS)} "
                                 f"and use_fast_path, and {fixed} only at these values)")
            kw = dict(d_model=d.get("d_model"), n_layer=d.get("n_layer"), vocab_size=d.get("vocab_size"),
                      pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
                      norm_eps=d.get("norm_epsilon", 1e-5), residual_in_fp32=d.get("residual_in_fp32", True),
                      tie_embeddings=d.get("tie_embeddings", True), **ssm)
        kinds = {f.name: f.type for f in fields(cls)}                  # int, float, bool; dt_rank int | str
        for name, value in kw.items():
            if kinds[name] is bool or name == "dt_rank" and value == "auto":
                continue
            number = kinds[name] is float
            if isinstance(value, bool) or not isinstance(value, (int, float) if number else int) or value <= 0:
                raise ValueError(f"{name} must be a positive {'number' if number else 'integer'}, got {value!r} (a "
                                 f"state-spaces config has d_model, n_layer, vocab_size; a Hugging Face one "
                                 f"hidden_size, num_hidden_layers)")
        return cls(**kw)


# ----------------------------------------------------------------------------------------------------------
# 2. Selective scans. One signature for all (mamba_ssm's `selective_scan_fn`, so users can swap):
#
#   u, delta, z (b, d_inner, l);  A (d_inner, n) float32;  B, C (b, n, l) or grouped (b, groups, n, l);
#   D, delta_bias (d_inner,) float32.   Returns out (b, d_inner, l) in u's dtype [, last state (b, d_inner, n) fp32].
#   Ours also take skip_below (d_inner,) float32 (with delta_softplus): channel c skips token t, Δ_t := 0, where
#   delta_t + delta_bias <= skip_below[c] (a method's hook asks for this: see the module docstring).


def _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus, skip_below):
    """Upcast to float32 (float64 stays float64: the tests' reference), apply the Δ bias/softplus (and the skips),
    expand grouped B/C to (b, d_inner, n, l)."""
    d_inner = u.shape[1]
    delta = _up(delta)
    if delta_bias is not None:
        delta = delta + _up(delta_bias)[:, None]
    if skip_below is not None:
        assert delta_softplus, "skip_below needs delta_softplus (a skipped token gets softplus(-inf) = 0)"
        delta = torch.where(delta > _up(skip_below)[:, None], delta, -math.inf)
    if delta_softplus:
        delta = F.softplus(delta)

    def per_channel(M):  # (b, n, l) or (b, groups, n, l) -> (b, d_inner or 1, n, l)
        if M.dim() == 3:
            return _up(M)[:, None]
        return _up(M).repeat_interleave(d_inner // M.shape[1], dim=1)

    return _up(u), delta, _up(A), per_channel(B), per_channel(C)


def _up(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scan_output(y, u, D, z, out_dtype):
    if D is not None:
        y = y + _up(D)[:, None] * u
    if z is not None:
        y = y * F.silu(_up(z))
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, skip_below=None):
    """The definition: a sequential loop over time. Slow; everything else is tested against it."""
    out_dtype = u.dtype
    u, delta, A, B, C = _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus, skip_below)
    batch, d_inner, L = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])                              # (b, d_inner, n)
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A)                              # Ā = exp(Δ_t A), eq. (4)
        dBu = delta[:, :, t, None] * B[..., t] * u[:, :, t, None]             # B̄ x_t ≈ Δ_t B_t x_t
        h = dA * h + dBu                                                      # eq. (2a)
        ys.append((h * C[..., t]).sum(-1))                                    # eq. (2b): C_t · h_t
    y = _scan_output(torch.stack(ys, dim=-1), u, D, z, out_dtype)
    return (y, h) if return_last_state else y


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, skip_below=None, chunk_len=None):
    """Same result as the reference, fast on a CPU: O(sqrt(l)) Python steps instead of O(l). The Triton kernel
    (scan_triton.py) runs the same three passes, one GPU program per chunk.

    Cut the sequence into c chunks of T tokens (T ≈ sqrt(l)) and run the recurrence on all chunks at once:
      1. local scan: every chunk scans its T tokens from a zero state, all chunks in parallel -> the chunk's
         local end state S_c and its total decay P_c = exp(A · Σ_{t in c} Δ_t);
      2. carry: h_start[0] = 0, h_start[c+1] = P_c ⊙ h_start[c] + S_c (c sequential steps on (b, d_inner, n));
      3. rescan: every chunk scans again from its true start state, writing y.
    Only products of decays ≤ 1 appear, so it is as stable as the loop.
    """
    out_dtype = u.dtype
    u, delta, A, B, C = _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus, skip_below)
    batch, d_inner, L = u.shape
    T = chunk_len or math.isqrt(L - 1) + 1                      # ceil(sqrt(l))
    n_chunks = -(-L // T)
    pad = n_chunks * T - L  # padded tokens have Δ = 0: exp(0·A) = 1 and Δ·B·x = 0 leave the state unchanged

    def chunked(x):  # (b, c, ..., l) -> (T, b, c, n_chunks, ...): time-major, so step t reads a contiguous slice
        x = F.pad(x, (0, pad)).unflatten(-1, (n_chunks, T))                 # (b, c, ..., n_chunks, T)
        return x.movedim(-1, 0).movedim(-1, 3).contiguous()

    delta_c = chunked(delta)                                    # (T, b, d_inner, n_chunks)
    du_c = chunked(delta * u)                                   # Δ_t x_t
    B_c, C_c = chunked(B), chunked(C)                           # (T, b, d_inner or 1, n_chunks, n)
    A_ = A[None, :, None, :]                                    # (1, d_inner, 1, n)

    def step(h, t):  # advance every chunk by its t-th token; h (b, d_inner, n_chunks, n)
        dA = torch.exp(delta_c[t, ..., None] * A_)
        dBu = du_c[t, ..., None] * B_c[t]
        return dA * h + dBu                                     # eq. (2a)

    # 1. local scans from zero
    h = u.new_zeros(batch, d_inner, n_chunks, A.shape[1])
    for t in range(T):
        h = step(h, t)
    chunk_decay = torch.exp(delta_c.sum(0)[..., None] * A_)  # (b, d_inner, n_chunks, n)
    # 2. carry the state across chunk boundaries
    starts = [u.new_zeros(batch, d_inner, A.shape[1])]
    for c in range(n_chunks):
        starts.append(chunk_decay[:, :, c] * starts[-1] + h[:, :, c])
    last_state = starts[-1]
    # 3. rescan each chunk from its true start
    h = torch.stack(starts[:-1], dim=2)
    ys = []
    for t in range(T):
        h = step(h, t)
        ys.append((h * C_c[t]).sum(-1))                         # (b, d_inner, n_chunks), eq. (2b)
    y = torch.stack(ys, dim=-1).flatten(-2)[..., :L]
    y = _scan_output(y, u, D, z, out_dtype)
    return (y, last_state) if return_last_state else y


def _backend(x):
    """$MAMBA_SCAN if set (ref, torch or triton), else the Triton kernels for CUDA tensors when Triton imports."""
    return os.environ.get("MAMBA_SCAN") or ("triton" if x.is_cuda and scan_triton else "torch")


def selective_scan(u, *args, backend=None, **kwargs):
    """Dispatch to a scan implementation: `backend` (ref, torch or triton), else _backend's choice."""
    backend = backend or _backend(u)
    if backend == "ref":
        return selective_scan_ref(u, *args, **kwargs)
    if backend == "torch":
        return selective_scan_chunked(u, *args, **kwargs)
    if backend == "triton":
        assert scan_triton is not None, "the triton scan needs the triton package"
        return scan_triton.selective_scan(u, *args, **kwargs)
    raise ValueError(f"unknown scan backend {backend!r} (argument or MAMBA_SCAN): use ref, torch or triton")


# ----------------------------------------------------------------------------------------------------------
# 3. One layer


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):  # computed in float32, returned in the weight's dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(self.weight.dtype)


@dataclass
class LayerCache:
    """Recurrent state of one mixer: everything a decoding step needs to know about the past."""
    conv_state: torch.Tensor  # (b, d_inner, d_conv): the last d_conv inputs of the causal conv
    ssm_state: torch.Tensor   # (b, d_inner, n) float32: h_t


class SkipBelow(NamedTuple):
    """A hook's answer (module docstring): scan dt, channel c skipping every token whose dt + dt_bias <= bound[c]."""
    dt: torch.Tensor      # (b, d_inner, l)
    bound: torch.Tensor   # (d_inner,) float32; -inf: the channel keeps every token


def delta_of(dt, dt_bias, skip_below=None):
    """Δ = softplus(dt + dt_bias) in float32, 0 where dt + dt_bias <= skip_below: dt (b, d_inner, l), dt_bias and
    skip_below (d_inner,) -> (b, d_inner, l). What the scan forms."""
    pre = dt.float() + dt_bias.float()[:, None]
    delta = F.softplus(pre)
    return delta if skip_below is None else torch.where(pre > skip_below.float()[:, None], delta, 0.0)


def _recompute_all_but_the_scan():
    """Selective activation checkpointing: inside the checkpointed region only the scan operator's outputs are
    saved for the backward, everything else there is recomputed (cheap next to the memory it would keep)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts   # torch >= 2.4, as the Triton path
    return create_selective_checkpoint_contexts([torch.ops.mamba_triton.scan_fwd.default])


def _gather(x, keep):
    """x (b, c, l) at positions keep (b, k) -> (b, c, k)."""
    return x.gather(2, keep[:, None, :].expand(-1, x.shape[1], -1))


def _as_matrix(x):
    """x (b, c, l) as the (c, b·l) matrix it is a view of on the fast path (also (b, l, c) tokens seen as x.mT);
    a copy otherwise."""
    b, c, l = x.shape
    return x.transpose(0, 1).reshape(c, b * l)


def _per_token(weight, x):
    """The linear map `weight` (c_out, c_in) applied to every token of x (b, c_in, l) -> (b, c_out, l), as one
    (c_out, c_in) @ (c_in, b·l) matrix product whose output is a (c_out, b·l) matrix viewed as (b, c_out, l): each
    channel's tokens contiguous, the rows the conv and the scan read."""
    b, _, l = x.shape
    return (weight @ _as_matrix(x)).view(-1, b, l).transpose(0, 1)


class MambaMixer(nn.Module):
    """The Mamba block's mixer (mamba_ssm's `Mamba`): in_proj -> conv -> selective SSM -> gate -> out_proj.
    Between in_proj and out_proj tensors are (b, channels, l); on the fast path each is a view of a (channels, b·l)
    matrix, the layout the conv and the scan read and write in place (`_per_token`)."""

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        c = self.config = config
        self.layer_idx = layer_idx
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = c.d_inner, c.d_state, c.dt_rank, c.d_conv
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner, bias=False)
        self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, c.d_conv, groups=c.d_inner, padding=c.d_conv - 1)
        self.x_proj = nn.Linear(c.d_inner, c.dt_rank + 2 * c.d_state, bias=False)
        self.dt_proj = nn.Linear(c.dt_rank, c.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(c.d_inner, c.d_state))
        self.D = nn.Parameter(torch.empty(c.d_inner))
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self):
        """mamba_ssm's initialisation of a mixer (Mamba.reset_parameters scales out_proj afterwards)."""
        c = self.config
        for linear in (self.in_proj, self.x_proj, self.out_proj):
            linear.reset_parameters()
        self.conv1d.reset_parameters()
        # dt_proj weight ~ U(±dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        nn.init.uniform_(self.dt_proj.weight, -c.dt_rank ** -0.5, c.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(c.d_inner) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A_n = -(n+1) for every channel; skip connection D = 1
        self.A_log.copy_(torch.log(torch.arange(1, c.d_state + 1, dtype=torch.float32)).repeat(c.d_inner, 1))
        self.D.fill_(1.0)

    def _selection(self, x):
        """x (b, d_inner, l) after the conv -> dt (b, d_inner, l) before bias and softplus, B, C (b, n, l)."""
        dt, B, C = _per_token(self.x_proj.weight, x).split([self.dt_rank, self.d_state, self.d_state], dim=1)
        return _per_token(self.dt_proj.weight, dt), B, C    # the bias is added inside the scan

    def _conv_silu(self, x):
        """silu(depthwise causal conv over time), x (b, d_inner, l) -> (b, d_inner, l):
        out_t = silu(bias + Σ_k w_k ⊙ x_{t-d_conv+1+k}). The Triton kernel reads x inside in_proj's output."""
        if _backend(x) == "triton":
            assert conv_triton is not None, "the triton conv needs the triton package"
            if self.d_conv <= conv_triton.MAX_K:                           # wider: PyTorch's conv below
                return conv_triton.causal_conv_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias)
        return F.silu(self.conv1d(x)[..., :x.shape[2]])      # padded on both sides: keep the first l

    def forward(self, hidden_states, hook=None, return_cache=False):
        """hidden_states (b, l, d_model) -> out (b, l or k, d_model), keep (b, k) or None, LayerCache or None."""
        L = hidden_states.shape[1]
        x, z = _per_token(self.in_proj.weight, hidden_states.mT).chunk(2, dim=1)   # (b, d_inner, l) each
        if hook is None and not return_cache and torch.is_grad_enabled() and torch.compiler.is_compiling() \
                and _backend(x) == "triton":
            # Compiled training on the fast path: the backward redoes the conv and the small projections
            # instead of keeping their outputs (u, dt); kept are in_proj's output and what the scan returns.
            # Compiled, the recomputation is part of the backward graph; eager, every op of the region would
            # pass through a Python dispatch mode twice.
            out = torch.utils.checkpoint.checkpoint(self._mix, x, z, use_reentrant=False,
                                                    context_fn=_recompute_all_but_the_scan)[0]
            return out, None, None
        conv_state = F.pad(x, (self.d_conv - L, 0)) if return_cache else None      # last d_conv inputs
        out, keep, ssm_state = self._mix(x, z, hook, return_cache)
        return out, keep, (LayerCache(conv_state, ssm_state) if return_cache else None)

    def _mix(self, x, z, hook=None, return_cache=False):
        """x, z (b, d_inner, l) from in_proj -> out (b, l or k, d_model), keep (b, k) or None, the last state or
        None: conv, selection, the hook, the scan with its gate, out_proj."""
        x = self._conv_silu(x)                                                   # (b, d_inner, l)
        dt, B, C = self._selection(x)
        A = -torch.exp(self.A_log.float())                                       # (d_inner, n)
        dt_bias, keep, skip_below = self.dt_proj.bias.float(), None, None
        if hook is not None:
            dt = hook(self.layer_idx, dt, dt_bias)
            if isinstance(dt, SkipBelow):  # a method skips tokens per channel, tested inside the scan
                dt, skip_below = dt
            elif isinstance(dt, tuple):  # a method drops tokens: this layer's scan reads only the kept ones
                dt, keep = dt
                x, z, dt, B, C = (_gather(t, keep) for t in (x, z, dt, B, C))
        y = selective_scan(x, dt, A, B, C, self.D.float(), z, delta_bias=dt_bias, delta_softplus=True,
                           return_last_state=return_cache, skip_below=skip_below)  # Δ = softplus(dt + dt_bias)
        y, ssm_state = y if return_cache else (y, None)
        b, _, l = y.shape
        return self.out_proj(_as_matrix(y).mT).view(b, l, -1), keep, ssm_state  # (b, l or k, d_model)

    def step(self, hidden_states, cache: LayerCache):
        """One token: hidden_states (b, 1, d_model) -> (b, 1, d_model); updates `cache` in place. O(1) in l."""
        x, z = self.in_proj(hidden_states[:, 0]).chunk(2, dim=-1)                # (b, d_inner)
        cache.conv_state.copy_(torch.roll(cache.conv_state, shifts=-1, dims=-1))
        cache.conv_state[:, :, -1] = x
        x = F.silu((cache.conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)   # (b, d_inner)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = delta_of(F.linear(dt, self.dt_proj.weight)[..., None], self.dt_proj.bias)[..., 0]   # (b, d_inner)
        B, C = B.float(), C.float()                                              # (b, n)
        A = -torch.exp(self.A_log.float())
        h = torch.exp(delta[..., None] * A) * cache.ssm_state \
            + (delta * x.float())[..., None] * B[:, None]                        # eq. (2a)
        cache.ssm_state.copy_(h)
        y = (h * C[:, None]).sum(-1) + self.D.float() * x.float()                # eq. (2b)
        y = (y * F.silu(z.float())).to(hidden_states.dtype)
        return self.out_proj(y)[:, None]


class Block(nn.Module):
    """Pre-norm residual block: residual += mixer(norm(residual)). The residual stream may stay float32."""

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MambaMixer(config, layer_idx)

    def forward(self, residual, hook=None, return_cache=False):
        out, keep, cache = self.mixer(self.norm(residual), hook, return_cache)
        if keep is not None:
            residual = residual.gather(1, keep[..., None].expand(-1, -1, residual.shape[-1]))
        return residual + out, cache

    def step(self, residual, cache):
        return residual + self.mixer.step(self.norm(residual), cache)


# ----------------------------------------------------------------------------------------------------------
# 4. The language model


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)


class Mamba(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.hook = None  # the method hook (module docstring); None is vanilla Mamba
        self.cuda_graph_decoding = True  # decode() on a GPU replays a compiled step as a CUDA graph (GraphedStep)
        self._graphs = {}  # the GraphedSteps recorded for decode() (_graphed_step)
        self.reset_parameters()

    @contextlib.contextmanager
    def hooked(self, hook):
        """Run with `hook` set (None: vanilla); whatever hook was set before is restored afterwards."""
        previous, self.hook = self.hook, hook
        try:
            yield self
        finally:
            self.hook = previous

    @torch.no_grad()
    def reset_parameters(self):
        """mamba_ssm's initialisation: each mixer's own (MambaMixer.reset_parameters), then GPT-2 style, the
        residual-branch output projections scaled by 1/sqrt(n_layer); embedding ~ N(0, 0.02); norms 1."""
        for layer in self.backbone.layers:
            layer.mixer.reset_parameters()
            layer.mixer.out_proj.weight /= math.sqrt(self.config.n_layer)
            layer.norm.weight.fill_(1.0)
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        self.backbone.norm_f.weight.fill_(1.0)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def hidden_states(self, input_ids=None, inputs_embeds=None, return_cache=False):
        """input_ids (b, l) or inputs_embeds (b, l, d_model) -> final-norm hidden states (b, l, d_model)
        [, per-layer LayerCache list for decoding]. After a decimating hook, l is the number of kept tokens."""
        assert (input_ids is None) != (inputs_embeds is None), "pass input_ids or inputs_embeds"
        residual = self.backbone.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if residual.shape[1] == 0:
            raise ValueError("Mamba needs at least one token (the input has length 0)")
        if self.config.residual_in_fp32:
            residual = residual.float()
        caches = []
        for layer in self.backbone.layers:
            residual, cache = layer(residual, self.hook, return_cache)
            caches.append(cache)
        h = self.backbone.norm_f(residual)
        return (h, caches) if return_cache else h

    def forward(self, input_ids=None, inputs_embeds=None):
        """Logits (b, l, padded_vocab)."""
        return self.lm_head(self.hidden_states(input_ids, inputs_embeds))

    def prefill(self, input_ids=None, inputs_embeds=None):
        """Read a prompt: the logits of its last position (b, padded_vocab) and the caches to decode from.
        Only the last position's logits are formed: (l, vocab) logits of a long prompt are gigabytes."""
        h, caches = self.hidden_states(input_ids, inputs_embeds, return_cache=True)
        return self.lm_head(h[:, -1]), caches

    def step(self, token_ids, caches):
        """One decoding step: token_ids (b,) -> logits (b, padded_vocab); caches are updated in place."""
        residual = self.backbone.embedding(token_ids[:, None])
        if self.config.residual_in_fp32:
            residual = residual.float()
        for layer, cache in zip(self.backbone.layers, caches):
            residual = layer.step(residual, cache)
        return self.lm_head(self.backbone.norm_f(residual))[:, 0]

    @torch.no_grad()
    def generate(self, input_ids=None, max_new_tokens=20, temperature=0.0, top_k=None, eos_token_id=None,
                 inputs_embeds=None, min_new_tokens=0):
        """Prefill with the parallel scan, then one O(1) recurrent step per new token (decode)."""
        logits, caches = self.prefill(input_ids, inputs_embeds)
        return self.decode(logits, caches, max_new_tokens, temperature, top_k, eos_token_id, min_new_tokens)

    @torch.no_grad()
    def decode(self, logits, caches, max_new_tokens, temperature=0.0, top_k=None, eos_token_id=None,
               min_new_tokens=0):
        """Continue from a prefill's last logits (b, padded_vocab) and caches. Greedy at temperature 0.
        eos_token_id: a stop token id or a list of them, never emitted before min_new_tokens tokens.
        Returns the new token ids (b, ≤ max_new_tokens); a sequence that emitted a stop token is padded with it,
        and decoding stops once every sequence has."""
        vocab = self.config.vocab_size
        stops = torch.tensor([] if eos_token_id is None else eos_token_id, device=logits.device).long().flatten()
        if len(stops) and not 0 <= int(stops.min()) <= int(stops.max()) < vocab:
            raise ValueError(f"eos_token_id {eos_token_id}: token ids must be in [0, {vocab})")
        if temperature < 0 or top_k is not None and top_k < 1:
            raise ValueError(f"temperature must be >= 0 and top_k must be None or >= 1, got {temperature}, {top_k}")
        graphed = _graphed_step(self, caches) if logits.is_cuda and self.cuda_graph_decoding and max_new_tokens > 1 \
            else None
        step = self.step if graphed is None else graphed.step
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        new_tokens = []
        for i in range(max_new_tokens):
            logits = logits[:, :vocab].float()                     # never sample the vocabulary's padding
            if i < min_new_tokens and len(stops):                  # out of place: logits may be the caller's
                logits = logits.index_fill(1, stops, float("-inf"))
            if temperature == 0.0:
                token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(F.softmax(logits, -1), 1)[:, 0]
            if len(stops):
                token = torch.where(finished, new_tokens[-1] if new_tokens else token, token)
                finished |= torch.isin(token, stops)
            new_tokens.append(token)
            if len(stops) and bool(finished.all()) or i == max_new_tokens - 1:
                break
            logits = step(token, caches)
        if graphed is not None:
            graphed.copy_caches_to(caches)
        if not new_tokens:
            return torch.empty(logits.shape[0], 0, dtype=torch.long, device=logits.device)
        return torch.stack(new_tokens, dim=1)

    # ------------------------------------------------------------------------------------------------------
    # 5. Checkpoints

    def save_pretrained(self, directory, encoding=None, dtype=None):
        """Write the state-spaces layout (config.json + pytorch_model.bin), and the tokenizer if given.
        dtype (e.g. torch.float16) stores the weights smaller; A_log, D and the Δ bias stay float32."""
        atomic_write(os.path.join(directory, "config.json"), json.dumps(self.config.to_json_dict(), indent=2))
        # copy to the CPU once per storage, so the tied lm_head.weight stays one tensor in the file
        copies, state = {}, {}
        for k, v in self.state_dict().items():
            ident = (v.data_ptr(), v.dtype, v.shape)
            if ident not in copies:
                keep_fp32 = k.endswith(("A_log", "mixer.D", "dt_proj.bias"))
                copies[ident] = v.detach().to("cpu", None if keep_fp32 else dtype, copy=True)
            state[k] = copies[ident]
        atomic_write(os.path.join(directory, "pytorch_model.bin"), lambda f: torch.save(state, f))
        if encoding is not None:
            import tokenizer
            tokenizer.save_tokenizer(encoding, directory)

    @classmethod
    def from_pretrained(cls, path_or_name, device="cpu", dtype=None):
        """Load a state-spaces or Hugging Face (`-hf`) checkpoint directory, or a hub name when possible.
        A file that cannot be read raises ValueError or FileNotFoundError naming the file and the problem."""
        directory = _resolve_checkpoint(path_or_name)
        config_path = os.path.join(directory, "config.json")
        try:
            with open(config_path) as f:
                config = MambaConfig.from_json_dict(json.load(f))
        except (ValueError, TypeError, AttributeError) as e:   # JSON and Unicode errors are ValueErrors
            raise ValueError(f"{config_path}: not a Mamba config ({e})") from None
        state = read_weights(directory)
        model = cls(config)
        _load_state(model, state, directory)
        model = model.to(device=device, dtype=dtype)
        for layer in model.backbone.layers:  # as mamba_ssm: the decay rates, D and the Δ bias stay float32
            for p in (layer.mixer.A_log, layer.mixer.D, layer.mixer.dt_proj.bias):
                p.data = p.data.float()
        return model


_HF_RENAMES = {"backbone.embeddings.weight": "backbone.embedding.weight"}  # a -hf checkpoint's one other name


def _load_state(model, state, source):
    """Strict load with readable errors; maps Hugging Face names; ignores a tied lm_head copy."""
    state = {_HF_RENAMES.get(k, k): v for k, v in state.items()}
    expected = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not match the config. Missing keys: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}; unexpected keys: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)} in the checkpoint but the config "
                             f"makes it {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)  # the keys were checked above; a tied lm_head is the embedding


def training_length(directory):
    """The length in tokens a checkpoint was trained at, from the train_info.json that train.py writes beside
    its weights; None for other checkpoints (the state-spaces models were trained at 2,048)."""
    try:
        with open(os.path.join(directory, "train_info.json")) as f:
            return int(json.load(f)["L_train"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def git_commit():
    """This checkout's commit ($MAMBA_COMMIT where the tree was copied without .git)."""
    return os.environ.get("MAMBA_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
        capture_output=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"


def atomic_write(path, write_fn):
    """Write through a temporary file in the same directory, then rename: a crash never leaves half a file.
    write_fn(f) writes to a binary file object; a str or bytes is written as it is."""
    if isinstance(write_fn, (str, bytes)):
        data = write_fn.encode() if isinstance(write_fn, str) else write_fn
        write_fn = lambda f: f.write(data)  # noqa: E731
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _resolve_checkpoint(path_or_name):
    """The checkpoint directory: path_or_name itself, or its snapshot from the Hugging Face hub."""
    if os.path.isfile(path_or_name):
        raise FileNotFoundError(f"{path_or_name} is a file: pass the checkpoint directory that holds it")
    directory = path_or_name
    if not os.path.isdir(path_or_name):
        try:
            from huggingface_hub import snapshot_download
            directory = snapshot_download(path_or_name, allow_patterns=["config.json", "*.bin", "*.safetensors",
                                                                        "tokenizer.json"])
        except Exception as e:  # not installed, offline, unknown name: say what to fetch by hand
            raise FileNotFoundError(
                f"{path_or_name!r} is not a directory and could not be fetched from the Hugging Face hub "
                f"({type(e).__name__}: {e}). Download config.json and pytorch_model.bin (state-spaces layout) or "
                f"model.safetensors (-hf layout) from https://huggingface.co/{path_or_name}, plus tokenizer.json "
                f"(from EleutherAI/gpt-neox-20b for the state-spaces models), into one directory and pass its "
                f"path.") from None
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory} has no config.json; a checkpoint directory holds config.json "
                                f"and pytorch_model.bin or model.safetensors")
    return directory


def read_weights(directory):
    """The state dict in a checkpoint directory's model.safetensors or pytorch_model.bin."""
    st, pt = os.path.join(directory, "model.safetensors"), os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st)
    if not os.path.isfile(pt):
        raise FileNotFoundError(f"{directory} holds no weights: expected pytorch_model.bin or model.safetensors "
                                f"(sharded checkpoints are not supported)")
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{pt}: not a readable PyTorch weights file (truncated or corrupt? {type(e).__name__})") \
            from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{pt}: not a dict of tensors (a model's state_dict)")
    return state


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The safetensors format without the package: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}} and the raw little-endian tensor bytes after it."""
    data = bytearray(os.path.getsize(path))        # the tensors are views of this one buffer: no second copy
    with open(path, "rb") as f:
        size = f.readinto(data)
    try:
        if size != len(data):
            raise ValueError(f"read {size} of {len(data)} bytes: the file changed while it was read")
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        body_len = len(data) - 8 - header_len
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}, which is not supported")
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            if not 0 <= begin <= end <= body_len:
                raise ValueError(f"tensor {name} spans bytes {begin} to {end} of a {body_len}-byte body: truncated?")
            count = math.prod(info["shape"])
            if end - begin != count * dtype.itemsize:
                raise ValueError(f"tensor {name}: {end - begin} bytes for shape {info['shape']} of {info['dtype']}")
            flat = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + header_len + begin) if count else \
                torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors


# ----------------------------------------------------------------------------------------------------------
# 6. Decoding on a GPU


class GraphedStep:
    """Mamba.step on a GPU for one batch size, recorded once as a CUDA graph and replayed for every new token.

    A decoding step is a few small kernels per layer, each shorter than the Python and the launch that start it,
    so eager decoding waits on the CPU. torch.compile first fuses the step's element-wise work (the norms, the
    conv-state shift and the conv, Δ, the state update (2a), the readout (2b) and the gate) into a few kernels
    per layer beside the matrix products; a CUDA graph then launches all of them with one call. A graph reads and
    writes fixed buffers: decode() copies the prefill's caches in, replays, and copies the caches back at the
    end. The weights are read where they are, so training between two decodes is seen."""

    def __init__(self, model, caches):
        self.caches = [LayerCache(c.conv_state.clone(), c.ssm_state.clone()) for c in caches]
        self.token = torch.zeros(caches[0].ssm_state.shape[0], dtype=torch.long, device=caches[0].ssm_state.device)
        compiled = torch.compile(model.step, dynamic=False)
        side = torch.cuda.Stream()   # warm-up runs (the compilation among them) off the stream being recorded
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                compiled(self.token, self.caches)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = compiled(self.token, self.caches)

    def copy_caches_from(self, caches):
        for mine, theirs in zip(self.caches, caches):
            mine.conv_state.copy_(theirs.conv_state)
            mine.ssm_state.copy_(theirs.ssm_state)

    def copy_caches_to(self, caches):
        for mine, theirs in zip(self.caches, caches):
            theirs.conv_state.copy_(mine.conv_state)
            theirs.ssm_state.copy_(mine.ssm_state)

    def step(self, token_ids, caches=None):
        """As Mamba.step on the graph's own caches; the logits buffer is overwritten by the next step."""
        self.token.copy_(token_ids)
        self.graph.replay()
        return self.logits


def _graphed_step(model, caches):
    """The model's GraphedStep for this batch size, autocast dtype and these weights (recorded on first use). A
    graph reads every weight at the address it was recorded with: when any weight moves to new memory (a dtype
    change, a replaced tensor), the graphs recorded before are dropped and a new one is recorded."""
    batch, device = caches[0].ssm_state.shape[0], caches[0].ssm_state.device
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    weights = tuple((p.data_ptr(), p.dtype) for p in model.parameters())
    key = (batch, device, autocast, weights)
    if key not in model._graphs:
        model._graphs = {k: g for k, g in model._graphs.items() if k[-1] == weights}
        model._graphs[key] = GraphedStep(model, caches)
    graphed = model._graphs[key]
    graphed.copy_caches_from(caches)
    return graphed
