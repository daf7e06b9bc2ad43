"""longmamba.py: calibration numbers against the official rule, the filter's parity checks, files, backends."""
import math

import pytest
import torch
import torch.nn.functional as F

import longmamba
from longmamba import LongMambaCalibration
from mamba import Mamba, MambaConfig

L_TRAIN = 32
VOCAB = 101


def small_model(seed=0, **kw):
    """Random weights moved off the initialisation, so Δ varies over tokens and channels."""
    torch.manual_seed(seed)
    cfg = dict(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8)
    cfg.update(kw)
    model = Mamba(MambaConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def windows(n, seed=0):
    return torch.randint(0, VOCAB, (n, L_TRAIN), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def calibration(model):
    return longmamba.calibrate(model, windows(6))


@pytest.fixture(autouse=True)
def vanilla_after_each_test(model):
    yield
    model.set_hook(None)


def official_rule(sorted_delta, decay, L):
    """load_align_target.py's rule, written out directly on the stretched curve."""
    v = F.interpolate(sorted_delta[:, None], size=L, mode="linear", align_corners=False)[:, 0]
    k = 1 + (v.cumsum(-1) > decay[:, None]).int().argmax(-1)
    return k, v.gather(1, k.clamp_max(L - 1)[:, None])[:, 0], (k / L).clamp_max(1)


def record_deltas(model, ids):
    """Δ per layer of a vanilla forward, through the hook."""
    deltas = {}

    def hook(layer_idx, hidden_states, dt, delta, is_step):
        deltas[layer_idx] = delta.clone()
        return delta

    model.set_hook(hook)
    with torch.no_grad():
        model(ids)
    model.set_hook(None)
    return deltas


# ------------------------------------------------------------------------------------------------ calibration


def test_default_lengths_scale_the_official_grid():
    assert longmamba.default_lengths(2000) == list(longmamba.OFFICIAL_LENGTHS)
    grid = longmamba.default_lengths(512)
    assert grid[:4] == [256, 512, 768, 1024] and grid[-1] == 96 * 512 and len(grid) == 25
    assert longmamba.default_lengths(32)[:4] == [16, 32, 48, 64]


def test_calibration_numbers_on_a_hand_made_delta():
    # channel 0: Δ = [0.5, 0.25, 1, 0.25], decay 2; sorted [1, .5, .25, .25] stretched to L = 8 (scale 1/2):
    #   v = [1, .875, .625, .4375, .3125, .25, .25, .25], cumsum = [1, 1.875, 2.5, ...]
    # cumsum > 2 first at index 2, so k = 1 + 2 = 3: threshold = v[3] = .4375 (not v[2]), alpha = 3/8.
    # channel 1: Δ = 0 never exceeds decay 0: argmax of all-False is 0, k = 1, threshold v[1] = 0.
    delta = torch.tensor([[[0.5, 0.25, 1.0, 0.25], [0.0, 0.0, 0.0, 0.0]]])          # (B=1, C=2, n=4)
    A = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])                                  # (C, N)
    stretches = [None, longmamba._Stretch(4, 8, "cpu")]                              # lengths [4, 8]
    decay, tA_prod, threshold, alpha = longmamba._window_statistics(delta, A, stretches, "slowest")
    assert decay.tolist() == [[2.0, 0.0]]
    assert torch.allclose(tA_prod, torch.tensor([[math.exp(-2.0), 1.0]]))
    assert threshold.tolist() == [[[0.0, 0.0], [0.4375, 0.0]]]                       # L = 4 ≤ n: no filtering
    assert alpha.tolist() == [[[1.0, 1.0], [3 / 8, 1 / 8]]]
    v = F.interpolate(torch.tensor([[[1.0, 0.5, 0.25, 0.25]]]), size=8, mode="linear", align_corners=False)
    assert v.flatten().tolist() == [1, 0.875, 0.625, 0.4375, 0.3125, 0.25, 0.25, 0.25]
    _, tA_mean, _, _ = longmamba._window_statistics(delta, A, stretches, "mean")
    assert torch.allclose(tA_mean, torch.tensor([[(math.exp(-2) + math.exp(-4)) / 2, 1.0]]))


