"""decimamba.py: the max_p rule (k top tokens in order, plus the protected tail), the β^s schedule, decoding."""
import torch

import mamba
from conftest import raw_dt, small_model
from decimamba import DeciMamba

VOCAB = 101


def watching(method):
    """A hook that runs `method` and records (layer, Δ, keep or None) of each prefill call."""
    seen = []

    def hook(layer_idx, dt, dt_bias):
        result = method(layer_idx, dt, dt_bias)
        seen.append((layer_idx, mamba.delta_of(dt, dt_bias), result[1] if isinstance(result, tuple) else None))
        return result

    return hook, seen


def test_keeps_the_k_most_important_tokens_in_order_and_the_tail_besides():
    # importance = ‖Δ_{:,t}‖₂ over 2 channels; the last token (the protected tail) is kept whatever its Δ
    dt = raw_dt(torch.tensor([[[5., 1., 4., 2., 6., 3., .1], [0., 0., 0., 0., 0., 0., .1]],
                              [[5., 1., 4., 2., 6., 3., 9.], [0., 0., 0., 0., 0., 0., 0.]]]))  # (b=2, C=2, L=7)
    bias = torch.zeros(2)
    hook = DeciMamba([1], L_base=3, beta=0.5, min_len=2)
    assert hook(0, dt, bias) is dt                                                  # not a decimating layer
    out, keep = hook(1, dt, bias)
    assert out is dt
    assert keep.tolist() == [[0, 2, 4, 6], [0, 2, 4, 6]]                             # top 3: 6, 5, 4; and the tail
    assert DeciMamba([1], L_base=3, min_len=2, tail=2)(1, dt, bias)[1].tolist()[0] == [0, 2, 4, 5, 6]


def test_decimating_layer_keeps_top_k_by_delta_norm_in_the_model():
    model = small_model(n_layer=3)
    ids = torch.randint(0, VOCAB, (2, 50))
    hook, seen = watching(DeciMamba([1], L_base=12, min_len=4))
    with model.hooked(hook):
        logits = model(ids)
    assert logits.shape == (2, 13, 104)                                            # 12 top-ranked and the last
    assert [(layer, keep is None) for layer, _, keep in seen] == [(0, True), (1, False), (2, True)]
    _, delta, keep = seen[1]
    importance = delta.norm(dim=1)
    for row in range(2):
        kept = keep[row].tolist()
        assert kept == sorted(kept) and len(set(kept)) == 13 and kept[-1] == 49
        dropped = sorted(set(range(49)) - set(kept))
        assert importance[row, kept[:-1]].min() >= importance[row, dropped].max()


def test_multi_layer_schedule_keeps_L_base_beta_s_and_at_least_min_len():
    model = small_model(n_layer=4)
    ids = torch.randint(0, VOCAB, (1, 61))
    for min_len, expected in ((3, [40, 20, 10]), (15, [40, 20, 15])):
        hook, seen = watching(DeciMamba([3, 0, 2], L_base=40, beta=0.5, min_len=min_len))
        with model.hooked(hook):
            assert model(ids).shape[1] == expected[-1] + 1
        kept = {layer: keep.shape[1] - 1 for layer, _, keep in seen if keep is not None}
        assert kept == dict(zip([0, 2, 3], expected))                               # s counts in layer order
        assert [delta.shape[-1] for _, delta, _ in seen] == [61, 41, 41, 21]        # later layers see fewer
    with model.hooked(DeciMamba([0, 1], L_base=100, beta=1.0)):                     # L ≤ k: nothing dropped
        assert model(ids).shape[1] == 61


def test_short_prompt_is_vanilla_bit_for_bit():
    model = small_model()
    short, long = torch.randint(0, VOCAB, (2, 21)), torch.randint(0, VOCAB, (2, 64))
    vanilla_short = model(short)
    with model.hooked(DeciMamba([1], L_base=8, min_len=20)):                        # k = 20 = 21 − tail
        assert torch.equal(model(short), vanilla_short)
        assert model(long).shape[1] == 21


def test_generation_continues_from_the_short_scan_of_the_decimating_layer():
    model = small_model(n_layer=3)
    ids = torch.randint(0, VOCAB, (2, 40))
    hook, seen = watching(DeciMamba([1], L_base=10, min_len=4))
    with model.hooked(hook):
        generated = model.generate(ids, max_new_tokens=6)
    keep = seen[1][2]
    # by hand: a hook that drops exactly those tokens at layer 1, then plain steps from the prefill's states
    with model.hooked(lambda i, dt, dt_bias: (dt, keep) if i == 1 else dt):
        logits, caches = model.prefill(ids)
    tokens = [logits[:, :VOCAB].argmax(-1)]
    for _ in range(5):
        tokens.append(model.step(tokens[-1], caches)[:, :VOCAB].argmax(-1))
    assert torch.equal(generated, torch.stack(tokens, 1))
    assert caches[1].ssm_state.shape == (2, 64, 8)
    assert [delta.shape[-1] for _, delta, _ in seen] == [40, 40, 11]                # steps were not watched
