"""mamba.py: scans against the reference, recurrent decoding, the hook, checkpoints, parity with transformers."""
import json
import os
import struct
import tracemalloc

import pytest
import torch

import mamba
from conftest import rel_err, small_model
from mamba import Mamba, MambaConfig


def scan_inputs(batch, d_inner, d_state, L, groups=None, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g)
    bc_shape = (batch, d_state, L) if groups is None else (batch, groups, d_state, L)
    return dict(u=r(batch, d_inner, L), delta=r(batch, d_inner, L) * 0.5,
                A=-torch.rand(d_inner, d_state, generator=g) * 4 - 0.1,
                B=r(*bc_shape), C=r(*bc_shape), D=r(d_inner), z=r(batch, d_inner, L), delta_bias=r(d_inner) * 0.5)


@pytest.mark.parametrize("batch,d_inner,d_state,L,chunk_len", [
    (1, 4, 16, 1, None), (3, 6, 16, 37, None), (2, 8, 64, 50, 7), (2, 4, 4, 64, 64), (1, 5, 8, 129, 1)])
@pytest.mark.parametrize("options", ["all", "plain"])
def test_chunked_scan_equals_reference_with_gradients(batch, d_inner, d_state, L, chunk_len, options):
    x = scan_inputs(batch, d_inner, d_state, L)
    kw = dict(delta_softplus=True, return_last_state=True)
    if options == "plain":
        x.update(D=None, z=None, delta_bias=None)
        x["delta"] = x["delta"].abs()
        kw["delta_softplus"] = False
    grads = {}  # the reference runs in float64, so the error measured is the fp32 chunked scan's own
    for name, fn in [("ref", mamba.selective_scan_ref), ("chunked", mamba.selective_scan_chunked)]:
        dtype = torch.float64 if name == "ref" else torch.float32
        inputs = {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in x.items()}
        extra = {"chunk_len": chunk_len} if name == "chunked" else {}
        y, last = fn(**inputs, **kw, **extra)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward(retain_graph=True)
        (last.sin().sum()).backward()
        grads[name] = (y.detach(), last.detach(), {k: v.grad for k, v in inputs.items() if v is not None})
    (y_ref, last_ref, g_ref), (y_chk, last_chk, g_chk) = grads["ref"], grads["chunked"]
    assert rel_err(y_chk, y_ref) <= 1e-5
    assert rel_err(last_chk, last_ref) <= 1e-5
    for k in g_ref:
        assert rel_err(g_chk[k], g_ref[k]) <= 1e-5, k


def test_grouped_B_C():
    x = scan_inputs(2, 8, 4, 21, groups=2)
    y_ref = mamba.selective_scan_ref(**x, delta_softplus=True)
    y_chk = mamba.selective_scan_chunked(**x, delta_softplus=True)
    assert rel_err(y_chk, y_ref) <= 1e-5
    # a group is shared by d_inner // G consecutive channels: equal to expanding by hand
    x_manual = dict(x, B=x["B"][:, 0], C=x["C"][:, 0])
    x_manual.update({k: x[k][:, :4] for k in ("u", "delta", "z")}, A=x["A"][:4], D=x["D"][:4],
                    delta_bias=x["delta_bias"][:4])
    assert rel_err(y_ref[:, :4], mamba.selective_scan_ref(**x_manual, delta_softplus=True)) <= 1e-6


def test_backend_selection(monkeypatch):
    x = scan_inputs(1, 4, 4, 9, seed=0)
    monkeypatch.setenv("MAMBA_SCAN", "ref")
    assert torch.equal(mamba.selective_scan(*x.values()), mamba.selective_scan_ref(*x.values()))
    assert torch.equal(mamba.selective_scan(**x), mamba.selective_scan_ref(**x))  # keywords, as mamba_ssm's
    with pytest.raises(ValueError, match="unknown scan backend 'cuda'.*ref, torch or triton"):
        mamba.selective_scan(*x.values(), backend="cuda")