def test_crossing_equals_the_official_rule_at_long_lengths():
    g = torch.Generator().manual_seed(0)
    n = 64
    delta = F.softplus(torch.randn(200, n, generator=g) * 2 - 3)
    sorted_delta = delta.sort(-1, descending=True).values
    curve, decay = longmamba._Curve(sorted_delta), delta.sum(-1)
    for L in (n + 1, 96, 3 * n + 7, 16 * n, 96 * n):
        k, threshold, alpha = longmamba._crossing(curve, decay, longmamba._Stretch(n, L, "cpu"))
        k_ref, threshold_ref, alpha_ref = official_rule(sorted_delta, decay, L)
        assert torch.equal(k, k_ref), L
        assert torch.allclose(threshold, threshold_ref, rtol=1e-5, atol=0), L
        assert torch.equal(alpha, alpha_ref), L
    assert int(k.max()) < L // 10  # at 96x only the largest Δ are kept
    # a bound that stops too early (as float rounding could make it) falls back to summing every segment
    stretch = longmamba._Stretch(n, 3 * n, "cpu")
    stretch.min_count *= 50
    k, threshold, _ = longmamba._crossing(curve, decay, stretch)
    k_ref, threshold_ref, _ = official_rule(sorted_delta, decay, 3 * n)
    assert torch.equal(k, k_ref) and torch.allclose(threshold, threshold_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("aggregate", ["avg", "max"])
def test_calibrate_aggregates_the_rule_over_windows(model, aggregate, monkeypatch):
    monkeypatch.setattr(longmamba, "TOKENS_PER_FORWARD", 2 * L_TRAIN)                # batches of 2, 2, 1 windows
    ids = windows(5, seed=3)
    lengths = [16, 32, 48, 100, 3000]
    calibration = longmamba.calibrate(model, ids, lengths=lengths, aggregate=aggregate)
    reduce = (lambda x: x.mean(0)) if aggregate == "avg" else (lambda x: x.amax(0))
    deltas = record_deltas(model, ids)                                              # {layer: (S, C, L_train)}
    for layer, delta in deltas.items():
        decay = delta.sum(-1)                                                       # (S, C)
        A_slowest = (-torch.exp(model.backbone.layers[layer].mixer.A_log)).amax(-1)
        assert torch.allclose(calibration.decay[layer], reduce(decay), rtol=1e-5)
        assert torch.allclose(calibration.tA_prod[layer], reduce(torch.exp(A_slowest * decay)), rtol=1e-5)
        sorted_delta = delta.flatten(0, 1).sort(-1, descending=True).values
        for L in lengths:
            if L <= L_TRAIN:
                threshold, alpha = torch.zeros_like(decay), torch.ones_like(decay)
            else:
                _, threshold, alpha = official_rule(sorted_delta, decay.flatten(), L)
            assert torch.allclose(calibration.threshold[L][layer], reduce(threshold.view_as(decay)), rtol=1e-5)
            assert torch.allclose(calibration.alpha[L][layer], reduce(alpha.view_as(decay)))
    assert calibration.lengths == lengths and calibration.n_windows == 5 and calibration.L_train == L_TRAIN


def test_decay_state_mean_calls_fewer_channels_global(model):
    slowest = longmamba.calibrate(model, windows(3), lengths=[64])
    mean = longmamba.calibrate(model, windows(3), lengths=[64], decay_state="mean")
    assert torch.equal(slowest.decay, mean.decay)
    assert (mean.tA_prod <= slowest.tA_prod).all() and (mean.tA_prod < slowest.tA_prod).any()
    n_slowest, n_mean = int((slowest.tA_prod > 0.05).sum()), int((mean.tA_prod > 0.05).sum())
    assert 0 < n_mean < n_slowest < slowest.tA_prod.numel()


def test_calibrate_measures_the_vanilla_model_and_restores_the_hook(model, calibration):
    def halve(layer_idx, hidden_states, dt, delta, is_step):
        return delta * 0.5

    model.set_hook(halve)
    again = longmamba.calibrate(model, windows(6))
    assert model.hook is halve
    assert torch.equal(again.decay, calibration.decay) and torch.equal(again.threshold[96], calibration.threshold[96])


# ------------------------------------------------------------------------------------------------ the filter


def test_no_global_channel_or_short_prompt_gives_vanilla_bit_for_bit(model, calibration):
    long_ids = torch.randint(0, VOCAB, (2, 100))
    short_ids = long_ids[:, :47]                                                    # < 1.5 · L_train = 48
    vanilla_long, vanilla_short = model(long_ids), model(short_ids)
    longmamba.apply(model, calibration, c=1.5)                                      # tA_prod ≤ 1: none global
    assert torch.equal(model(long_ids), vanilla_long)
    longmamba.apply(model, calibration, c=0.0)                                      # all global, prompt short
    assert torch.equal(model(short_ids), vanilla_short)
    assert not torch.allclose(model(long_ids), vanilla_long)                        # and long prompts change
    longmamba.remove(model)
    assert model.hook is None and torch.equal(model(long_ids), vanilla_long)


def test_filtered_delta_is_where_delta_above_b_threshold_in_global_channels_only(model, calibration):
    b, c = 1.3, float(calibration.tA_prod.median())                                # some global, some local
    longmamba.apply(model, calibration, c=c, b=b)
    method = model.hook
    seen = []

    def watch(layer_idx, hidden_states, dt, delta, is_step):
        seen.append((layer_idx, delta, method(layer_idx, hidden_states, dt, delta, is_step)))
        return seen[-1][2]

    model.set_hook(watch)
    model(torch.randint(0, VOCAB, (1, 100)))
    assert longmamba.nearest_length(method.lengths, 100) == 96                     # the key used
    zeroed_somewhere = False
    for layer, delta_in, delta_out in seen:
        is_global = calibration.tA_prod[layer] > c
        floor = b * calibration.threshold[96][layer]
        expected = torch.where(is_global[:, None] & (delta_in <= floor[:, None]), 0.0, delta_in)
        assert torch.equal(delta_out, expected)
        assert torch.equal(delta_out[:, ~is_global], delta_in[:, ~is_global])
        zeroed_somewhere |= bool((delta_out[:, is_global] == 0).any())
        assert 0 < int(is_global.sum()) < is_global.numel()
    assert zeroed_somewhere


def hand_made_calibration():
    """Two channels, one layer: channel 0 global (tA_prod 0.5), channel 1 local (0.01)."""
    return LongMambaCalibration(
        L_train=4, lengths=[4, 6, 8], tA_prod=torch.tensor([[0.5, 0.01]]), decay=torch.tensor([[1.0, 1.0]]),
        threshold={4: torch.zeros(1, 2), 6: torch.tensor([[0.22, 0.5]]), 8: torch.tensor([[0.9, 0.9]])},
        alpha={L: torch.ones(1, 2) for L in (4, 6, 8)}, aggregate="avg", decay_state="slowest", n_windows=1,
        model={})


def test_dt_thre_and_bound_on_a_hand_made_delta():
    row = [0.2, 0.6, 0.1, 0.3, 0.05, 0.25]
    delta = torch.tensor([[row, row]])                                              # (1, 2, 6): 6 ≥ 1.5 · 4

    def keeping(*kept):  # channel 0 (global) keeps these values, channel 1 (local) all
        return torch.tensor([[[x if x in kept else 0.0 for x in row], row]])

    def hook(b, variant):
        return longmamba.LongMambaFilter(hand_made_calibration(), c=0.05, b=b, variant=variant, device="cpu")

    assert torch.equal(hook(1.0, "dt_thre")(0, None, None, delta, False), keeping(0.6, 0.3, 0.25))  # Δ > .22
    assert torch.equal(hook(2.0, "dt_thre")(0, None, None, delta, False), keeping(0.6))            # Δ > .44
    # bound: sorted .6 .3 .25 ...; cumsum .6 .9 1.15: keep the largest while the sum stays ≤ decay = 1
    assert torch.equal(hook(1.0, "bound")(0, None, None, delta, False), keeping(0.6, 0.3))
    filt = hook(1.0, "dt_thre")
    assert longmamba.nearest_length([4, 6, 8], 7) == 6                            # a tie takes the smaller
    assert torch.equal(filt(0, None, None, delta[..., :5], False), delta[..., :5])  # 5 < 1.5 · 4
    assert torch.equal(filt(0, None, None, delta[..., :1], True), delta[..., :1])   # decoding step


@pytest.mark.parametrize("variant", ["dt_thre", "bound"])
def test_works_with_the_reference_and_chunked_scans(model, calibration, variant, monkeypatch):
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(5))
    outputs = {}
    for backend in ("ref", "torch"):
        monkeypatch.setenv("MAMBA_SCAN", backend)
        vanilla = model(ids)
        longmamba.apply(model, calibration, variant=variant)
        outputs[backend] = model(ids)
        assert not torch.allclose(outputs[backend], vanilla)
        longmamba.apply(model, calibration, c=1.5)
        assert torch.equal(model(ids), vanilla)
        longmamba.remove(model)
    assert torch.allclose(outputs["torch"], outputs["ref"], rtol=1e-4, atol=1e-4)


