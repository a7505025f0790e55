"""Detox steering: feature selection, tiers, steering hooks, baselines, toxicity scoring, prompt splits."""

import pytest
import torch

from sae_guard import SAE, Edit
from sae_guard.analysis.detox import (TIERS, DetoxSteering, add_to_hidden, mean_difference, random_direction,
                                      select_toxic_features, text_perplexity, continuation_perplexity)
from sae_guard.analysis.detox_prompts import (CLEAN_STARTS, PROVOCATIVE_STARTS, split_prompts,
                                              toxic_selection_texts)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class _CharTokenizer:
    """Bytes mod 64 as ids; enough for perplexity helpers."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [2 + b % 62 for b in text.encode()]
        return type("Enc", (), {"input_ids": torch.tensor([ids])})()


def test_selection_takes_frequent_toxic_latents_strongest_first():
    clean = torch.zeros(100, 10)
    clean[:, 0] = 1.0                       # fires everywhere: fails the frequency ratio
    toxic = torch.zeros(50, 10)
    toxic[:, 0] = 9.0
    toxic[:, 3] = 2.0                       # toxic only, weaker
    toxic[:, 7] = 5.0                       # toxic only, stronger
    clean[:2, 7] = 0.1                      # rare on clean: ratio 1.0 / 0.02 = 50 passes
    assert select_toxic_features(toxic, clean, n_features=5).tolist() == [7, 3]
    assert select_toxic_features(toxic, clean, n_features=1).tolist() == [7]


def test_selection_refuses_mismatched_codes():
    with pytest.raises(ValueError, match="d_sae"):
        select_toxic_features(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least one"):
        select_toxic_features(torch.zeros(0, 4), torch.zeros(3, 4))


def test_tiers_are_monotone_and_edit_matches():
    sae = SAE.create("topk", d_in=16, d_sae=32, k=4)
    steer = DetoxSteering.from_features(sae, torch.tensor([1, 5]), scale=10.0)
    strengths = [steer.strength(t) for t in ("low", "medium", "high")]
    assert strengths == sorted(strengths) and strengths[0] > 0
    assert torch.isclose(steer.direction.norm(), torch.tensor(1.0))
    rows = sae.W_dec.detach()[[1, 5]]
    expected = -(rows / rows.norm(dim=-1, keepdim=True)).mean(0)
    assert torch.allclose(steer.direction, expected / expected.norm(), atol=1e-6)
    edit = steer.edit("high")
    assert isinstance(edit, Edit) and edit.mode == "steer" and edit.strength == TIERS["high"] * 10.0
    with pytest.raises(ValueError, match="unknown tier"):
        steer.strength("max")
    with pytest.raises(ValueError, match="no toxicity features"):
        DetoxSteering.from_features(sae, torch.tensor([], dtype=torch.long), scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        DetoxSteering(torch.ones(16), scale=0.0)


def test_steering_changes_logits_and_detaches_exactly():
    model = _tiny_llama()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    before = model(input_ids=ids).logits
    steer = DetoxSteering(random_direction(16, seed=1), scale=4.0)
    with steer.applied(model, "model.layers.0", "high"):
        steered = model(input_ids=ids).logits
    after = model(input_ids=ids).logits
    assert not torch.allclose(before, steered, atol=1e-4)
    assert torch.equal(before, after)
    with add_to_hidden(model, "model.layers.0", torch.zeros(16)):
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)


def test_baseline_directions():
    a = random_direction(32, seed=0)
    assert torch.equal(a, random_direction(32, seed=0)) and not torch.equal(a, random_direction(32, seed=1))
    assert torch.isclose(a.norm(), torch.tensor(1.0))
    toxic, clean = torch.zeros(4, 3), torch.zeros(5, 3)
    toxic[:, 0], clean[:, 1] = 2.0, 1.0
    assert torch.allclose(mean_difference(toxic, clean), torch.tensor([-2.0, 1.0, 0.0]) / 5 ** 0.5)


def test_perplexity_helpers_rise_under_strong_steering():
    model, tok = _tiny_llama(), _CharTokenizer()
    texts = ["hello there", "a quiet day"]
    plain = text_perplexity(model, tok, texts)
    with add_to_hidden(model, "model.layers.0", 50.0 * random_direction(16)):
        steered = text_perplexity(model, tok, texts)
    assert plain > 1 and steered != pytest.approx(plain)
    ppl = continuation_perplexity(model, tok, ["the cat"], [" sat"])
    assert ppl.shape == (1,) and ppl[0] > 1
    with pytest.raises(ValueError, match="continuations"):
        continuation_perplexity(model, tok, ["a", "b"], ["c"])


def test_prompt_split_is_disjoint_and_seeded():
    split = split_prompts(PROVOCATIVE_STARTS, seed=0)
    assert not set(split.select) & set(split.eval)
    assert set(split.select) | set(split.eval) == set(PROVOCATIVE_STARTS)
    assert split == split_prompts(PROVOCATIVE_STARTS, seed=0) != split_prompts(PROVOCATIVE_STARTS, seed=1)
    assert len(set(CLEAN_STARTS)) == len(CLEAN_STARTS) and not set(CLEAN_STARTS) & set(PROVOCATIVE_STARTS)
    with pytest.raises(ValueError, match="duplicates"):
        split_prompts(["a", "a", "b"])


def test_toxicity_scorer_and_selection_texts():
    pytest.importorskip("profanity_check")
    from sae_guard.analysis.toxicity import ToxicityScorer
    scorer = ToxicityScorer()
    flags = scorer.toxic(["you are a stupid idiot", "the garden is lovely in spring", "fuck off"])
    assert flags.tolist() == [True, False, True]
    assert scorer.rate([]) == 0.0
    with pytest.raises(TypeError, match="one string"):
        scorer.toxic("fuck off")
    texts = toxic_selection_texts(20, seed=0)
    assert len(texts) == 20 and scorer.rate(texts) >= 0.8
    assert texts == toxic_selection_texts(20, seed=0)


def test_tiers_are_chosen_from_the_selection_sweep():
    from sae_guard.analysis.detox import SweepPoint, choose_tiers
    sweep = [SweepPoint(0.0, 0.40, 0.0), SweepPoint(0.05, 0.30, 0.02), SweepPoint(0.1, 0.25, 0.05),
             SweepPoint(0.2, 0.15, 0.20), SweepPoint(0.4, 0.05, 1.0)]
    tiers = choose_tiers(sweep, margin=1.0)
    assert tiers["low"] == 0.1  # the strongest within +5% clean perplexity
    assert tiers["high"] == 0.2  # the weakest halving the toxic rate (0.40 -> <= 0.20)
    assert choose_tiers(sweep)["high"] == pytest.approx(0.4)  # with the default 2x margin
    assert tiers["low"] < tiers["medium"] < tiers["high"]
    with pytest.raises(ValueError, match="share 0"):
        choose_tiers(sweep[1:])
    steer = DetoxSteering(torch.ones(4), 10.0, tiers=tiers)
    assert steer.strength("high") == pytest.approx(2.0)


def test_random_baseline_is_read_at_equal_clean_cost():
    from sae_guard.analysis.detox import SweepPoint, at_equal_cost
    curve = [SweepPoint(0.0, 0.4, 0.0), SweepPoint(0.1, 0.3, 0.1), SweepPoint(0.2, 0.1, 0.3)]
    assert at_equal_cost(curve, 0.2) == pytest.approx(0.2)
    assert at_equal_cost(curve, 0.05) == pytest.approx(0.35)
    assert at_equal_cost(curve, 0.5) is None
    assert at_equal_cost(curve, -0.02) == pytest.approx(0.4)  # cheaper than no steering: the unsteered rate
