"""AFA diagnostics (ZF plot, εLBO, AFA error) on SAEs whose answers are known in closed form."""

from __future__ import annotations

import pytest
import torch

from sae_guard import SAE
from sae_guard.sae.afa import afa_cone, afa_error, epsilon_lbo, zf_data

D_IN, D_SAE = 16, 8


def orthonormal_sae(arch: str = "topk", scale: float = 1.0) -> SAE:
    """An SAE whose decoder rows are orthonormal (times `scale`) and whose encoder inverts them exactly."""
    torch.manual_seed(0)
    sae = SAE.create(arch, d_in=D_IN, d_sae=D_SAE, k=3)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN))[0][:D_SAE]
    with torch.no_grad():
        sae.W_dec.copy_(basis * scale)
        sae.W_enc.copy_(basis / scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def sparse_inputs(sae: SAE, n: int = 50) -> torch.Tensor:
    """Non-negative combinations of at most 3 atoms, which the orthonormal SAE encodes exactly."""
    gen = torch.Generator().manual_seed(1)
    coeffs = torch.rand(n, D_SAE, generator=gen) + 0.5
    keep = torch.rand(n, D_SAE, generator=gen).argsort(-1) < 3
    return (coeffs * keep) @ sae.W_dec.detach()


def test_perfect_quasi_orthogonal_codes_sit_on_the_line():
    sae = orthonormal_sae()
    x = sparse_inputs(sae)
    data = zf_data(sae, x)
    assert data.z_norm.shape == data.f_norm.shape == data.epsilon_lbo.shape == data.nmse.shape == (50,)
    torch.testing.assert_close(data.f_norm, data.z_norm, atol=1e-5, rtol=1e-5)
    assert data.epsilon_lbo.max() < 1e-5 and data.nmse.max() < 1e-10
    assert afa_error(sae, x).abs().max() < 1e-5


def test_decoder_norms_are_folded_into_the_features():
    """Scaling decoder rows by c and codes by 1/c is the same dictionary: the AFA must not change."""
    x = sparse_inputs(orthonormal_sae())
    plain, scaled = zf_data(orthonormal_sae(), x), zf_data(orthonormal_sae(scale=3.0), x)
    torch.testing.assert_close(scaled.f_norm, plain.f_norm, atol=1e-5, rtol=1e-5)


def test_decoder_bias_counts_as_one_more_feature():
    sae = orthonormal_sae()
    x = sparse_inputs(sae)
    bias = torch.zeros(D_IN)
    bias[0] = 2.0
    with torch.no_grad():
        sae.b_dec.copy_(bias)
    data = zf_data(sae, x + bias)
    codes = sae.encode(x + bias)
    torch.testing.assert_close(data.f_norm.pow(2).float(), codes.pow(2).sum(-1) + 4.0, atol=1e-4, rtol=1e-5)
    expected = (data.z_norm.pow(2) - data.f_norm.pow(2)).abs() / (D_SAE * data.f_norm.pow(2))
    torch.testing.assert_close(epsilon_lbo(sae, x + bias), expected)


def test_over_activation_is_positive_error():
    sae = orthonormal_sae()
    x = sparse_inputs(sae)
    with torch.no_grad():
        sae.W_enc.mul_(2.0)  # every code twice too large
    torch.testing.assert_close(afa_error(sae, x), torch.ones(50, dtype=torch.float64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "abstopk", "matryoshka", "feature_choice", "top_afa"])
def test_works_on_any_architecture_and_shape(arch):
    torch.manual_seed(0)
    sae = SAE.create(arch, d_in=D_IN, d_sae=32, **({} if arch == "top_afa" else {"k": 3}))
    data = zf_data(sae, torch.randn(4, 5, D_IN), batch_size=7)
    assert all(t.shape == (20,) and torch.isfinite(t).all() for t in data)


def test_cone_bounds():
    z = torch.tensor([1.0, 4.0])
    lower, upper = afa_cone(z, 0.75)
    torch.testing.assert_close(lower, z / 1.75**0.5)
    torch.testing.assert_close(upper, z * 2.0)
    assert torch.isinf(afa_cone(z, 1.0)[1]).all()
    with pytest.raises(ValueError):
        afa_cone(z, -0.1)
