"""longmamba.py: calibration numbers against the official rule worked by hand, the clamp, the filter's parity checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import longmamba
import mamba
from conftest import raw_dt, small_model
from longmamba import LongMamba

L_TRAIN = 32
VOCAB = 101


def windows(n, seed=0):
    return torch.randint(0, VOCAB, (n, L_TRAIN), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def calibration(model):
    return longmamba.calibrate(model, windows(4))


def record_deltas(model, ids):
    """Δ per layer of a vanilla forward, through the hook."""
    deltas = {}

    def hook(layer_idx, dt, dt_bias):
        deltas[layer_idx] = mamba.delta_of(dt, dt_bias)
        return dt

    with model.hooked(hook), torch.no_grad():
        model(ids)
    return deltas


# ------------------------------------------------------------------------------------------------ calibration


def test_default_lengths_scale_the_official_grid():
    assert longmamba.default_lengths(2000) == list(longmamba.OFFICIAL_LENGTHS)
    grid = longmamba.default_lengths(512)
    assert grid[:4] == [256, 512, 768, 1024] and grid[-1] == 96 * 512 and len(grid) == 25


def test_calibration_numbers_on_a_hand_made_delta():
    # channel 0: Δ = [0.5, 0.25, 1, 0.25], decay 2; sorted [1, .5, .25, .25] stretched to L = 8 (scale 1/2):
    #   v = [1, .875, .625, .4375, .3125, .25, .25, .25], cumsum = [1, 1.875, 2.5, ...]
    # cumsum > 2 first at index 2, so k = 1 + 2 = 3: threshold = v[3] = .4375 (not v[2]), alpha = 3/8.
    # channel 1: Δ = 0 never exceeds decay 0: argmax of all-False is 0, k = 1, threshold v[1] = 0.
    delta = torch.tensor([[0.5, 0.25, 1.0, 0.25], [0.0, 0.0, 0.0, 0.0]])           # (C=2, n=4)
    A = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])                                  # (C, N)
    decay, tA_prod, threshold, alpha = longmamba.window_statistics(delta, A, [4, 8])
    assert decay.tolist() == [2.0, 0.0]
    assert torch.allclose(tA_prod, torch.tensor([math.exp(-2.0), 1.0]))
    assert threshold.tolist() == [[0.0, 0.0], [0.4375, 0.0]]                        # L = 4 ≤ n: no filtering
    assert alpha.tolist() == [[1.0, 1.0], [3 / 8, 1 / 8]]
    v = F.interpolate(torch.tensor([[[1.0, 0.5, 0.25, 0.25]]]), size=8, mode="linear", align_corners=False)
    assert v.flatten().tolist() == [1, 0.875, 0.625, 0.4375, 0.3125, 0.25, 0.25, 0.25]
    _, tA_mean, _, _ = longmamba.window_statistics(delta, A, [8], decay_state="mean")
    assert torch.allclose(tA_mean, torch.tensor([(math.exp(-2) + math.exp(-4)) / 2, 1.0]))


def test_the_clamp_caps_each_channel_at_its_top_sc_value():
    # n = 10, sc = 0.2: k = 2, so each channel is clamped at its 2nd largest Δ before any statistic
    delta = torch.tensor([[1.0, 9.0, 2.0, 8.0, 3.0, 0.5, 0.5, 0.5, 0.5, 0.5], [1.0] * 10])
    decay, _, threshold, _ = longmamba.window_statistics(delta, -torch.ones(2, 1), [10, 30], sc=0.2)
    assert decay.tolist() == [1 + 8 + 2 + 8 + 3 + 2.5, 10.0]
    clamped = delta.clamp(max=torch.tensor([[8.0], [1.0]]))
    assert torch.equal(threshold[1], longmamba._thresholds(clamped, clamped.sum(-1), 30)[0])


def test_block_wise_thresholds_equal_one_block():
    delta = F.softplus(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * 2 - 3)
    whole = longmamba._thresholds(delta, delta.sum(-1), 300)
    blocks = [longmamba._thresholds(delta[i:i + 7], delta[i:i + 7].sum(-1), 300) for i in range(0, 50, 7)]
    assert torch.equal(whole[0], torch.cat([b[0] for b in blocks])) and torch.equal(whole[1], torch.cat([b[1] for b in blocks]))


@pytest.mark.parametrize("aggregate", ["avg", "max"])
def test_calibrate_aggregates_the_window_statistics(model, aggregate):
    ids = windows(3, seed=3)
    lengths = [16, 32, 48, 100]
    calibration = longmamba.calibrate(model, ids, lengths=lengths, aggregate=aggregate)
    reduce = (lambda x: x.mean(0)) if aggregate == "avg" else (lambda x: x.amax(0))
    deltas = [record_deltas(model, w[None]) for w in ids]                           # per window {layer: Δ}
    for layer in range(model.config.n_layer):
        A = -torch.exp(model.backbone.layers[layer].mixer.A_log)
        stats = [longmamba.window_statistics(d[layer][0], A, lengths) for d in deltas]
        assert torch.allclose(calibration["decay"][layer], reduce(torch.stack([s[0] for s in stats])))
        assert torch.allclose(calibration["tA_prod"][layer], reduce(torch.stack([s[1] for s in stats])))
        for i, L in enumerate(lengths):
            assert torch.allclose(calibration["threshold"][L][layer], reduce(torch.stack([s[2][i] for s in stats])))
    s = calibration["settings"]
    assert (s["L_train"], s["windows"], s["lengths"], s["aggregate"]) == (L_TRAIN, 3, lengths, aggregate)


def test_decay_state_mean_calls_fewer_channels_global(model):
    slowest = longmamba.calibrate(model, windows(2), lengths=[64])
    mean = longmamba.calibrate(model, windows(2), lengths=[64], decay_state="mean")
    assert torch.equal(slowest["decay"], mean["decay"])
    assert (mean["tA_prod"] <= slowest["tA_prod"]).all()
    assert 0 < int((mean["tA_prod"] > 0.05).sum()) < int((slowest["tA_prod"] > 0.05).sum())


def test_calibrate_measures_the_vanilla_model_and_restores_the_hook(model, calibration):
    halve = lambda layer_idx, dt, dt_bias: dt * 0.5  # noqa: E731
    with model.hooked(halve):
        again = longmamba.calibrate(model, windows(4))
        assert model.hook is halve
    assert torch.equal(again["decay"], calibration["decay"])
    assert longmamba.fingerprint(model) != longmamba.fingerprint(small_model(seed=7))


# ------------------------------------------------------------------------------------------------ the filter


def test_no_global_channel_or_short_prompt_gives_vanilla_bit_for_bit(model, calibration):
    long_ids = torch.randint(0, VOCAB, (2, 100))
    short_ids = long_ids[:, :47]                                                    # < 1.5 · L_train = 48
    vanilla_long, vanilla_short = model(long_ids), model(short_ids)
    with model.hooked(LongMamba(calibration, c=1.5)):                              # tA_prod ≤ 1: none global
        assert torch.equal(model(long_ids), vanilla_long)
    with model.hooked(LongMamba(calibration, c=0.0)):                              # all global, prompt short
        assert torch.equal(model(short_ids), vanilla_short)
        assert not torch.allclose(model(long_ids), vanilla_long)                    # and long prompts change


def scanned_delta(answer, dt_bias):
    """The Δ a scan forms from a hook's answer: a dt, or mamba.SkipBelow(dt, bound)."""
    if isinstance(answer, mamba.SkipBelow):
        return mamba.delta_of(answer.dt, dt_bias, answer.bound)
    return mamba.delta_of(answer, dt_bias)


