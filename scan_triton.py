"""
Selective scan in Triton: forward and backward kernels, parallel over batch, channels and sequence chunks.

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False)

Same signature and result as `mamba.selective_scan_ref` (and mamba_ssm's `selective_scan_fn`), differentiable
with respect to u, delta, A, B, C, D, z and delta_bias. For every batch b, channel d and state n (N = d_state):

    Δ_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias without softplus)
    h_t = a_t h_{t-1} + b_t,   a_t = exp(Δ_t A),  b_t = Δ_t B_t u_t        eq. (2a), fp32 state
    y_t = Σ_n C_t h_t + D u_t;  out_t = y_t · silu(z_t)                    eq. (2b) and the gate

How the recurrence is parallelised
----------------------------------
h_t = a_t h_{t-1} + b_t is a first-order linear recurrence: its steps are affine maps x -> a x + b, and
composing two of them is again one, (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2). Composition is associative,
so the whole sequence of maps can be combined in any bracketing: in a tree (`tl.associative_scan`, log T
steps for T tokens) or chunk by chunk. Batch and channels are independent, so they are parallel for free; the
sequence is the hard axis (one sequence of 128k tokens must still fill the GPU). It is cut into chunks of
CHUNK tokens, and the forward runs in three passes, each one kernel launch:

  1. chunk summaries (all chunks in parallel): each chunk scans from a zero state. Its end state is
         S_c = Σ_t exp(A · Σ_{s>t} Δ_s) b_t            (the decay from token t to the chunk's end)
     and its total decay is exp(A · Σ_t Δ_t), kept as the sum of Δ over the chunk.
  2. carry (sequential over chunks, parallel over batch and channels): the true start state of each chunk,
         h_start[0] = 0,   h_start[c+1] = exp(A · ΣΔ_c) h_start[c] + S_c.
     This is the only sequential loop, one fused multiply-add per chunk per state: cheap.
  3. outputs (all chunks in parallel): each chunk rescans its tokens from h_start[c] with the associative scan,
         h_t = (Π_{s≤t} a_s) h_start[c] + (local state from zero at t),
     and writes y fused with D·u and silu(z).
The chunk start states are kept for the backward: memory B·d_inner·N·L/CHUNK floats, never one state per token.

The backward
------------
With dout the gradient of the output, the adjoint of the state g_t = ∂loss/∂h_t runs backwards in time:

    dy_t = dout_t · silu(z_t)
    g_t  = C_t dy_t + a_{t+1} g_{t+1}                  (g after the last token: the gradient of the last state)

the same kind of recurrence, reversed, so it is parallelised the same way, mirrored:

  1. chunk summaries: what a chunk passes to its left neighbour from a zero carry, a_{t0} g_{t0} =
         Q_c = Σ_t exp(A · Σ_{s≤t} Δ_s) C_t dy_t        (the decay from the chunk's start to token t);
  2. carry, right to left: G_last = ∂loss/∂h_L,  G_{c-1} = exp(A · ΣΔ_c) G_c + Q_c;
  3. per chunk: recompute h_t from the stored start state (forward scan), g_t from G_c (reverse scan), then
         ∂u_t = D dy_t + Σ_n g_t Δ_t B_t            ∂B_t = Σ_d g_t Δ_t u_t        ∂C_t = Σ_d dy_t h_t
         ∂Δ_t = Σ_n g_t (B_t u_t + A a_t h_{t-1})  ∂A = Σ_t g_t Δ_t a_t h_{t-1}    ∂D = Σ_t dy_t u_t
         ∂z_t = dout_t y_t silu'(z_t)              ∂delta_t = ∂Δ_t · sigmoid(delta_t + delta_bias) with softplus
     with a_t h_{t-1} = h_t - b_t, so no shifted copy of h is needed. ∂B, ∂C sum over channels, which live
     in different programs: they are accumulated with atomic adds. ∂A, ∂D, ∂delta_bias sum over batch and
     time: each program writes its partial sum and PyTorch adds them up.

Every kernel works on one tile: BLOCK_D channels × N states × CHUNK tokens of one batch element, all
channels of the tile in one group of B/C (grouped B, C: channel d reads group d // (d_inner / G)).
"""
import os