def test_config_defaults_and_json_round_trip():
    c = MambaConfig(d_model=100, n_layer=3, vocab_size=50277)
    assert c.dt_rank == 7 and c.d_inner == 200 and c.padded_vocab_size == 50280
    assert MambaConfig.from_json_dict(json.loads(json.dumps(c.to_json_dict()))) == c
    hf = dict(hidden_size=64, num_hidden_layers=2, state_size=16, conv_kernel=4, expand=2, time_step_rank=4,
              vocab_size=50280, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True)
    c = MambaConfig.from_json_dict(hf)
    assert (c.d_model, c.n_layer, c.d_state, c.dt_rank, c.padded_vocab_size) == (64, 2, 16, 4, 50280)
    with pytest.raises(ValueError, match="use_bias=True"):
        MambaConfig.from_json_dict(dict(hf, use_bias=True))
    with pytest.raises(ValueError, match="only Mamba-1"):
        MambaConfig.from_json_dict({"d_model": 8, "n_layer": 1, "vocab_size": 8, "ssm_cfg": {"layer": "Mamba2"}})
    with pytest.raises(ValueError, match="d_model must be a positive integer, got 0"):
        MambaConfig.from_json_dict({"d_model": 0, "n_layer": 1, "vocab_size": 8})
    with pytest.raises(ValueError, match="n_layer must be a positive integer, got None"):
        MambaConfig.from_json_dict({"d_model": 8, "vocab_size": 8})


def test_initialisation_matches_mamba_ssm():
    c = MambaConfig(d_model=64, n_layer=4, vocab_size=64, d_state=16)
    m = Mamba(c)
    mixer = m.backbone.layers[0].mixer
    assert torch.allclose(-torch.exp(mixer.A_log[3]), -torch.arange(1, 17).float())
    assert torch.equal(mixer.D, torch.ones(c.d_inner))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= c.dt_init_floor * 0.999 and dt.max() <= c.dt_max * 1.001
    assert mixer.dt_proj.weight.abs().max() <= c.dt_rank ** -0.5
    assert m.lm_head.weight is m.backbone.embedding.weight
    assert 0.015 < m.backbone.embedding.weight.std() < 0.025
    assert mixer.in_proj.bias is None and mixer.conv1d.bias is not None
    names = set(m.state_dict())
    for k in ["backbone.embedding.weight", "backbone.layers.0.norm.weight", "backbone.layers.3.mixer.A_log",
              "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.conv1d.bias",
              "backbone.layers.0.mixer.x_proj.weight", "backbone.layers.0.mixer.dt_proj.bias",
              "backbone.layers.0.mixer.out_proj.weight", "backbone.layers.0.mixer.D", "backbone.norm_f.weight",
              "lm_head.weight"]:
        assert k in names


def test_step_and_generate_match_full_forward():
    model = small_model()
    ids = torch.randint(0, 101, (2, 13))
    full = model(ids)
    logits, caches = model.prefill(ids[:, :5])
    assert rel_err(logits, full[:, 4]) <= 1e-5
    for t in range(5, 13):
        step_logits = model.step(ids[:, t], caches)
        assert rel_err(step_logits, full[:, t]) <= 1e-5, t
    # prefill shorter than d_conv, then steps
    logits, caches = model.prefill(ids[:, :2])
    for t in range(2, 6):
        assert rel_err(model.step(ids[:, t], caches), full[:, t]) <= 1e-5
    # greedy generate equals arg-max of repeated full forwards
    new = model.generate(ids[:, :6], max_new_tokens=5)
    seq = ids[:, :6]
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[:, -1, :101].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 6:])


def test_generate_stops_at_eos_and_samples():
    model = small_model()
    ids = torch.randint(0, 101, (1, 8))
    greedy = model.generate(ids, max_new_tokens=6)
    eos = int(greedy[0, 2])
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=eos)
    assert stopped.shape[1] <= 3 and int(stopped[0, -1]) == eos
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=4, temperature=1.0, top_k=5)
    assert sampled.shape == (1, 4) and int(sampled.max()) < 101


def test_hook_none_and_identity_are_bit_identical_and_steps_are_not_hooked():
    model = small_model()
    ids = torch.randint(0, 101, (2, 17))
    vanilla = model(ids)   # no hook: the scan applies Δ's bias and softplus itself
    calls = []

    def identity(layer_idx, dt, dt_bias):
        calls.append((layer_idx, tuple(dt.shape), tuple(dt_bias.shape), dt_bias.dtype))
        return dt

    with model.hooked(identity):
        assert torch.equal(model(ids), vanilla)
        assert calls == [(i, (2, 64, 17), (64,), torch.float32) for i in range(2)]
        calls.clear()
        _, caches = model.prefill(ids)
        model.step(ids[:, 0], caches)
        assert len(calls) == 2   # the prefill's two layers, no step
    assert model.hook is None and torch.equal(model(ids), vanilla)


def test_hooked_restores_the_previous_hook_even_on_error():
    model = small_model()
    outer = lambda i, dt, dt_bias: dt  # noqa: E731
    with model.hooked(outer):
        with pytest.raises(RuntimeError):
            with model.hooked(None):
                assert model.hook is None
                raise RuntimeError
        assert model.hook is outer
    assert model.hook is None


