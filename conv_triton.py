"""
Mamba's causal depthwise conv and its SiLU, fused, in Triton: forward and backward, a PyTorch operator.

    causal_conv_silu(x, weight, bias)        x (b, l, d) with unit stride over d; weight (d, K); bias (d,)

For every channel c and token t (K = d_conv, 4 in every Mamba; x_s = 0 before the first token):

    pre_t = bias + Σ_{k<K} w_k x_{t-K+1+k}         the conv: token t sees itself and the K-1 tokens before it
    u_t   = silu(pre_t) = pre_t · sigmoid(pre_t)

The same as `F.silu(nn.Conv1d(d, d, K, groups=d, padding=K-1)(x.mT)[..., :l]).mT` (mamba.MambaMixer's plain path,
which the tests compare with). Backward, with g_t = ∂u_t · silu'(pre_t) the gradient at pre_t:

    ∂x_t = Σ_{s<K} w_{K-1-s} g_{t+s}               token t reached pre_t, ..., pre_{t+K-1}
    ∂w_k = Σ_{b,t} g_t x_{t-K+1+k}                 ∂bias = Σ_{b,t} g_t

Why a kernel: the layer's x arrives inside in_proj's output (b, l, 2d) (x beside the gate z), and PyTorch's conv
wants a contiguous (b, d, l) copy, runs a generic depthwise kernel, then a separate SiLU; its backward is slower
still. Here one program reads a (BLOCK_L, BLOCK_D) tile of tokens × channels straight from in_proj's output, K
shifted loads of the tile (the overlaps hit the cache), and writes u in the same (b, l, d) layout that x_proj reads.
Channels are the contiguous dimension, so every load of a warp is one contiguous run of memory. Only x is kept
for the backward, which runs in two kernels: the first recomputes pre from x, writes g in float32 and sums ∂w,
∂bias over its tile; the second runs the conv backwards in time over g for ∂x.
"""
import os

import torch
import triton
import triton.language as tl

BLOCK_L = 32            # tokens per program
BLOCK_D = 128           # channels per program (contiguous in memory)


