"""The planted-generator family the zoo defaults are chosen on (sae_guard.synthetic.Generator)."""

import pytest
import torch

from sae_guard import SAE
from sae_guard.synthetic import (
    GENERATORS, HELD_OUT, Generator, hierarchy_recovery, oracle_fvu, planted, planted_hierarchical, recovery,
)


def test_family_spans_k_above_and_below_true_sparsity_within_two():
    offsets = []
    for gen in GENERATORS + HELD_OUT:
        ds = gen.dataset()
        offsets.append(gen.k(ds) - ds.expected_l0())
        assert abs(gen.k(ds) - ds.expected_l0()) <= 2.5, gen.name
    assert min(offsets) < -0.5 and max(offsets) > 0.5


def test_held_out_settings_are_separate_and_include_the_issue_setting():
    names = [g.name for g in GENERATORS]
    held = {g.name: g for g in HELD_OUT}
    assert not set(names) & set(held) and len(set(names)) == len(names)
    issue = held["issue17"]
    ds = issue.dataset()
    assert (ds.d, ds.n_atoms, issue.k(ds)) == (128, 512, 8)
    assert abs(ds.expected_l0() - 6) < 0.5 and issue.samples is not None


def test_replayed_generator_trains_on_a_fixed_set_and_fresh_one_streams():
    fixed = Generator("t", d=16, n_atoms=32, active=3.0, samples=1000)
    a, b = fixed.training_data(), fixed.training_data()
    assert a.shape == (1000, 16) and torch.equal(a, b)
    fresh = Generator("t", d=16, n_atoms=32, active=3.0)
    assert hasattr(fresh.training_data(), "iterate")


def test_frequency_cap_and_coherence_change_the_data():
    capped = planted(d=32, n_atoms=64, active=6.0, zipf_exponent=1.5, frequency_cap=0.3)
    assert capped.probs.max() <= 0.3 + 1e-6 and capped.expected_l0() < 6.0
    def close_pairs(ds):  # share of atom pairs with cosine above 0.3 (2.4 sigma for random 64-d atoms)
        c = ds.atoms @ ds.atoms.T
        return ((c - 2 * torch.eye(len(c))) > 0.3).float().mean().item()
    loose = planted(d=64, n_atoms=256, seed=1)
    coherent = planted(d=64, n_atoms=256, seed=1, coherence=0.6)
    assert close_pairs(coherent) > 3 * close_pairs(loose)
    assert torch.allclose(coherent.atoms.norm(dim=-1), torch.ones(256))


def test_bipolar_atoms_take_either_sign_and_the_rest_stay_non_negative():
    plain = planted(d=32, n_atoms=64, active=6.0, seed=3)
    ds = planted(d=32, n_atoms=64, active=6.0, seed=3, bipolar=0.5)
    assert torch.equal(ds.atoms, plain.atoms) and torch.equal(ds.probs, plain.probs)  # same dictionary and law
    assert plain.bipolar is None and int(ds.bipolar.sum()) == 32
    x, coeffs = ds.sample(20_000, torch.Generator().manual_seed(0))
    fired = coeffs != 0
    negative = (coeffs < 0).sum(0) / fired.sum(0).clamp_min(1)
    assert (negative[~ds.bipolar] == 0).all()
    common = ds.bipolar & (fired.sum(0) > 400)
    assert common.any() and ((negative[common] - 0.5).abs() < 0.1).all()  # either sign, evenly
    torch.testing.assert_close(x, coeffs @ ds.atoms, atol=0.2, rtol=0)  # signed mixtures plus the noise
    assert torch.equal(ds.with_batch_size(8).bipolar, ds.bipolar)
    assert (plain.sample(1000, torch.Generator().manual_seed(0))[1] >= 0).all()


def test_an_sae_seeded_like_the_data_does_not_start_at_the_planted_atoms():
    # torch.manual_seed(s) then planted(seed=s) once gave the SAE's random decoder the atoms' own draws
    for seed in (0, 1, 17):
        for ds in (planted(seed=seed), planted_hierarchical(seed=seed)):
            torch.manual_seed(seed)
            sae = SAE.create("topk", d_in=ds.d, d_sae=1024, k=6)
            assert recovery(sae.W_dec, ds.atoms) < 0.05, seed


def test_recovery_of_a_signed_sae_matches_atoms_held_as_their_negatives():
    ds = planted(d=32, n_atoms=64, seed=3)
    flipped = torch.where(torch.arange(64)[:, None] % 2 == 0, ds.atoms, -ds.atoms)
    assert recovery(flipped, ds.atoms) == 0.5
    assert recovery(flipped, ds.atoms, signed=True) == 1.0
    assert SAE.create("abstopk", d_in=32, d_sae=64, k=3).signed
    assert not SAE.create("topk", d_in=32, d_sae=64, k=3).signed


def test_oracle_fvu_is_the_floor_of_a_budget_below_the_true_sparsity():
    ds = planted(d=32, n_atoms=64, active=4.0, noise=0.0, seed=2)
    x, coeffs = ds.sample(4096, torch.Generator().manual_seed(0))
    assert oracle_fvu(x, coeffs, ds.atoms, k=64) < 1e-6  # every atom kept, no noise: nothing unexplained
    below = [oracle_fvu(x, coeffs, ds.atoms, k=k) for k in (1, 2, 3)]
    assert below[0] > below[1] > below[2] > 0.01
    # a batch-level budget of the same size puts the slots where the coefficients are largest
    assert oracle_fvu(x, coeffs, ds.atoms, k=2, per_token=False) < below[1]


def test_hierarchy_recovery_tells_absorbed_parents_from_learnt_ones():
    ds = planted_hierarchical(d=64, n_parents=16, children_per_parent=3, seed=4)
    exact = hierarchy_recovery(ds.atoms, ds)
    assert exact["parents_recovered"] == exact["children_recovered"] == 1.0
    assert exact["parent_with_children_cosine"] < 0.9
    absorbed = ds.atoms.clone()
    children = (ds.parents >= 0).nonzero().squeeze(-1)
    absorbed.index_add_(0, ds.parents[children], ds.probs[children, None] * ds.atoms[children])
    report = hierarchy_recovery(absorbed, ds)
    assert report["parents_recovered"] == 0.0 and report["children_recovered"] == 1.0
    assert report["parent_with_children_cosine"] > 0.999 and report["parent_cosine"] < 0.9
    with pytest.raises(ValueError, match="hierarchical"):
        hierarchy_recovery(ds.atoms, planted(d=64, n_atoms=16, seed=4))