def test_filtered_delta_is_where_delta_above_b_threshold_in_global_channels_only(model, calibration):
    b, c = 1.3, float(calibration["tA_prod"].median())                             # some global, some local
    method, seen = LongMamba(calibration, c=c, b=b), []

    def watch(layer_idx, dt, dt_bias):
        seen.append((layer_idx, mamba.delta_of(dt, dt_bias), method(layer_idx, dt, dt_bias), dt_bias))
        return seen[-1][2]

    with model.hooked(watch):
        model(torch.randint(0, VOCAB, (1, 100)))                                    # nearest calibrated length 96
    zeroed_somewhere = False
    for layer, delta_in, answer, dt_bias in seen:
        is_global = calibration["tA_prod"][layer] > c
        floor = b * calibration["threshold"][96][layer]
        expected = torch.where(is_global[:, None] & (delta_in <= floor[:, None]), 0.0, delta_in)
        delta_out = scanned_delta(answer, dt_bias)
        assert torch.equal(delta_out == 0, expected == 0) and torch.equal(delta_out, expected)
        zeroed_somewhere |= bool((delta_out[:, is_global] == 0).any())
        assert 0 < int(is_global.sum()) < is_global.numel()
    assert zeroed_somewhere


def hand_made_calibration():
    """Two channels, one layer: channel 0 global (tA_prod 0.5), channel 1 local (0.01)."""
    return {"settings": {"L_train": 4}, "tA_prod": torch.tensor([[0.5, 0.01]]), "decay": torch.tensor([[1.0, 1.0]]),
            "threshold": {4: torch.zeros(1, 2), 6: torch.tensor([[0.22, 0.5]]), 8: torch.tensor([[0.9, 0.9]])}}


