"""The TopK family: selection operators and the batchtopk, abstopk, matryoshka, mutual_choice,
feature_choice and top_afa variants (L0, batch independence, thresholds, signs, nested groups,
capacities, and that a short run lowers the FVU)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

import sae_guard
from sae_guard import SAE
from sae_guard.sae.metrics import evaluate
from sae_guard.sae.sparsifiers import (
    abs_topk, afa_topk, batch_topk, batch_topk_mask, column_capacity_mask, mask_to_codes, row_topk,
)
from sae_guard.sae.variants.abstopk import AbsTopKSAE
from sae_guard.sae.variants.matryoshka import inner_prefix_fvu
from sae_guard.sae.variants.mutual_choice import aux_zipf_loss
from sae_guard.synthetic import hierarchy_recovery, planted, planted_hierarchical

D_IN, D_SAE, K, BATCH = 16, 64, 3, 256
BATCH_LEVEL = ["batchtopk", "mutual_choice", "feature_choice", "matryoshka:batch", "abstopk:batch"]


def data():
    return planted(d=D_IN, n_atoms=32, active=K, seed=1, batch_size=BATCH)


def make(spec: str) -> SAE:
    """`arch` or `arch:selection` (AbsTopK's batch mode)."""
    arch, _, selection = spec.partition(":")
    torch.manual_seed(0)
    kwargs = {} if arch == "top_afa" else {"k": K}
    if selection:
        kwargs["selection"] = selection
    return SAE.create(arch, d_in=D_IN, d_sae=D_SAE, **kwargs)


@functools.cache
def trained(spec: str) -> tuple[SAE, float, float]:
    """The SAE after a short run, with its held-out FVU before and after (shared by the tests)."""
    ds = data()
    held_out = ds.sample(2048, torch.Generator().manual_seed(99))[0]
    sae = make(spec)
    sae.init_from_data(ds.batch(0))
    before = evaluate(sae, held_out)["fvu"]
    sae, _ = sae_guard.train(sae, ds, tokens=BATCH * 120, batch_size=BATCH, progress=False)
    return sae, before, evaluate(sae, held_out)["fvu"]


# ---------------------------------------------------------------------------------- sparsifiers
def test_batch_topk_mask_is_exact_on_both_paths():
    torch.manual_seed(0)
    for shape, k in [((9, 7), 2.0), ((512, 300), 4.0)]:  # the second is large enough for the sampled pre-filter
        scores = torch.randn(shape)
        budget = round(k * shape[0])
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[scores.reshape(-1).topk(budget).indices] = True
        mask = batch_topk_mask(scores, k)
        assert torch.equal(mask.reshape(-1), expected)
        assert mask.sum() == budget


def test_batch_topk_codes_drop_zeros_and_pad_with_zeros():
    values = F.relu(torch.tensor([[3.0, -1.0, 2.0, 0.5], [-1.0, -2.0, -3.0, 0.1], [0.2, 0.3, 4.0, 5.0]]))
    codes = batch_topk(values, 2.0)  # a budget of 6 of the 8 positive entries
    dense = codes.to_dense(4)
    expected = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(dense != 0, expected)
    assert torch.equal(dense, values * expected)
    assert codes.k == 3 and (codes.values[1] == 0).all()


def test_mask_to_codes_roundtrips_any_leading_shape():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10)
    mask = x > 0.7
    codes = mask_to_codes(x, mask)
    assert codes.values.shape[:-1] == (2, 3) and codes.k == int(mask.sum(-1).max())
    torch.testing.assert_close(codes.to_dense(10), x * mask)


def test_row_and_abs_topk():
    pre = torch.tensor([[0.1, -5.0, 2.0, -0.2], [1.0, 0.5, -3.0, 4.0]])
    assert set(row_topk(pre, 2)[0].tolist()) == {0, 2}
    codes = abs_topk(pre, 2)
    torch.testing.assert_close(codes.to_dense(4), torch.tensor([[0.0, -5.0, 2.0, 0.0], [0.0, 0.0, -3.0, 4.0]]))