def test_generation_continues_unfiltered_from_the_filtered_prefill(model, calibration):
    ids = torch.randint(0, VOCAB, (2, 80))
    longmamba.apply(model, calibration)
    generated = model.generate(ids, max_new_tokens=5)
    logits, caches = model(ids, return_cache=True)
    longmamba.remove(model)                                                         # steps are not filtered
    assert not torch.allclose(logits, model(ids))
    tokens = [logits[:, -1, :VOCAB].argmax(-1)]
    for _ in range(4):
        tokens.append(model.step(tokens[-1], caches)[:, :VOCAB].argmax(-1))
    assert torch.equal(generated, torch.stack(tokens, 1))


def test_describe_counts_global_channels_and_kept_tokens(calibration):
    text = longmamba.describe(calibration, c=0.05, length=500)
    n_global = (calibration.tA_prod > 0.05).sum(-1).tolist()
    assert "6 windows of 32 tokens" in text and "calibrated length 480" in text
    for layer, n in enumerate(n_global):
        kept = calibration.alpha[480][layer][calibration.tA_prod[layer] > 0.05].mean()
        assert f"{n:>5} / 64" in text and f"{kept:6.2%}" in text
    assert "kept" not in longmamba.describe(calibration).splitlines()[-1]


# ------------------------------------------------------------------------------------------------ files, errors


