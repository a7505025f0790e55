"""Attention-output SAE analysis: decoder-norm shares per head, per-head features, families."""

import pytest
import torch

from sae_guard.analysis.attention_heads import families, head_report, head_shares, share_multi_family


def _decoder():
    # 3 heads of width 2; features 0,1 live in head 0, feature 2 in head 1, feature 3 is split
    W = torch.zeros(4, 6)
    W[0, 0], W[1, 1], W[2, 2] = 1.0, 2.0, 1.0
    W[3, 4], W[3, 0] = 1.0, 1.0
    return W


def test_shares_sum_to_one_and_locate_heads():
    shares = head_shares(_decoder(), 3)
    assert torch.allclose(shares.sum(-1), torch.ones(4))
    assert shares[0].tolist() == [1.0, 0.0, 0.0] and shares[2].argmax() == 1
    assert torch.allclose(shares[3], torch.tensor([0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match="heads"):
        head_shares(_decoder(), 4)


def test_families_split_features_firing_on_different_tokens():
    fires = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert families(fires) == [[0, 1], [2]]
    assert families(torch.ones(3, 2, dtype=torch.bool)) == [[0, 1]]


def test_report_lists_own_features_families_and_examples():
    codes = torch.zeros(4, 4)
    codes[0, 0], codes[1, 1], codes[2, 2], codes[3, 3] = 3.0, 2.0, 1.0, 5.0
    contexts = ["a", "b", "c", "d"]
    report = head_report(_decoder(), 3, codes, contexts)
    assert [h.features for h in report] == [[0, 1], [2], []]   # split feature 3 belongs to no head
    assert report[0].families == [[0], [1]]                     # never co-fire: two families
    assert report[0].examples == {0: ["a"], 1: ["b"]}
    assert share_multi_family(report) == 0.5
    with pytest.raises(ValueError, match="contexts"):
        head_report(_decoder(), 3, codes, contexts[:2])