def test_column_capacity_mask_gives_each_feature_its_top_rows():
    torch.manual_seed(0)
    scores = torch.randn(20, 5)
    capacities = torch.tensor([0, 1, 3, 20, 7])
    mask = column_capacity_mask(scores, capacities)
    assert mask.sum(0).tolist() == capacities.tolist()
    for i, m in enumerate(capacities.tolist()):
        assert set(mask[:, i].nonzero().flatten().tolist()) == set(scores[:, i].topk(m).indices.tolist())


def test_afa_topk_picks_the_prefix_whose_norm_matches():
    contributions = torch.tensor([[9.0, 16.0, 0.0, 1.0], [4.0, 0.0, 0.0, 0.0]])  # cumulative norms 4, 5, 5.1
    indices, keep = afa_topk(contributions, torch.tensor([5.0, 100.0]))
    assert keep.sum(-1).tolist() == [2, 1]  # |(4,3)| = 5 matches; the second row keeps its best (k >= 1)
    assert indices[0, :2].tolist() == [1, 0]
    assert keep.shape == indices.shape == (2, 2)


# ---------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("spec", ["batchtopk", "mutual_choice", "matryoshka:batch", "abstopk:batch"])
def test_batch_level_training_keeps_k_per_token_on_average(spec):
    sae = make(spec)
    x = data().batch(3)
    step = sae.training_forward(x)
    per_token = (step.codes.values != 0).sum(-1)
    assert per_token.sum() == K * BATCH
    assert per_token.max() > per_token.min()  # the budget is shared, not fixed per token


@pytest.mark.parametrize("spec", BATCH_LEVEL)
def test_trainer_runs_a_per_token_warmup_before_the_batch_rule(spec):
    sae = make(spec)
    x = data().batch(3)
    per_token = lambda: (sae.training_forward(x).codes.values != 0).sum(-1)  # noqa: E731
    assert not sae.in_warmup()  # outside a trainer: the batch rule
    sae.training_progress = 0.9 * sae.cfg.topk_warmup
    assert sae.in_warmup() and (per_token() == K).all()
    sae.training_progress = sae.cfg.topk_warmup
    after = per_token()
    assert not sae.in_warmup() and after.max() > after.min()
    seen = []
    forward = sae.training_forward
    sae.training_forward = lambda batch, dead: (seen.append(sae.training_progress), forward(batch, dead))[1]
    sae_guard.train(sae, data(), tokens=BATCH * 6, batch_size=BATCH, progress=False)
    assert seen == [step / 6 for step in range(6)] and sae.training_progress is None


def test_warmup_can_be_turned_off_and_is_validated():
    sae = SAE.create("batchtopk", d_in=D_IN, d_sae=D_SAE, k=K, topk_warmup=0.0)
    sae.training_progress = 0.0
    per_token = (sae.training_forward(data().batch(3)).codes.values != 0).sum(-1)
    assert per_token.max() > per_token.min()
    with pytest.raises(ValueError, match="topk_warmup"):
        SAE.create("batchtopk", d_in=D_IN, d_sae=D_SAE, k=K, topk_warmup=1.5)


@pytest.mark.parametrize("spec", BATCH_LEVEL)
def test_a_run_that_ends_in_the_warmup_learns_the_batch_rules_threshold(spec):
    """Per-token minima would set the threshold far below the batch rule's cut (and inference far above k)."""
    arch, _, selection = spec.partition(":")
    extra = {"selection": selection} if selection else {}
    torch.manual_seed(0)
    sae = SAE.create(arch, d_in=D_IN, d_sae=D_SAE, k=K, topk_warmup=1.0, threshold_decay=0.0, **extra)
    sae, _ = sae_guard.train(sae, data(), tokens=BATCH * 40, batch_size=BATCH, progress=False)
    x = data().batch(7)
    sae.training_progress = 0.0  # the last step's selection, made again on a fresh batch
    with torch.no_grad():
        cut = sae.kept_minimum(sae.select_batch(sae.pre_acts(x)))
    sae.training_progress = None
    seen = torch.isfinite(cut)
    ratio = (sae.threshold[seen] / cut[seen].to(sae.threshold)).median().item()  # feature_choice: one per latent
    assert 2 / 3 < ratio < 3 / 2
    l0 = (sae.encode(data().sample(2048, torch.Generator().manual_seed(99))[0]) != 0).sum(-1).float().mean().item()
    assert 0.5 * K < l0 < 2 * K


