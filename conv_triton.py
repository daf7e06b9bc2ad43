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
in_proj's output, as K shifted loads of the tile (the overlaps hit the cache), and writes u in x's layout: for x
a view of a (d, b·l) matrix, as the mixer's projections write it, u is one too. Only x is kept for the backward,
which runs in two kernels: the first recomputes pre from x, writes g in float32 and sums ∂w, ∂bias over its
tile (along tokens, inside a thread's registers and a warp); the second runs the conv backwards in time over g
for ∂x.
"""
import os

import torch
import triton
import triton.language as tl

BLOCK_L = 128           # tokens per program (contiguous in memory)
BLOCK_D = 16            # channels per program


@triton.jit
def _conv_at(x_rows, w_ptr, bias, t, c, mask_c, L, K: tl.constexpr, BLOCK_L: tl.constexpr):
    """pre at channels c (BLOCK_D,) and tokens t (BLOCK_L,): bias + Σ_k w_k x_{t-K+1+k} in float32. x_rows
    (BLOCK_D,) points at each channel's token 0; w_ptr at the (d, K) weights."""
    pre = tl.zeros((1, BLOCK_L), dtype=tl.float32) + bias[:, None]              # (BLOCK_D, BLOCK_L)
    for k in tl.static_range(K):
        src = t - (K - 1) + k                                            # source tokens; < 0 is the zero padding
        x = tl.load(x_rows[:, None] + src[None, :], mask=mask_c[:, None] & ((src >= 0) & (src < L))[None, :],
                    other=0.0)
        w_k = tl.load(w_ptr + c * K + k, mask=mask_c, other=0.0).to(tl.float32)
        pre += w_k[:, None] * x.to(tl.float32)
    return pre


@triton.jit
def _tile(BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b)'s tokens t, channels c and batch element b."""
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return t, c, tl.program_id(2).to(tl.int64)                          # b·stride_b can exceed 2^31


@triton.jit
def _rows(b, c, stride_b, stride_d):
    """The offsets of rows (b, c) (BLOCK_D,), each a channel's token 0, in a tensor of those strides."""
    return b * stride_b + c.to(tl.int64) * stride_d


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, u_ptr,
                     L, d, stride_xb, stride_xd, stride_ub, stride_ud,
                     K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b): u = silu(conv(x)) for a (BLOCK_D, BLOCK_L) tile."""
    t, c, b = _tile(BLOCK_L, BLOCK_D)
    x_rows, u_rows = _rows(b, c, stride_xb, stride_xd), _rows(b, c, stride_ub, stride_ud)
    mask_c = c < d
    bias = tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    pre = _conv_at(x_ptr + x_rows, w_ptr, bias, t, c, mask_c, L, K, BLOCK_L)
    u = pre * tl.sigmoid(pre)
    tl.store(u_ptr + u_rows[:, None] + t[None, :], u.to(u_ptr.dtype.element_ty),
             mask=mask_c[:, None] & (t < L)[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, du_ptr, g_ptr, dw_part_ptr, dbias_part_ptr,
                     L, d, stride_xb, stride_xd, stride_ub, stride_ud, stride_ul,
                     K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b): g = ∂u · silu'(pre) for its tile (written out, (b, d, L)
    contiguous, for `_conv_transpose_kernel`), and the tile's sums ∂w_k = Σ_t g_t x_{t-K+1+k}, ∂bias = Σ_t g_t.
    ∂u may come in any layout; tokens contiguous is the fast one."""
    t, c, b = _tile(BLOCK_L, BLOCK_D)
    x_rows, g_rows = _rows(b, c, stride_xb, stride_xd), _rows(b, c, d.to(tl.int64) * L, L)   # d·L can exceed 2^31
    mask_c = c < d
    in_seq = mask_c[:, None] & (t < L)[None, :]
    bias = tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    pre = _conv_at(x_ptr + x_rows, w_ptr, bias, t, c, mask_c, L, K, BLOCK_L)
    du_offs = b * stride_ub + c[:, None].to(tl.int64) * stride_ud + t[None, :].to(tl.int64) * stride_ul
    du = tl.load(du_ptr + du_offs, mask=in_seq, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    g = du * sig * (1.0 + pre * (1.0 - sig))                             # ∂pre = ∂u · silu'(pre); 0 past L
    tl.store(g_ptr + g_rows[:, None] + t[None, :], g, mask=in_seq)
    part = (b * tl.num_programs(0) + tl.program_id(0)) * d + c          # this tile's row of the partial sums
    tl.store(dbias_part_ptr + part, tl.sum(g, axis=1), mask=mask_c)
    for k in tl.static_range(K):                                         # the conv's inputs again (cached)
        src = t - (K - 1) + k
        x = tl.load(x_ptr + x_rows[:, None] + src[None, :],
                    mask=mask_c[:, None] & ((src >= 0) & (src < L))[None, :], other=0.0)
        tl.store(dw_part_ptr + part * K + k, tl.sum(g * x.to(tl.float32), axis=1), mask=mask_c)


@triton.jit
def _conv_transpose_kernel(g_ptr, w_ptr, dx_ptr, L, d, stride_dxb, stride_dxd,
                           K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b): ∂x_t = Σ_s w_{K-1-s} g_{t+s}, the conv backwards in time."""
    t, c, b = _tile(BLOCK_L, BLOCK_D)
    g_rows, dx_rows = _rows(b, c, d.to(tl.int64) * L, L), _rows(b, c, stride_dxb, stride_dxd)  # d·L can exceed 2^31
    mask_c = c < d
    dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for s in tl.static_range(K):
        ts = t + s
        g = tl.load(g_ptr + g_rows[:, None] + ts[None, :], mask=mask_c[:, None] & (ts < L)[None, :], other=0.0)
        dx += tl.load(w_ptr + c * K + K - 1 - s, mask=mask_c, other=0.0).to(tl.float32)[:, None] * g
    tl.store(dx_ptr + dx_rows[:, None] + t[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask_c[:, None] & (t < L)[None, :])


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
    g = torch.empty(batch, d, L, dtype=torch.float32, device=x.device)   # ∂x is then rounded once, at the end
    dw_part = torch.empty(batch * grid[0], d, weight.shape[1], dtype=torch.float32, device=x.device)
    dbias_part = torch.empty(batch * grid[0], d, dtype=torch.float32, device=x.device)
    _conv_bwd_kernel[grid](x, weight, bias, du, g, dw_part, dbias_part, L, d, x.stride(0), x.stride(1),
                           *du.stride(), K=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    dx = _like(x)
    _conv_transpose_kernel[grid](g, weight, dx, L, d, dx.stride(0), dx.stride(1),
                                 K=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
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
    assert x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", \
        "CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); on a CPU use MAMBA_SCAN=torch"
    return _conv_fwd(x, weight.contiguous(), bias.contiguous())
