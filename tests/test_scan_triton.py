"""scan_triton.py: forward and every gradient against mamba.selective_scan_ref, in Triton's CPU interpreter.

Segments of 8 tokens (the kernels' default is 64), so that small shapes already span several segments, tiles
and, where a test asks for it, several chunks; the carry pass loads chunk summaries in groups of 2 (default 16),
so that 3 chunks span a full and a partial group. Every buffer a kernel should write in full starts as NaN, so an
element it skips fails the comparison. Inputs are fresh random numbers on every run; the seed is in the failure
message.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

import mamba
from conftest import rel_err, small_model
import scan_triton

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def small_segments_and_poisoned_outputs(monkeypatch):
    monkeypatch.setattr(scan_triton, "SEG", 8)
    monkeypatch.setattr(scan_triton, "CARRY_GROUP", 2)
    monkeypatch.setattr(scan_triton, "_alloc",
                        lambda *shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def use_chunks(monkeypatch, chunked):
    """Chunks of 2 segments (16 tokens: passes 1 to 3 in both directions), or the whole sequence as one."""
    chunk_len = (lambda batch, d_inner, L, *_: 16) if chunked else (lambda batch, d_inner, L, *_: 8 * (-(-L // 8)))
    monkeypatch.setattr(scan_triton, "_chunk_len", chunk_len)


def make_inputs(seed, batch, d_inner, d_state, L, groups=None, D=True, z=True, delta_bias=True, softplus=True,
                dtype=torch.float32):
    """Mamba-like magnitudes: A = -exp(·) spread over [-N, -1/2]; Δ small and positive (without softplus,
    delta and delta_bias are positive themselves, else the state would grow without bound)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    bc_shape = (batch, d_state, L) if groups is None else (batch, groups, d_state, L)
    delta = r(batch, d_inner, L) * 0.5 - 1.0 if softplus else torch.rand(batch, d_inner, L, generator=g) * 0.3
    x = dict(u=r(batch, d_inner, L).to(dtype), delta=delta.to(dtype),
             A=-torch.exp(torch.rand(d_inner, d_state, generator=g) * torch.log(torch.tensor(2.0 * d_state))) / 2,
             B=r(*bc_shape).to(dtype), C=r(*bc_shape).to(dtype),
             D=r(d_inner) if D else None, z=r(batch, d_inner, L).to(dtype) if z else None,
             delta_bias=(r(d_inner) * 0.5 if softplus else torch.rand(d_inner, generator=g) * 0.1) if delta_bias
             else None)
    return {k: None if v is None else v.requires_grad_() for k, v in x.items()}


def run_both(x, softplus, return_last_state, seed, keep_strides=False):
    """Forward and backward through both scans with the same random output gradients; returns
    ([out, last_state?], {name: grad}) for each. keep_strides: the inputs' copies keep their strides, those
    of slices included (clone would make them dense)."""
    results = []
    g = torch.Generator().manual_seed(seed + 1)
    cotangents = None
    for scan in (scan_triton.selective_scan, mamba.selective_scan_ref):
        copy = (lambda v: torch.empty_strided(v.shape, v.stride()).copy_(v)) if keep_strides else torch.clone
        inputs = {k: None if v is None else copy(v.detach()).requires_grad_() for k, v in x.items()}
        outs = scan(**inputs, delta_softplus=softplus, return_last_state=return_last_state)
        outs = list(outs) if return_last_state else [outs]
        if cotangents is None:
            cotangents = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, cotangents)
        results.append((outs, {k: v.grad for k, v in inputs.items() if v is not None}))
    return results


