"""The bf16 pre-screen picks exactly the fp32 top-k, and says so row by row or falls back."""

import pytest
import torch
import torch.nn.functional as F

from sae_guard.sae import SAE
from sae_guard.sae import screened_topk as screen
from sae_guard.sae.sparsifiers import row_topk


def plain(x_c, weight, bias, k):
    pre = F.linear(x_c, weight, bias)
    indices = row_topk(pre, k)
    return pre.gather(-1, indices), indices


def assert_same_codes(got, want):
    (values, indices), (ref_values, ref_indices) = got, want
    order, ref_order = indices.argsort(-1), ref_indices.argsort(-1)
    assert torch.equal(indices.gather(-1, order), ref_indices.gather(-1, ref_order))
    torch.testing.assert_close(values.gather(-1, order), ref_values.gather(-1, ref_order), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, d_in, d_sae, k, scale", [(50, 256, 4096, 32, 1.0), (30, 768, 6000, 16, 40.0),
                                                         (20, 300, 5000, 7, 0.01), (3, 256, 4096, 1, 1.0)])
def test_the_screen_selects_the_fp32_top_k(rows, d_in, d_sae, k, scale):
    torch.manual_seed(rows)
    weight = torch.randn(d_sae, d_in) * (0.5 + torch.rand(d_sae, 1)) / d_in**0.5
    bias = torch.randn(d_sae) * 0.1
    x_c = torch.randn(rows, d_in) * scale
    x_c[:, :3] *= 30  # a few massive dimensions, as in a transformer's residual stream
    got = screen.screened_topk(x_c, weight, bias, k, screen.Bf16Encoder())
    assert_same_codes(got, plain(x_c, weight, bias, k))


def test_rows_the_bound_cannot_settle_fall_back_to_the_plain_encode(monkeypatch):
    """With one candidate per row past k nothing can be settled; the answer must still be exact."""
    torch.manual_seed(0)
    weight, bias, x_c = torch.randn(4096, 256), torch.zeros(4096), torch.randn(40, 256)
    calls = []
    real_linear = F.linear
    monkeypatch.setattr(screen, "CANDIDATES_PER_K", 1)
    monkeypatch.setattr(screen.F, "linear", lambda *a: calls.append(a[0].shape) or real_linear(*a))
    got = screen.screened_topk(x_c, weight, bias, 8, screen.Bf16Encoder())
    assert any(shape == (40, 256) for shape in calls)  # every row went the plain way
    assert_same_codes(got, plain(x_c, weight, bias, 8))


def test_ties_at_bf16_precision_are_resolved_in_fp32():
    """Latents whose pre-activations differ below bf16's resolution are still told apart."""
    weight = torch.zeros(4096, 256)
    weight[:, 0] = 1 + torch.arange(4096) * 1e-6  # every bf16 rounds these to one of two values
    x_c = torch.zeros(2, 256)
    x_c[:, 0] = 1.0
    _, indices = screen.screened_topk(x_c, weight, torch.zeros(4096), 5, screen.Bf16Encoder())
    assert sorted(indices[0].tolist()) == list(range(4091, 4096))


def test_a_topk_sae_encodes_the_same_with_and_without_the_screen(monkeypatch):
    torch.manual_seed(1)
    sae = SAE.create("topk", d_in=256, d_sae=4096, k=16).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.5)
    x = torch.randn(3, 20, 256)
    monkeypatch.setattr(screen, "has_amx", lambda: True)
    with torch.no_grad():
        screened = sae.encode_sparse(x)
        sae.W_enc.mul_(2)  # the cached bf16 copy follows the weights
        rescreened = sae.encode_sparse(x)
    monkeypatch.setattr(screen, "has_amx", lambda: False)
    with torch.no_grad():
        unscreened = sae.encode_sparse(x)
        sae.W_enc.div_(2)
        reference = sae.encode_sparse(x)
    flat = lambda codes: (codes.values.reshape(-1, 16), codes.indices.reshape(-1, 16))
    assert_same_codes(flat(screened), flat(reference))
    assert_same_codes(flat(rescreened), flat(unscreened))


def test_the_screen_stays_out_of_gradients_and_small_dictionaries():
    sae = SAE.create("topk", d_in=256, d_sae=4096, k=16)
    x = torch.randn(4, 256)
    assert not screen.screen_applies(x, sae.W_enc)  # grad enabled
    with torch.no_grad():
        assert not screen.screen_applies(x, torch.zeros(1024, 256))
        assert not screen.screen_applies(x[:, :128], torch.zeros(4096, 128))
        assert not screen.screen_applies(x, sae.W_enc.double())
