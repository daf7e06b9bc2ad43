"""
Mamba's causal depthwise conv and its SiLU, fused, in Triton: forward and backward, a PyTorch operator.

    causal_conv_silu(x, weight, bias)        x (b, d, l) with unit stride over l; weight (d, K); bias (d,)

For every channel c and token t (K = d_conv, 4 in every Mamba; x_s = 0 before the first token):

    pre_t = bias + Σ_{k<K} w_k x_{t-K+1+k}         the conv: token t sees itself and the K-1 tokens before it
    u_t   = silu(pre_t) = pre_t · sigmoid(pre_t)

The same as `F.silu(nn.Conv1d(d, d, K, groups=d, padding=K-1)(x)[..., :l])` (mamba.MambaMixer's plain path,
which the tests compare with). Backward, with g_t = ∂u_t · silu'(pre_t) the gradient at pre_t:

    ∂x_t = Σ_{s<K} w_{K-1-s} g_{t+s}               token t reached pre_t, ..., pre_{t+K-1}
    ∂w_k = Σ_{b,t} g_t x_{t-K+1+k}                 ∂bias = Σ_{b,t} g_t

Why a kernel: PyTorch runs a generic depthwise conv, then a separate SiLU, and its backward is slower still.
Here one program reads a (BLOCK_D, BLOCK_L) tile of channels × tokens, tokens contiguous, straight from
in_proj's output, and writes u in x's layout: for x a view of a (d, b·l) matrix, as the mixer's projections
write it, u is one too.

Groups of 4 tokens. Token t needs x_{t-3}, ..., x_t: loaded as shifted tiles, those are misaligned and each
element becomes its own 2-byte load. Instead a tile is read as groups of 4 consecutive tokens, each group in one
thread's registers, with two aligned vector loads: the tile itself and the tile 4 tokens earlier (the group
before each group). Token j of a group then reads its taps from the two groups without moving data:

    pre_j = bias + Σ_k w_k · (x[j-K+1+k] if j-K+1+k >= 0 else x_before[4+j-K+1+k])       (K <= 5)

The backward is one kernel: g_t = ∂u_t · silu'(pre_t) at the tile's tokens and, recomputed from a third load
(the tile 4 tokens later), at the 4 tokens after each group, which ∂x_t = Σ_s w_{K-1-s} g_{t+s} needs; the
tile's sums ∂w_k = Σ_t g_t x_{t-K+1+k}, ∂bias = Σ_t g_t are written per tile and added up by PyTorch. Only x
is kept for the backward.
"""
import os

import torch
import triton
import triton.language as tl

BLOCK_L = 128           # tokens per program (contiguous in memory)
BLOCK_D = 16            # channels per program
MAX_K = 5               # widest conv: a token's taps lie in its own group of 4 and the one before


