"""remamba.py: region rules, stage-1 selection, the Δ adaptation, generation, training loss, save/load."""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remamba
from mamba import Mamba, MambaConfig
from remamba import ReMamba, compression_region, training_region

VOCAB = 101


def small_model(seed=0, d_model=32, n_layer=2, dtype=torch.float32):
    """A small random Mamba, moved off its fresh init (small Δ, D = 1) so every path is exercised."""
    torch.manual_seed(seed)
    model = Mamba(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, d_state=8)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(dtype)


def trained_looking(rm, seed=2):
    """Give the new parameters non-zero values, as after training (V_proj's last Linear starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return rm


def ids_of(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Region rules


def test_compression_region_edges():
    assert compression_region(10, 0.1, 0.3, 0.0) == (0, 3, 1)        # ⌈0.3·10⌉ = 3 despite float round-off
    assert compression_region(100, 0.1, 0.3, 0.0) == (0, 30, 3)
    assert compression_region(20, 0.5, 0.4, 0.25) == (5, 13, 4)
    assert compression_region(1, 0.1, 0.3, 0.0) == (0, 0, 0)         # a lone token is never compressed
    assert compression_region(2, 0.1, 0.3, 0.0) == (0, 1, 1)         # region ≥ 1 token, K = ⌈0.1⌉ = 1
    assert compression_region(3, 0.1, 0.01, 0.0) == (0, 1, 1)        # ⌈0.03⌉ = 1
    assert compression_region(10, 0.0, 0.3, 0.0) == (0, 3, 0)        # ratio 0: nothing kept
    assert compression_region(10, 1.0, 1.0, 0.0) == (0, 9, 9)        # e clipped to L − 1
    assert compression_region(10, 0.5, 0.3, 0.95) == (9, 9, 0)       # region starts at the last token: empty
    assert compression_region(10, 0.5, 0.3, 0.85) == (8, 9, 1)


def test_training_region_schedule():
    rng = random.Random(0)
    T = 512
    for L in [T - 3, T, 450]:                                         # long prompts: > 0.8·T
        for _ in range(200):
            s, e, K = training_region(L, T, rng)
            assert s == 0
            assert min(_ceil(0.1 * L), L - _ceil(0.75 * T)) <= e <= min(_ceil(0.3 * L), L - _ceil(0.75 * T))
            assert _ceil(0.05 * e) <= K <= _ceil(0.2 * e)
    for L in [400, 50, 11]:                                           # short prompts: first ⌈0.1·L⌉ tokens
        s, e, K = training_region(L, T, rng)
        assert (s, e) == (0, _ceil(0.1 * L)) and 1 <= K <= _ceil(0.2 * e)
    assert training_region(1, T, rng) == (0, 0, 0)
    assert training_region(2, T, rng) == (0, 1, 1)
    draws = [training_region(T, T, random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    numpy_rng = np.random.default_rng(0)                              # a numpy Generator draws the same way
    assert all(training_region(T, T, numpy_rng)[1] <= T - _ceil(0.75 * T) for _ in range(20))
    with pytest.raises(ValueError, match="train_length"):
        training_region(10, 0, rng)


def _ceil(x):
    return remamba._ceil(x)


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
    rm = ReMamba(small_model(d_model=d), ratio=0.5, compress_ratio=0.6, start_ratio=0.2)
    identity_projections(rm)
    L = 10
    assert rm.region(L) == (2, 8, 3)
    e0, e1 = torch.eye(d)[0], torch.eye(d)[1]
    angle = lambda t: 4 * (torch.cos(torch.tensor(t)) * e0 + torch.sin(torch.tensor(t)) * e1)
    H = torch.randn(2, L, d) * 5                       # outside the region: anything, it must not be chosen
    H[:, L - 1] = 4 * e0                               # the query
    H[:, 0] = H[:, 1] = 4 * e0                         # identical to the query, but before the region
    # batch 0: region positions 2..7 at growing angles from the query, position 7 identical to it
    for p, t in zip(range(2, 8), [1.4, 0.3, 1.2, 0.6, 1.5, 0.0]):
        H[0, p] = angle(t)
    # batch 1: mostly opposite to the query (cos = −1), so a kept state can have weight ReLU(−1) = 0
    H[1, 2:8] = -4 * e0
    H[1, 2] = -4 * e0 + 0.5 * e1                       # still negative (cos ≈ −0.22), but the third best
    H[1, 4] = angle(0.2)
    H[1, 6] = angle(0.9)
    kept, w = rm.select(H)
    assert kept.tolist() == [[3, 5, 7], [2, 4, 6]]     # top-3 by score, re-sorted by position
    expected = F.relu(F.cosine_similarity(F.silu(H.gather(1, kept[..., None].expand(-1, -1, d))),
                                          F.silu(H[:, L - 1:]), dim=-1))
    assert torch.allclose(w, expected, atol=1e-6)
    assert float(w[0, 2]) == pytest.approx(1.0, abs=1e-6) and float(w[1, 0]) == 0.0
    assert w[0, 0] > w[0, 1] > 0                       # angle 0.3 scores above angle 0.6
    # K = 1: the single best position
    kept, w = rm.select(H, (2, 8, 1))
    assert kept.tolist() == [[7], [4]]
    # very short prompts: L = 2 keeps position 0; L = 1 keeps nothing
    rm.ratio, rm.compress_ratio, rm.start_ratio = 0.1, 0.3, 0.0
    kept, w = rm.select(H[:, [5, 9]])
    assert kept.tolist() == [[0], [0]] and w.shape == (2, 1)
    kept, w = rm.select(H[:, :1])
    assert kept.shape == (2, 0) and w.shape == (2, 0)
    with pytest.raises(ValueError, match="last token is never compressed"):
        rm.select(H, (0, 10, 2))


# ----------------------------------------------------------------------------------------------------------
# Stage 2


def test_no_compression_is_the_plain_model():
    base = small_model()
    ids = ids_of(2, 12)
    rm = trained_looking(ReMamba(base, ratio=0.0))
    assert rm.region(12)[2] == 0
    assert torch.equal(rm(ids), base(ids))
    assert torch.equal(rm.generate(ids, max_new_tokens=4), base.generate(ids, max_new_tokens=4))
    one = trained_looking(ReMamba(base))
    assert torch.equal(one(ids[:, :1]), base(ids[:, :1]))


def test_untrained_compressed_states_are_blank_tokens():
    base = small_model()
    rm = ReMamba(base)
    ids = ids_of(1, 40)
    s, e, K = rm.region(40)
    logits = rm(ids)
    assert logits.shape == (1, s + K + 40 - e, 104)
    # V_proj starts at zero and a zero token stays zero through every layer: its logits are exactly 0
    assert torch.equal(logits[:, s:s + K], torch.zeros_like(logits[:, s:s + K]))
    assert not torch.equal(logits[:, s + K:], torch.zeros_like(logits[:, s + K:]))


def record_hook_calls(base, monkeypatch):
    """Wrap every hook ReMamba sets on `base`, recording (layer, is_step, dt, Δ in, Δ out) per call."""
    calls = []
    set_hook = base.set_hook

    def wrapped(fn):
        def recorder(layer_idx, hidden_states, dt, delta, is_step):
            out = fn(layer_idx, hidden_states, dt, delta, is_step)
            calls.append((layer_idx, is_step, dt.detach(), delta.detach(), out.detach()))
            return out
        set_hook(None if fn is None else recorder)

    monkeypatch.setattr(base, "set_hook", wrapped)
    return calls


def test_delta_changes_only_at_compressed_positions_in_every_layer(monkeypatch):
    n_layer = 3
    base = small_model(n_layer=n_layer)
    rm = trained_looking(ReMamba(base, ratio=0.5, compress_ratio=0.4, start_ratio=0.25))
    ids = ids_of(2, 20)
    s, e, K = rm.region(20)
    assert (s, e, K) == (5, 13, 4)
    kept, w = rm.select(base.hidden_states(ids))
    assert (w > 0).any()
    calls = record_hook_calls(base, monkeypatch)
    rm(ids)
    assert [c[0] for c in calls] == list(range(n_layer)) and not any(c[1] for c in calls)
    for layer_idx, _, dt, delta_in, delta_out in calls:
        assert delta_out.shape == (2, base.config.d_inner, s + K + 20 - e)
        outside = torch.cat([delta_out[..., :s], delta_out[..., s + K:]], -1)
        assert torch.equal(outside, torch.cat([delta_in[..., :s], delta_in[..., s + K:]], -1))
        mixer = base.backbone.layers[layer_idx].mixer
        expected = F.softplus(dt[..., s:s + K] * w[:, None] + rm.ret_bias[layer_idx].detach()[:, None]
                              + mixer.dt_proj.bias.detach()[:, None])
        assert torch.allclose(delta_out[..., s:s + K], expected, atol=1e-6)
        assert not torch.allclose(delta_out[..., s:s + K], delta_in[..., s:s + K])
    # decoding steps: Δ unchanged
    calls.clear()
    rm.generate(ids, max_new_tokens=3)
    steps = [c for c in calls if c[1]]
    assert len(steps) == 2 * n_layer
    assert all(torch.equal(c[3], c[4]) for c in steps)


def test_generate_equals_greedy_argmax_over_stage2_forwards():
    base = small_model(dtype=torch.float64)
    rm = trained_looking(ReMamba(base, ratio=0.3)).double()
    ids = ids_of(2, 30, seed=3)
    new = rm.generate(ids, max_new_tokens=6)
    continuation = ids[:, :0]
    for _ in range(6):
        token = rm(ids, continuation)[:, -1, :VOCAB].argmax(-1, keepdim=True)
        continuation = torch.cat([continuation, token], 1)
    assert torch.equal(new, continuation)
    eos = int(new[0, 1])
    stopped = rm.generate(ids[:1], max_new_tokens=6, eos_token_id=eos)
    assert stopped[0].tolist() == new[0, :new[0].tolist().index(eos) + 1].tolist()


def test_previous_hook_is_restored_even_on_error(monkeypatch):
    base = small_model()
    rm = trained_looking(ReMamba(base))
    calls = []

    def sentinel(layer_idx, hidden_states, dt, delta, is_step):
        calls.append(layer_idx)
        return delta

    base.set_hook(sentinel)
    ids = ids_of(1, 30)
    rm(ids)
    rm.generate(ids, max_new_tokens=2)
    rm.training_loss([ids_of(30)], [25], random.Random(0), train_length=30)
    ReMamba(base, ratio=0.0)(ids)                        # no compression: still not the sentinel's forward
    assert base.hook is sentinel and calls == []        # ReMamba replaces it during both stages
    monkeypatch.setattr(base, "generate", lambda **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        rm.generate(ids, max_new_tokens=2)
    assert base.hook is sentinel
    with pytest.raises(ValueError, match="continuation_ids has batch"):
        rm(ids, ids_of(2, 3))
    assert base.hook is sentinel


# ----------------------------------------------------------------------------------------------------------
# Training


def test_gradients_reach_the_new_parameters_and_optionally_the_base():
    base = small_model()
    rm = trained_looking(ReMamba(base))
    params = rm.trainable_parameters()
    assert len(params) == 13 and not any(p.requires_grad for p in base.parameters())
    samples = [ids_of(40, seed=i) for i in range(3)]
    rm.training_loss(samples, [34, 35, 36], random.Random(0), train_length=40).backward()
    for name, p in rm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in base.parameters())
    params = rm.trainable_parameters(train_base=True)
    assert len(params) == 13 + len(list(base.parameters()))
    rm.training_loss(samples, [34, 35, 36], random.Random(0), train_length=40).backward()
    for name, p in base.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_loss_is_the_answer_cross_entropy_after_stage_2(monkeypatch):
    base = small_model()
    rm = trained_looking(ReMamba(base))
    ids, a = ids_of(40), 34
    # with the region the schedule draws pinned to the inference one, the loss is the forward's cross-entropy
    monkeypatch.setattr(remamba, "training_region", lambda L, train_length, rng: rm.region(L))
    logits = rm(ids[:a], ids[a:-1])[0, -(40 - a):, :VOCAB]
    ce = F.cross_entropy(logits, ids[a:], reduction="none")
    loss = rm.training_loss([ids], [a], random.Random(0), train_length=40)
    assert torch.allclose(loss, ce.mean())
    weights = torch.full((39,), 0.05)
    weights[a - 1:] = torch.arange(1.0, 7.0)
    loss = rm.training_loss([ids], [a], random.Random(0), weights=[weights], train_length=40)
    assert torch.allclose(loss, (ce * weights[a - 1:]).sum() / weights[a - 1:].sum())
    # a one-token prompt is never compressed: the loss is the plain model's
    monkeypatch.undo()
    plain = F.cross_entropy(base(ids[None, :-1])[0, :, :VOCAB], ids[1:])
    assert torch.allclose(rm.training_loss([ids], [1], random.Random(0), train_length=40), plain)


def test_bad_arguments_have_clear_messages():
    base = small_model()
    with pytest.raises(TypeError, match="wraps a mamba.Mamba"):
        ReMamba(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ratio is the fraction"):
        ReMamba(base, ratio=1.5)
    with pytest.raises(ValueError, match="start_ratio"):
        ReMamba(base, start_ratio=1.0)
    rm = ReMamba(base)
    rng = random.Random(0)
    with pytest.raises(ValueError, match="answer start 1 ≤ a < n"):
        rm.training_loss([ids_of(10)], [10], rng, train_length=10)
    with pytest.raises(ValueError, match="one answer start per sample"):
        rm.training_loss([ids_of(10)], [5, 6], rng, train_length=10)
    with pytest.raises(ValueError, match=r"weights must have shape \(9,\)"):
        rm.training_loss([ids_of(10)], [5], rng, weights=[torch.ones(10)], train_length=10)
    with pytest.raises(ValueError, match="prompt is empty"):
        rm(ids_of(1, 0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rm(torch.tensor([[1, 2, 500, 3]]))


# ----------------------------------------------------------------------------------------------------------
# Save / load


def test_save_load_round_trip(tmp_path):
    base = small_model()
    rm = trained_looking(ReMamba(base, ratio=0.2, compress_ratio=0.5, start_ratio=0.1))
    rm.save(str(tmp_path))                                        # a checkpoint directory: remamba.pt inside
    assert os.listdir(tmp_path) == [remamba.REMAMBA_FILE]
    loaded = ReMamba.load(base, str(tmp_path))
    assert (loaded.ratio, loaded.compress_ratio, loaded.start_ratio) == (0.2, 0.5, 0.1)
    assert loaded.state_dict().keys() == rm.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in rm.state_dict().items())
    assert all(not k.startswith("base") for k in loaded.state_dict())
    ids = ids_of(1, 30)
    assert torch.equal(loaded(ids), rm(ids))
    path = tmp_path / "elsewhere.pt"
    rm.save(str(path))
    assert torch.equal(ReMamba.load(base, str(path)).ret_bias, rm.ret_bias)


def test_load_errors_for_files_that_do_not_match(tmp_path):
    base = small_model()
    with pytest.raises(FileNotFoundError, match="train.py --method remamba"):
        ReMamba.load(base, str(tmp_path))
    ReMamba(small_model(d_model=16)).save(str(tmp_path / "narrow.pt"))
    with pytest.raises(ValueError, match="different base model.*d_model 16 in the file but 32 in the model"):
        ReMamba.load(base, str(tmp_path / "narrow.pt"))
    ReMamba(small_model(n_layer=3)).save(str(tmp_path / "deep.pt"))
    with pytest.raises(ValueError, match="n_layer 3 in the file but 2"):
        ReMamba.load(base, str(tmp_path / "deep.pt"))
    torch.save(base.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a ReMamba parameter file"):
        ReMamba.load(base, str(tmp_path / "weights.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a ReMamba parameter file"):
        ReMamba.load(base, str(tmp_path / "garbage.pt"))