CASES = {  # name: (batch, d_inner, d_state, L, groups, D, z, delta_bias, softplus, return_last_state)
    "all options, odd L over 3 chunks": (2, 4, 16, 37, None, True, True, True, True, True),
    "L = 1": (1, 4, 16, 1, None, True, True, True, True, True),
    "batch 3, plain": (3, 4, 16, 13, None, False, False, False, False, False),
    "L a multiple of the chunk (no padding)": (1, 4, 16, 32, None, True, True, True, True, True),
    "5 chunks, d_state 64: the carry spans 2 programs and 3 groups": (2, 3, 64, 70, None, True, True, True, True,
                                                                      True),
    "d_state 64": (2, 3, 64, 19, None, True, True, True, True, True),
    "d_state 10 (not a power of 2)": (1, 3, 10, 21, None, True, False, True, True, True),
    "grouped B, C": (2, 8, 16, 23, 2, True, True, True, True, True),
    "70 channels: 3 blocks of 32, the last partial": (1, 70, 4, 11, None, True, True, True, True, True),
    "groups of 35 channels: blocks do not straddle groups": (1, 70, 4, 9, 2, True, True, False, True, False),
    "D and z only": (1, 5, 16, 17, None, True, True, False, False, False),
    "softplus without bias": (1, 4, 16, 9, None, False, False, False, True, True),
    "bias without softplus": (2, 4, 16, 25, None, False, True, True, False, False),
}


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "one chunk"])
@pytest.mark.parametrize("case", CASES)
def test_float32_forward_and_gradients_match_reference(case, chunked, monkeypatch):
    use_chunks(monkeypatch, chunked)
    batch, d_inner, d_state, L, groups, D, z, delta_bias, softplus, return_last_state = CASES[case]
    seed = torch.seed() % 2**31
    x = make_inputs(seed, batch, d_inner, d_state, L, groups, D, z, delta_bias, softplus)
    (outs, grads), (ref_outs, ref_grads) = run_both(x, softplus, return_last_state, seed)
    assert outs[0].dtype == torch.float32 and outs[0].shape == (batch, d_inner, L)
    for o, ref in zip(outs, ref_outs):
        assert rel_err(o, ref) <= 1e-5, f"{case}: forward rel err {rel_err(o, ref):.2e} (seed {seed})"
    if return_last_state:
        assert outs[1].dtype == torch.float32 and outs[1].shape == (batch, d_inner, d_state)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].shape == x[name].shape
        err = rel_err(grads[name], ref_grads[name])
        assert err <= 1e-4, f"{case}: d{name} rel err {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs_match_reference_within_output_rounding(dtype, bound, monkeypatch):
    """Both scans read the same rounded inputs and accumulate in float32, so they differ only by how what
    they return is rounded: at most 2^-8 relative per element for bfloat16, 2^-11 for float16, twice that
    where Triton's interpreter truncates to bfloat16 instead of rounding (the GPU rounds). Measured norm
    errors: ~4.5e-3 bfloat16, < 1e-5 float16; bounds 1e-2 and 2e-3."""
    use_chunks(monkeypatch, True)
    seed = torch.seed() % 2**31
    x = make_inputs(seed, 2, 4, 16, 29, groups=None, dtype=dtype)
    (outs, grads), (ref_outs, ref_grads) = run_both(x, True, True, seed)
    assert outs[0].dtype == dtype and outs[1].dtype == torch.float32
    for o, ref in zip(outs, ref_outs):
        assert rel_err(o, ref) <= bound, f"forward rel err {rel_err(o, ref):.2e} (seed {seed})"
    for name in GRAD_NAMES:
        assert grads[name].dtype == x[name].dtype
        err = rel_err(grads[name], ref_grads[name])
        assert err <= bound, f"d{name} rel err {err:.2e} (seed {seed})"


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "one chunk"])
def test_gradient_through_last_state_only(chunked, monkeypatch):
    """The output is unused: its gradient arrives as None and the adjoint starts from ∂loss/∂h_L alone."""
    use_chunks(monkeypatch, chunked)
    seed = torch.seed() % 2**31
    x = make_inputs(seed, 1, 4, 16, 27)
    grads = []
    for scan in (scan_triton.selective_scan, mamba.selective_scan_ref):
        inputs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        _, last_state = scan(**inputs, delta_softplus=True, return_last_state=True)
        last_state.pow(2).sum().backward()
        grads.append(inputs)
    for name in ("u", "delta", "A", "B", "delta_bias"):
        err = rel_err(grads[0][name].grad, grads[1][name].grad)
        assert err <= 1e-4, f"d{name} rel err {err:.2e} (seed {seed})"
    for name in ("C", "D", "z"):  # they only reach the output
        assert grads[0][name].grad.abs().max() == 0


