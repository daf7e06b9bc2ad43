"""Shared helpers of the test suite (CPU only)."""
import os

# Triton kernels run in its interpreter, which must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mamba import Mamba, MambaConfig  # noqa: E402


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def raw_dt(delta):
    """The dt that makes Δ = softplus(dt + 0) equal `delta` (-inf where delta is 0): hand-made Δ for a hook."""
    d = delta.double()
    return (d + torch.log(-torch.expm1(-d))).float()


def small_model(seed=0, perturb=True, **config):
    """A tiny random Mamba (d_model 32, 2 layers, vocab 101), its weights moved off the initialisation so that
    Δ, D and every path vary (a fresh init has Δ small and D = 1)."""
    torch.manual_seed(seed)
    model = Mamba(MambaConfig(**{**dict(d_model=32, n_layer=2, vocab_size=101, d_state=8), **config})).eval()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def model():
    return small_model()
