"""The public SAE contract (DESIGN.md), checked on every registered architecture."""

import json

import pytest
import torch

import sae_guard
from sae_guard import SAE
from sae_guard.synthetic import planted

D_IN, D_SAE = 16, 64
ARCHS = sae_guard.architectures()


def make(arch: str) -> SAE:
    torch.manual_seed(0)
    kwargs = {"k": 4} if "k" in {f for f in SAE.create.__globals__["get_architecture"](arch).config_class.__dataclass_fields__} else {}
    return SAE.create(arch, d_in=D_IN, d_sae=D_SAE, **kwargs)


def trained(arch: str) -> SAE:
    ds = planted(d=D_IN, n_atoms=32, active=3, seed=1, batch_size=256)
    sae = make(arch)
    sae, _ = sae_guard.train(sae, ds, tokens=256 * 30, batch_size=256, progress=False)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_forward(arch):
    sae = trained(arch)
    x = torch.randn(3, 5, D_IN)
    codes = sae.encode(x)
    assert codes.shape == (3, 5, D_SAE)
    assert sae.decode(codes).shape == (3, 5, D_IN)
    assert sae(x).shape == (3, 5, D_IN)
    assert sae.W_dec.shape == (D_SAE, D_IN)
    sparse = sae.encode_sparse(x)
    torch.testing.assert_close(sparse.to_dense(D_SAE), codes)
    torch.testing.assert_close(sae.decode(sparse), sae.decode(codes), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), sae.decode(codes), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cfg_is_json_and_roundtrips(arch, tmp_path):
    sae = trained(arch)
    json.dumps(sae.cfg.to_dict())
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = SAE.load(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x = torch.randn(7, D_IN)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded(x), sae(x), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_lays_the_encoder_out_for_inference_without_changing_it(arch):
    sae = make(arch).train()
    x = torch.randn(9, D_IN)
    with torch.no_grad():
        before, weights = sae.encode(x), sae.W_enc.clone()
        sae.eval()
        assert sae.W_enc.stride() == (1, D_SAE) and torch.equal(sae.W_enc, weights)
        torch.testing.assert_close(sae.encode(x), before, atol=1e-5, rtol=1e-5)
    sae.train()
    assert sae.W_enc.is_contiguous() and torch.equal(sae.W_enc, weights)


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_does_not_depend_on_batch(arch):
    sae = trained(arch)
    x = torch.randn(12, D_IN)
    together = sae.encode(x)
    alone = torch.cat([sae.encode(x[i : i + 1]) for i in range(12)])
    # A batched and a one-row matmul may differ in the last bits, which can tip a latent sitting at a selection's
    # boundary (top-AFA's prefix on one BLAS thread: one latent of 5e-4). A batch-dependent rule moves whole codes.
    torch.testing.assert_close(together, alone, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_width_and_nan_are_clear_errors(arch):
    sae = make(arch)
    with pytest.raises(ValueError, match="width d_in=16"):
        sae.encode(torch.randn(2, D_IN + 1))
    x = torch.randn(2, D_IN)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sae.encode(x)


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ValueError, match="unknown SAE architecture 'nope'.*topk"):
        SAE.create("nope", d_in=4, d_sae=8)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="d_sae must be a positive integer"):
        SAE.create("topk", d_in=4, d_sae=0)
    with pytest.raises(ValueError, match="k must be in"):
        SAE.create("topk", d_in=4, d_sae=8, k=9)