def test_the_backward_scratch_is_one_per_launched_program_not_one_per_work_item(monkeypatch):
    """27 work items (3 batch elements × 3 channel blocks × 3 chunks), 3 programs: the scratch is allocated for
    the 3 programs, not the 27 items. The interpreter runs programs one after another, so the first takes every
    item and reuses its scratch from one item to the next, which must not change a gradient; programs running
    at once, each with its own scratch, are tested on a GPU (test_cuda.py)."""
    use_chunks(monkeypatch, True)
    allocated, poisoned = [], scan_triton._alloc
    monkeypatch.setattr(scan_triton, "_alloc", lambda *shape, **kw: allocated.append(shape) or poisoned(*shape, **kw))
    seed = torch.seed() % 2**31
    x = make_inputs(seed, 3, 70, 4, 37)
    (_, grads), (_, ref_grads) = run_both(x, True, False, seed)
    scratch = [s for s in allocated if len(s) == 4 and s[1:] == (8 // scan_triton.BWD_T, 4, 33)]
    assert scratch == [(scan_triton.INTERPRETER_BWD_PROGRAMS, 8 // scan_triton.BWD_T, 4, 33)]
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-4, f"d{name} (seed {seed})"


@pytest.mark.parametrize("L", [37, 40], ids=["L padded", "L a multiple of 8"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "one chunk"])
@pytest.mark.parametrize("layout", ["channels first", "tokens of channels", "rows"])
def test_the_layouts_a_mamba_layer_passes(layout, chunked, L, monkeypatch):
    """As MambaMixer calls it, every input a view of a (channels, batch·L) matrix (u, z slices of one, as in_proj
    writes them; B, C slices of x_proj's output): with L = 40 the operator reads and writes them in place, and its
    output and gradients have that layout too. Or u, z, B, C laid out (batch, L, ·), as a projection of
    (batch, L, ·) tokens writes them; or every input in rows, z a slice along channels of a larger tensor. The
    operator copies what is not in rows of a multiple of 8 tokens (with L = 40 only the layout decides)."""
    use_chunks(monkeypatch, chunked)
    seed = torch.seed() % 2**31
    batch, d_inner = 2, 36                                                     # 36 channels: 2 blocks
    x = {k: v.detach() for k, v in make_inputs(seed, batch, d_inner, 16, L).items()}
    tokens = (lambda t: t.mT.contiguous().mT)                                  # same values, (b, L, ·) storage
    first = (lambda *ts: [m.transpose(0, 1) for m in torch.cat([t.transpose(0, 1) for t in ts]).split(
        [t.shape[1] for t in ts])])                                            # slices of one (Σc, b, L) tensor
    if layout == "channels first":
        x["u"], x["z"] = first(x["u"], x["z"])
        x["delta"], = first(x["delta"])
        _, x["B"], x["C"] = first(torch.randn(batch, 3, L), x["B"], x["C"])
    else:
        x["B"], x["C"] = tokens(x["B"]), tokens(x["C"])
    if layout == "rows":
        x["z"] = torch.cat([x["z"], torch.randn(batch, 3, L)], dim=1)[:, :d_inner]
    elif layout == "tokens of channels":
        x["u"], x["z"] = tokens(x["u"]), torch.cat([x["z"].mT, x["z"].mT], dim=-1)[..., :d_inner].mT
    (outs, grads), (ref_outs, ref_grads) = run_both(x, True, True, seed, keep_strides=True)
    if layout == "channels first" and L == 40:
        assert outs[0].stride() == (L, batch * L, 1) and grads["u"].stride() == (L, batch * L, 1)
    for o, ref in zip(outs, ref_outs):
        assert rel_err(o, ref) <= 1e-5, f"forward rel err {rel_err(o, ref):.2e} (seed {seed})"
    for name in GRAD_NAMES:
        err = rel_err(grads[name], ref_grads[name])
        assert err <= 1e-4, f"d{name} rel err {err:.2e} (seed {seed})"


@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_slices_of_in_projs_output_are_read_in_place(shift, monkeypatch):
    """u and z slices of one (2·d_inner, batch·L) matrix, z starting d_inner·batch·L elements in, as in_proj
    writes them (the layouts test copies its inputs, which drops such offsets). Aligned, nothing is copied into
    rows: the only row buffers made are the outputs (out; ∂u, ∂delta, ∂z). Shifted by one element, every row
    input is copied. Both give the reference's forward and gradients."""
    seed = torch.seed() % 2**31
    batch, d_inner, L = 2, 36, 40
    x = {k: v.detach() for k, v in make_inputs(seed, batch, d_inner, 16, L).items()}
    made = []
    new_rows = scan_triton._new_rows
    monkeypatch.setattr(scan_triton, "_new_rows", lambda u, dtype: made.append(1) or new_rows(u, dtype))
    storage = torch.cat([torch.zeros(shift), torch.cat([x["u"].transpose(0, 1), x["z"].transpose(0, 1)]).flatten()])
    storage.requires_grad_()
    uz = storage[shift:].view(2 * d_inner, batch, L).transpose(0, 1)              # (batch, 2·d_inner, L)
    delta = x["delta"].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    u, z = uz[:, :d_inner], uz[:, d_inner:]
    inputs = dict(x, u=u, z=z, delta=delta)
    out = scan_triton.selective_scan(**inputs, delta_softplus=True)
    dout = torch.randn(d_inner, batch, L).transpose(0, 1)
    grads = torch.autograd.grad(out, (storage, delta), dout)
    ref_inputs = {k: v.clone().requires_grad_() for k, v in dict(x, delta=x["delta"]).items() if v is not None}
    ref = mamba.selective_scan_ref(**ref_inputs, delta_softplus=True)
    ref_grads = torch.autograd.grad(ref, (ref_inputs["u"], ref_inputs["z"], ref_inputs["delta"]), dout)
    du, dz = grads[0][shift:].view(2 * d_inner, batch, L).transpose(0, 1).split(d_inner, dim=1)
    assert rel_err(out, ref) <= 1e-5, f"seed {seed}"
    for got, want in zip((du, dz, grads[1]), ref_grads):
        assert rel_err(got, want) <= 1e-4, f"seed {seed}"
    assert (len(made) == 4) == (shift == 0), made


def test_rows_not_16_byte_aligned_are_copied():
    """delta contiguous with L = 24 (no padding needed) but starting 4 bytes into its storage: only the alignment
    sends it to a copy."""
    seed = torch.seed() % 2**31
    x = {k: v.detach() for k, v in make_inputs(seed, 2, 4, 16, 24).items()}
    x["delta"] = torch.cat([x["delta"].new_zeros(1), x["delta"].flatten()])[1:].view(2, 4, 24)
    assert x["delta"].is_contiguous() and x["delta"].data_ptr() % 16 != 0
    with torch.no_grad():
        out = scan_triton.selective_scan(**x, delta_softplus=True)
        ref = mamba.selective_scan_ref(**x, delta_softplus=True)
    assert rel_err(out, ref) <= 1e-5, f"seed {seed}"


@pytest.mark.parametrize("change", [dict(A=torch.zeros(5, 16)), dict(A=torch.zeros(4, 65)),
                                    dict(B=torch.zeros(2, 16, 8)), dict(z=torch.zeros(2, 4, 8)),
                                    dict(B=torch.zeros(2, 3, 16, 9), C=torch.zeros(2, 3, 16, 9)),
                                    dict(D=torch.zeros(3))])
def test_inputs_the_kernels_cannot_take_are_refused(change):
    x = {k: None if v is None else v.detach() for k, v in make_inputs(0, 2, 4, 16, 9).items()}
    x.update(change)
    with pytest.raises(AssertionError):
        scan_triton.selective_scan(**x)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "one chunk"])
def test_dt_of_minus_infinity_skips_the_token_in_every_scan(chunked, monkeypatch):
    """A method skips a token with dt = -inf: Δ = softplus(-inf) = 0 exactly, so the state passes it unchanged."""
    use_chunks(monkeypatch, chunked)
    x = {k: v.detach() for k, v in make_inputs(3, 2, 4, 16, 37).items()}
    x["delta"][:, 1:, 5:30] = float("-inf")                       # channels 1-3 skip tokens 5 to 29
    delta = torch.where(x["delta"] == float("-inf"), 0.0, torch.nn.functional.softplus(
        x["delta"] + x["delta_bias"][:, None]))
    zero = dict(x, delta=delta, delta_bias=None)
    with torch.no_grad():
        expected = mamba.selective_scan_ref(**zero, return_last_state=True)   # Δ = 0 written out
        for scan in (scan_triton.selective_scan, mamba.selective_scan_chunked, mamba.selective_scan_ref):
            out = scan(**x, delta_softplus=True, return_last_state=True)
            for o, e in zip(out, expected):
                assert torch.isfinite(o).all() and rel_err(o, e) <= 1e-5


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "one chunk"])
def test_skip_below_is_dt_of_minus_infinity_below_the_bound(chunked, monkeypatch):
    """skip_below[c]: channel c skips the tokens with delta + delta_bias <= skip_below[c], as if their delta were
    -inf. Every scan, forward and every gradient (the skipped tokens' ∂delta is 0)."""
    use_chunks(monkeypatch, chunked)
    seed = torch.seed() % 2**31
    x = make_inputs(seed, 2, 36, 16, 37)
    bound = torch.tensor([-float("inf"), float("inf")] + [-1.0, -0.5] * 17)       # keep all, skip all, some
    pre = x["delta"].detach() + x["delta_bias"].detach()[:, None]
    masked = dict(x, delta=torch.where(pre > bound[:, None], x["delta"].detach(), -float("inf")).requires_grad_())
    _, (ref_outs, ref_grads) = run_both(masked, True, True, seed)                   # the reference, dt = -inf
    for scan in (scan_triton.selective_scan, mamba.selective_scan_chunked, mamba.selective_scan_ref):
        inputs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        got = scan(**inputs, delta_softplus=True, return_last_state=True, skip_below=bound)
        g = torch.Generator().manual_seed(seed + 1)                                  # run_both's cotangents
        torch.autograd.backward(got, [torch.randn(o.shape, generator=g) for o in got])
        for o, ref in zip(got, ref_outs):
            assert rel_err(o, ref) <= 1e-5, f"{scan.__name__}: forward (seed {seed})"
        for name in GRAD_NAMES:
            expected = ref_grads[name] if name != "delta" else torch.where(pre > bound[:, None], ref_grads[name], 0)
            err = rel_err(inputs[name].grad, expected)
            assert err <= 1e-4, f"{scan.__name__}: d{name} rel err {err:.2e} (seed {seed})"


