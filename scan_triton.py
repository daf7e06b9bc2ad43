"""
Selective scan in Triton: forward and backward kernels, parallel over batch, channels and sequence chunks.

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, skip_below=None)

Same signature and result as `mamba.selective_scan_ref` (mamba_ssm's `selective_scan_fn` plus skip_below, a
per-channel bound below which a token is skipped), differentiable with respect to u, delta, A, B, C, D, z and
delta_bias. It is the algorithm of `mamba.selective_scan_chunked`,
the PyTorch twin to read first, with one GPU thread per channel:

    for every chunk c, in parallel:              # pass 1 (only when batch × channels cannot fill the GPU)
        S_c, ΣΔ_c = scan the chunk from h = 0    #   its end state and the sum of its Δ
    h_start[0] = 0                               # pass 2, the carry: sequential over chunks
    for c = 0, 1, ...: h_start[c+1] = exp(A·ΣΔ_c) h_start[c] + S_c
    for every chunk c, in parallel:              # pass 3
        h = h_start[c]; for every token t of c: h = a_t h + b_t; y_t = C_t · h + D u_t; out_t = y_t · silu(z_t)

For every batch b, channel d and state n (N = d_state):

    Δ_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias without softplus)
    h_t = a_t h_{t-1} + b_t,   a_t = exp(Δ_t A),  b_t = Δ_t B_t u_t        eq. (2a), fp32 state
    y_t = Σ_n C_t h_t + D u_t;  out_t = y_t · silu(z_t)                    eq. (2b) and the gate

One thread, one channel
-----------------------
The work is B·d_inner·N·L updates of h, each an exponential and two fused multiply-adds; everything else
(loading u, Δ, z, the softplus, the gate) is per (channel, token), N times less. So every thread owns one
channel and keeps all N states of it in its registers: the recurrence is a plain sequential loop over
tokens, with no communication between threads, and the sum over n for y_t stays inside the thread. A program
is BLOCK_D = 32·num_warps channels of one batch element, side by side (they share B_t and C_t, which every
thread reads from the same address).

Memory is read in tiles of T = 8 tokens: the thread of channel d loads u, Δ, z[d, t0 : t0+T], contiguous in a
row of tokens, with 16-byte loads (one for 16-bit inputs, two for float32), then steps through the T tokens in
its registers, and writes the T outputs at once. B and C are transposed once to (L, N) float32 rows, so B_t is
one contiguous vector.
Every token waits on B_t and C_t, which all threads of a program read, so their latency must not be paid
token by token: the tile loop is software-pipelined (Triton's `tl.range(..., num_stages=2)`), which copies
the next tile's B and C rows into shared memory asynchronously (cp.async) while the current tile is worked on,
and the u, Δ, z tiles of the next iteration are loaded into registers before the current one is used. Rows must
start 16-byte aligned for vector loads, and a tile's token mask must be the same for all its tokens, so every
sequence is stored as rows of a multiple of 8 tokens, row (b, d) starting at b·row_b + d·row_d (`_layout`). With
l a multiple of 8, u's own rows are used when u is contiguous or, as Mamba's mixer hands it over, a (channels, b·l)
matrix viewed as (b, channels, l); otherwise the rows are (b, d_inner, ·) contiguous and zero-padded. Δ, z and
∂out are read in place where they are laid out as those rows and 16-byte aligned, copied into them where not (so
is a tensor laid out (b, l, ·): read across channels, a tile no longer sits in one thread's registers), and the
outputs are written in them. The exponential is exp2 with A pre-scaled by log2(e): one hardware instruction.

Chunks: parallel over the sequence
----------------------------------
One thread per channel is B·d_inner threads; a GPU wants tens of thousands, so with few long sequences
(batch 1, L = 128k) the sequence is also cut into n_chunks chunks of whole segments (below). h_t = a_t h_{t-1}
+ b_t is a chain of affine maps x -> a x + b, and composing two of them is again one, so chunks can be
summarised independently and stitched together afterwards, the three passes of the pseudo-code above: pass 1
writes each chunk's end state S_c from a zero state and its ΣΔ_c (the chunk's total decay is exp(A · ΣΔ_c));
pass 2 is one multiply-add per chunk, sequential over chunks and parallel over batch, channels and states;
pass 3 runs every chunk again from its true start state and writes y. Pass 1 costs a second sweep over the
chunk (without C, z and the output), so it only runs when the batch and channels alone cannot fill the GPU:
`_chunk_len` picks as few chunks as give every SM enough warps, and with one chunk the forward is the single
pass 3. A thread walks its tokens one after the other, each step waiting on the last, so the GPU needs many
threads in flight to stay busy.

The backward
------------
With dout the gradient of the output, the adjoint g_t = ∂loss/∂h_t runs backwards in time:

    dy_t = dout_t · silu(z_t),     g_t = C_t dy_t + a_{t+1} g_{t+1}     (after the last token: ∂loss/∂h_L)
    ∂u_t = D dy_t + Δ_t Σ_n g_t B_t              ∂B_t = Σ_d g_t Δ_t u_t       ∂C_t = Σ_d dy_t h_t
    ∂Δ_t = Σ_n g_t (B_t u_t + A a_t h_{t-1})     ∂A = Σ_t g_t Δ_t a_t h_{t-1}   ∂D = Σ_t dy_t u_t
    ∂z_t = dout_t y_t silu'(z_t),                ∂delta_t = ∂Δ_t · sigmoid(delta_t + delta_bias) with softplus

The adjoint is the same kind of recurrence, reversed, so it is chunked the same way mirrored (summaries of
each chunk from a zero adjoint at its end, then a right-to-left carry). Walking a chunk backwards needs h_t
at every token in reverse order, and h cannot be run backwards (h_{t-1} = (h_t - b_t) / a_t divides by decays
that underflow). So states are checkpointed at three levels, each recomputed from the one above:
  - the forward saves h every SEG = 64 tokens (memory B·d_inner·N·L/64 floats, never one state per token);
  - the backward, for each segment of SEG tokens of a chunk from the last to the first, recomputes the segment
    forward from its saved state and writes the state at the start of each tile of T = 4 tokens (BWD_T; the
    forward's tiles are 8) to a small scratch buffer of its program (SEG/T states): `_segment_tile_starts`;
  - for each tile, from the last to the first, it recomputes the T states of the tile into registers, then
    steps backwards through the T tokens, carrying g and producing every gradient: `_segment_backward`.
The backward launches only as many programs as the GPU runs at once, and they take the (channel block, chunk,
batch) work items from a counter, so that the scratch buffers, one per program, stay few. ∂B and ∂C sum over
channels, which live in different threads: a sum across the program's threads, then an atomic add per token
into float32 buffers. ∂A, ∂D, ∂delta_bias sum over batch and time: each work item writes its partial sum and
PyTorch adds them up.
"""
import math
import os

import torch
import triton
import triton.language as tl

