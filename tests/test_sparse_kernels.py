"""The sparse paths must agree with plain dense autograd, values and gradients."""

import pytest
import torch

from sae_guard import SAE, SparseCodes, discrete_codes
from sae_guard.sae.codes import dense_to_sparse, sparse_decode
from sae_guard.sae.kernels import encoder_preacts, gather_linear


def test_gather_linear_matches_dense_autograd():
    torch.manual_seed(0)
    x = torch.randn(10, 8, requires_grad=True)
    c = torch.randn(8, requires_grad=True)
    w = torch.randn(32, 8, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    pre = encoder_preacts(x - c, w, b)
    torch.testing.assert_close(pre, torch.nn.functional.linear(x - c, w, b), atol=1e-5, rtol=1e-5)
    idx = pre.topk(5, dim=-1).indices
    upstream = torch.randn(10, 5)
    (gather_linear(x, c, w, b, idx, pre) * upstream).sum().backward()
    sparse_grads = [t.grad.clone() for t in (x, c, w, b)]
    for t in (x, c, w, b):
        t.grad = None
    (torch.nn.functional.linear(x - c, w, b).gather(-1, idx) * upstream).sum().backward()
    for got, t in zip(sparse_grads, (x, c, w, b)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)


def test_sparse_decode_matches_dense():
    torch.manual_seed(0)
    dense = torch.relu(torch.randn(2, 3, 40)) * (torch.rand(2, 3, 40) < 0.2)
    codes = dense_to_sparse(dense)
    w = torch.randn(40, 6)
    torch.testing.assert_close(sparse_decode(codes, w), dense @ w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codes.to_dense(40), dense)


def test_sparse_decode_gradients_match_dense_autograd_with_repeated_latents():
    torch.manual_seed(0)
    indices = torch.randint(0, 12, (9, 4))
    indices[0, 1] = indices[0, 0]  # zero-padded codes repeat a latent within a token
    values = torch.randn(9, 4, requires_grad=True)
    w = torch.randn(12, 5, requires_grad=True)
    upstream = torch.randn(9, 5)
    (sparse_decode(SparseCodes(values, indices), w) * upstream).sum().backward()
    got = values.grad.clone(), w.grad.clone()
    values.grad = w.grad = None
    dense = torch.zeros(9, 12).index_put((torch.arange(9)[:, None].expand(-1, 4), indices), values, accumulate=True)
    ((dense @ w) * upstream).sum().backward()
    torch.testing.assert_close(got[0], values.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], w.grad, atol=1e-5, rtol=1e-5)


def test_topk_training_forward_gradients_match_dense_reference():
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=8, d_sae=32, k=3, auxk_coef=0.0)
    x = torch.randn(16, 8)
    step = sae.training_forward(x)
    loss = ((step.x_hat - x) ** 2).sum()
    loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = torch.nn.functional.linear(x - sae.b_dec, sae.W_enc, sae.b_enc)
    idx = pre.detach().topk(3, dim=-1).indices
    z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))
    ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum().backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_discrete_codes_pick_the_most_active_latent():
    dense = torch.tensor([[0.0, 2.0, -3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert discrete_codes(dense).tolist() == [2, -1]
    sparse = SparseCodes(torch.tensor([[0.5, 4.0], [0.0, 0.0]]), torch.tensor([[3, 1], [0, 2]]))
    assert discrete_codes(sparse).tolist() == [1, -1]


def test_chunked_topk_encode_matches_the_dense_one():
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=8, d_sae=300, k=5)
    x = torch.randn(4, 7, 8)
    dense = sae.encode(x)
    sae.chunk_elements = 7 * 64  # forces row chunks: one token per chunk (a one-row matmul may round differently)
    chunked = sae.encode(x)
    assert torch.equal(chunked != 0, dense != 0)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)
    sae.chunk_elements = 64  # a dictionary wider than a chunk: latent chunks, then the best of their candidates
    by_latents = sae.encode(x)  # a matmul over a slice of W_enc may round differently too, on some CPUs
    assert torch.equal(by_latents != 0, dense != 0)
    torch.testing.assert_close(by_latents, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows, width, k", [(7, 1792, 32), (5, 1000, 20), (3, 513, 16), (4, 2048, 8), (2, 64, 4),
                                          (3, 12288, 32), (2, 6000, 7)])
def test_row_topk_selects_exactly_the_top_k_of_each_row(rows, width, k):
    """The grouped selection (used on wide rows, including widths that leave a padded last group, and recursively on
    the maxima of very wide ones) keeps the same entries as one torch.topk."""
    from sae_guard.sae.sparsifiers import row_topk

    scores = torch.randn(rows, 3, width, generator=torch.Generator().manual_seed(width))
    scores[0, 0, :k] = scores.max() + 1.0  # a row whose winners share the first groups
    got = row_topk(scores, k)
    assert got.shape == (rows, 3, k)
    expected = scores.topk(k, dim=-1).indices
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
