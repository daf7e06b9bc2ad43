"""conv_triton.py: the fused causal conv + SiLU against PyTorch's depthwise conv, in Triton's CPU interpreter."""
import pytest
import torch
import torch.nn.functional as F

import conv_triton
from conftest import rel_err, small_model


def reference(x, weight, bias):
    """mamba.MambaMixer's plain path: nn.Conv1d padded on both sides, the first l outputs, SiLU."""
    d, L = x.shape[1:]
    return F.silu(F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=d)[..., :L])


@pytest.mark.parametrize("batch, L, d, K", [(2, 137, 40, 4), (1, 3, 130, 4), (3, 70, 16, 2), (2, 33, 8, 5)],
                         ids=["tiles cut inside", "shorter than the kernel", "K=2", "K=5, the widest taken"])
def test_forward_and_gradients_match_pytorch_on_a_slice_of_in_projs_output(batch, L, d, K):
    """x is the first half of in_proj's output, a (2d, b·l) matrix viewed (b, d, l): u and ∂x keep that layout."""
    seed = torch.seed()
    xz = torch.randn(2 * d, batch * L, requires_grad=True)
    x = xz[:d].view(d, batch, L).transpose(0, 1)
    weight, bias = torch.randn(d, K, requires_grad=True), torch.randn(d, requires_grad=True)
    u = conv_triton.causal_conv_silu(x, weight, bias)
    ref = reference(x, weight, bias)
    assert u.stride() == (L, batch * L, 1) and rel_err(u, ref) <= 1e-5, f"seed {seed}"
    du = torch.randn_like(u)
    grads = torch.autograd.grad(u, (xz, weight, bias), du)
    for name, got, want in zip(("x", "weight", "bias"), grads, torch.autograd.grad(ref, (xz, weight, bias), du)):
        assert rel_err(got, want) <= 1e-5, f"{name}, seed {seed}"


def test_half_precision_input_is_computed_in_float32():
    """bf16 x and ∂u, float32 weights: the output and ∂x are rounded to bf16 once (≤ 2^-8 per element, up to
    twice that where the interpreter truncates instead of rounding); ∂w and ∂bias stay float32."""
    seed = torch.seed()
    x = torch.randn(2, 24, 50, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = torch.randn(24, 4, requires_grad=True), torch.randn(24, requires_grad=True)
    u = conv_triton.causal_conv_silu(x, weight, bias)
    x32 = x.detach().float().requires_grad_()
    ref = reference(x32, weight, bias)
    assert u.dtype == torch.bfloat16 and rel_err(u, ref) <= 4e-3, f"seed {seed}"
    du = torch.randn(2, 50, 24).to(torch.bfloat16).mT                # channels contiguous: any layout is read
    dx, dw, dbias = torch.autograd.grad(u, (x, weight, bias), du)
    dx_ref, dw_ref, dbias_ref = torch.autograd.grad(ref, (x32, weight, bias), du.float())
    assert dx.dtype == torch.bfloat16 and rel_err(dx, dx_ref) <= 5e-3, f"seed {seed}"
    assert rel_err(dw, dw_ref) <= 1e-5 and rel_err(dbias, dbias_ref) <= 1e-5, f"seed {seed}"


@pytest.mark.parametrize("d_conv", [5, 6], ids=["the widest the kernel takes", "wider: PyTorch's conv"])
def test_the_mixer_on_the_triton_path_takes_any_conv_width(monkeypatch, d_conv):
    """A model with a conv wider than the kernel's MAX_K still runs on the Triton path, its conv in PyTorch."""
    model = small_model(d_conv=d_conv)
    ids = torch.randint(0, 101, (2, 24))
    logits = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MAMBA_SCAN", backend)
        logits[backend] = model(ids)
    assert rel_err(logits["triton"], logits["torch"]) <= 1e-5