# Launch configuration, chosen by timing the alternatives (notes/scan_triton_notes.md has them)
SEG = 64                # tokens between the states the forward saves for the backward
FWD_WARPS = 4           # warps per forward program, 32·num_warps channels: its 4 warps share the loads of B_t, C_t
FWD_T = 8               # tokens per forward tile: two 16-byte loads per float32 row
FWD_STAGES = 2          # the forward's tile loop is software-pipelined: B, C rows one tile ahead
BWD_WARPS = 1           # the backward's threads hold 255 registers: one warp per program
BWD_T = 4               # tokens per tile in the backward, whose tiles keep T states per thread
FWD_WARPS_PER_SM = 64   # chunks are cut until there is this much work per SM (more than fits at once: shorter
BWD_WARPS_PER_SM = 64   # chunks even out the finishing times), in programs or, in the backward, work items
BWD_PROGRAMS_PER_SM = 8 # what an SM runs at once of the backward (65536 registers / (32 threads · 255)): the
                        # backward launches that many programs per SM, which share out its work items
CARRY_BLOCK = 128       # pass 2: (channel, state) elements per program, one per thread
CARRY_GROUP = 16        # pass 2: chunk summaries loaded together
ROWS_BLOCK = 64         # tokens and channels per program of the transposing copy into rows
INTERPRETER_SMS = 4     # stands in for the SM count when the kernels run in Triton's CPU interpreter
INTERPRETER_BWD_PROGRAMS = 3  # the interpreter runs programs one after another: the first takes every item

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------
# Pieces shared by the kernels


@triton.jit
def _program_channels(block, d_inner, group_size, BLOCK_D: tl.constexpr):
    """Channel block `block`'s channels d (BLOCK_D,), which of them exist, and their B/C group g. Blocks are
    numbered group by group, so that a block never straddles two groups."""
    blocks_per_group = tl.cdiv(group_size, BLOCK_D)
    g = block // blocks_per_group
    in_group = (block % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    return g * group_size + in_group, in_group < group_size, g


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e) with e = e^-|x| in (0, 1]. log1p(e) = 2 atanh(s), s = e / (2 + e)
    <= 1/3: the odd series 2 (s + s^3/3 + s^5/5 + ...) gains a factor s^2 <= 1/9 per term, so 8 terms reach
    float32 precision, relative, however small e is (log(1 + e) would lose e below the rounding of 1 + e)."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    s = e / (2.0 + e)
    s2 = s * s
    series = 1.0 / 15.0
    for k in tl.static_range(6, -1, -1):
        series = series * s2 + 1.0 / (2 * k + 1)
    return tl.maximum(x, 0.0) + 2.0 * s * series