def mixer_reference(mixer, hidden_states, keep=None):
    """One mixer written out with the reference scan; the tokens not in keep dropped before the scan."""
    L = hidden_states.shape[1]
    x, z = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    x = torch.nn.functional.silu(mixer.conv1d(x)[..., :L])
    dt, B, C = mixer.x_proj(x.transpose(1, 2)).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    delta = torch.nn.functional.softplus(dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias).transpose(1, 2)
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    if keep is not None:
        x, z, delta, B, C = (t[:, :, keep] for t in (x, z, delta, B, C))
    y = mamba.selective_scan_ref(x, delta, -torch.exp(mixer.A_log), B, C, mixer.D, z)
    return mixer.out_proj(y.transpose(1, 2))


def test_hook_changes_delta_and_drops_tokens_before_the_scan():
    model = small_model()
    ids = torch.randint(0, 101, (1, 12))
    vanilla = model(ids)
    with model.hooked(lambda i, dt, dt_bias: torch.full_like(dt, -10.0) if i == 1 else dt):
        assert not torch.allclose(model(ids), vanilla)
    keep = [0, 3, 11]
    with model.hooked(lambda i, dt, dt_bias: (dt, torch.tensor([keep])) if i == 0 else dt):
        out = model(ids)
    assert out.shape == (1, 3, 104)
    # layer 0's scan reads only the kept tokens (the conv before it sees them all); layer 1 sees 3 positions
    layers = model.backbone.layers
    residual = model.backbone.embedding(ids).float()
    residual = residual[:, keep] + mixer_reference(layers[0].mixer, layers[0].norm(residual), keep)
    residual = residual + mixer_reference(layers[1].mixer, layers[1].norm(residual))
    assert rel_err(out, model.lm_head(model.backbone.norm_f(residual))) <= 1e-5


def test_decoding_continues_from_the_shortened_prefill():
    model = small_model()
    ids = torch.randint(0, 101, (1, 12))
    keep = torch.tensor([[0, 3, 11]])
    drop = lambda i, dt, dt_bias: (dt, keep) if i == 0 else dt  # noqa: E731
    with model.hooked(drop):
        logits, caches = model.prefill(ids)
        assert rel_err(logits, model(ids)[:, -1]) <= 1e-6
        step = model.step(torch.tensor([5]), caches)
    # prefill + step equals the forward of the longer prompt that keeps the same tokens and the new one
    keep2 = torch.tensor([[0, 3, 11, 12]])
    with model.hooked(lambda i, dt, dt_bias: (dt, keep2) if i == 0 else dt):
        assert rel_err(step, model(torch.cat([ids, torch.tensor([[5]])], 1))[:, -1]) <= 1e-5


def test_low_precision_load_keeps_decay_rates_in_float32(tmp_path):
    small_model().save_pretrained(tmp_path)
    model = Mamba.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    mixer = model.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_proj.bias.dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_save_load_round_trip_state_spaces_layout(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    assert json.load(open(tmp_path / "config.json"))["ssm_cfg"]["d_state"] == 8
    loaded = Mamba.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 101, (1, 9))
    assert torch.equal(loaded(ids), model(ids))


def hf_state_dict(model):
    return {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v
            for k, v in model.state_dict().items() if k != "lm_head.weight"}


def hf_config(model):
    c = model.config
    return dict(model_type="mamba", hidden_size=c.d_model, num_hidden_layers=c.n_layer, state_size=c.d_state,
                conv_kernel=c.d_conv, expand=c.expand, time_step_rank=c.dt_rank, vocab_size=c.padded_vocab_size,
                layer_norm_epsilon=c.norm_eps, use_bias=False, use_conv_bias=True, residual_in_fp32=True,
                tie_word_embeddings=True)


def write_safetensors(path, tensors):
    """A minimal writer for the tests (the format: 8-byte header length, JSON header, raw bytes)."""
    header, blobs, offset = {}, [], 0
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_load_hugging_face_layout(tmp_path, weights_file):
    model = small_model()
    json.dump(hf_config(model), open(tmp_path / "config.json", "w"))
    state = hf_state_dict(model)
    if weights_file == "model.safetensors":
        write_safetensors(tmp_path / weights_file, state)
    else:
        torch.save(state, tmp_path / weights_file)
    loaded = Mamba.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 101, (1, 9))
    assert torch.equal(loaded(ids)[..., :101], model(ids)[..., :101])


