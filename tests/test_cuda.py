"""The fast path on a GPU: the compiled model around the Triton operator against the PyTorch path, and decoding
replayed from CUDA graphs against plain steps. Run on a GPU machine with the kernels compiled, not interpreted:

    TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py

(the suite's default runs Triton in its CPU interpreter, where test_scan_triton.py checks the same operator)."""
import os

import pytest
import torch

import longmamba
import mamba
from conftest import rel_err, small_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ["TRITON_INTERPRET"] == "1",
                                reason="needs a CUDA GPU and TRITON_INTERPRET=0")
TESTBED = "checkpoints/mamba-testbed"


def test_compiled_triton_path_matches_the_pytorch_path_in_float32(monkeypatch):
    model = small_model(d_model=64, n_layer=3).cuda()
    ids = torch.randint(0, 101, (3, 300), device="cuda")
    results = []
    for backend, run in (("torch", model), ("triton", torch.compile(model))):
        monkeypatch.setenv("MAMBA_SCAN", backend)
        model.zero_grad()
        logits = run(ids)
        (logits * torch.linspace(-1, 1, logits.shape[-1], device="cuda")).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager, g_eager), (compiled, g_compiled) = results
    assert rel_err(compiled, eager) <= 1e-5
    for name in g_eager:
        assert rel_err(g_compiled[name], g_eager[name]) <= 1e-4, name


@pytest.mark.parametrize("batch", [1, 4])
def test_decoding_from_cuda_graphs_gives_the_tokens_of_plain_steps(batch):
    model = mamba.Mamba.from_pretrained(TESTBED, device="cuda").eval()
    prompt = torch.randint(0, 256, (batch, 700), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    outputs = []
    for graphs in (False, True, True):          # the second graphed run replays the graph recorded by the first
        model.cuda_graph_decoding = graphs
        logits, caches = model.prefill(prompt)
        tokens = model.decode(logits, caches, 40)
        outputs.append((tokens, [c.ssm_state.clone() for c in caches]))
    for tokens, states in outputs[1:]:
        assert torch.equal(tokens, outputs[0][0])
        for state, plain in zip(states, outputs[0][1]):     # the caller's caches hold the state after decoding
            assert rel_err(state, plain) <= 1e-5


def test_a_weight_moved_to_new_memory_records_a_new_graph():
    """A CUDA graph reads every weight at the address it was recorded with: replacing one parameter's storage
    (here D, while lm_head stays where it was) must not replay the graph recorded for the old one."""
    model = small_model().cuda()
    prompt = torch.randint(0, 101, (2, 50), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model.decode(*model.prefill(prompt), 3)                     # records a graph
    mixer = model.backbone.layers[0].mixer
    mixer.D.data = mixer.D.data + 1.0
    with torch.no_grad():
        _, plain_caches = model.prefill(prompt)
        _, caches = model.prefill(prompt)
        graphed = mamba._graphed_step(model, caches)
        for token in prompt[:, :5].unbind(1):
            assert rel_err(graphed.step(token), model.step(token, plain_caches)) <= 1e-5


@pytest.mark.parametrize("batch", [1, 4])
def test_graphed_steps_under_bf16_autocast_give_the_logits_of_plain_steps(batch):
    """In bf16 the compiled step rounds differently from the eager one, so greedy decoding may take another
    token where two are nearly tied: both step paths are fed the same tokens and their logits compared, within
    bf16's precision (2^-8 per rounding, in different places on the two paths, carried by the state over 40
    steps); a wrong step would be off by order 1."""
    model = mamba.Mamba.from_pretrained(TESTBED, device="cuda").eval()
    prompt = torch.randint(0, 256, (batch, 700), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    tokens = torch.randint(0, 256, (batch, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        _, plain_caches = model.prefill(prompt)
        _, caches = model.prefill(prompt)
        graphed = mamba._graphed_step(model, caches)
        for token in tokens.unbind(1):
            plain = model.step(token, plain_caches)
            assert rel_err(graphed.step(token).float(), plain.float()) <= 2e-2


def test_longmamba_on_the_triton_path_matches_the_pytorch_path(monkeypatch):
    """LongMamba answers mamba.SkipBelow: both scans skip the same tokens (Δ = 0) where they form Δ."""
    model = mamba.Mamba.from_pretrained(TESTBED, device="cuda").eval()
    calibration = torch.load(f"{TESTBED}/longmamba_calibration.pt", weights_only=True)
    ids = torch.randint(0, 256, (1, 8192), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    logits = {}
    with torch.no_grad(), model.hooked(longmamba.LongMamba(calibration, b=1.5)):
        for backend in ("torch", "triton"):
            monkeypatch.setenv("MAMBA_SCAN", backend)
            logits[backend] = model.hidden_states(ids)[:, -64:]
            torch.cuda.synchronize()
    assert rel_err(logits["triton"], logits["torch"]) <= 1e-5


def test_scan_backward_with_two_programs_taking_many_work_items(monkeypatch):
    """Two backward programs, each on its own SM, share 128 work items through the counter: a scratch buffer
    used by both at once, or a work item taken twice or never, would show in the gradients."""
    import scan_triton
    monkeypatch.setattr(scan_triton, "BWD_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(scan_triton, "_sms", lambda device: 2)  # also chunks: 4 per sequence
    g = torch.Generator("cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    x = dict(u=r(4, 256, 1000), delta=r(4, 256, 1000) * 0.5 - 1, A=-torch.rand(256, 16, device="cuda", generator=g) * 8,
             B=r(4, 16, 1000), C=r(4, 16, 1000), D=r(256), z=r(4, 256, 1000), delta_bias=r(256) * 0.5)
    dout = r(4, 256, 1000)
    grads = []
    for scan in (scan_triton.selective_scan, mamba.selective_scan_ref):
        inputs = {k: v.clone().requires_grad_() for k, v in x.items()}
        torch.autograd.backward(scan(**inputs, delta_softplus=True), dout)
        grads.append({k: v.grad for k, v in inputs.items()})
    for name in x:
        assert rel_err(grads[0][name], grads[1][name]) <= 1e-4, name