def test_save_load_and_a_file_from_another_model(model, calibration, tmp_path):
    path = tmp_path / "longmamba_calibration.pt"
    calibration.save(path)
    loaded = LongMambaCalibration.load(path, model)
    assert loaded.lengths == calibration.lengths and loaded.model == calibration.model
    assert all(torch.equal(loaded.threshold[L], calibration.threshold[L]) for L in calibration.lengths)
    with pytest.raises(ValueError, match="another model.*A_log/dt_proj weights.*Delete the file"):
        LongMambaCalibration.load(path, small_model(seed=7))
    with pytest.raises(ValueError, match=r"another model \(config differs in \['d_model'"):
        LongMambaCalibration.load(path, small_model(d_model=16))
    with pytest.raises(ValueError, match="cannot apply LongMamba: the calibration was computed on another model"):
        longmamba.apply(small_model(seed=7), calibration)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt is not a readable LongMamba calibration file"):
        LongMambaCalibration.load(tmp_path / "junk.pt", model)
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a LongMamba calibration file"):
        LongMambaCalibration.load(tmp_path / "other.pt", model)
    with pytest.raises(FileNotFoundError, match="no LongMamba calibration at"):
        LongMambaCalibration.load(tmp_path / "missing.pt", model)


def test_load_or_calibrate_reuses_a_matching_file_and_recomputes_otherwise(model, tmp_path, capsys):
    path = str(tmp_path / "longmamba_calibration.pt")
    calls = []

    def windows_fn():
        calls.append(1)
        return windows(2)

    first = longmamba.load_or_calibrate(model, path, windows_fn, L_train=L_TRAIN)
    again = longmamba.load_or_calibrate(model, path, windows_fn, L_train=L_TRAIN)
    assert len(calls) == 1 and torch.equal(first.decay, again.decay)
    other = longmamba.load_or_calibrate(model, path, windows_fn, L_train=L_TRAIN, aggregate="max")
    assert len(calls) == 2 and other.aggregate == "max"
    assert "saved with aggregate='avg', asked for 'max'; recalibrating" in capsys.readouterr().err
    longmamba.load_or_calibrate(small_model(seed=7), path, windows_fn, L_train=L_TRAIN, aggregate="max")
    assert len(calls) == 3 and "another model" in capsys.readouterr().err
    assert LongMambaCalibration.load(path, small_model(seed=7)).aggregate == "max"
    with pytest.raises(ValueError, match=r"token_windows_fn must return \(S, L_train=16\) token ids, got \(2, 32\)"):
        longmamba.load_or_calibrate(model, path, windows_fn, L_train=16)


def test_bad_arguments_have_clear_messages(model, calibration):
    with pytest.raises(ValueError, match="token_windows must be an integer tensor"):
        longmamba.calibrate(model, torch.rand(2, 32))
    with pytest.raises(ValueError, match="token_windows must be an integer tensor"):
        longmamba.calibrate(model, torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match="aggregate must be one of 'avg', 'max', got 'mean'"):
        longmamba.calibrate(model, windows(1), aggregate="mean")
    with pytest.raises(ValueError, match="decay_state must be one of 'slowest', 'mean'"):
        longmamba.calibrate(model, windows(1), decay_state="fastest")
    with pytest.raises(ValueError, match="lengths must be a list of positive integers"):
        longmamba.calibrate(model, windows(1), lengths=[0, 64])
    with pytest.raises(ValueError, match="variant must be one of 'dt_thre', 'bound', got 'alpha'"):
        longmamba.apply(model, calibration, variant="alpha")
    with pytest.raises(ValueError, match="c must be a finite number ≥ 0"):
        longmamba.apply(model, calibration, c=-1)
    with pytest.raises(TypeError, match="calibration must be a LongMambaCalibration"):
        longmamba.apply(model, "longmamba_calibration.pt")
    assert model.hook is None