@pytest.mark.parametrize("spec", BATCH_LEVEL)
def test_threshold_is_learned_and_inference_is_batch_independent(spec, tmp_path):
    sae, _, _ = trained(spec)
    assert (sae.threshold > 0).any()
    x = data().sample(64, torch.Generator().manual_seed(5))[0]
    together = sae.encode(x)
    alone = torch.cat([sae.encode(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(together != 0, alone != 0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    l0 = (together != 0).sum(-1).float().mean().item()
    assert 0.5 * K < l0 < 2 * K  # the threshold reproduces roughly the training sparsity
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    torch.testing.assert_close(loaded.threshold, sae.threshold, atol=0, rtol=0)
    torch.testing.assert_close(loaded.encode(x), together, atol=0, rtol=0)


def test_threshold_ema_starts_from_first_batch_then_moves_slowly():
    sae = make("batchtopk")
    x = data().batch(0)
    smallest = lambda step: step.codes.values[step.codes.values > 0].min()  # noqa: E731
    first = sae.training_forward(x)
    sae.update_threshold(first.codes)
    torch.testing.assert_close(sae.threshold, smallest(first).reshape(1))
    second = sae.training_forward(2 * x)
    sae.update_threshold(second.codes)
    expected = 0.95 * smallest(first) + 0.05 * smallest(second)
    torch.testing.assert_close(sae.threshold, expected.reshape(1))


@pytest.mark.parametrize("spec", ["batchtopk", "abstopk", "abstopk:batch", "matryoshka", "matryoshka:batch",
                                  "mutual_choice", "feature_choice", "top_afa"])
def test_short_training_lowers_fvu(spec):
    _, before, after = trained(spec)
    assert after < 0.5 * before and after < 0.6


def test_abstopk_keeps_signs_and_exactly_k_per_token():
    sae, _, _ = trained("abstopk")
    x = data().sample(128, torch.Generator().manual_seed(6))[0]
    codes = sae.encode_sparse(x)
    assert ((codes.values != 0).sum(-1) == K).all()
    pre = sae.pre_acts(x)
    torch.testing.assert_close(codes.values, pre.gather(-1, codes.indices))  # no ReLU
    assert (codes.values < 0).any() and (codes.values > 0).any()
    smallest_kept = codes.values.abs().amin(-1, keepdim=True)
    dense = sae.encode(x)
    assert (pre.abs()[dense == 0].reshape(len(x), -1) <= smallest_kept).all()  # the k largest |pre|
    assert not hasattr(sae, "threshold")  # per-token selection needs none


@pytest.mark.parametrize("selection", ["token", "batch"])
def test_abstopk_sign_warmup_trains_as_topk_then_keeps_signs(selection):
    torch.manual_seed(0)
    sae = SAE.create("abstopk", d_in=D_IN, d_sae=D_SAE, k=K, selection=selection, sign_warmup=0.5)
    x = data().batch(3)
    sae.training_progress = 0.25  # in the warm-up: TopK's codes, each token's k largest positive pre-activations
    codes = sae.training_forward(x).codes
    pre = sae.pre_acts(x).detach()
    assert (codes.values >= 0).all() and ((codes.values > 0).sum(-1) == K).all()
    torch.testing.assert_close(codes.values.detach().sort(-1).values, pre.topk(K, -1).values.relu().sort(-1).values)
    sae.training_progress = 0.75  # after it: the variant's own signed rule
    assert (sae.training_forward(x).codes.values < 0).any()
    sae.training_progress = 0.25
    sae.eval()  # inference never warms up
    assert (sae.encode_sparse(x).values < 0).any()
    with pytest.raises(ValueError, match="sign_warmup"):
        SAE.create("abstopk", d_in=D_IN, d_sae=D_SAE, k=K, sign_warmup=1.5)


def test_abstopk_folds_a_feature_split_into_two_poles_into_one_signed_latent():
    torch.manual_seed(0)
    sae = SAE.create("abstopk", d_in=D_IN, d_sae=D_SAE, k=1)
    direction = F.normalize(torch.randn(D_IN), dim=0)
    with torch.no_grad():  # what the TopK warm-up leaves for a bipolar feature: a latent per pole
        sae.W_enc.mul_(0.01)
        for latent, sign in ((3, 1.0), (7, -1.0)):
            sae.W_dec[latent], sae.W_enc[latent], sae.b_enc[latent] = sign * direction, sign * direction, -0.1
    assert sae.fold_poles() == 1
    alignment = (sae.W_dec.detach() @ direction).abs()
    kept = 3 if alignment[3] > 0.99 else 7
    freed = 10 - kept
    assert alignment[freed] < 0.9 and sae.W_dec[freed].norm().item() == pytest.approx(1.0)
    assert sae.W_enc[freed].norm() < 0.1 * sae.W_enc[kept].norm()  # small: dead until AuxK revives it
    assert sae.b_enc[kept].item() == pytest.approx(0.0)  # the poles' biases cancel
    sae.eval()
    x = torch.stack([2 * direction, -2 * direction])
    codes = sae.encode_sparse(x)
    assert codes.indices.flatten().tolist() == [kept, kept]
    assert codes.values[0, 0] * codes.values[1, 0] < 0  # one latent, either sign
    torch.testing.assert_close(sae(x), x, atol=1e-5, rtol=0)
    assert sae.fold_poles() == 0  # nothing opposite is left


def test_abstopk_folds_poles_once_when_its_warmup_ends(monkeypatch):
    calls = []
    monkeypatch.setattr(AbsTopKSAE, "fold_poles", lambda self: calls.append(self.training_progress))
    sae = make("abstopk")
    sae_guard.train(sae, data(), tokens=BATCH * 12, batch_size=BATCH, progress=False)
    assert calls == [pytest.approx(4 / 12)]  # the first signed step, after the warm-up's third
    calls.clear()
    sae = SAE.create("abstopk", d_in=D_IN, d_sae=D_SAE, k=K, sign_warmup=0.0)  # the paper's rule throughout
    sae_guard.train(sae, data(), tokens=BATCH * 12, batch_size=BATCH, progress=False)
    assert calls == []


def test_abstopk_resumed_from_a_checkpoint_at_the_end_of_its_warmup_still_folds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(AbsTopKSAE, "fold_poles", lambda self: calls.append(self.training_progress))
    ds = data()
    original = ds.batch

    class Interrupt(Exception):
        pass

    def failing_batch(step):
        if step >= 4:
            raise Interrupt
        return original(step)

    def run():
        return sae_guard.train(make("abstopk"), ds, tokens=BATCH * 12, batch_size=BATCH, progress=False,
                               checkpoint_dir=tmp_path, checkpoint_every=BATCH * 4)

    ds.batch = failing_batch
    with pytest.raises(Interrupt):
        run()  # checkpointed after step 3, the warm-up's last (steps 0-3 of 12), then interrupted
    assert calls == [] and json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    ds.batch = original
    run()
    assert calls == [pytest.approx(4 / 12)]  # the resumed run's first step is the first signed one, and folds


@pytest.mark.parametrize("spec", ["abstopk", "matryoshka", "batchtopk:token"])
def test_token_selection_keeps_exactly_k_in_training_and_inference(spec):
    sae = make(spec)
    assert not sae.batch_level and not hasattr(sae, "threshold")
    x = data().batch(3)
    sae.training_progress = 0.9  # past any warm-up: still per token
    assert ((sae.training_forward(x).codes.values != 0).sum(-1) == K).all()
    sae.training_progress = None
    assert ((sae.encode(x) != 0).sum(-1) == K).all()


@pytest.mark.parametrize("arch", ["batchtopk", "abstopk", "matryoshka", "feature_choice"])
def test_selection_is_validated(arch):
    with pytest.raises(ValueError, match="selection"):
        SAE.create(arch, d_in=4, d_sae=8, k=2, selection="row")
    with pytest.raises(ValueError, match="integer k"):
        SAE.create(arch, d_in=4, d_sae=8, k=2.5, selection="token")


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_choice_saes_refuse_per_token_selection(arch):
    """Per token they would be TopK plus an auxiliary loss under another name: refused, not silently accepted."""
    with pytest.raises(ValueError, match="selection must be 'batch'.*'topk' architecture"):
        SAE.create(arch, d_in=4, d_sae=8, k=2, selection="token")


def test_a_matryoshka_file_from_before_selection_loads_with_the_batch_rule(tmp_path):
    """Files written before `selection` existed carry a threshold and no `selection`: they were batch-trained."""
    import json

    sae = make("matryoshka:batch")
    sae.threshold.fill_(0.25)
    folder = sae.save(tmp_path / "old")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["selection"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = SAE.load(folder)
    assert loaded.cfg.selection == "batch" and loaded.threshold.item() == 0.25


def test_matryoshka_groups_and_nested_losses():
    sae = make("matryoshka")
    assert sae.cfg.group_sizes == [4, 4, 8, 16, 32] and sae.prefix_ends == [4, 8, 16, 32, 64]
    x = data().batch(1)
    step = sae.training_forward(x)
    values, indices = step.codes
    dense = step.codes.to_dense(D_SAE)
    for end, recon in zip(sae.prefix_ends, step.extras["prefix_recons"]):
        torch.testing.assert_close(recon, dense[:, :end] @ sae.W_dec[:end] + sae.b_dec, atol=1e-5, rtol=1e-5)
    ratio = sae.cfg.prefix_weight_ratio
    weights = torch.tensor([ratio**4, ratio**3, ratio**2, ratio, 1.0])
    weights = (weights / weights.sum()).tolist()
    terms = sae.loss_terms()
    assert terms["fvu"][0] == pytest.approx(weights[-1])
    weighted = sum(w * ((x - r).pow(2).sum(-1).mean()) for w, r in zip(weights, step.extras["prefix_recons"]))
    weighted = weighted / (x - x.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(inner_prefix_fvu(step), weighted)


def test_matryoshka_uniform_weights_and_explicit_weights():
    uniform = SAE.create("matryoshka", d_in=4, d_sae=8, k=2, group_sizes=[4, 4], prefix_weight_ratio=1.0)
    assert uniform.prefix_weights() == [0.5, 0.5]
    explicit = SAE.create("matryoshka", d_in=4, d_sae=8, k=2, group_sizes=[4, 4], group_weights=[3.0, 1.0])
    assert explicit.prefix_weights() == [0.75, 0.25]
    with pytest.raises(ValueError, match="prefix_weight_ratio"):
        SAE.create("matryoshka", d_in=4, d_sae=8, k=2, prefix_weight_ratio=0.0)


def test_matryoshka_parents_do_not_hedge_their_children_by_default():
    """With every prefix weighted alike, an early latent that holds a parent but not its children also carries
    their expected share (feature hedging); the default's lighter inner prefixes leave it the parent alone."""
    ds = planted_hierarchical(d=32, n_parents=16, children_per_parent=3, active=3.0, seed=3, batch_size=1024)
    cosines = {}
    for ratio in (1.0, None):
        torch.manual_seed(0)
        sae = SAE.create("matryoshka", d_in=32, d_sae=128, k=4,
                         **({} if ratio is None else {"prefix_weight_ratio": ratio}))
        sae, _ = sae_guard.train(sae, ds, tokens=1024 * 300, batch_size=1024, progress=False)
        cosines[ratio] = hierarchy_recovery(sae.W_dec.detach(), ds)["parent_cosine"]
    assert cosines[1.0] < 0.9 and cosines[None] > 0.95, cosines


def test_matryoshka_rejects_groups_that_do_not_cover_the_dictionary():
    with pytest.raises(ValueError, match="sum to d_sae"):
        SAE.create("matryoshka", d_in=4, d_sae=8, k=2, group_sizes=[2, 2])
    with pytest.raises(ValueError, match="group_weights"):
        SAE.create("matryoshka", d_in=4, d_sae=8, k=2, group_sizes=[4, 4], group_weights=[1.0])


def test_feature_choice_capacities_follow_demand_with_an_even_floor():
    sae = make("feature_choice")
    assert sae.capacities(BATCH).tolist() == [round(K * BATCH / D_SAE)] * D_SAE  # no demand seen yet
    demand = torch.zeros(D_SAE)
    demand[:4] = torch.tensor([1.0, 0.8, 0.6, 0.6])  # shares of tokens; they sum to k
    sae.feature_density.copy_(demand)
    capacities = sae.capacities(BATCH)
    floor = round(0.1 * K * BATCH / D_SAE)
    assert capacities[4:].eq(floor).all() and capacities[0] > capacities[1] > capacities[2] > floor
    assert abs(int(capacities.sum()) - K * BATCH) <= D_SAE


def test_feature_choice_respects_capacities_and_learns_per_feature_thresholds():
    sae = make("feature_choice")
    x = data().batch(2)
    capacities = sae.capacities(BATCH)
    step = sae.training_forward(x)
    per_feature = torch.bincount(step.codes.indices[step.codes.values != 0], minlength=D_SAE)
    assert (per_feature <= capacities).all()
    assert abs(int(capacities.sum()) - K * BATCH) <= D_SAE
    trained_sae, _, _ = trained("feature_choice")
    assert trained_sae.threshold.shape == (D_SAE,)
    assert trained_sae.threshold.unique().numel() > 1
    assert (trained_sae.feature_density > 0).sum() > D_SAE // 2


def test_aux_zipf_teaches_under_used_latents_when_to_fire():
    sae = make("mutual_choice")
    sae.feature_density.copy_(0.5 * torch.linspace(1.0, 0.0, D_SAE).pow(4))  # the tail fires far below Zipf
    flagged = sae.underused_mask()
    assert flagged[-1] and not flagged[0]
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-1] = True
    step = sae.training_forward(data().batch(0), dead)
    assert "auxk_recon" in step.extras  # dead latents keep AuxK
    loss = aux_zipf_loss(step)
    assert loss > 0
    loss.backward()
    trained_rows = sae.W_enc.grad.abs().sum(-1) > 0
    assert trained_rows[flagged & ~dead].any() and not trained_rows[~flagged | dead].any()
    assert sae.W_dec.grad is None  # what an under-used feature means stays fixed


def test_top_afa_chooses_k_per_token_from_the_norm():
    sae, _, _ = trained("top_afa")
    x = data().sample(256, torch.Generator().manual_seed(7))[0]
    codes = sae.encode_sparse(x)
    l0 = (codes.values != 0).sum(-1)
    assert l0.min() < l0.max()  # data-dependent k
    f_norm = codes.values.norm(dim=-1)
    x_norm = (x - sae.b_dec).norm(dim=-1)
    relative_gap = ((f_norm - x_norm).abs() / x_norm).median()
    assert relative_gap < 0.3  # the AFA: |f| ~ |x - b_dec|
    torch.testing.assert_close(sae.encode(x[:5]), sae.encode(x)[:5], atol=1e-5, rtol=1e-5)


def test_abstopk_revives_dead_latents_with_topks_auxk():
    """Signed AuxK fits dead latents as linear regressors over tokens of both signs; they shrink instead of reviving."""
    sae = make("abstopk")
    x = data().batch(2)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::2] = True
    step = sae.training_forward(x, dead)
    pre = sae.pre_acts(x)[:, dead]
    top = pre.topk(min(sae.k_aux, pre.shape[1]), dim=-1)
    expected = torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values)) @ sae.W_dec[dead]
    torch.testing.assert_close(step.extras["auxk_recon"], expected, atol=1e-5, rtol=1e-4)