def test_dt_thre_and_bound_on_a_hand_made_delta():
    row = [0.2, 0.6, 0.1, 0.3, 0.05, 0.25]
    dt = raw_dt(torch.tensor([[row, row]]))                                         # (1, 2, 6): 6 ≥ 1.5 · 4
    bias = torch.zeros(2)

    def kept(*values):  # which tokens keep their Δ: channel 0 (global) these values, channel 1 (local) all
        return torch.tensor([[[x in values for x in row], [True] * len(row)]])

    def filtered(b, variant, dt):  # the tokens that keep a Δ > 0
        return scanned_delta(LongMamba(hand_made_calibration(), c=0.05, b=b, variant=variant)(0, dt, bias), bias) > 0

    assert torch.equal(filtered(1.0, "dt_thre", dt), kept(0.6, 0.3, 0.25))         # Δ > .22
    assert torch.equal(filtered(2.0, "dt_thre", dt), kept(0.6))                     # Δ > .44
    # bound: sorted .6 .3 .25 ...; cumsum .6 .9 1.15: keep the largest while the sum stays ≤ decay = 1
    assert torch.equal(filtered(1.0, "bound", dt), kept(0.6, 0.3))
    filt = LongMamba(hand_made_calibration(), c=0.05)
    assert torch.equal(filt(0, dt[..., :5], bias), dt[..., :5])                     # 5 < 1.5 · 4: untouched
    seven = raw_dt(torch.tensor([[row + [0.7], row + [0.7]]]))                      # 7 tokens: a tie between
    assert torch.equal((scanned_delta(filt(0, seven, bias), bias) > 0)[0, 0, :6], kept(0.6, 0.3, 0.25)[0, 0])  # 6


@pytest.mark.parametrize("variant", ["dt_thre", "bound"])
def test_works_with_the_reference_and_chunked_scans(model, calibration, variant, monkeypatch):
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(5))
    outputs = {}
    for backend in ("ref", "torch"):
        monkeypatch.setenv("MAMBA_SCAN", backend)
        vanilla = model(ids)
        with model.hooked(LongMamba(calibration, variant=variant)):
            outputs[backend] = model(ids)
        assert not torch.allclose(outputs[backend], vanilla)
    assert torch.allclose(outputs["torch"], outputs["ref"], rtol=1e-4, atol=1e-4)


def test_generation_continues_unfiltered_from_the_filtered_prefill(model, calibration):
    ids = torch.randint(0, VOCAB, (2, 80))
    with model.hooked(LongMamba(calibration)):
        generated = model.generate(ids, max_new_tokens=5)
        logits, caches = model.prefill(ids)
    assert not torch.allclose(logits, model(ids)[:, -1])
    tokens = [logits[:, :VOCAB].argmax(-1)]
    for _ in range(4):                                                              # steps are not filtered
        tokens.append(model.step(tokens[-1], caches)[:, :VOCAB].argmax(-1))
    assert torch.equal(generated, torch.stack(tokens, 1))


def test_describe_counts_global_channels_and_kept_tokens(calibration):
    text = longmamba.describe(calibration, c=0.05, length=500)
    assert "4 windows of 32 tokens" in text and "calibrated length 480" in text
    for layer, g in enumerate(calibration["tA_prod"] > 0.05):
        assert f"{int(g.sum()):>5} / 64" in text
        assert f"{calibration['alpha'][480][layer][g].mean():6.2%}" in text
    assert "kept" not in longmamba.describe(calibration).splitlines()[-1]
