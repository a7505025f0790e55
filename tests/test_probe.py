"""The `probe` strategy (a sparse signed readout of latent maxima) and the linear readout it scores with."""

import pytest
import torch

from sae_guard.concepts.probe import probe
from sae_guard.concepts.scoring import feature_slots, latent_contributions, max_activations, readout_scores
from sae_guard.concepts.selection import greedy_tpr
from sae_guard.sae.codes import SparseCodes


def _names_like(n: int = 200, d_sae: int = 32, seed: int = 0):
    """Latent 3 fires on every target and on half the retain inputs, where latent 5 fires too (a first name
    shared with people to keep); the other latents are noise on both sides."""
    g = torch.Generator().manual_seed(seed)
    noise = lambda rows: torch.rand(rows, d_sae, generator=g) * (torch.rand(rows, d_sae, generator=g) < 0.1)  # noqa: E731
    target, retain = noise(n), noise(n)
    for block in (target, retain):
        block[:, 3] = 0.0
        block[:, 5] = 0.0
    target[:, 3] = 1.0 + torch.rand(n, generator=g)
    retain[: n // 2, 3] = 1.0 + torch.rand(n // 2, generator=g)
    retain[: n // 2, 5] = 1.0 + torch.rand(n // 2, generator=g)
    return target, retain


def test_probe_finds_the_latent_that_speaks_against_the_concept():
    target, retain = _names_like()
    features, weights = probe(target, retain, n_features=2)
    assert dict(zip(features.tolist(), weights.sign().tolist())) == {3: 1.0, 5: -1.0}
    w = torch.zeros(target.shape[1])
    w[features] = weights
    assert (target @ w).min() > (retain @ w).max()  # separates every input
    # one shared threshold on the features' maxima cannot: latent 3 is as strong on the retains it shares
    picked = greedy_tpr(target, retain, n_features=2)
    assert (target[:, picked].amax(-1) > retain[:, picked].amax(-1).topk(3).values[-1]).float().mean() < 0.9


def test_probe_keeps_to_its_budget_and_needs_both_sides():
    target, retain = _names_like(seed=1)
    for budget in (1, 2, 4):
        assert 0 < probe(target, retain, n_features=budget)[0].numel() <= budget
    with pytest.raises(ValueError, match="both target and retain"):
        probe(target, retain[:0])


def test_readout_scores_match_the_dense_maxima_and_mark_the_tokens_holding_them():
    torch.manual_seed(0)
    n_tokens, k, d_sae, n_inputs = 60, 4, 40, 5
    codes = SparseCodes(torch.rand(n_tokens, k), torch.stack([torch.randperm(d_sae)[:k] for _ in range(n_tokens)]))
    owner = torch.randint(0, n_inputs, (n_tokens,)).sort().values
    features, weights = torch.tensor([3, 7, 11, 20]), torch.tensor([1.0, -2.0, 0.5, 3.0])
    scores, holds = readout_scores(codes, owner, n_inputs, feature_slots(features, d_sae), weights)
    maxima = max_activations(codes, owner, n_inputs, d_sae)
    torch.testing.assert_close(scores, maxima[:, features] @ weights)
    dense = codes.to_dense(d_sae)
    positive = features[weights > 0]
    expected = ((dense[:, positive] == maxima[owner][:, positive]) & (dense[:, positive] > 0)).any(-1)
    assert torch.equal(holds, expected) and holds.any()


def test_latent_contributions_are_each_latents_weighted_maximum_largest_first():
    torch.manual_seed(1)
    n_tokens, k, d_sae = 12, 4, 30
    codes = SparseCodes(torch.rand(n_tokens, k), torch.stack([torch.randperm(d_sae)[:k] for _ in range(n_tokens)]))
    positions = torch.arange(n_tokens)
    features, weights = torch.tensor([1, 5, 9, 17, 22]), torch.tensor([2.0, -1.0, 0.5, 1.5, 3.0])
    rows = latent_contributions(codes, positions, feature_slots(features, d_sae), weights, torch.randn(d_sae, 8),
                                top=3)
    dense = codes.to_dense(d_sae)
    expected = {int(j): float(dense[:, j].max() * w) for j, w in zip(features, weights) if w > 0 and dense[:, j].max() > 0}
    best = sorted(expected.items(), key=lambda item: -item[1])[:3]
    assert [(r["latent"], round(r["contribution"], 5)) for r in rows] == [(j, round(c, 5)) for j, c in best]
    for r in rows:
        assert dense[r["token"], r["latent"]] == dense[:, r["latent"]].max()
    W_dec = torch.randn(d_sae, 8)
    members = torch.zeros(d_sae, dtype=torch.bool)
    members[features] = True
    energy = latent_contributions(codes, positions, members, None, W_dec, top=10)
    assert {r["latent"] for r in energy} == {j for j in expected} | {int(j) for j in features[weights < 0]
                                                                     if dense[:, j].max() > 0}
    for r in energy:
        assert abs(r["contribution"] - r["activation"] * float(W_dec[r["latent"]].norm())) < 1e-5
