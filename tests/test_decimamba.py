"""decimamba.py: the max_p rule (k tokens, in order, always the last), the β^s schedule, decoding after it."""
import pytest
import torch

import decimamba
from mamba import Mamba, MambaConfig

VOCAB = 101


def small_model(n_layer=3, seed=0):
    """Random weights moved off the initialisation, so Δ varies over tokens and channels."""
    torch.manual_seed(seed)
    model = Mamba(MambaConfig(d_model=32, n_layer=n_layer, vocab_size=VOCAB, d_state=8)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def watch(model):
    """Wrap the applied hook; returns the list of (layer, Δ, keep or None) of each prefill call."""
    method, seen = model.hook, []

    def hook(layer_idx, hidden_states, dt, delta, is_step):
        result = method(layer_idx, hidden_states, dt, delta, is_step)
        if not is_step:
            seen.append((layer_idx, delta, result[1] if isinstance(result, tuple) else None))
        return result

    model.set_hook(hook)
    return seen


def test_keeps_the_k_most_important_tokens_in_order_and_always_the_last():
    # importance = ‖Δ_{:,t}‖₂ over 2 channels; row 0's last token is the least important, row 1's the most
    delta = torch.tensor([[[5., 1., 4., 2., 6., 3., .1], [0., 0., 0., 0., 0., 0., .1]],
                          [[5., 1., 4., 2., 6., 3., 9.], [0., 0., 0., 0., 0., 0., 0.]]])   # (B=2, C=2, L=7)
    hook = decimamba.Decimator([1], beta=0.5, L_base=3, min_len=2)
    assert hook(0, None, None, delta, False) is delta                               # not a decimating layer
    out, keep = hook(1, None, None, delta, False)
    assert out is delta
    # top 3 of row 0: 6 (pos 4), 5 (pos 0), 4 (pos 2); the last replaces the least important of them, pos 2
    assert keep.tolist() == [[0, 4, 6], [0, 4, 6]]                                   # row 1: 9, 6, 5
    assert torch.equal(hook(1, None, None, delta[..., :1], True), delta[..., :1])   # decoding: Δ back, no keep


def test_decimating_layer_keeps_top_k_by_delta_norm_in_the_model():
    model = small_model()
    ids = torch.randint(0, VOCAB, (2, 50))
    decimamba.apply(model, L_base=12, min_len=4)                                    # layer 3 // 2 = 1
    seen = watch(model)
    logits = model(ids)
    assert logits.shape == (2, 12, 104)
    assert [(layer, keep is None) for layer, _, keep in seen] == [(0, True), (1, False), (2, True)]
    _, delta, keep = seen[1]
    importance = delta.norm(dim=1)
    for row in range(2):
        kept = keep[row].tolist()
        assert kept == sorted(kept) and len(set(kept)) == 12 and kept[-1] == 49
        others = [t for t in kept if t != 49]
        dropped = sorted(set(range(49)) - set(others))
        assert importance[row, others].min() >= importance[row, dropped].max()      # the most important 11 + last
    decimamba.remove(model)
    assert model.hook is None


def test_multi_layer_schedule_keeps_L_base_beta_s_and_at_least_min_len():
    model = small_model(n_layer=4)
    ids = torch.randint(0, VOCAB, (1, 60))
    for min_len, expected in ((3, [40, 20, 10]), (15, [40, 20, 15])):
        decimamba.apply(model, decimating_layers=[3, 0, 2], beta=0.5, L_base=40, min_len=min_len)
        seen = watch(model)
        assert model(ids).shape[1] == expected[-1]
        kept = {layer: keep.shape[1] for layer, _, keep in seen if keep is not None}
        assert kept == dict(zip([0, 2, 3], expected))                               # s counts in layer order
        lengths = [delta.shape[-1] for _, delta, _ in seen]
        assert lengths == [60, 40, 40, 20]                                          # later layers see fewer
    decimamba.apply(model, decimating_layers=[0, 1], beta=1.0, L_base=100)          # L ≤ k: nothing dropped
    assert model(ids).shape[1] == 60


def test_short_prompt_and_remove_are_vanilla_bit_for_bit():
    model = small_model()
    short, long = torch.randint(0, VOCAB, (2, 19)), torch.randint(0, VOCAB, (2, 64))
    vanilla_short, vanilla_long = model(short), model(long)
    decimamba.apply(model, L_base=8, min_len=20)                                    # k = max(8, 20) = 20 > 19
    assert torch.equal(model(short), vanilla_short)
    assert model(long).shape[1] == 20
    decimamba.remove(model)
    assert torch.equal(model(long), vanilla_long)


def test_generation_continues_from_the_decimated_prefill():
    model = small_model()
    ids = torch.randint(0, VOCAB, (2, 40))
    decimamba.apply(model, decimating_layers=[1], L_base=10, min_len=4)
    seen = watch(model)
    generated = model.generate(ids, max_new_tokens=6)
    keep = seen[1][2]
    # the same thing by hand: layer 0 on all tokens, gather the kept ones, then layers 1..2 on the shorter sequence
    # (layer 1 scans all 40 tokens and its output is gathered), and decode step by step from those states
    decimamba.remove(model)
    layers = model.backbone.layers
    residual = model.backbone.embedding(ids).float()
    residual, cache0 = layers[0](residual, return_cache=True)
    out, _, cache1 = layers[1].mixer(layers[1].norm(residual), return_cache=True)
    gather = keep[..., None].expand(-1, -1, residual.shape[-1])
    residual = residual.gather(1, gather) + out.gather(1, gather)
    residual, cache2 = layers[2](residual, return_cache=True)
    logits = model.lm_head(model.backbone.norm_f(residual))
    assert logits.shape[1] == 10
    caches, tokens = [cache0, cache1, cache2], [logits[:, -1, :VOCAB].argmax(-1)]
    for _ in range(5):
        tokens.append(model.step(tokens[-1], caches)[:, :VOCAB].argmax(-1))
    assert torch.equal(generated, torch.stack(tokens, 1))
    assert [delta.shape[-1] for _, delta, _ in seen] == [40, 40, 10]                # steps were not watched


def test_default_layer_and_bad_arguments():
    model = small_model(n_layer=5)
    assert decimamba.default_decimating_layers(5) == [2] and decimamba.default_decimating_layers(24) == [12]
    with pytest.raises(ValueError, match="needs L_base.*training length"):
        decimamba.apply(model)
    with pytest.raises(ValueError, match=r"distinct layer indices in \[0, 5\), got \[5\]"):
        decimamba.apply(model, decimating_layers=[5], L_base=8)
    with pytest.raises(ValueError, match="distinct layer indices"):
        decimamba.apply(model, decimating_layers=[1, 1], L_base=8)
    with pytest.raises(ValueError, match=r"beta must be a number in \(0, 1\], got 0"):
        decimamba.apply(model, L_base=8, beta=0)
    with pytest.raises(ValueError, match="min_len must be a positive integer"):
        decimamba.apply(model, L_base=8, min_len=0)
    with pytest.raises(ValueError, match="L_base must be a positive integer"):
        decimamba.apply(model, L_base=2.5)
    assert model.hook is None