import torch
import triton
import triton.language as tl

CHUNK = 64          # tokens per chunk; one chunk is one tile, scanned with tl.associative_scan
TILE = 4096         # elements of a (channels, states, tokens) tile: BLOCK_D = TILE // (N·CHUNK) channels


# ----------------------------------------------------------------------------------------------------------
# Elementwise pieces shared by the kernels


@triton.jit
def _affine_compose(a1, b1, a2, b2):
    """x -> a1 x + b1 followed by x -> a2 x + b2 is x -> (a1 a2) x + (a2 b1 + b2): the scan's combine."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|); log1p(e) computed as log(w)·e/(w - 1) with w = 1 + e
    (Kahan), exact to float32 rounding even where e is far below 1 + e's rounding error."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _tile_indices(L, d_inner, n_groups, d_state, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The program's tile: chunk c, batch b, BLOCK_D channels d of one group g, all states n.
    Program ids: 0 = chunk, 1 = channel block (group-major), 2 = batch."""
    c = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)  # b·d_inner·L can exceed 2^31
    d_per_group = d_inner // n_groups
    blocks_per_group = tl.cdiv(d_per_group, BLOCK_D)
    g = tl.program_id(1) // blocks_per_group
    d = g * d_per_group + (tl.program_id(1) % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = c * CHUNK + tl.arange(0, CHUNK)
    n = tl.arange(0, BLOCK_N)
    d_mask = d < (g + 1) * d_per_group
    t_mask = t < L
    n_mask = n < d_state
    return c, b, g, d, t, n, d_mask, t_mask, n_mask


@triton.jit
def _load_delta(delta_ptr, delta_bias_ptr, offs, mask, d, d_mask, HAS_DELTA_BIAS: tl.constexpr,
                DELTA_SOFTPLUS: tl.constexpr):
    """Δ for a (BLOCK_D, CHUNK) tile in float32, and the pre-softplus value (for softplus' derivative).
    Tokens past L get Δ = 0: a = exp(0·A) = 1 and b = 0·B·u = 0 leave the state unchanged."""
    delta = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        delta += tl.load(delta_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    pre = delta
    if DELTA_SOFTPLUS:
        delta = _softplus(delta)
    return tl.where(mask, delta, 0.0), pre


# ----------------------------------------------------------------------------------------------------------
# Pass 1 (forward): chunk summaries


@triton.jit
def _chunk_state_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, delta_bias_ptr, states_ptr, delta_sum_ptr,
                            L, d_inner, n_groups, d_state, n_chunks,
                            HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    c, b, g, d, t, n, d_mask, t_mask, n_mask = _tile_indices(L, d_inner, n_groups, d_state, CHUNK, BLOCK_D,
                                                              BLOCK_N)
    dt_offs = b * d_inner * L + d[:, None] * L + t[None, :]                         # (BLOCK_D, CHUNK)
    dt_mask = d_mask[:, None] & t_mask[None, :]
    delta, _ = _load_delta(delta_ptr, delta_bias_ptr, dt_offs, dt_mask, d, d_mask, HAS_DELTA_BIAS,
                           DELTA_SOFTPLUS)
    u = tl.load(u_ptr + dt_offs, mask=dt_mask, other=0.0).to(tl.float32)
    nt_offs = (b * n_groups + g) * d_state * L + n[:, None] * L + t[None, :]        # (BLOCK_N, CHUNK)
    nt_mask = n_mask[:, None] & t_mask[None, :]
    Bt = tl.load(B_ptr + nt_offs, mask=nt_mask, other=0.0).to(tl.float32)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d[:, None] * d_state + n[None, :], mask=dn_mask, other=0.0)  # (BLOCK_D, BLOCK_N)

    # S_c = Σ_t exp(A · Σ_{s>t} Δ_s) Δ_t B_t u_t: a reduction, no scan needed for the end state alone
    delta_after = tl.cumsum(delta, 1, reverse=True) - delta                         # Σ_{s>t} Δ_s
    decay_to_end = tl.exp(A[:, :, None] * delta_after[:, None, :])                  # (BLOCK_D, BLOCK_N, CHUNK)
    end_state = tl.sum(decay_to_end * (delta * u)[:, None, :] * Bt[None, :, :], axis=2)

    state_offs = ((b * n_chunks + c) * d_inner + d[:, None]) * d_state + n[None, :]
    tl.store(states_ptr + state_offs, end_state, mask=dn_mask)
    tl.store(delta_sum_ptr + (b * n_chunks + c) * d_inner + d, tl.sum(delta, axis=1), mask=d_mask)


# ----------------------------------------------------------------------------------------------------------
# Pass 2 (forward and backward): carry states across chunks, in place


@triton.jit
def _chunk_carry_kernel(states_ptr, delta_sum_ptr, A_ptr, initial_ptr, final_ptr,
                        d_inner, d_state, n_chunks,
                        REVERSE: tl.constexpr, HAS_INITIAL: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """states[c] holds a chunk's summary X_c on entry and the carry entering chunk c on exit:
        carry = initial;  for c in order: states[c], carry = carry, exp(A · ΣΔ_c) ⊙ carry + X_c
    in time order for the forward (carry = start state), reversed for the backward (carry = adjoint G_c)."""
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_mask = d < d_inner
    dn_mask = d_mask[:, None] & (n < d_state)[None, :]
    dn_offs = d[:, None] * d_state + n[None, :]
    A = tl.load(A_ptr + dn_offs, mask=dn_mask, other=0.0)
    if HAS_INITIAL:
        carry = tl.load(initial_ptr + b * d_inner * d_state + dn_offs, mask=dn_mask, other=0.0)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i if REVERSE else i
        state_ptrs = states_ptr + (b * n_chunks + c) * d_inner * d_state + dn_offs
        summary = tl.load(state_ptrs, mask=dn_mask, other=0.0)
        delta_sum = tl.load(delta_sum_ptr + (b * n_chunks + c) * d_inner + d, mask=d_mask, other=0.0)
        tl.store(state_ptrs, carry, mask=dn_mask)
        carry = tl.exp(A * delta_sum[:, None]) * carry + summary
    tl.store(final_ptr + b * d_inner * d_state + dn_offs, carry, mask=dn_mask)


# ----------------------------------------------------------------------------------------------------------
# Pass 3 (forward): rescan each chunk from its true start state, write y


@triton.jit
def _chunk_scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, states_ptr,
                           out_ptr, L, d_inner, n_groups, d_state, n_chunks,
                           HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
                           DELTA_SOFTPLUS: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    c, b, g, d, t, n, d_mask, t_mask, n_mask = _tile_indices(L, d_inner, n_groups, d_state, CHUNK, BLOCK_D,
                                                              BLOCK_N)
    dt_offs = b * d_inner * L + d[:, None] * L + t[None, :]                         # (BLOCK_D, CHUNK)
    dt_mask = d_mask[:, None] & t_mask[None, :]
    delta, _ = _load_delta(delta_ptr, delta_bias_ptr, dt_offs, dt_mask, d, d_mask, HAS_DELTA_BIAS,
                           DELTA_SOFTPLUS)
    u = tl.load(u_ptr + dt_offs, mask=dt_mask, other=0.0).to(tl.float32)
    nt_offs = (b * n_groups + g) * d_state * L + n[:, None] * L + t[None, :]        # (BLOCK_N, CHUNK)
    nt_mask = n_mask[:, None] & t_mask[None, :]
    Bt = tl.load(B_ptr + nt_offs, mask=nt_mask, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + nt_offs, mask=nt_mask, other=0.0).to(tl.float32)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d[:, None] * d_state + n[None, :], mask=dn_mask, other=0.0)  # (BLOCK_D, BLOCK_N)
    h_start = tl.load(states_ptr + ((b * n_chunks + c) * d_inner + d[:, None]) * d_state + n[None, :],
                      mask=dn_mask, other=0.0)

    a = tl.exp(A[:, :, None] * delta[:, None, :])                                   # (BLOCK_D, BLOCK_N, CHUNK)
    bu = (delta * u)[:, None, :] * Bt[None, :, :]                                   # Δ_t B_t u_t
    decay_from_start, h_local = tl.associative_scan((a, bu), 2, _affine_compose)
    h = decay_from_start * h_start[:, :, None] + h_local                            # h_t, eq. (2a)
    y = tl.sum(h * Ct[None, :, :], axis=1)                                          # C_t · h_t, eq. (2b)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[:, None] * u
    if HAS_Z:
        z = tl.load(z_ptr + dt_offs, mask=dt_mask, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + dt_offs, y.to(out_ptr.dtype.element_ty), mask=dt_mask)


# ----------------------------------------------------------------------------------------------------------
# Pass 1 (backward): chunk summaries of the adjoint


@triton.jit
def _gate_grad(dout, z, y, HAS_Z: tl.constexpr):
    """out = y · silu(z): returns (∂y, ∂z); ∂z is only meaningful with HAS_Z."""
    if HAS_Z:
        sig = tl.sigmoid(z)
        return dout * z * sig, dout * y * sig * (1.0 + z * (1.0 - sig))
    else:
        return dout, dout


@triton.jit
def _chunk_state_bwd_kernel(dout_ptr, delta_ptr, A_ptr, C_ptr, z_ptr, delta_bias_ptr, adjoints_ptr,
                            L, d_inner, n_groups, d_state, n_chunks,
                            HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    c, b, g, d, t, n, d_mask, t_mask, n_mask = _tile_indices(L, d_inner, n_groups, d_state, CHUNK, BLOCK_D,
                                                              BLOCK_N)
    dt_offs = b * d_inner * L + d[:, None] * L + t[None, :]                         # (BLOCK_D, CHUNK)
    dt_mask = d_mask[:, None] & t_mask[None, :]
    delta, _ = _load_delta(delta_ptr, delta_bias_ptr, dt_offs, dt_mask, d, d_mask, HAS_DELTA_BIAS,
                           DELTA_SOFTPLUS)
    dout = tl.load(dout_ptr + dt_offs, mask=dt_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + dt_offs, mask=dt_mask, other=0.0).to(tl.float32) if HAS_Z else dout
    dy, _ = _gate_grad(dout, z, dout, HAS_Z)
    nt_mask = n_mask[:, None] & t_mask[None, :]
    Ct = tl.load(C_ptr + (b * n_groups + g) * d_state * L + n[:, None] * L + t[None, :], mask=nt_mask,
                 other=0.0).to(tl.float32)                                          # (BLOCK_N, CHUNK)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d[:, None] * d_state + n[None, :], mask=dn_mask, other=0.0)

    # Q_c = Σ_t exp(A · Σ_{s≤t} Δ_s) C_t dy_t: the adjoint this chunk hands to the previous one's last token
    decay_from_start = tl.exp(A[:, :, None] * tl.cumsum(delta, 1)[:, None, :])      # (BLOCK_D, BLOCK_N, CHUNK)
    summary = tl.sum(decay_from_start * Ct[None, :, :] * dy[:, None, :], axis=2)
    tl.store(adjoints_ptr + ((b * n_chunks + c) * d_inner + d[:, None]) * d_state + n[None, :], summary,
             mask=dn_mask)


# ----------------------------------------------------------------------------------------------------------
# Pass 3 (backward): per chunk, the state forwards and the adjoint backwards, then every gradient


@triton.jit
def _chunk_scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr,
                           states_ptr, adjoints_ptr, dout_ptr,
                           du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr,
                           ddelta_bias_part_ptr,
                           L, d_inner, n_groups, d_state, n_chunks,
                           HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
                           DELTA_SOFTPLUS: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    c, b, g, d, t, n, d_mask, t_mask, n_mask = _tile_indices(L, d_inner, n_groups, d_state, CHUNK, BLOCK_D,
                                                              BLOCK_N)
    dt_offs = b * d_inner * L + d[:, None] * L + t[None, :]                         # (BLOCK_D, CHUNK)
    dt_mask = d_mask[:, None] & t_mask[None, :]
    delta, delta_pre = _load_delta(delta_ptr, delta_bias_ptr, dt_offs, dt_mask, d, d_mask, HAS_DELTA_BIAS,
                                   DELTA_SOFTPLUS)
    u = tl.load(u_ptr + dt_offs, mask=dt_mask, other=0.0).to(tl.float32)
    nt_offs = (b * n_groups + g) * d_state * L + n[:, None] * L + t[None, :]        # (BLOCK_N, CHUNK)
    nt_mask = n_mask[:, None] & t_mask[None, :]
    Bt = tl.load(B_ptr + nt_offs, mask=nt_mask, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + nt_offs, mask=nt_mask, other=0.0).to(tl.float32)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + d[:, None] * d_state + n[None, :], mask=dn_mask, other=0.0)  # (BLOCK_D, BLOCK_N)
    state_offs = ((b * n_chunks + c) * d_inner + d[:, None]) * d_state + n[None, :]
    h_start = tl.load(states_ptr + state_offs, mask=dn_mask, other=0.0)
    g_end = tl.load(adjoints_ptr + state_offs, mask=dn_mask, other=0.0)             # G_c

    # the forward again: h_t
    a = tl.exp(A[:, :, None] * delta[:, None, :])                                   # (BLOCK_D, BLOCK_N, CHUNK)
    bu = (delta * u)[:, None, :] * Bt[None, :, :]
    decay_from_start, h_local = tl.associative_scan((a, bu), 2, _affine_compose)
    h = decay_from_start * h_start[:, :, None] + h_local
    y = tl.sum(h * Ct[None, :, :], axis=1)
    if HAS_D:
        D = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        y += D[:, None] * u
    dout = tl.load(dout_ptr + dt_offs, mask=dt_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + dt_offs, mask=dt_mask, other=0.0).to(tl.float32) if HAS_Z else dout
    dy, dz = _gate_grad(dout, z, y, HAS_Z)

    # the adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, a reverse scan whose multiplier is the next token's a
    # (1 past the chunk's last token: the next chunk's decay is already inside G_c)
    next_mask = dt_mask & (tl.arange(0, CHUNK) < CHUNK - 1)[None, :]
    delta_next, _ = _load_delta(delta_ptr + 1, delta_bias_ptr, dt_offs, next_mask & ((t + 1) < L)[None, :], d,
                                d_mask, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
    a_next = tl.exp(A[:, :, None] * delta_next[:, None, :])
    decay_to_end, g_local = tl.associative_scan((a_next, Ct[None, :, :] * dy[:, None, :]), 2, _affine_compose,
                                                reverse=True)
    adj = decay_to_end * g_end[:, :, None] + g_local                                # g_t

    # gradients; a_t h_{t-1} = h_t - Δ_t B_t u_t
    decayed_prev = h - bu
    g_delta = adj * delta[:, None, :]
    du = tl.sum(g_delta * Bt[None, :, :], axis=1)
    if HAS_D:
        du += D[:, None] * dy
        tl.store(dD_part_ptr + (b * n_chunks + c) * d_inner + d, tl.sum(dy * u, axis=1), mask=d_mask)
    ddelta = tl.sum(adj * (Bt[None, :, :] * u[:, None, :] + A[:, :, None] * decayed_prev), axis=1)
    if DELTA_SOFTPLUS:
        ddelta *= tl.sigmoid(delta_pre)                                             # softplus' = sigmoid
    ddelta = tl.where(dt_mask, ddelta, 0.0)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias_part_ptr + (b * n_chunks + c) * d_inner + d, tl.sum(ddelta, axis=1), mask=d_mask)
    tl.store(du_ptr + dt_offs, du.to(du_ptr.dtype.element_ty), mask=dt_mask)
    tl.store(ddelta_ptr + dt_offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=dt_mask)
    if HAS_Z:
        tl.store(dz_ptr + dt_offs, dz.to(dz_ptr.dtype.element_ty), mask=dt_mask)
    tl.store(dA_part_ptr + state_offs, tl.sum(g_delta * decayed_prev, axis=2), mask=dn_mask)
    tl.atomic_add(dB_ptr + nt_offs, tl.sum(g_delta * u[:, None, :], axis=0), mask=nt_mask)
    tl.atomic_add(dC_ptr + nt_offs, tl.sum(h * dy[:, None, :], axis=0), mask=nt_mask)


# ----------------------------------------------------------------------------------------------------------
# The autograd Function and the public entry point


def _alloc(*shape, dtype, device):
    """Every buffer a kernel writes in full is allocated here, uninitialised. The tests fill them with NaN
    instead, so an element a kernel forgets to write shows up as a failure."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tiling(d_inner, n_groups, d_state):
    """(CHUNK, BLOCK_D, BLOCK_N): a tile of at most TILE elements, at least one channel."""
    block_n = triton.next_power_of_2(d_state)
    block_d = max(1, TILE // (block_n * CHUNK))
    block_d = min(block_d, triton.next_power_of_2(d_inner // n_groups))
    return CHUNK, block_d, block_n


def _carry(states, delta_sum, A, initial, reverse, block_d, block_n):
    """Pass 2 on (batch, n_chunks, d_inner, N) `states`, in place; returns the carry after the last chunk."""
    batch, n_chunks, d_inner, d_state = states.shape
    final = _alloc(batch, d_inner, d_state, dtype=torch.float32, device=states.device)
    _chunk_carry_kernel[(triton.cdiv(d_inner, block_d), batch)](
        states, delta_sum, A, initial, final, d_inner, d_state, n_chunks,
        REVERSE=reverse, HAS_INITIAL=initial is not None, BLOCK_D=block_d, BLOCK_N=block_n)
    return final


class SelectiveScan(torch.autograd.Function):
    """Inputs are contiguous, B and C are (batch, G, N, L); returns (out, last_state)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
        batch, d_inner, L = u.shape
        n_groups, d_state = B.shape[1], B.shape[2]
        chunk, block_d, block_n = _tiling(d_inner, n_groups, d_state)
        n_chunks = triton.cdiv(L, chunk)
        grid = (n_chunks, n_groups * triton.cdiv(d_inner // n_groups, block_d), batch)
        tiles = dict(CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
        flags = dict(HAS_DELTA_BIAS=delta_bias is not None, DELTA_SOFTPLUS=delta_softplus)
        sizes = (L, d_inner, n_groups, d_state, n_chunks)

        states = _alloc(batch, n_chunks, d_inner, d_state, dtype=torch.float32, device=u.device)
        delta_sum = _alloc(batch, n_chunks, d_inner, dtype=torch.float32, device=u.device)
        _chunk_state_fwd_kernel[grid](u, delta, A, B, delta_bias, states, delta_sum, *sizes, **flags, **tiles)
        last_state = _carry(states, delta_sum, A, None, False, block_d, block_n)   # states: chunk start states
        out = _alloc(batch, d_inner, L, dtype=u.dtype, device=u.device)
        _chunk_scan_fwd_kernel[grid](u, delta, A, B, C, D, z, delta_bias, states, out, *sizes,
                                     HAS_D=D is not None, HAS_Z=z is not None, **flags, **tiles)

        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, delta_sum)
        ctx.delta_softplus = delta_softplus
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast_state):
        u, delta, A, B, C, D, z, delta_bias, states, delta_sum = ctx.saved_tensors
        batch, d_inner, L = u.shape
        n_groups, d_state = B.shape[1], B.shape[2]
        chunk, block_d, block_n = _tiling(d_inner, n_groups, d_state)
        n_chunks = states.shape[1]
        grid = (n_chunks, n_groups * triton.cdiv(d_inner // n_groups, block_d), batch)
        tiles = dict(CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n)
        flags = dict(HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
                     DELTA_SOFTPLUS=ctx.delta_softplus)
        sizes = (L, d_inner, n_groups, d_state, n_chunks)
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast_state = None if dlast_state is None else dlast_state.float().contiguous()

        adjoints = _alloc(batch, n_chunks, d_inner, d_state, dtype=torch.float32, device=u.device)
        _chunk_state_bwd_kernel[grid](dout, delta, A, C, z, delta_bias, adjoints, *sizes, **flags, **tiles)
        _carry(adjoints, delta_sum, A, dlast_state, True, block_d, block_n)         # adjoints: G_c per chunk

        du = _alloc(*u.shape, dtype=u.dtype, device=u.device)
        ddelta = _alloc(*delta.shape, dtype=delta.dtype, device=u.device)
        dz = None if z is None else _alloc(*z.shape, dtype=z.dtype, device=u.device)
        dB = torch.zeros(B.shape, dtype=torch.float32, device=u.device)             # atomic-add targets
        dC = torch.zeros(C.shape, dtype=torch.float32, device=u.device)
        dA_part = _alloc(batch, n_chunks, d_inner, d_state, dtype=torch.float32, device=u.device)
        dD_part = None if D is None else _alloc(batch, n_chunks, d_inner, dtype=torch.float32, device=u.device)
        ddelta_bias_part = (None if delta_bias is None else
                            _alloc(batch, n_chunks, d_inner, dtype=torch.float32, device=u.device))
        _chunk_scan_bwd_kernel[grid](u, delta, A, B, C, D, z, delta_bias, states, adjoints, dout,
                                     du, ddelta, dz, dB, dC, dA_part, dD_part, ddelta_bias_part, *sizes,
                                     HAS_D=D is not None, **flags, **tiles)
        dD = None if D is None else dD_part.sum((0, 1)).to(D.dtype)
        ddelta_bias = None if delta_bias is None else ddelta_bias_part.sum((0, 1)).to(delta_bias.dtype)
        return (du, ddelta, dA_part.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz,
                ddelta_bias, None)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Clear errors for inputs the kernels cannot take; returns the number of B/C groups."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, d_inner, L); got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}")
    batch, d_inner, L = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"selective_scan: A must be (d_inner={d_inner}, d_state); got {tuple(A.shape)}")
    d_state = A.shape[1]
    if not 1 <= d_state <= 64:
        raise ValueError(f"selective_scan: d_state = {d_state}; the Triton kernel supports 1 to 64 (use "
                         "mamba.selective_scan_chunked for larger states)")
    for name, M in (("B", B), ("C", C)):
        grouped = M.dim() == 4 and M.shape[1] >= 1 and d_inner % M.shape[1] == 0
        if not (M.dim() == 3 or grouped) or M.shape[0] != batch or M.shape[-2:] != (d_state, L):
            raise ValueError(f"selective_scan: {name} must be (batch={batch}, d_state={d_state}, L={L}) or "
                             f"(batch, G, d_state, L) with d_inner={d_inner} divisible by G; got "
                             f"{tuple(M.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"selective_scan: B and C must have the same shape; got {tuple(B.shape)} and "
                         f"{tuple(C.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must be shaped like u {tuple(u.shape)}; got {tuple(z.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (d_inner,):
            raise ValueError(f"selective_scan: {name} must be (d_inner={d_inner},); got {tuple(v.shape)}")
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, x in tensors.items():
        if x is not None and x.dtype not in _FLOATS:
            raise ValueError(f"selective_scan: {name} has dtype {x.dtype}; use float32, bfloat16 or float16")
        if x is not None and x.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {x.device} but u is on {u.device}; put all inputs "
                             "on one device")
    if u.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"selective_scan: the Triton kernel needs CUDA tensors (got {u.device}); on a CPU use "
                         "mamba.selective_scan_chunked, or set TRITON_INTERPRET=1 before importing triton to "
                         "run the kernels in Triton's (slow) interpreter")
    return 1 if B.dim() == 3 else B.shape[1]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The selective scan (see the module docstring), differentiable. Shapes: u, delta, z (B, d_inner, L);
    A (d_inner, N) float32; B, C (B, N, L) or (B, G, N, L); D, delta_bias (d_inner,) float32.
    Returns out (B, d_inner, L) in u's dtype, and with return_last_state also h_L (B, d_inner, N) float32."""
    n_groups = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, _, L = u.shape
    grouped = (lambda M: M.reshape(batch, n_groups, M.shape[-2], L).contiguous())    # (B, G, N, L)
    contiguous = (lambda x: None if x is None else x.contiguous())
    out, last_state = SelectiveScan.apply(u.contiguous(), delta.contiguous(), A.float().contiguous(),
                                          grouped(B), grouped(C), contiguous(D), contiguous(z),
                                          contiguous(delta_bias), delta_softplus)
    return (out, last_state) if return_last_state else out