@triton.jit
def _groups(tile, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """A (BLOCK_D, BLOCK_L) tile of consecutive tokens as its groups of 4: the tuple (v_0, v_1, v_2, v_3), v_j
    (BLOCK_D, BLOCK_L/4) the j-th token of every group. A thread holds whole groups, so this moves no data."""
    q0, q1 = tl.split(tl.reshape(tile, (BLOCK_D, BLOCK_L // 4, 2, 2)))     # token 2p + q of a group
    v0, v2 = tl.split(q0)
    v1, v3 = tl.split(q1)
    return v0, v1, v2, v3


@triton.jit
def _ungroup(v, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """The inverse of `_groups`."""
    return tl.reshape(tl.join(tl.join(v[0], v[2]), tl.join(v[1], v[3])), (BLOCK_D, BLOCK_L))


@triton.jit
def _token(prev, cur, i: tl.constexpr):
    """Token i of a group (i may be negative, -4 <= i < 4: token 4 + i of the group before)."""
    if i >= 0:
        return cur[i]
    else:
        return prev[4 + i]


@triton.jit
def _pre(prev, cur, bias, w, K: tl.constexpr):
    """pre_j = bias + Σ_k w_k x_{j-K+1+k} for the four tokens j of every group (a tuple); prev, cur: the groups
    of the tokens 4 before and the tokens themselves, w the tuple of the K (BLOCK_D,) weight columns."""
    pre = ()
    for j in tl.static_range(4):
        p = bias[:, None] + tl.zeros_like(cur[0])
        for k in tl.static_range(K):
            p += w[k][:, None] * _token(prev, cur, j - (K - 1) + k)
        pre = pre + (p,)
    return pre


@triton.jit
def _ahead(cur, nxt, i: tl.constexpr):
    """Token i of a group (0 <= i < 8: token i - 4 of the group after)."""
    if i < 4:
        return cur[i]
    else:
        return nxt[i - 4]


@triton.jit
def _load_groups(rows, t, stride_l, mask_c, L, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """The tile of tokens t (0 outside the sequence) of the rows, as float32 groups of 4."""
    x = tl.load(rows[:, None] + t[None, :].to(tl.int64) * stride_l,
                mask=mask_c[:, None] & ((t >= 0) & (t < L))[None, :], other=0.0)
    return _groups(x.to(tl.float32), BLOCK_D, BLOCK_L)


@triton.jit
def _tile(program_b, stride_b, stride_d, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b)'s tokens t, channels c, and the offsets of its rows."""
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = program_b * stride_b + c.to(tl.int64) * stride_d             # b·stride_b can exceed 2^31
    return t, c, rows


@triton.jit
def _weights(w_ptr, c, mask_c, K: tl.constexpr):
    w = ()
    for k in tl.static_range(K):
        w = w + (tl.load(w_ptr + c * K + k, mask=mask_c, other=0.0).to(tl.float32),)
    return w


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, u_ptr,
                     L, d, stride_xb, stride_xd, stride_ub, stride_ud,
                     K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b): u = silu(conv(x)) for a (BLOCK_D, BLOCK_L) tile, from two
    loads: its tokens and the tokens 4 before them."""
    b = tl.program_id(2).to(tl.int64)
    t, c, x_rows = _tile(b, stride_xb, stride_xd, BLOCK_L, BLOCK_D)
    _, _, u_rows = _tile(b, stride_ub, stride_ud, BLOCK_L, BLOCK_D)
    mask_c = c < d
    bias = tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    x = _load_groups(x_ptr + x_rows, t, 1, mask_c, L, BLOCK_D, BLOCK_L)
    prev = _load_groups(x_ptr + x_rows, t - 4, 1, mask_c, L, BLOCK_D, BLOCK_L)
    pre = _pre(prev, x, bias, _weights(w_ptr, c, mask_c, K), K)
    u = ()
    for j in tl.static_range(4):
        u = u + (pre[j] * tl.sigmoid(pre[j]),)
    tl.store(u_ptr + u_rows[:, None] + t[None, :], _ungroup(u, BLOCK_D, BLOCK_L).to(u_ptr.dtype.element_ty),
             mask=mask_c[:, None] & (t < L)[None, :])


@triton.jit
def _silu_grad(du, pre):
    sig = tl.sigmoid(pre)
    return du * sig * (1.0 + pre * (1.0 - sig))                          # ∂pre = ∂u · silu'(pre)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, du_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr,
                     L, d, stride_xb, stride_xd, stride_ub, stride_ud, stride_ul, stride_dxb, stride_dxd,
                     K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b): g = ∂u · silu'(pre) for its tile's tokens and, recomputed,
    for the 4 tokens after each group (∂x_t needs g_t ... g_{t+K-1}); then ∂x for the tile and the tile's sums
    ∂w_k = Σ_t g_t x_{t-K+1+k}, ∂bias = Σ_t g_t. ∂u may come in any layout; tokens contiguous is the fast one."""
    b = tl.program_id(2).to(tl.int64)
    t, c, x_rows = _tile(b, stride_xb, stride_xd, BLOCK_L, BLOCK_D)
    _, _, dx_rows = _tile(b, stride_dxb, stride_dxd, BLOCK_L, BLOCK_D)
    mask_c = c < d
    bias = tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    w = _weights(w_ptr, c, mask_c, K)
    prev = _load_groups(x_ptr + x_rows, t - 4, 1, mask_c, L, BLOCK_D, BLOCK_L)
    x = _load_groups(x_ptr + x_rows, t, 1, mask_c, L, BLOCK_D, BLOCK_L)
    nxt = _load_groups(x_ptr + x_rows, t + 4, 1, mask_c, L, BLOCK_D, BLOCK_L)
    du_rows = b * stride_ub + c.to(tl.int64) * stride_ud
    du = _load_groups(du_ptr + du_rows, t, stride_ul, mask_c, L, BLOCK_D, BLOCK_L)
    du_nxt = _load_groups(du_ptr + du_rows, t + 4, stride_ul, mask_c, L, BLOCK_D, BLOCK_L)
    pre, pre_nxt = _pre(prev, x, bias, w, K), _pre(x, nxt, bias, w, K)
    g, g_nxt = (), ()
    for j in tl.static_range(4):                                          # 0 past L, where ∂u is
        g = g + (_silu_grad(du[j], pre[j]),)
        g_nxt = g_nxt + (_silu_grad(du_nxt[j], pre_nxt[j]),)
    dx = ()
    for j in tl.static_range(4):
        acc = tl.zeros_like(x[0])
        for s in tl.static_range(K):                                      # ∂x_t = Σ_s w_{K-1-s} g_{t+s}
            acc += w[K - 1 - s][:, None] * _ahead(g, g_nxt, j + s)
        dx = dx + (acc,)
    tl.store(dx_ptr + dx_rows[:, None] + t[None, :], _ungroup(dx, BLOCK_D, BLOCK_L).to(dx_ptr.dtype.element_ty),
             mask=mask_c[:, None] & (t < L)[None, :])
    part = (b * tl.num_programs(0) + tl.program_id(0)) * d + c          # this tile's row of the partial sums
    tl.store(dbias_part_ptr + part, tl.sum(g[0] + g[1] + g[2] + g[3], axis=1), mask=mask_c)
    for k in tl.static_range(K):
        acc = tl.zeros_like(x[0])
        for j in tl.static_range(4):
            acc += g[j] * _token(prev, x, j - (K - 1) + k)
        tl.store(dw_part_ptr + part * K + k, tl.sum(acc, axis=1), mask=mask_c)


def _like(x, dtype=None):
    """An uninitialised tensor of x's shape in x's layout when x is a view of a (d, b·l) matrix, else contiguous."""
    batch, d, L = x.shape
    if x.stride() == (L, batch * L, 1):
        return torch.empty(d, batch, L, dtype=dtype or x.dtype, device=x.device).transpose(0, 1)
    return torch.empty(batch, d, L, dtype=dtype or x.dtype, device=x.device)


def _unit_token_stride(x):
    return x if x.stride(2) == 1 else x.contiguous()                # batch and channels may have any stride


def _grid(x):
    batch, d, L = x.shape
    return (triton.cdiv(L, BLOCK_L), triton.cdiv(d, BLOCK_D), batch)


# Registered as PyTorch operators, so that torch.compile sees them whole. Their outputs' layout follows x's: the
# fake (shape-only) functions that tell the compiler so rely on it passing the strides it traced (the tag).
@torch.library.custom_op("mamba_triton::conv_fwd", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x = _unit_token_stride(x)
    u = _like(x)
    _conv_fwd_kernel[_grid(x)](x, weight, bias, u, x.shape[2], x.shape[1], x.stride(0), x.stride(1),
                               u.stride(0), u.stride(1), K=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    return u


@_conv_fwd.register_fake
def _(x, weight, bias):
    return _like(_unit_token_stride(x))


@torch.library.custom_op("mamba_triton::conv_bwd", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              du: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _unit_token_stride(x)
    batch, d, L = x.shape
    grid = _grid(x)
    dx = _like(x)
    dw_part = torch.empty(batch * grid[0], d, weight.shape[1], dtype=torch.float32, device=x.device)
    dbias_part = torch.empty(batch * grid[0], d, dtype=torch.float32, device=x.device)
    _conv_bwd_kernel[grid](x, weight, bias, du, dx, dw_part, dbias_part, L, d, x.stride(0), x.stride(1),
                           *du.stride(), dx.stride(0), dx.stride(1), K=weight.shape[1], BLOCK_L=BLOCK_L,
                           BLOCK_D=BLOCK_D)
    return dx, dw_part.sum(0).to(weight.dtype), dbias_part.sum(0).to(bias.dtype)


@_conv_bwd.register_fake
def _(x, weight, bias, du):
    return _like(_unit_token_stride(x)), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, du):
    return _conv_bwd(*ctx.saved_tensors, du)


torch.library.register_autograd("mamba_triton::conv_fwd", _backward, setup_context=_setup_context)


def causal_conv_silu(x, weight, bias):
    """silu(causal depthwise conv(x)): x (b, d, l) with x.stride(2) == 1 (a slice of in_proj's output is fine),
    weight (d, K), bias (d,) -> u (b, d, l) in x's layout (module docstring) and dtype. Differentiable in x,
    weight and bias."""
    assert x.stride(2) == 1 and weight.shape == (x.shape[1], weight.shape[1]) and bias.shape == (x.shape[1],)
    assert weight.shape[1] <= MAX_K, "the kernels read each token's 4 neighbours on either side: d_conv <= 5"
    assert x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", \
        "CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); on a CPU use MAMBA_SCAN=torch"
    return _conv_fwd(x, weight.contiguous(), bias.contiguous())