def test_safetensors_reader_against_package(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "d": torch.randn(2, 2).half(), "empty": torch.zeros(0, 3)}
    safetensors_torch.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    ours = mamba.read_safetensors(str(tmp_path / "x.safetensors"))
    theirs = safetensors_torch.load_file(str(tmp_path / "x.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_safetensors_reader_holds_the_file_once(tmp_path):
    """The tensors are views of one buffer the size of the file: reading a checkpoint takes its size in memory
    once, not twice."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = str(tmp_path / "big.safetensors")
    safetensors_torch.save_file({f"w{i}": torch.randn(256, 1024) for i in range(4)}, path)   # 4 MiB
    tracemalloc.start()
    tensors = mamba.read_safetensors(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(tensors) == 4 and peak < 1.5 * os.path.getsize(path), f"peak {peak} for {os.path.getsize(path)}"


def test_checkpoint_errors_name_files_keys_and_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Mamba.from_pretrained(str(tmp_path))
    model = small_model()
    json.dump(model.config.to_json_dict(), open(tmp_path / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin or model.safetensors"):
        Mamba.from_pretrained(str(tmp_path))
    state = model.state_dict()
    state["backbone.layers.0.mixer.D"] = torch.ones(7)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer.D has shape \(7,\).*\(64,\)"):
        Mamba.from_pretrained(str(tmp_path))
    state = small_model().state_dict()
    del state["backbone.norm_f.weight"]
    state["extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"Missing keys: \['backbone.norm_f.weight'\].*unexpected keys: \['extra.weight'\]"):
        Mamba.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json and pytorch_model.bin .* into one directory"):
        Mamba.from_pretrained("no-such-org/no-such-model-here")


def test_parity_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for seed, (d_model, n_layer, d_state, vocab) in enumerate([(32, 2, 8, 96), (48, 3, 16, 120)]):
        torch.manual_seed(seed)
        cfg = transformers.MambaConfig(hidden_size=d_model, num_hidden_layers=n_layer, state_size=d_state,
                                       vocab_size=vocab, expand=2, conv_kernel=4, use_bias=False,
                                       use_conv_bias=True, tie_word_embeddings=True)
        hf = transformers.MambaForCausalLM(cfg).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        hf.save_pretrained(tmp_path / f"m{seed}")
        ours = Mamba.from_pretrained(str(tmp_path / f"m{seed}"))
        ids = torch.randint(0, vocab, (2, 33))
        with torch.no_grad():
            expected = hf(ids).logits
        assert rel_err(ours(ids), expected) <= 1e-5


def test_bfloat16_weights_keep_state_and_residual_in_float32():
    model = small_model()
    ids = torch.randint(0, 101, (2, 19))
    expected = model(ids)
    half = small_model()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    logits, caches = half.prefill(ids[:, :11])
    assert caches[0].ssm_state.dtype == torch.float32
    assert rel_err(logits.float(), expected[:, 10]) < 3e-2
    for t in range(11, 19):
        assert rel_err(half.step(ids[:, t], caches).float(), expected[:, t]) < 3e-2


def test_unreadable_checkpoint_files_name_the_file(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    weights = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable PyTorch weights file"):
        Mamba.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "pytorch_model.bin")
    write_safetensors(tmp_path / "model.safetensors", hf_state_dict(model))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        Mamba.from_pretrained(str(tmp_path))
    for config in ({"d_model": 32, "vocab_size": 101}, {"d_model": "64", "n_layer": 2, "vocab_size": 101}):
        json.dump(config, open(tmp_path / "config.json", "w"))
        with pytest.raises(ValueError, match="config.json: not a Mamba config .*must be a positive integer"):
            Mamba.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a Mamba config"):
        Mamba.from_pretrained(str(tmp_path))


def test_half_precision_save_keeps_decay_rates_in_float32(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path, dtype=torch.float16)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert state["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.float16
    assert state["backbone.layers.0.mixer.A_log"].dtype == state["backbone.layers.0.mixer.D"].dtype == torch.float32
    loaded = Mamba.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 101, (1, 9))
    assert rel_err(loaded(ids), model(ids)) < 1e-2


def test_decode_stops_at_any_stop_token_but_not_before_min_new_tokens():
    model = small_model()
    ids = torch.randint(0, 101, (1, 8))
    first = int(model.generate(ids, max_new_tokens=1)[0, 0])
    assert model.generate(ids, 6, eos_token_id=[7 if first != 7 else 8, first]).tolist() == [[first]]
    held = model.generate(ids, 6, eos_token_id=first, min_new_tokens=1)
    assert int(held[0, 0]) != first and held.shape[1] >= 2


def test_decode_refuses_bad_arguments_and_leaves_the_callers_logits_alone():
    model = small_model()
    logits, caches = model.prefill(torch.randint(0, 101, (2, 8)))
    before = logits.clone()
    model.decode(logits, caches, 3, eos_token_id=int(logits[0].argmax()), min_new_tokens=2)
    assert torch.equal(logits, before)   # the stop tokens are held back in a copy
    for bad, message in ((dict(eos_token_id=101), r"eos_token_id 101: token ids must be in \[0, 101\)"),
                         (dict(eos_token_id=[3, -1]), r"eos_token_id \[3, -1\]: token ids"),
                         (dict(temperature=-1.0), "temperature must be >= 0"),
                         (dict(temperature=1.0, top_k=0), "top_k must be None or >= 1")):
        with pytest.raises(ValueError, match=message):
            model.decode(logits, caches, 3, **bad)
    with pytest.raises(ValueError, match="needs at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))


def test_odd_configs_are_refused_in_one_line():
    base = {"d_model": 8, "n_layer": 1, "vocab_size": 8}
    for config, message in ((dict(base, pad_vocab_size_multiple=0), "pad_vocab_size_multiple must be a positive "
                                                                     "integer, got 0"),
                            (dict(base, ssm_cfg={"d_model": 4}), r"unsupported ssm_cfg keys \['d_model'\]"),
                            (dict(base, ssm_cfg={"bias": True}), r"unsupported ssm_cfg keys \['bias'\] .* bias=False"),
                            (dict(base, norm_epsilon=None), "norm_eps must be a positive number, got None"),
                            (dict(base, d_model="auto"), "d_model must be a positive integer, got 'auto'")):
        with pytest.raises(ValueError, match=message):
            MambaConfig.from_json_dict(config)


def test_a_config_that_spells_out_mamba_ssms_defaults_loads():
    """mamba_ssm may write every Mamba-1 option into ssm_cfg; at the values this model implements they load."""
    ssm = {"layer": "Mamba1", "d_state": 8, "dt_init": "random", "dt_scale": 1.0, "conv_bias": True, "bias": False,
           "use_fast_path": False}
    config = MambaConfig.from_json_dict({"d_model": 8, "n_layer": 1, "vocab_size": 8, "ssm_cfg": ssm})
    assert config.d_state == 8


def test_odd_weights_files_and_paths_are_refused_in_one_line(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is a file: pass the checkpoint directory"):
        Mamba.from_pretrained(str(tmp_path / "config.json"))
    torch.save([1, 2], tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: not a dict of tensors"):
        Mamba.from_pretrained(str(tmp_path))
    for header, message in ((b"[]", "not a readable safetensors file"),
                            (b'{"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}',
                             "not a readable safetensors file .*tensor a has dtype F8_E4M3, which is not supported"),
                            (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1]}}',
                             "tensor a: 1 bytes for shape \\[1\\] of F32"),
                            (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 9]}}',
                             "tensor a spans bytes 0 to 9 of a 1-byte body: truncated")):
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
        with pytest.raises(ValueError, match=message):
            mamba.read_safetensors(str(tmp_path / "model.safetensors"))


def test_a_safetensors_file_that_shrinks_while_read_is_refused(tmp_path, monkeypatch):
    header = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\1")
    size = os.path.getsize
    monkeypatch.setattr(os.path, "getsize", lambda path: size(path) + 8)   # as if 8 bytes went before the read
    with pytest.raises(ValueError, match="the file changed while it was read"):
        mamba.read_safetensors(str(tmp_path / "model.safetensors"))


def test_cuda_graphs_are_recorded_again_when_any_weight_moves(monkeypatch):
    """The cache key of decode()'s CUDA graphs, checked on a CPU with a stand-in for the recording: a graph reads
    every weight where it was recorded, so a weight moved to new memory needs a new one (test_cuda.py replays)."""
    recorded = []
    monkeypatch.setattr(mamba, "GraphedStep", type("Recorded", (), dict(
        __init__=lambda self, model, caches: recorded.append(self), copy_caches_from=lambda self, caches: None)))
    model = small_model()
    _, caches = model.prefill(torch.randint(0, 101, (2, 8)))
    assert mamba._graphed_step(model, caches) is mamba._graphed_step(model, caches) is recorded[0]
    mixer = model.backbone.layers[1].mixer
    mixer.D.data = mixer.D.data + 1.0   # lm_head.weight stays where it was
    assert mamba._graphed_step(model, caches) is recorded[1] and len(model._graphs) == 1