@triton.jit
def _delta(raw, bias, skip, in_sequence, HAS_SKIP: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """Δ for a (BLOCK_D, T) tile of delta as loaded, in float32, and its value before the softplus (for the
    softplus' derivative). Tokens past L (the padding of the last tile) get Δ = 0: a = exp(0·A) = 1 and
    b = 0·B·u = 0 leave the state unchanged. HAS_SKIP: a token whose delta + delta_bias is not above its
    channel's skip_below gets pre = -inf, so Δ = softplus(-inf) = 0 and its gradient sigmoid(-inf) = 0."""
    pre = raw.to(tl.float32) + bias[:, None]
    if HAS_SKIP:
        pre = tl.where(pre > skip[:, None], pre, float("-inf"))
    delta = _softplus(pre) if DELTA_SOFTPLUS else pre
    return tl.where(in_sequence, delta, 0.0), pre


@triton.jit
def _load(ptr, offs, mask):
    """Masked load as float32 (zeros where masked)."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _token(tile, j, T: tl.constexpr):
    """Token j of a (BLOCK_D, T) tile as a (BLOCK_D,) vector. A thread holds whole rows of the tile, and j is
    a compile-time constant, so this selects a register; no data moves between threads."""
    return tl.sum(tl.where(tl.arange(0, T)[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _set_token(tile, j, value, T: tl.constexpr):
    """The tile with token j replaced by value (BLOCK_D,): again a register move."""
    return tl.where(tl.arange(0, T)[None, :] == j, value[:, None], tile)


@triton.jit
def _step(h, A2, delta_j, du_j, B_j):
    """h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t for one token, eq. (2a): (BLOCK_D, N) states of BLOCK_D
    channels, from Δ_t, Δ_t u_t (BLOCK_D,) and B_t (N,); A2 = A·log2(e)."""
    return tl.exp2(A2 * delta_j[:, None]) * h + du_j[:, None] * B_j[None, :]


@triton.jit
def _silu_and_derivative(z):
    """silu(z) = z·sigmoid(z) and its derivative sigmoid(z)·(1 + z·(1 - sigmoid(z))), for the gate's gradients:
    out = y·silu(z) gives ∂y = dout·silu(z) and ∂z = dout·y·silu'(z)."""
    sig = tl.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _load_tile(ptr, rows, t, d_mask, stride):
    """The (BLOCK_D, T) tile of tokens t (T,) of the program's channels, as stored; zeros for a tile outside the
    row. rows (BLOCK_D,) are the offsets of each channel's token 0. Rows hold a multiple of 8 tokens and tiles
    start at multiples of T, so the token mask is the same for a whole tile: the compiler keeps 16-byte loads."""
    mask = d_mask[:, None] & ((t >= 0) & (t < stride))[None, :]
    return tl.load(ptr + rows[:, None] + t[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, rows, t, d_mask, stride, tile):
    """Store a float32 (BLOCK_D, T) tile of tokens t in ptr's dtype."""
    mask = d_mask[:, None] & (t < stride)[None, :]
    tl.store(ptr + rows[:, None] + t[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Forward: passes 1 (STATES_ONLY) and 3 of the chunked scan, or the whole scan when there is one chunk


@triton.jit
def _scan_fwd_kernel(
        # pointers: the (batch, d_inner, L) sequences, the parameters, the states kept between passes
        u_ptr, delta_ptr, z_ptr, out_ptr, A2_ptr, Bt_ptr, Ct_ptr, D_ptr, delta_bias_ptr, skip_ptr,
        chunk_state_ptr, delta_sum_ptr, seg_state_ptr, last_state_ptr,
        # sizes: L tokens, stored as rows of `stride` (a multiple of 8) tokens, row (b, d) at b·row_b + d·row_d
        L, stride, row_b, row_d, d_inner, group_size, n_groups, chunk_len,
        # meta-parameters
        STATES_ONLY: tl.constexpr, FROM_CHUNK_STATE: tl.constexpr, SAVE_SEGMENTS: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
        DELTA_SOFTPLUS: tl.constexpr,
        SEG: tl.constexpr, T: tl.constexpr, STAGES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (channel block, chunk c, batch b). STATES_ONLY (pass 1): from a zero state, write the chunk's
    end state and ΣΔ. Otherwise (pass 3): from the chunk's start state (zero for a single chunk), write out,
    the state every SEG tokens for the backward (SAVE_SEGMENTS) and, in the last chunk, the last state."""
    d, d_mask, g = _program_channels(tl.program_id(0), d_inner, group_size, BLOCK_D)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)  # b·d_inner·L can exceed 2^31
    stride = tl.multiple_of(stride, 8)  # rows start 16-byte aligned (the host pads them): vector loads
    row_b, row_d = tl.multiple_of(row_b, 8), tl.multiple_of(row_d, 8)
    n = tl.arange(0, BLOCK_N)
    state_offs = d[:, None] * BLOCK_N + n[None, :]                     # (BLOCK_D, BLOCK_N) in (d_inner, BLOCK_N)
    state_mask = d_mask[:, None]
    A2 = tl.load(A2_ptr + state_offs, mask=state_mask, other=0.0)     # A·log2(e), zero in padded states
    if FROM_CHUNK_STATE:
        h = tl.load(chunk_state_ptr + (b * n_chunks + c) * d_inner * BLOCK_N + state_offs, mask=state_mask,
                    other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    bias = _load(delta_bias_ptr, d, d_mask) if HAS_DELTA_BIAS else tl.zeros((BLOCK_D,), dtype=tl.float32)
    skip = _load(skip_ptr, d, d_mask) if HAS_SKIP else bias
    D = _load(D_ptr, d, d_mask) if HAS_D else tl.zeros((BLOCK_D,), dtype=tl.float32)
    delta_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    rows = b * row_b + d.to(tl.int64) * row_d                          # (BLOCK_D,) each channel's token 0
    bc_rows = (b * n_groups + g) * stride                              # this group's B^T, C^T
    t_start = c * chunk_len
    t_end = tl.minimum(t_start + chunk_len, L)
    # Each iteration issues the loads of the next tile before it works on the current one, so that the memory
    # latency is hidden behind the work of a tile instead of stalling every iteration.
    t = t_start + tl.arange(0, T)
    delta_next = _load_tile(delta_ptr, rows, t, d_mask, stride)
    u_next = _load_tile(u_ptr, rows, t, d_mask, stride)
    z_next = _load_tile(z_ptr, rows, t, d_mask, stride) if HAS_Z and not STATES_ONLY else u_next
    for t0 in tl.range(t_start, t_end, T, num_stages=STAGES):
        if SAVE_SEGMENTS and t0 % SEG == 0:                            # h before token t0, for the backward
            tl.store(seg_state_ptr + (b * tl.cdiv(L, SEG) + t0 // SEG) * d_inner * BLOCK_N + state_offs, h,
                     mask=state_mask)
        t = t0 + tl.arange(0, T)
        delta_raw, u_raw, z_raw = delta_next, u_next, z_next
        delta_next = _load_tile(delta_ptr, rows, t + T, d_mask, stride)   # past the chunk: loaded, unused
        u_next = _load_tile(u_ptr, rows, t + T, d_mask, stride)
        if HAS_Z and not STATES_ONLY:
            z_next = _load_tile(z_ptr, rows, t + T, d_mask, stride)

        delta, _ = _delta(delta_raw, bias, skip, (t < L)[None, :], HAS_SKIP, DELTA_SOFTPLUS)
        u = u_raw.to(tl.float32)
        du = delta * u
        y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        bc_tile = (bc_rows + t0) * BLOCK_N + n                         # B_t, C_t of the tile's first token
        for j in tl.static_range(T):
            bc_offs = bc_tile + j * BLOCK_N
            h = _step(h, A2, _token(delta, j, T), _token(du, j, T), tl.load(Bt_ptr + bc_offs))
            if not STATES_ONLY:
                C_j = tl.load(Ct_ptr + bc_offs)
                y = _set_token(y, j, tl.sum(h * C_j[None, :], axis=1), T)  # C_t · h_t, eq. (2b)
        if STATES_ONLY:
            delta_sum += tl.sum(delta, axis=1)
        else:
            if HAS_D:
                y += D[:, None] * u
            if HAS_Z:
                z = z_raw.to(tl.float32)
                y *= z * tl.sigmoid(z)
            _store_tile(out_ptr, rows, t, d_mask, stride, y)
    chunk_offs = (b * n_chunks + c) * d_inner * BLOCK_N + state_offs
    if STATES_ONLY:
        tl.store(chunk_state_ptr + chunk_offs, h, mask=state_mask)
        tl.store(delta_sum_ptr + (b * n_chunks + c) * d_inner + d, delta_sum, mask=d_mask)
    elif c == n_chunks - 1:
        tl.store(last_state_ptr + b * d_inner * BLOCK_N + state_offs, h, mask=state_mask)


# ----------------------------------------------------------------------------------------------------------
# Pass 2 (forward and backward): carry states across chunks, in place


@triton.jit
def _chunk_carry_kernel(states_ptr, delta_sum_ptr, A2_ptr, initial_ptr, d_inner, n_chunks,
                        REVERSE: tl.constexpr, HAS_INITIAL: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """states[c] holds a chunk's summary X_c on entry and the carry entering chunk c on exit:
        carry = initial;  for c in order: states[c], carry = carry, exp(A · ΣΔ_c) ⊙ carry + X_c
    in time order for the forward (carry = start state), reversed for the backward (carry = adjoint G_c; the
    last carry, out of chunk 0, is not stored, so X_0 is never written).
    A thread owns one (channel, state) element e of the (d_inner, BLOCK_N) plane. The chain over chunks is
    sequential, but its inputs are not: the summaries of GROUP chunks are loaded before the chain runs through
    them, so that one memory latency is paid per GROUP chunks instead of one per chunk."""
    b = tl.program_id(1).to(tl.int64)
    plane = d_inner * BLOCK_N
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e_mask = e < plane
    A2 = tl.load(A2_ptr + e, mask=e_mask, other=0.0)
    if HAS_INITIAL:
        carry = tl.load(initial_ptr + b * plane + e, mask=e_mask, other=0.0)
    else:
        carry = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, n_chunks, GROUP):
        chunks = ()
        masks = ()
        summaries = ()
        decays = ()
        for j in tl.static_range(GROUP):
            c = n_chunks - 1 - (i0 + j) if REVERSE else i0 + j
            # past the last chunk nothing is loaded: X = 0 and a decay of 1 leave the carry as it is (the test is
            # a tensor because Triton's interpreter cannot combine a scalar condition with a tensor mask)
            masks = masks + (e_mask & (tl.full((BLOCK,), i0 + j, tl.int32) < n_chunks),)
            chunks = chunks + ((b * n_chunks + c) * plane + e,)
            summaries = summaries + (tl.load(states_ptr + chunks[j], mask=masks[j], other=0.0),)
            delta_sum = tl.load(delta_sum_ptr + (b * n_chunks + c) * d_inner + e // BLOCK_N, mask=masks[j],
                                other=0.0)
            decays = decays + (tl.exp2(A2 * delta_sum),)
        for j in tl.static_range(GROUP):
            tl.store(states_ptr + chunks[j], carry, mask=masks[j])
            carry = decays[j] * carry + summaries[j]


# ----------------------------------------------------------------------------------------------------------
# Pass 1 (backward): chunk summaries of the adjoint


@triton.jit
def _adjoint_summary_kernel(
        dout_ptr, delta_ptr, z_ptr, A2_ptr, Ct_ptr, delta_bias_ptr, skip_ptr, adjoint_ptr, delta_sum_ptr,
        L, stride, row_b, row_d, d_inner, group_size, n_groups, chunk_len,
        HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
        DELTA_SOFTPLUS: tl.constexpr,
        T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (channel block, chunk c, batch b): walk the chunk backwards from a zero adjoint,
        g_t = C_t dy_t + carried,  carried <- a_t g_t,
    and write what reaches the previous chunk's last token (carried at the chunk's first token) and ΣΔ_c.
    Chunk 0 has no previous chunk: the programs are chunks 1 to n_chunks - 1."""
    d, d_mask, g = _program_channels(tl.program_id(0), d_inner, group_size, BLOCK_D)
    c = tl.program_id(1) + 1
    n_chunks = tl.num_programs(1) + 1
    b = tl.program_id(2).to(tl.int64)
    stride = tl.multiple_of(stride, 8)
    row_b, row_d = tl.multiple_of(row_b, 8), tl.multiple_of(row_d, 8)
    n = tl.arange(0, BLOCK_N)
    state_offs = d[:, None] * BLOCK_N + n[None, :]
    A2 = tl.load(A2_ptr + state_offs, mask=d_mask[:, None], other=0.0)
    bias = _load(delta_bias_ptr, d, d_mask) if HAS_DELTA_BIAS else tl.zeros((BLOCK_D,), dtype=tl.float32)
    skip = _load(skip_ptr, d, d_mask) if HAS_SKIP else bias
    carried = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    delta_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    rows = b * row_b + d.to(tl.int64) * row_d
    bc_rows = (b * n_groups + g) * stride
    t_start = c * chunk_len
    n_tiles = tl.cdiv(tl.minimum(chunk_len, L - t_start), T)
    t = t_start + (n_tiles - 1) * T + tl.arange(0, T)                                  # the last tile first
    delta_next = _load_tile(delta_ptr, rows, t, d_mask, stride)
    dout_next = _load_tile(dout_ptr, rows, t, d_mask, stride)
    z_next = _load_tile(z_ptr, rows, t, d_mask, stride) if HAS_Z else dout_next
    for i in range(n_tiles):
        t0 = t_start + (n_tiles - 1 - i) * T
        t = t0 + tl.arange(0, T)
        delta_raw, dout_raw, z_raw = delta_next, dout_next, z_next
        delta_next = _load_tile(delta_ptr, rows, t - T, d_mask, stride)            # the tile before this one
        dout_next = _load_tile(dout_ptr, rows, t - T, d_mask, stride)
        if HAS_Z:
            z_next = _load_tile(z_ptr, rows, t - T, d_mask, stride)

        delta, _ = _delta(delta_raw, bias, skip, (t < L)[None, :], HAS_SKIP, DELTA_SOFTPLUS)
        dy = dout_raw.to(tl.float32)                                                     # ∂y_t
        if HAS_Z:
            dy *= _silu_and_derivative(z_raw.to(tl.float32))[0]
        delta_sum += tl.sum(delta, axis=1)
        bc_tile = (bc_rows + t0) * BLOCK_N + n
        for j in tl.static_range(T - 1, -1, -1):
            C_j = tl.load(Ct_ptr + bc_tile + j * BLOCK_N)
            adjoint = carried + _token(dy, j, T)[:, None] * C_j[None, :]                        # g_t
            carried = tl.exp2(A2 * _token(delta, j, T)[:, None]) * adjoint                       # a_t g_t
    tl.store(adjoint_ptr + (b * n_chunks + c) * d_inner * BLOCK_N + state_offs, carried, mask=d_mask[:, None])
    tl.store(delta_sum_ptr + (b * n_chunks + c) * d_inner + d, delta_sum, mask=d_mask)


# ----------------------------------------------------------------------------------------------------------
# Pass 3 (backward): per chunk, segments from the last to the first; in each, its tiles from the last to the first


@triton.jit
def _scan_bwd_kernel(
        # pointers: inputs, the states kept by the forward and pass 2, outputs
        u_ptr, delta_ptr, z_ptr, dout_ptr, A2_ptr, Bt_ptr, Ct_ptr, D_ptr, delta_bias_ptr, skip_ptr,
        seg_state_ptr, adjoint_ptr, scratch_ptr, next_item_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dBt_ptr, dCt_ptr, dA_part_ptr, dD_part_ptr, ddelta_bias_part_ptr,
        # sizes: L tokens, stored as rows of `stride` (a multiple of 8) tokens, row (b, d) at b·row_b + d·row_d;
        # the work items
        L, stride, row_b, row_d, d_inner, group_size, n_groups, chunk_len, n_chunks, batch,
        # meta-parameters
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
        DELTA_SOFTPLUS: tl.constexpr,
        SEG: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The work items are (channel block, chunk c, batch b), as the forward's programs. Only as many programs
    are launched as the GPU runs at once, so that the scratch, one per program, stays small; each takes the next
    item from a shared counter until none is left, as the GPU would hand out programs. For an item: starting
    from the adjoint G_c that enters the chunk's last token from the right (pass 2), walk the chunk's segments
    from the last to the first: recompute the states at the segment's tile starts (`_segment_tile_starts`), then
    go back through its tiles (`_segment_backward`), writing ∂u, ∂delta, ∂z, adding ∂B, ∂C. At the end, write
    the item's partial sums of ∂A, ∂D and ∂delta_bias."""
    stride = tl.multiple_of(stride, 8)
    row_b, row_d = tl.multiple_of(row_b, 8), tl.multiple_of(row_d, 8)
    n = tl.arange(0, BLOCK_N)
    n_blocks = n_groups * tl.cdiv(group_size, BLOCK_D)
    first_state = tl.program_id(0) * (SEG // T)                                # the program's scratch
    item = tl.atomic_add(next_item_ptr, 1)
    while item < n_blocks * n_chunks * batch:
        d, d_mask, g = _program_channels(item % n_blocks, d_inner, group_size, BLOCK_D)
        c = item // n_blocks % n_chunks
        b = (item // (n_blocks * n_chunks)).to(tl.int64)
        state_offs = d[:, None] * BLOCK_N + n[None, :]
        state_mask = d_mask[:, None]
        A2 = tl.load(A2_ptr + state_offs, mask=state_mask, other=0.0)
        bias = _load(delta_bias_ptr, d, d_mask) if HAS_DELTA_BIAS else tl.zeros((BLOCK_D,), dtype=tl.float32)
        skip = _load(skip_ptr, d, d_mask) if HAS_SKIP else bias
        D = _load(D_ptr, d, d_mask) if HAS_D else tl.zeros((BLOCK_D,), dtype=tl.float32)
        chunk = (b * n_chunks + c) * d_inner
        carried = tl.load(adjoint_ptr + chunk * BLOCK_N + state_offs, mask=state_mask, other=0.0)  # a_{t+1} g_{t+1}
        dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
        ddelta_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
        rows = b * row_b + d.to(tl.int64) * row_d
        bc_rows = (b * n_groups + g) * stride
        t_start = c * chunk_len
        n_segs = tl.cdiv(tl.minimum(chunk_len, L - t_start), SEG)
        for i in range(n_segs):
            s0 = t_start + (n_segs - 1 - i) * SEG
            n_tiles = tl.cdiv(tl.minimum(SEG, L - s0), T)
            h = tl.load(seg_state_ptr + (b * tl.cdiv(L, SEG) + s0 // SEG) * d_inner * BLOCK_N + state_offs,
                        mask=state_mask, other=0.0)
            _segment_tile_starts(h, scratch_ptr, first_state, s0, n_tiles, delta_ptr, u_ptr, Bt_ptr, A2, bias,
                                 skip, rows, bc_rows, stride, d_mask, L, HAS_SKIP, DELTA_SOFTPLUS, T, BLOCK_D,
                                 BLOCK_N)
            carried, dA, dD, ddelta_bias = _segment_backward(
                carried, dA, dD, ddelta_bias, scratch_ptr, first_state, s0, n_tiles,
                u_ptr, delta_ptr, z_ptr, dout_ptr, Bt_ptr, Ct_ptr, du_ptr, ddelta_ptr, dz_ptr, dBt_ptr, dCt_ptr,
                A2, D, bias, skip, rows, bc_rows, stride, d_mask, L,
                HAS_D, HAS_Z, HAS_SKIP, DELTA_SOFTPLUS, T, BLOCK_D, BLOCK_N)
        tl.store(dA_part_ptr + chunk * BLOCK_N + state_offs, dA, mask=state_mask)
        if HAS_D:
            tl.store(dD_part_ptr + chunk + d, dD, mask=d_mask)
        if HAS_DELTA_BIAS:
            tl.store(ddelta_bias_part_ptr + chunk + d, ddelta_bias, mask=d_mask)
        item = tl.atomic_add(next_item_ptr, 1)


@triton.jit
def _scratch_state(scratch_ptr, k, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers (BLOCK_D, BLOCK_N) to state k of the backward's scratch, where each program owns SEG/T states.
    Each state is stored transposed with rows of BLOCK_D + 1: the compiler then gives every thread all N states
    of its channel (as in the loops) and does not shuffle states between threads at each tile, as it would for a
    plain layout it could vectorise."""
    return (scratch_ptr + k * (BLOCK_N * (BLOCK_D + 1)) + tl.arange(0, BLOCK_D)[:, None]
            + tl.arange(0, BLOCK_N)[None, :] * (BLOCK_D + 1))


@triton.jit
def _segment_tile_starts(h, scratch_ptr, first_state, s0, n_tiles, delta_ptr, u_ptr, Bt_ptr, A2, bias, skip,
                         rows, bc_rows, stride, d_mask, L, HAS_SKIP: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
                         T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The segment forwards from its saved state h: the state at the start of each of its tiles to the scratch."""
    n = tl.arange(0, BLOCK_N)
    t = s0 + tl.arange(0, T)
    delta_next = _load_tile(delta_ptr, rows, t, d_mask, stride)
    u_next = _load_tile(u_ptr, rows, t, d_mask, stride)
    for k in range(n_tiles):
        tl.store(_scratch_state(scratch_ptr, first_state + k, BLOCK_D, BLOCK_N), h)
        t = s0 + k * T + tl.arange(0, T)
        delta_raw, u_raw = delta_next, u_next
        delta_next = _load_tile(delta_ptr, rows, t + T, d_mask, stride)            # the next tile
        u_next = _load_tile(u_ptr, rows, t + T, d_mask, stride)
        delta, _ = _delta(delta_raw, bias, skip, (t < L)[None, :], HAS_SKIP, DELTA_SOFTPLUS)
        du = delta * u_raw.to(tl.float32)
        bc_tile = (bc_rows + s0 + k * T) * BLOCK_N + n
        for j in tl.static_range(T):
            h = _step(h, A2, _token(delta, j, T), _token(du, j, T), tl.load(Bt_ptr + bc_tile + j * BLOCK_N))


@triton.jit
def _segment_backward(carried, dA, dD, ddelta_bias, scratch_ptr, first_state, s0, n_tiles,
                      u_ptr, delta_ptr, z_ptr, dout_ptr, Bt_ptr, Ct_ptr, du_ptr, ddelta_ptr, dz_ptr, dBt_ptr, dCt_ptr,
                      A2, D, bias, skip, rows, bc_rows, stride, d_mask, L,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SKIP: tl.constexpr,
                      DELTA_SOFTPLUS: tl.constexpr, T: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The segment's tiles from the last to the first. Each tile runs forwards from its start state (scratch) to
    keep its T states in registers, then backwards through its tokens carrying the adjoint. Returns the adjoint
    carried into the segment before, and the running sums of ∂A, ∂D, ∂delta_bias."""
    n = tl.arange(0, BLOCK_N)
    t = s0 + (n_tiles - 1) * T + tl.arange(0, T)
    delta_next = _load_tile(delta_ptr, rows, t, d_mask, stride)
    u_next = _load_tile(u_ptr, rows, t, d_mask, stride)
    dout_next = _load_tile(dout_ptr, rows, t, d_mask, stride)
    z_next = _load_tile(z_ptr, rows, t, d_mask, stride) if HAS_Z else dout_next
    for k_rev in range(n_tiles):
        k = n_tiles - 1 - k_rev
        t0 = s0 + k * T
        t = t0 + tl.arange(0, T)
        in_sequence = (t < L)[None, :]
        delta_raw, u_raw, dout_raw, z_raw = delta_next, u_next, dout_next, z_next
        delta_next = _load_tile(delta_ptr, rows, t - T, d_mask, stride)            # the tile before this one
        u_next = _load_tile(u_ptr, rows, t - T, d_mask, stride)
        dout_next = _load_tile(dout_ptr, rows, t - T, d_mask, stride)
        if HAS_Z:
            z_next = _load_tile(z_ptr, rows, t - T, d_mask, stride)

        delta, delta_pre = _delta(delta_raw, bias, skip, in_sequence, HAS_SKIP, DELTA_SOFTPLUS)
        u = u_raw.to(tl.float32)
        du = delta * u
        dout = dout_raw.to(tl.float32)
        dy = dout                                                                   # ∂y_t
        if HAS_Z:
            silu_z, dsilu_z = _silu_and_derivative(z_raw.to(tl.float32))
            dy = dout * silu_z
        # the tile forwards from its start state: states[j] is h before token j. On the way, ∂C_t = Σ_d dy_t h_t
        # and y_t (for ∂z).
        h = tl.load(_scratch_state(scratch_ptr, first_state + k, BLOCK_D, BLOCK_N))
        states = ()
        y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        bc_tile = (bc_rows + t0) * BLOCK_N + n                     # B_t, C_t of the tile's first token
        for j in tl.static_range(T):
            bc_offs = bc_tile + j * BLOCK_N
            states = states + (h,)
            h = _step(h, A2, _token(delta, j, T), _token(du, j, T), tl.load(Bt_ptr + bc_offs))
            C_j = tl.load(Ct_ptr + bc_offs)
            y = _set_token(y, j, tl.sum(h * C_j[None, :], axis=1), T)
            tl.atomic_add(dCt_ptr + bc_offs, tl.sum(_token(dy, j, T)[:, None] * h, axis=0), sem="relaxed")
        if HAS_Z:
            if HAS_D:
                y += D[:, None] * u
            _store_tile(dz_ptr, rows, t, d_mask, stride, dout * y * dsilu_z)
        # backwards through the tile's tokens
        du_tile = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        ddelta_tile = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        for j in tl.static_range(T - 1, -1, -1):
            bc_offs = bc_tile + j * BLOCK_N
            B_j = tl.load(Bt_ptr + bc_offs)
            C_j = tl.load(Ct_ptr + bc_offs)
            delta_j = _token(delta, j, T)
            dy_j = _token(dy, j, T)
            a = tl.exp2(A2 * delta_j[:, None])                                      # a_t
            adjoint = carried + dy_j[:, None] * C_j[None, :]                        # g_t
            decayed = a * states[j]                                                 # a_t h_{t-1}
            g_decayed = adjoint * decayed
            gB = tl.sum(adjoint * B_j[None, :], axis=1)                             # Σ_n g_t B_t
            du_tile = _set_token(du_tile, j, delta_j * gB + D * dy_j, T)
            ddelta_tile = _set_token(ddelta_tile, j, _token(u, j, T) * gB +
                                     LN2 * tl.sum(A2 * g_decayed, axis=1), T)        # A = A2·ln(2)
            dA += delta_j[:, None] * g_decayed
            tl.atomic_add(dBt_ptr + bc_offs, tl.sum(adjoint * _token(du, j, T)[:, None], axis=0), sem="relaxed")
            carried = a * adjoint                                                   # a_t g_t
        if DELTA_SOFTPLUS:
            ddelta_tile *= tl.sigmoid(delta_pre)                                    # softplus' = sigmoid
        ddelta_tile = tl.where(in_sequence, ddelta_tile, 0.0)
        _store_tile(du_ptr, rows, t, d_mask, stride, du_tile)
        _store_tile(ddelta_ptr, rows, t, d_mask, stride, ddelta_tile)
        dD += tl.sum(dy * u, axis=1)
        ddelta_bias += tl.sum(ddelta_tile, axis=1)
    return carried, dA, dD, ddelta_bias


# ----------------------------------------------------------------------------------------------------------
# The operators (forward, backward) and the public entry point


@triton.jit
def _rows_kernel(x_ptr, rows_ptr, L, stride, d_inner, x_stride_b, x_stride_t, row_b, row_d, BLOCK: tl.constexpr):
    """rows[b, d, t] = x[b, t, d] (0 for L <= t < stride), x with channels contiguous: a (token, channel) tile is
    read along channels and written along tokens (the compiler exchanges it through shared memory)."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(2).to(tl.int64)
    x = tl.load(x_ptr + b * x_stride_b + t[:, None].to(tl.int64) * x_stride_t + d[None, :],
                mask=(t[:, None] < L) & (d[None, :] < d_inner), other=0.0)
    tl.store(rows_ptr + b * row_b + d[None, :].to(tl.int64) * row_d + t[:, None], x,
             mask=(t[:, None] < stride) & (d[None, :] < d_inner))


def _alloc(*shape, dtype, device):
    """Every buffer a kernel writes in full is allocated here, uninitialised. The tests fill them with NaN
    instead, so an element a kernel forgets to write shows up as a failure."""
    return torch.empty(shape, dtype=dtype, device=device)


def _sms(device):
    """The GPU's SM count, or its stand-in in the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS


def _chunk_len(batch, d_inner, L, device, num_warps, warps_per_sm):
    """Tokens per chunk, a multiple of SEG: as few chunks as give every SM `warps_per_sm` warps' worth of
    work items (one chunk when batch and channels alone already do)."""
    sms = _sms(device)
    programs = batch * triton.cdiv(d_inner, 32 * num_warps)
    n_chunks = max(1, min(triton.cdiv(sms * warps_per_sm, programs * num_warps), triton.cdiv(L, SEG)))
    return SEG * triton.cdiv(triton.cdiv(L, n_chunks), SEG)


def _row_len(L):
    """Tokens per stored row: L rounded up to a multiple of 8, so that every row starts 16-byte aligned."""
    return triton.cdiv(L, 8) * 8


def _channels_first(u):
    """Whether u (batch, d_inner, L) is a view of a (d_inner, batch·L) matrix, as the model's projections write
    it, with L a multiple of 8 and batch > 1 (for one sequence the two layouts are the same). Then the scan's rows
    are such a matrix; otherwise they are (batch, d_inner, stride) contiguous, zero-padded."""
    batch, d_inner, L = u.shape
    return batch > 1 and L % 8 == 0 and u.stride() == (L, batch * L, 1)


def _layout(u):
    """The rows of u's scan: (stride, row_b, row_d), row (b, d) starting at element b·row_b + d·row_d."""
    batch, d_inner, L = u.shape
    if _channels_first(u):
        return L, L, batch * L
    stride = _row_len(L)
    return stride, d_inner * stride, stride


def _new_rows(u, dtype):
    """An uninitialised (batch, d_inner, stride) tensor in the rows of u's scan."""
    batch, d_inner, L = u.shape
    if _channels_first(u):
        return _alloc(d_inner, batch, L, dtype=dtype, device=u.device).transpose(0, 1)
    return _alloc(batch, d_inner, _row_len(L), dtype=dtype, device=u.device)


def _rows(x, u):
    """x (batch, d_inner, L) in the rows of u's scan, 16-byte aligned: x itself when it already is, else a copy
    (zero-padded). A sequence stored across channels, (b, l, ·) as a projection writes it, is copied too: read
    in place, a tile no longer sits in one thread's registers and the forward is several times slower than the
    copy."""
    if x is None:
        return None
    stride, row_b, row_d = _layout(u)
    batch, d_inner, L = x.shape
    in_place = x.shape[2] == stride and x.stride(2) == 1 and x.data_ptr() % 16 == 0 and \
        all(n == 1 or have == want for n, have, want in zip(x.shape, x.stride(), (row_b, row_d)))
    if in_place:
        return x
    rows = _new_rows(u, x.dtype)
    if x.stride(1) == 1:  # channels contiguous: a tiled transpose, both sides read and written in whole lines
        grid = (triton.cdiv(stride, ROWS_BLOCK), triton.cdiv(d_inner, ROWS_BLOCK), batch)
        _rows_kernel[grid](x, rows, L, stride, d_inner, x.stride(0), x.stride(2), row_b, row_d, BLOCK=ROWS_BLOCK)
    else:
        rows[..., :L] = x
        rows[..., L:] = 0
    return rows


def _transposed(M, stride, block_n):
    """(batch, G, N, L) -> (batch, G, stride, BLOCK_N) float32, zero-padded: B_t, C_t become contiguous rows,
    and a tile running past L reads zeros without a mask. One copy kernel when there is nothing to pad."""
    padded = M.shape[3] != stride or M.shape[2] != block_n
    out = (torch.zeros if padded else torch.empty)(*M.shape[:2], stride, block_n, dtype=torch.float32,
                                                    device=M.device)
    out[..., :M.shape[3], :M.shape[2]] = M.transpose(2, 3)
    return out


def _prepare(u, delta, A, B, C, z):
    """The kernels' layouts: u, Δ, z as rows of `stride` tokens, A·log2(e) padded to BLOCK_N states, B and C
    transposed to (batch, G, stride, BLOCK_N) float32."""
    L, d_state = u.shape[-1], A.shape[1]
    block_n, stride = triton.next_power_of_2(d_state), _row_len(L)
    A2 = A * math.log2(math.e)                                         # exp(x A) = exp2(x A2)
    A2 = torch.nn.functional.pad(A2, (0, block_n - d_state)) if block_n != d_state else A2.contiguous()
    return (_rows(u, u), _rows(delta, u), A2, _transposed(B, stride, block_n), _transposed(C, stride, block_n),
            _rows(z, u))


def _launch(u, n_groups, num_warps, warps_per_sm):
    """A pass's launch geometry for u (batch, d_inner, L): (grid, the kernels' size arguments, n_chunks, BLOCK_D)."""
    batch, d_inner, L = u.shape
    chunk_len = _chunk_len(batch, d_inner, L, u.device, num_warps, warps_per_sm)
    n_chunks, block_d = triton.cdiv(L, chunk_len), 32 * num_warps
    grid = (n_groups * triton.cdiv(d_inner // n_groups, block_d), n_chunks, batch)
    return grid, (L, *_layout(u), d_inner, d_inner // n_groups, n_groups, chunk_len), n_chunks, block_d


def _nothing(like):
    return like.new_empty(0)  # an operator cannot return None: an absent gradient or buffer is an empty tensor


# The forward and the backward are registered as PyTorch operators (torch.library.custom_op), so that
# torch.compile can compile the model around them: it sees one opaque operator with known output shapes instead
# of tracing into the kernel launches. Both make the padded rows and transposed B, C from their inputs: autograd
# then keeps the tensors the layer keeps anyway (views of them), not copies, and the copies are small next to
# the scan. Their outputs are laid out as u's rows (`_layout`): the fake (shape-only) functions that tell the
# compiler so rely on it passing the operators the strides it traced (the needs_exact_strides tag).

@torch.library.custom_op("mamba_triton::scan_fwd", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
              skip_below: torch.Tensor | None, delta_softplus: bool,
              save_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, delta, z (batch, d_inner, L); B, C (batch, G, N, L). Returns out (batch, d_inner, stride) in the rows of
    u's scan (`_layout`; the first L tokens are the output), last_state (batch, d_inner, BLOCK_N), and the states
    every SEG tokens the backward starts from (empty unless save_states)."""
    batch, d_inner, L = u.shape
    n_groups = B.shape[1]
    grid, sizes, n_chunks, block_d = _launch(u, n_groups, FWD_WARPS, FWD_WARPS_PER_SM)
    out = _new_rows(u, u.dtype)
    u, delta, A2, Bt, Ct, z = _prepare(u, delta, A, B, C, z)
    block_n = Bt.shape[-1]
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
                 HAS_SKIP=skip_below is not None, DELTA_SOFTPLUS=delta_softplus, SEG=SEG, T=FWD_T, STAGES=FWD_STAGES,
                 BLOCK_D=block_d, BLOCK_N=block_n, num_warps=FWD_WARPS)

    chunk_states = None
    if n_chunks > 1:  # passes 1 and 2
        chunk_states = _alloc(batch, n_chunks, d_inner, block_n, dtype=torch.float32, device=u.device)
        delta_sums = _alloc(batch, n_chunks, d_inner, dtype=torch.float32, device=u.device)
        _scan_fwd_kernel[grid](u, delta, z, None, A2, Bt, Ct, D, delta_bias, skip_below, chunk_states, delta_sums,
                               None, None, *sizes, STATES_ONLY=True, FROM_CHUNK_STATE=False, SAVE_SEGMENTS=False,
                               **flags)
        _carry(chunk_states, delta_sums, A2, None, False)
    last_state = _alloc(batch, d_inner, block_n, dtype=torch.float32, device=u.device)
    seg_states = (_alloc(batch, triton.cdiv(L, SEG), d_inner, block_n, dtype=torch.float32, device=u.device)
                  if save_states else _nothing(last_state))
    _scan_fwd_kernel[grid](u, delta, z, out, A2, Bt, Ct, D, delta_bias, skip_below, chunk_states, None,
                           seg_states if save_states else None, last_state, *sizes, STATES_ONLY=False,
                           FROM_CHUNK_STATE=n_chunks > 1, SAVE_SEGMENTS=save_states, **flags)
    return out, last_state, seg_states


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, skip_below, delta_softplus, save_states):
    batch, d_inner, L = u.shape
    block_n = triton.next_power_of_2(A.shape[1])
    f32 = dict(dtype=torch.float32)
    seg_states = (u.new_empty(batch, triton.cdiv(L, SEG), d_inner, block_n, **f32) if save_states
                  else u.new_empty(0, **f32))
    return _new_rows(u, u.dtype), u.new_empty(batch, d_inner, block_n, **f32), seg_states


@torch.library.custom_op("mamba_triton::scan_bwd", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
              skip_below: torch.Tensor | None, seg_states: torch.Tensor, dout: torch.Tensor, dlast: torch.Tensor | None,
              delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each of its input's shape (du, ddelta, dz
    (batch, d_inner, stride), in the rows of u's scan); an empty tensor for an absent D, z or delta_bias."""
    batch, d_inner, L = u.shape
    n_groups, d_state = B.shape[1], B.shape[2]
    grid, sizes, n_chunks, block_d = _launch(u, n_groups, BWD_WARPS, BWD_WARPS_PER_SM)
    du = _new_rows(u, u.dtype)
    ddelta = _new_rows(u, delta.dtype)
    dz = _nothing(u) if z is None else _new_rows(u, z.dtype)
    dout = _rows(dout, u)
    u, delta, A2, Bt, Ct, z = _prepare(u, delta, A, B, C, z)
    block_n = Bt.shape[-1]
    flags = dict(HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None, HAS_SKIP=skip_below is not None,
                 DELTA_SOFTPLUS=delta_softplus, T=BWD_T, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=BWD_WARPS)
    adjoints = _alloc(batch, n_chunks, d_inner, block_n, dtype=torch.float32, device=u.device)
    if n_chunks > 1:  # passes 1 and 2 of the adjoint
        delta_sums = _alloc(batch, n_chunks, d_inner, dtype=torch.float32, device=u.device)
        _adjoint_summary_kernel[grid[0], n_chunks - 1, batch](dout, delta, z, A2, Ct, delta_bias, skip_below,
                                                              adjoints, delta_sums, *sizes, **flags)
        _carry(adjoints, delta_sums, A2, dlast, True)
    elif dlast is None:
        adjoints.zero_()
    else:
        adjoints.copy_(dlast[:, None])

    dBt = torch.zeros(Bt.shape, dtype=torch.float32, device=u.device)            # atomic-add targets
    dCt = torch.zeros(Ct.shape, dtype=torch.float32, device=u.device)
    dA_part = _alloc(batch, n_chunks, d_inner, block_n, dtype=torch.float32, device=u.device)
    dD_part = None if D is None else _alloc(batch, n_chunks, d_inner, dtype=torch.float32, device=u.device)
    ddelta_bias_part = (None if delta_bias is None else
                        _alloc(batch, n_chunks, d_inner, dtype=torch.float32, device=u.device))
    resident = INTERPRETER_BWD_PROGRAMS if u.device.type == "cpu" else _sms(u.device) * BWD_PROGRAMS_PER_SM
    programs = min(grid[0] * n_chunks * batch, resident)          # no more programs than work items
    scratch = _alloc(programs, SEG // BWD_T, block_n, block_d + 1, dtype=torch.float32, device=u.device)
    next_item = torch.zeros(1, dtype=torch.int32, device=u.device)
    _scan_bwd_kernel[(programs,)](
        u, delta, z, dout, A2, Bt, Ct, D, delta_bias, skip_below, seg_states, adjoints, scratch, next_item,
        du, ddelta, None if z is None else dz, dBt, dCt, dA_part, dD_part, ddelta_bias_part,
        *sizes, n_chunks, batch, HAS_D=D is not None, SEG=SEG, **flags)
    dA = dA_part.sum((0, 1))[:, :d_state].contiguous()
    dD = _nothing(A) if D is None else dD_part.sum((0, 1)).to(D.dtype)
    ddelta_bias = _nothing(A) if delta_bias is None else ddelta_bias_part.sum((0, 1)).to(delta_bias.dtype)
    dB = dBt[..., :L, :d_state].transpose(2, 3).to(B.dtype).contiguous()
    dC = dCt[..., :L, :d_state].transpose(2, 3).to(C.dtype).contiguous()
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, skip_below, seg_states, dout, dlast, delta_softplus):
    nothing = A.new_empty(0)
    like = (lambda x: x.new_empty(x.shape))                       # contiguous, as the operator returns them
    return (_new_rows(u, u.dtype), _new_rows(u, delta.dtype), like(A), like(B), like(C),
            nothing if D is None else like(D), u.new_empty(0) if z is None else _new_rows(u, z.dtype),
            nothing if delta_bias is None else like(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, skip_below, delta_softplus, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, skip_below, output[2])
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast, _):
    u, delta, A, B, C, D, z, delta_bias, skip_below, seg_states = ctx.saved_tensors
    assert seg_states.numel(), "the forward ran with save_states=False, so it kept nothing for a backward"
    if dout is None:
        dout = torch.zeros_like(u)
    if dlast is not None:
        dlast = dlast.contiguous()
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = _scan_bwd(u, delta, A, B, C, D, z, delta_bias, skip_below,
                                                            seg_states, dout, dlast, ctx.delta_softplus)
    L = u.shape[-1]
    return (du[..., :L], ddelta[..., :L], dA, dB, dC, None if D is None else dD,
            None if z is None else dz[..., :L], None if delta_bias is None else ddelta_bias, None, None, None)


torch.library.register_autograd("mamba_triton::scan_fwd", _backward, setup_context=_setup_context)


def _carry(states, delta_sums, A2, initial, reverse):
    """Pass 2 on (batch, n_chunks, d_inner, BLOCK_N) `states`, in place."""
    batch, n_chunks, d_inner, block_n = states.shape
    _chunk_carry_kernel[(triton.cdiv(d_inner * block_n, CARRY_BLOCK), batch)](
        states, delta_sums, A2, initial, d_inner, n_chunks, REVERSE=reverse, HAS_INITIAL=initial is not None,
        BLOCK=CARRY_BLOCK, BLOCK_N=block_n, GROUP=CARRY_GROUP, num_warps=CARRY_BLOCK // 32)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, skip_below, delta_softplus):
    """What the kernels cannot take; returns the number of B/C groups."""
    batch, d_inner, L = u.shape
    assert delta.shape == u.shape and (z is None or z.shape == u.shape), "u, delta, z: (batch, d_inner, L)"
    assert A.shape[0] == d_inner and 1 <= A.shape[1] <= 64, "A: (d_inner, d_state), d_state 1 to 64"
    assert B.shape == C.shape and B.shape[0] == batch and B.shape[-2:] == (A.shape[1], L) \
        and (B.dim() == 3 or d_inner % B.shape[1] == 0), "B, C: (batch, d_state, L) or (batch, G, d_state, L)"
    assert all(x is None or x.shape == (d_inner,) for x in (D, delta_bias, skip_below)), \
        "D, delta_bias, skip_below: (d_inner,)"
    assert skip_below is None or delta_softplus, "skip_below needs delta_softplus (skipped: Δ = softplus(-inf))"
    assert u.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", \
        "CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); on a CPU use mamba.selective_scan"
    return 1 if B.dim() == 3 else B.shape[1]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, skip_below=None):
    """The selective scan (see the module docstring), differentiable. Shapes: u, delta, z (B, d_inner, L);
    A (d_inner, N) float32; B, C (B, N, L) or (B, G, N, L); D, delta_bias, skip_below (d_inner,) float32.
    Returns out (B, d_inner, L) in u's dtype, and with return_last_state also h_L (B, d_inner, N) float32.
    skip_below (with delta_softplus): channel c skips token t (Δ := 0) where delta_t + delta_bias ≤ skip_below[c]."""
    n_groups = _check_inputs(u, delta, A, B, C, D, z, delta_bias, skip_below, delta_softplus)
    batch, _, L = u.shape
    grouped = (lambda M: M.reshape(batch, n_groups, M.shape[-2], L))                 # (B, G, N, L), small
    contiguous = (lambda x: None if x is None else x.contiguous())
    # u, delta and z go to the operator as they are and it makes its rows inside (again in the backward): autograd
    # then keeps views of what the layer keeps anyway (the conv's output, in_proj's), not copies
    inputs = (u, delta, A.float(), grouped(B), grouped(C), contiguous(D), z, contiguous(delta_bias),
              contiguous(skip_below))
    save_states = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    out, last_state, _ = _scan_fwd(*inputs, delta_softplus, save_states)
    out, last_state = out[..., :L], last_state[..., :A.shape[1]]
    return (out, last_state) if return_last_state else out
