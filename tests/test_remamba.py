"""remamba.py: region rules, the authors' initialisation, stage-1 selection, the Δ adaptation, generation,
the batched training loss, save/load."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mamba
import remamba
from conftest import small_model
from remamba import ReMamba, compression_region, training_region

VOCAB = 101


def trained_looking(rm, seed=2):
    """Give the new parameters other values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rm.new_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return rm


def ids_of(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def last(ids):
    return torch.full((ids.shape[0],), ids.shape[1] - 1)


# ----------------------------------------------------------------------------------------------------------
# Region rules and initialisation


def test_compression_region_edges():
    assert compression_region(10, 0.1, 0.3, 0.0) == (0, 3, 1)        # ⌈0.3·10⌉ = 3 despite float round-off
    assert compression_region(100, 0.1, 0.3, 0.0) == (0, 30, 3)
    assert compression_region(20, 0.5, 0.4, 0.25) == (5, 13, 4)
    assert compression_region(1, 0.1, 0.3, 0.0) == (0, 0, 0)         # a lone token is never compressed
    assert compression_region(2, 0.1, 0.3, 0.0) == (0, 1, 1)         # region ≥ 1 token, K = ⌈0.1⌉ = 1
    assert compression_region(10, 0.0, 0.3, 0.0) == (0, 3, 0)        # ratio 0: nothing kept
    assert compression_region(10, 1.0, 1.0, 0.0) == (0, 9, 9)        # e clipped to L − 1
    assert compression_region(10, 0.5, 0.3, 0.95) == (9, 9, 0)       # region starts at the last token: empty


def test_training_region_schedule():
    rng, T = np.random.default_rng(0), 512
    ceil = remamba._ceil
    for L in [T - 3, T, 450, 4 * T]:                                  # long prompts: > 0.8·T
        for _ in range(200):
            s, e, K = training_region(L, T, rng)
            assert s == 0 and min(ceil(0.1 * L), L - ceil(0.75 * T)) <= e <= min(ceil(0.3 * L), L - ceil(0.75 * T))
            assert ceil(0.05 * e) <= K <= ceil(0.2 * e)
    for L in [400, 50, 11]:                                           # short prompts: first ⌈0.1·L⌉ tokens
        s, e, K = training_region(L, T, rng)
        assert (s, e) == (0, ceil(0.1 * L)) and 1 <= K <= ceil(0.2 * e)
    assert training_region(2, T, rng) == (0, 1, 1)
    assert training_region(T, T, np.random.default_rng(7)) == training_region(T, T, np.random.default_rng(7))


def test_official_initialisation_copies_layer_0_slices():
    base = small_model()
    rm = ReMamba(base)
    d, w_in, w_out = 32, base.backbone.layers[0].mixer.in_proj.weight, base.backbone.layers[0].mixer.out_proj.weight
    assert torch.equal(rm.K_proj[0].weight, w_in[:d]) and torch.equal(rm.K_proj[2].weight, w_in[d:2 * d])
    assert torch.equal(rm.Q_proj[0].weight, w_in[2 * d:3 * d]) and torch.equal(rm.Q_proj[2].weight, w_in[3 * d:])
    assert torch.equal(rm.V_proj[0].weight, w_out[:, :d]) and torch.equal(rm.V_proj[2].weight, w_out[:, d:])
    assert all(float(p[i].bias.detach().abs().sum()) == 0 for p in (rm.Q_proj, rm.K_proj, rm.V_proj) for i in (0, 2))
    assert float(rm.ret_bias.detach().abs().sum()) == 0
    assert float(ReMamba(base, init="zero_v").V_proj[2].weight.detach().abs().sum()) == 0
    assert len(rm.new_parameters()) == 13


# ----------------------------------------------------------------------------------------------------------
# Stage 1


def identity_projections(rm):
    """Q_proj = K_proj = SiLU: both Linears the identity, so score_i = cos(SiLU(H_i), SiLU(H_q))."""
    with torch.no_grad():
        for proj in (rm.Q_proj, rm.K_proj):
            for linear in (proj[0], proj[2]):
                linear.weight.copy_(torch.eye(linear.weight.shape[0]))
                linear.bias.zero_()


@torch.no_grad()
def test_select_on_hand_made_hidden_states():
    d = 8
    rm = ReMamba(small_model(d_model=d))
    identity_projections(rm)
    L, region = 10, compression_region(10, 0.5, 0.6, 0.2)
    assert region == (2, 8, 3)
    e0, e1 = torch.eye(d)[0], torch.eye(d)[1]
    angle = lambda t: 4 * (torch.cos(torch.tensor(t)) * e0 + torch.sin(torch.tensor(t)) * e1)  # noqa: E731
    H = torch.randn(2, L, d) * 5                       # outside the region: anything, it must not be chosen
    H[:, L - 1] = 4 * e0                               # the query
    H[:, 0] = H[:, 1] = 4 * e0                         # identical to the query, but before the region
    for p, t in zip(range(2, 8), [1.4, 0.3, 1.2, 0.6, 1.5, 0.0]):
        H[0, p] = angle(t)                             # batch 0: position 7 identical to the query
    H[1, 2:8] = -4 * e0                                # batch 1: mostly opposite (cos = −1)
    H[1, 2] = -4 * e0 + 0.5 * e1                       # still negative, but the third best
    H[1, 4], H[1, 6] = angle(0.2), angle(0.9)
    kept, w = rm.select(H, region, last(H))
    assert kept.tolist() == [[3, 5, 7], [2, 4, 6]]     # top-3 by score, re-sorted by position
    expected = F.relu(F.cosine_similarity(F.silu(H.gather(1, kept[..., None].expand(-1, -1, d))),
                                          F.silu(H[:, L - 1:]), dim=-1))
    assert torch.allclose(w, expected, atol=1e-6)
    assert float(w[0, 2]) == pytest.approx(1.0, abs=1e-6) and float(w[1, 0]) == 0.0
    assert rm.select(H, (2, 8, 1), last(H))[0].tolist() == [[7], [4]]
    # another query position per sample: batch 0 asks with H[1] (= e0), batch 1 with H[0] (= e0) too
    assert rm.select(H, region, torch.tensor([1, 0]))[0].tolist() == [[3, 5, 7], [2, 4, 6]]


# ----------------------------------------------------------------------------------------------------------
# Stage 2


def test_no_compression_is_the_plain_model():
    base = small_model()
    ids = ids_of(2, 12)
    rm = trained_looking(ReMamba(base, ratio=0.0))
    logits, _ = rm.prefill(ids)
    assert torch.equal(logits, base.prefill(ids)[0])
    assert torch.equal(rm.generate(ids, max_new_tokens=4), base.generate(ids, max_new_tokens=4))


def test_zero_v_compressed_states_are_blank_tokens():
    base = small_model()
    rm = ReMamba(base, init="zero_v")
    ids = ids_of(1, 40)
    s, e, K = compression_region(40)
    embeds, adapt, kept = rm._stage2(ids, (s, e, K), last(ids))
    with base.hooked(adapt):
        logits = base(inputs_embeds=embeds)
    assert logits.shape == (1, s + K + 40 - e, 104) and kept.shape == (1, K)
    # a zero token stays zero through every layer (RMSNorm(0) = 0, the gate SiLU(in_proj(0)) = 0): logits 0
    assert torch.equal(logits[:, s:s + K], torch.zeros_like(logits[:, s:s + K]))


def test_delta_changes_only_at_compressed_positions_in_every_layer():
    n_layer = 3
    base = small_model(n_layer=n_layer)
    rm = trained_looking(ReMamba(base))
    ids = ids_of(2, 20)
    region = (5, 13, 4)
    embeds, adapt, kept = rm._stage2(ids, region, last(ids))
    _, w = rm.select(base.hidden_states(ids), region, last(ids))
    assert (w > 0).any()
    calls = []

    def recorder(layer_idx, dt, dt_bias):
        out = adapt(layer_idx, dt, dt_bias)
        calls.append((layer_idx, dt.detach(), mamba.delta_of(dt, dt_bias).detach(),
                      mamba.delta_of(out, dt_bias).detach()))
        return out

    with base.hooked(recorder):
        base(inputs_embeds=embeds)
    s, e, K = region
    assert [c[0] for c in calls] == list(range(n_layer))
    for layer_idx, dt, delta_in, delta_out in calls:
        assert delta_out.shape == (2, 64, s + K + 20 - e)
        outside = torch.cat([delta_out[..., :s], delta_out[..., s + K:]], -1)
        assert torch.equal(outside, torch.cat([delta_in[..., :s], delta_in[..., s + K:]], -1))
        mixer = base.backbone.layers[layer_idx].mixer
        expected = F.softplus(dt[..., s:s + K] * w[:, None] + rm.ret_bias[layer_idx].detach()[:, None]
                              + mixer.dt_proj.bias.detach()[:, None])
        assert torch.allclose(delta_out[..., s:s + K], expected, atol=1e-6)


def test_generate_decodes_from_stage_2_and_restores_the_hook():
    base = small_model()
    rm = trained_looking(ReMamba(base))
    ids = ids_of(2, 30, seed=3)
    sentinel_calls = []
    sentinel = lambda i, dt, dt_bias: sentinel_calls.append(i) or dt  # noqa: E731
    with base.hooked(sentinel):
        new = rm.generate(ids, max_new_tokens=6)
        logits, caches = rm.prefill(ids)
        assert base.hook is sentinel and sentinel_calls == []      # ReMamba replaces it during both stages
    with base.hooked(None):
        assert torch.equal(new, base.decode(logits, caches, 6))       # decoding steps keep their own Δ
    kept = rm.kept                                                 # what the last prefill's stage 1 kept
    assert kept.shape == (2, compression_region(30)[2]) and int(kept.max()) < compression_region(30)[1]


# ----------------------------------------------------------------------------------------------------------
# Training


def test_training_loss_is_the_weighted_cross_entropy_of_stage_2():
    base = small_model()
    rm = trained_looking(ReMamba(base))
    ids = ids_of(3, 41)                                                # prompts of 34, 35, 35 tokens, then answers
    prompt_lengths = torch.tensor([34, 35, 35])
    weights = torch.zeros(3, 40)
    for i, a in enumerate(prompt_lengths.tolist()):
        weights[i, a - 1:] = torch.arange(1.0, 41 - a + 1)
    region = (0, 8, 2)
    loss = rm.training_loss(ids, weights, prompt_lengths, region)
    expected = []
    for i, a in enumerate(prompt_lengths.tolist()):   # one sample at a time: its prompt's last token is the query
        embeds, adapt, _ = rm._stage2(ids[i:i + 1, :-1], region, torch.tensor([a - 1]))
        with base.hooked(adapt):
            logits = base(inputs_embeds=embeds)[0, 2:]                 # positions 8 .. 39
        ce = F.cross_entropy(logits, ids[i, 9:], reduction="none")
        expected.append((ce * weights[i, 8:]).sum() / weights[i, 8:].sum())
    assert torch.allclose(loss, torch.stack(expected).mean(), rtol=1e-5)


def test_gradients_reach_the_new_parameters_and_optionally_the_base():
    base = small_model()
    rm = trained_looking(ReMamba(base))
    ids, weights = ids_of(2, 41), torch.zeros(2, 40)
    weights[:, 34:] = 1
    base.requires_grad_(False)
    rm.training_loss(ids, weights, torch.tensor([35, 35]), (0, 6, 2)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rm.new_parameters())
    assert all(p.grad is None for p in base.parameters())
    base.requires_grad_(True)
    rm.training_loss(ids, weights, torch.tensor([35, 35]), (0, 6, 2)).backward()
    for name, p in base.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------------------
# Save / load


def test_save_load_round_trip(tmp_path):
    base = small_model()
    rm = trained_looking(ReMamba(base, ratio=0.2, compress_ratio=0.5, start_ratio=0.1))
    rm.save(str(tmp_path / "remamba.pt"))
    loaded = ReMamba.load(base, str(tmp_path / "remamba.pt"))
    assert (loaded.ratio, loaded.compress_ratio, loaded.start_ratio) == (0.2, 0.5, 0.1)
    for a, b in zip(loaded.new_parameters(), rm.new_parameters()):
        assert torch.equal(a, b)
    assert not any(k.startswith("base.") for k in torch.load(tmp_path / "remamba.pt")["state_dict"])
    ids = ids_of(1, 30)
    assert torch.equal(loaded.generate(ids, 4), rm.generate(ids, 4))


def test_a_file_for_another_model_is_refused(tmp_path):
    ReMamba(small_model(d_model=16)).save(str(tmp_path / "narrow.pt"))
    with pytest.raises(ValueError, match="narrow.pt: not ReMamba parameters for this model"):
        ReMamba.load(small_model(), str(tmp_path / "narrow.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt: not ReMamba parameters"):
        ReMamba.load(small_model(), str(tmp_path / "garbage.pt"))