def test_compiled_model_around_the_triton_operator_matches_the_pytorch_path(monkeypatch):
    """torch.compile traces the model with the scan as one opaque operator (mamba_triton::scan_fwd/bwd): logits
    and every gradient agree with the eager PyTorch path (float32)."""
    monkeypatch.setattr(scan_triton, "SEG", 64)   # the default: compiled graphs are cached on disk, keyed without it
    model = small_model()
    ids = torch.randint(0, 101, (2, 40))
    grads = []
    for backend, run in (("torch", model), ("triton", torch.compile(model))):
        monkeypatch.setenv("MAMBA_SCAN", backend)
        model.zero_grad()
        logits = run(ids)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (compiled, g_compiled), (eager, g_eager) = grads[1], grads[0]
    assert rel_err(compiled, eager) <= 1e-5
    for name in g_eager:
        assert rel_err(g_compiled[name], g_eager[name]) <= 1e-4, name


def test_compiled_training_on_the_triton_path_recomputes_around_the_scan(monkeypatch):
    """A compiled training forward on the Triton path keeps in_proj's output and the scan's results; the backward
    redoes the conv, the projections and the copies around the scan. Logits equal those of the layer run whole
    (an identity hook turns the recomputation off) bit for bit, gradients to float32 rounding (the two compiled
    graphs may sum the embedding's repeated tokens in another order), and at least 2 (b, l, d_inner) tensors per
    layer fewer are kept."""
    monkeypatch.setenv("MAMBA_SCAN", "triton")
    monkeypatch.setattr(scan_triton, "SEG", 64)   # the default: compiled graphs are cached on disk, keyed without it
    model = small_model()
    ids = torch.randint(0, 101, (2, 40))
    results = []
    for hook in (None, lambda layer_idx, dt, dt_bias: dt):
        torch._dynamo.reset()
        model.zero_grad()
        kept = {}

        def pack(t):  # each storage counted once (views of one tensor are saved as several)
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with model.hooked(hook), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = torch.compile(model)(ids)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        sum(v for k, v in kept.items() if k not in params)))
    (logits, grads, kept), (plain_logits, plain_grads, plain_kept) = results
    assert torch.equal(logits, plain_logits)
    for name in grads:
        assert rel_err(grads[name], plain_grads[name]) <= 1e-6, name
    unit = ids.numel() * model.config.d_inner * 4                                          # float32
    assert kept <= plain_kept - 2 * unit * model.config.n_layer, f"{kept / unit:.2f} vs {plain_kept / unit:.2f}"