@triton.jit
def _conv_at(x_ptr, w_ptr, bias, t, c, mask_c, stride_l, L, K: tl.constexpr, BLOCK_L: tl.constexpr):
    """pre at tokens t (BLOCK_L,) of channels c (BLOCK_D,): bias + Σ_k w_k x_{t-K+1+k} in float32. x_ptr points
    at this batch element's token 0; w_ptr at the (d, K) weights."""
    pre = tl.zeros((BLOCK_L, 1), dtype=tl.float32) + bias[None, :]                 # (BLOCK_L, BLOCK_D)
    for k in tl.static_range(K):
        src = t - (K - 1) + k                                            # source tokens; < 0 is the zero padding
        x = tl.load(x_ptr + src[:, None] * stride_l + c[None, :],
                    mask=((src >= 0) & (src < L))[:, None] & mask_c[None, :], other=0.0)
        w_k = tl.load(w_ptr + c * K + k, mask=mask_c, other=0.0).to(tl.float32)
        pre += w_k[None, :] * x.to(tl.float32)
    return pre


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, u_ptr,
                     L, d, stride_xb, stride_xl,
                     K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b): u = silu(conv(x)) for a (BLOCK_L, BLOCK_D) tile."""
    t = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)   # t·stride can exceed 2^31
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    mask_c = c < d
    bias = tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    pre = _conv_at(x_ptr + b * stride_xb, w_ptr, bias, t, c, mask_c, stride_xl, L, K, BLOCK_L)
    u = pre * tl.sigmoid(pre)
    tl.store(u_ptr + (b * L + t[:, None]) * d + c[None, :], u.to(u_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & mask_c[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, du_ptr, g_ptr, dw_part_ptr, dbias_part_ptr,
                     L, d, stride_xb, stride_xl, stride_ub, stride_ul, stride_ud,
                     K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b): g = ∂u · silu'(pre) for its tile (written out for
    `_conv_transpose_kernel`), and the tile's sums ∂w_k = Σ_t g_t x_{t-K+1+k}, ∂bias = Σ_t g_t. ∂u may come in
    any layout (the compiler turns a token-contiguous tile into channel-contiguous registers)."""
    t = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)   # t·stride can exceed 2^31
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    mask_c = c < d
    in_seq = (t < L)[:, None] & mask_c[None, :]
    bias = tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    x_b = x_ptr + b * stride_xb
    pre = _conv_at(x_b, w_ptr, bias, t, c, mask_c, stride_xl, L, K, BLOCK_L)
    du_offs = b * stride_ub + t[:, None] * stride_ul + c[None, :].to(tl.int64) * stride_ud
    du = tl.load(du_ptr + du_offs, mask=in_seq, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    g = du * sig * (1.0 + pre * (1.0 - sig))                             # ∂pre = ∂u · silu'(pre); 0 past L
    tl.store(g_ptr + (b * L + t[:, None]) * d + c[None, :], g.to(g_ptr.dtype.element_ty), mask=in_seq)
    part = (b * tl.num_programs(0) + tl.program_id(0)) * d + c          # this tile's row of the partial sums
    tl.store(dbias_part_ptr + part, tl.sum(g, axis=0), mask=mask_c)
    for k in tl.static_range(K):                                         # the conv's inputs again (cached)
        src = t - (K - 1) + k
        x = tl.load(x_b + src[:, None] * stride_xl + c[None, :],
                    mask=((src >= 0) & (src < L))[:, None] & mask_c[None, :], other=0.0)
        tl.store(dw_part_ptr + part * K + k, tl.sum(g * x.to(tl.float32), axis=0), mask=mask_c)


@triton.jit
def _conv_transpose_kernel(g_ptr, w_ptr, dx_ptr, L, d,
                           K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token block, channel block, batch b): ∂x_t = Σ_s w_{K-1-s} g_{t+s}, the conv backwards in time."""
    t = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)   # t·stride can exceed 2^31
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    mask_c = c < d
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for s in tl.static_range(K):
        ts = t + s
        g = tl.load(g_ptr + (b * L + ts[:, None]) * d + c[None, :], mask=(ts < L)[:, None] & mask_c[None, :],
                    other=0.0).to(tl.float32)
        dx += tl.load(w_ptr + c * K + K - 1 - s, mask=mask_c, other=0.0).to(tl.float32)[None, :] * g
    tl.store(dx_ptr + (b * L + t[:, None]) * d + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & mask_c[None, :])


def _unit_channel_stride(x):
    return x if x.stride(2) == 1 else x.contiguous()                # tokens and batch may have any stride


def _grid(x):
    batch, L, d = x.shape
    return (triton.cdiv(L, BLOCK_L), triton.cdiv(d, BLOCK_D), batch)


@torch.library.custom_op("mamba_triton::conv_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x = _unit_channel_stride(x)
    batch, L, d = x.shape
    u = torch.empty(batch, L, d, dtype=x.dtype, device=x.device)
    _conv_fwd_kernel[_grid(x)](x, weight, bias, u, L, d, x.stride(0), x.stride(1),
                               K=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    return u


@_conv_fwd.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("mamba_triton::conv_bwd", mutates_args=())
def _conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              du: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _unit_channel_stride(x)
    batch, L, d = x.shape
    grid = _grid(x)
    g = torch.empty(batch, L, d, dtype=torch.float32, device=x.device)   # ∂x is then rounded once, at the end
    dw_part = torch.empty(batch * grid[0], d, weight.shape[1], dtype=torch.float32, device=x.device)
    dbias_part = torch.empty(batch * grid[0], d, dtype=torch.float32, device=x.device)
    _conv_bwd_kernel[grid](x, weight, bias, du, g, dw_part, dbias_part, L, d, x.stride(0), x.stride(1),
                           *du.stride(), K=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    dx = torch.empty(batch, L, d, dtype=x.dtype, device=x.device)
    _conv_transpose_kernel[grid](g, weight, dx, L, d, K=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    return dx, dw_part.sum(0).to(weight.dtype), dbias_part.sum(0).to(bias.dtype)


@_conv_bwd.register_fake
def _(x, weight, bias, du):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, du):
    return _conv_bwd(*ctx.saved_tensors, du)


torch.library.register_autograd("mamba_triton::conv_fwd", _backward, setup_context=_setup_context)


def causal_conv_silu(x, weight, bias):
    """silu(causal depthwise conv(x)): x (b, l, d) with x.stride(2) == 1 (a slice of in_proj's output is fine),
    weight (d, K), bias (d,) -> u (b, l, d) contiguous, in x's dtype. Differentiable in x, weight and bias."""
    assert x.stride(2) == 1 and weight.shape == (x.shape[2], weight.shape[1]) and bias.shape == (x.shape[2],)
    assert x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", \
        "CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); on a CPU use MAMBA_SCAN=torch"
    return _conv_fwd(x, weight.contiguous(), bias.contiguous())
