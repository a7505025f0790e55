"""The `token_probe` strategy: a readout of each token's code, an input scored by its best token."""

import pytest
import torch

from sae_guard.concepts import Concept, load_concepts, save_concepts
from sae_guard.concepts.probe import probe
from sae_guard.concepts.scoring import feature_slots, max_activations, token_readout_scores
from sae_guard.concepts.token_probe import token_probe
from sae_guard.sae.codes import SparseCodes

D_SAE, K = 24, 4


def _inputs(n: int, kind: str, g: torch.Generator) -> list[torch.Tensor]:
    """Per input, a (tokens, K, 2) tensor of (latent, value) pairs. Noise tokens use latents 4..23. A target has one
    token holding latents 1 and 2 together; a retain holds them on different tokens, or latent 1 alone."""
    out = []
    for i in range(n):
        tokens = int(torch.randint(3, 6, (1,), generator=g))
        latents = torch.stack([torch.randperm(D_SAE - 4, generator=g)[:K] + 4 for _ in range(tokens)])
        values = torch.rand(tokens, K, generator=g)
        if kind == "target":
            latents[0, :2], values[0, :2] = torch.tensor([1, 2]), 1 + torch.rand(2, generator=g)
        elif i % 2:
            latents[0, 0], latents[1, 0] = 1, 2
            values[0, 0], values[1, 0] = 1 + torch.rand(1, generator=g), 1 + torch.rand(1, generator=g)
        else:
            latents[0, 0], values[0, 0] = 1, 1 + torch.rand(1, generator=g)
        out.append(torch.stack([latents.float(), values], -1))
    return out


def _encoder(table: list[torch.Tensor]):
    def encode(inputs):
        rows = [table[i] for i in inputs]
        if not rows:
            empty = SparseCodes(torch.zeros(0, K), torch.zeros(0, K, dtype=torch.long))
            return empty, torch.zeros(0, dtype=torch.long), 0
        stacked = torch.cat(rows)
        owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([r.shape[0] for r in rows]))
        return SparseCodes(stacked[..., 1], stacked[..., 0].long()), owner, len(rows)
    return encode


def _data(n: int = 120, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = _inputs(n, "target", g) + _inputs(n, "retain", g)
    return _encoder(table), list(range(n)), list(range(n, 2 * n))


def test_token_probe_reads_latents_together_on_one_token_where_input_maxima_cannot():
    encode, target, retain = _data()
    features, weights = token_probe(encode(target), encode(retain), n_features=8)
    slot = feature_slots(features, D_SAE)
    scores_t = token_readout_scores(*encode(target), slot, weights, None)[0]
    scores_r = token_readout_scores(*encode(retain), slot, weights, None)[0]
    assert scores_t.min() > scores_r.max()  # every target above every retain
    assert {1, 2} <= set(features[weights > 0].tolist())
    # per-input maxima hold latents 1 and 2 alike on the retains that split them: no readout of them separates
    max_t, max_r = (max_activations(*encode(side), D_SAE) for side in (target, retain))
    f, w = probe(max_t, max_r, n_features=8)
    dense = torch.zeros(D_SAE)
    dense[f] = w
    assert (max_t @ dense).min() < (max_r @ dense).max()


def test_token_probe_keeps_to_its_budget_and_needs_both_sides():
    encode, target, retain = _data(60, seed=1)
    for budget in (1, 3):
        assert 0 < token_probe(encode(target), encode(retain), n_features=budget)[0].numel() <= budget
    with pytest.raises(ValueError, match="both target and retain"):
        token_probe(encode(target), encode([]))


def test_token_readout_is_the_best_tokens_weighed_code_and_marks_tokens_above_the_threshold():
    torch.manual_seed(0)
    n_tokens, n_inputs = 40, 6
    codes = SparseCodes(torch.rand(n_tokens, K), torch.stack([torch.randperm(D_SAE)[:K] for _ in range(n_tokens)]))
    owner = torch.randint(0, n_inputs - 1, (n_tokens,)).sort().values  # the last input has no token
    features, weights = torch.tensor([2, 5, 11, 19]), torch.tensor([1.0, -2.0, 0.5, 3.0])
    scores, fired = token_readout_scores(codes, owner, n_inputs, feature_slots(features, D_SAE), weights, 1.0)
    per_token = codes.to_dense(D_SAE)[:, features] @ weights
    expected = torch.stack([per_token[owner == i].max() if (owner == i).any() else torch.tensor(0.0)
                            for i in range(n_inputs)])
    torch.testing.assert_close(scores, expected)
    assert torch.equal(fired, per_token > 1.0) and fired.any() and not fired.all()


def test_a_token_probe_concept_fits_saves_and_loads_as_a_token_readout(tmp_path):
    encode, target, retain = _data(150, seed=2)
    concept = Concept("bound", target=target, retain=retain, strategy="token_probe", n_features=8, fpr=0.02)
    concept.fit(encode, D_SAE, torch.randn(D_SAE, 8))
    assert concept.readout == "token" and concept.calibration["readout"] == "token"
    assert concept.calibration["tpr"] > 0.9
    save_concepts([concept], tmp_path)
    (loaded,) = load_concepts(tmp_path)
    assert loaded.readout == "token"
    W_dec = torch.randn(D_SAE, 8)
    torch.testing.assert_close(loaded.scores(encode, retain, D_SAE, W_dec),
                               concept.scores(encode, retain, D_SAE, W_dec))
