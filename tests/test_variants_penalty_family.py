"""Threshold and penalty variants: relu, jumprelu, gated, variational, gba, archetypal."""

import pytest
import torch
from safetensors.torch import load_file

import sae_guard
from sae_guard import SAE
from sae_guard.sae.losses import fvu_of
from sae_guard.sae.metrics import evaluate
from sae_guard.synthetic import planted

D_IN, D_SAE, BATCH = 16, 64, 256
VARIANTS = {
    "relu": {}, "jumprelu": {"target_l0": 3}, "gated": {}, "variational": {"k": 3}, "gba": {},
    "archetypal": {"k": 3, "n_candidates": 128},
}


def data():
    return planted(d=D_IN, n_atoms=32, active=3, seed=1, batch_size=BATCH)


def make(arch: str, **kwargs) -> SAE:
    torch.manual_seed(0)
    return SAE.create(arch, d_in=D_IN, d_sae=D_SAE, **{**VARIANTS[arch], **kwargs})


def trained(arch: str, steps: int = 60, **kwargs) -> SAE:
    sae, _ = sae_guard.train(make(arch, **kwargs), data(), tokens=BATCH * steps, batch_size=BATCH, progress=False)
    return sae


def held_out() -> torch.Tensor:
    return data().sample(2048, torch.Generator().manual_seed(7))[0]


def first_step(sae: SAE):
    """A training forward on one batch after the data-dependent init, as the trainer does it."""
    ds = data()
    sae.init_from_data(ds.batch(0))
    sae.train()
    return sae.training_forward(ds.batch(1), torch.zeros(D_SAE, dtype=torch.bool))


# L1-penalised variants shrink small activations slowly: 60 steps make their codes markedly sparser than
# at initialisation but not yet near the data's true L0 of 3 (measured: L0 about 20 of 64 for relu and gated).
L1_VARIANTS = ("relu", "gated")


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_short_training_lowers_fvu_and_codes_are_sparse(arch):
    x = held_out()
    untrained = make(arch)
    untrained.init_from_data(data().batch(0))
    before = evaluate(untrained.eval(), x)
    after = evaluate(trained(arch), x)
    assert after["fvu"] < min(before["fvu"], 0.6), (before, after)
    if arch in L1_VARIANTS:
        assert after["l0"] < 0.75 * before["l0"], (before["l0"], after["l0"])
    else:
        assert after["l0"] < D_SAE / 4


def test_jumprelu_codes_are_pre_activations_above_threshold():
    sae = trained("jumprelu")
    x = held_out()[:64]
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))
    assert (sae.threshold > 0).all()


def test_jumprelu_threshold_learns_through_the_straight_through_estimator():
    sae = make("jumprelu", auxk_coef=0.0)
    step = first_step(sae)  # thresholds initialised for 3 firings per token
    sae.cfg.target_l0 = 1
    assert step.extras["l0"].mean() > 2  # above the target now
    terms = sae.loss_terms()
    coef, penalty = terms["l0_target"]
    (coef * penalty(step)).backward()
    grad = sae.threshold.grad
    assert grad is not None and (grad != 0).any()
    assert (grad <= 0).all()  # too many firings: every nudge raises a threshold


@pytest.mark.parametrize("window_rows, sparse_window", [(None, None), (7, 0.0), (7, 1.0)])
def test_jumprelu_training_step_has_the_gradients_of_the_dense_straight_through_step(window_rows, sparse_window,
                                                                                      monkeypatch):
    """The sparse pass (firing latents decoded, the window below θ through one dense product) against the
    estimator written densely: every latent through `_JumpReLU` and `_Step`, decoded by a matmul. With 7 rows per
    block the window's backward runs over many blocks and a short last one, every block multiplied (0.0) or every
    block gathered (1.0)."""
    from sae_guard.sae.losses import batch_variance
    from sae_guard.sae.variants import jumprelu
    from sae_guard.sae.variants.jumprelu import _JumpReLU

    if window_rows is not None:
        monkeypatch.setattr(jumprelu, "WINDOW_ROWS", window_rows)
        monkeypatch.setattr(jumprelu, "SPARSE_WINDOW", sparse_window)

    class _Step(torch.autograd.Function):  # 1[pre > θ]; d/dθ = -(1/ε) K((pre - θ)/ε), the paper's L0 estimator
        @staticmethod
        def forward(ctx, pre, threshold, bandwidth):
            ctx.save_for_backward(pre, threshold, bandwidth)
            return (pre > threshold).to(pre.dtype)

        @staticmethod
        def backward(ctx, grad):
            pre, threshold, bandwidth = ctx.saved_tensors
            return None, -((pre - threshold).abs() < bandwidth / 2).to(grad.dtype) / bandwidth * grad, None

    sae = make("jumprelu", auxk_coef=0.0, bandwidth=0.5)  # a wide window: most latents are in it
    x = data().batch(1)
    sae.init_from_data(data().batch(0))
    sae.train()

    def grads(loss_of):
        sae.zero_grad()
        loss_of().backward()
        return {name: p.grad.clone() for name, p in sae.named_parameters()}

    def sparse():
        step = sae.training_forward(x, torch.zeros(D_SAE, dtype=torch.bool))
        return fvu_of(x, step.x_hat) + (step.extras["l0"].mean() / 3 - 1) ** 2

    def dense():
        bandwidth = sae.cfg.bandwidth * batch_variance(x).detach().sqrt()
        pre = sae.pre_acts(x)
        x_hat = _JumpReLU.apply(pre, sae.threshold, bandwidth) @ sae.W_dec + sae.b_dec
        return fvu_of(x, x_hat) + (_Step.apply(pre, sae.threshold, bandwidth).sum(-1).mean() / 3 - 1) ** 2

    pre = sae.pre_acts(x).detach()
    window = sae.cfg.bandwidth * batch_variance(x).sqrt() / 2
    assert ((pre <= sae.threshold) & (pre > sae.threshold - window)).any(-1).all()  # every token has some below θ
    got, want = grads(sparse), grads(dense)
    assert want["threshold"].abs().max() > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_jumprelu_sampled_window_averages_to_the_whole_batch_over_its_offsets():
    """With window_tokens a quarter of the batch, θ's gradient from the silent window comes from every fourth token,
    scaled by 4, from an offset that turns each step: over four steps on one batch the gradients average to the
    gradient of the whole window, and each one differs from it."""
    def threshold_grads(window_tokens):
        sae = make("jumprelu", auxk_coef=0.0, bandwidth=0.5, window_tokens=window_tokens)
        x = data().batch(1)
        sae.init_from_data(data().batch(0))
        sae.train()
        grads = []
        for _ in range(4 if window_tokens else 1):
            sae.zero_grad()
            step = sae.training_forward(x, torch.zeros(D_SAE, dtype=torch.bool))
            (fvu_of(x, step.x_hat) + (step.extras["l0"].mean() / 3 - 1) ** 2).backward()
            grads.append(sae.threshold.grad.clone())
        return grads

    whole, = threshold_grads(None)
    sampled = threshold_grads(BATCH // 4)
    torch.testing.assert_close(torch.stack(sampled).mean(0), whole, rtol=1e-4, atol=1e-6)
    assert all(not torch.allclose(g, whole, rtol=1e-2, atol=1e-4) for g in sampled)


def test_jumprelu_threshold_update_is_multiplicative_and_stays_positive():
    sae = make("jumprelu")
    step = first_step(sae)
    before = sae.threshold.detach().clone()
    optimizer = torch.optim.Adam([sae.threshold], lr=0.01)
    sae.threshold.grad = torch.ones_like(before)  # every threshold should fall by the same factor
    sae.before_optimizer_step()
    optimizer.step()
    sae.after_optimizer_step(step)
    ratio = sae.threshold.detach() / before
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    assert 0 < ratio[0] < 1


def test_jumprelu_revives_a_dead_latent_by_lowering_its_threshold_to_its_best_token():
    sae = make("jumprelu")
    ds = data()
    sae.init_from_data(ds.batch(0))
    sae.train()
    with torch.no_grad():
        sae.threshold[:4] = 1e6  # these fire on nothing, and θ gets no gradient from the kernel
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:2] = True  # two of them are past the dead window
    before = sae.threshold.detach().clone()
    step = sae.training_forward(ds.batch(1), dead)
    sae.after_optimizer_step(step)
    pre = step.pre_acts
    firing = (pre > sae.threshold).sum(0)
    assert (firing[:2] >= 1).all()  # the dead latents fire again, on their best tokens of the batch
    assert (sae.threshold[:2] < pre[:, :2].max(0).values).all()
    torch.testing.assert_close(sae.threshold[2:], before[2:], atol=0, rtol=0)  # the rest are untouched


def test_jumprelu_revival_never_takes_a_threshold_to_zero_or_below():
    sae = make("jumprelu")
    sae.init_from_data(data().batch(0))
    sae.train()
    one_token = -data().batch(1)[:1]  # one token: no batch spread to floor θ with, and mostly negative pre-activations
    step = sae.training_forward(one_token, torch.ones(D_SAE, dtype=torch.bool))
    sae.after_optimizer_step(step)
    assert (step.pre_acts <= 0).any()
    assert (sae.threshold > 0).all()


def test_jumprelu_threshold_is_saved_as_theta_and_loaded(tmp_path):
    sae = trained("jumprelu")
    sae.save(tmp_path / "sae")
    saved = load_file(str(tmp_path / "sae" / "sae.safetensors"))
    torch.testing.assert_close(saved["threshold"], sae.threshold.detach(), atol=0, rtol=0)
    loaded = SAE.load(tmp_path / "sae")
    torch.testing.assert_close(loaded.threshold, sae.threshold, atol=0, rtol=0)


def test_jumprelu_without_target_uses_lambda_l0():
    sae = make("jumprelu", target_l0=None, l0_coef=0.01)
    assert set(sae.loss_terms()) == {"fvu", "l0", "auxk"}
    assert sae.loss_terms()["l0"][0] == 0.01


def test_gba_biases_get_no_gradient():
    sae = make("gba")
    step = first_step(sae)
    sum(coef * fn(step) for coef, fn in sae.loss_terms().values()).backward()
    assert not sae.b_enc.requires_grad and sae.b_enc.grad is None
    assert sae.W_enc.grad is not None
    assert set(sae.loss_terms()) == {"fvu", "auxk"}  # reconstruction (and AuxK's): no sparsity penalty


def test_gba_auxk_trains_a_dead_latent_below_its_bias():
    sae = make("gba")
    ds = data()
    sae.init_from_data(ds.batch(0))
    sae.train()
    with torch.no_grad():
        sae.b_enc[:2] = -1e6  # below every pre-activation: ReLU(W_enc (x - b_dec) + b) is zero on every token
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:2] = True
    step = sae.training_forward(ds.batch(1), dead)
    assert not (step.pre_acts[:, :2] > 0).any()
    (sae.cfg.auxk_coef * sae.loss_terms()["auxk"][1](step)).backward()
    assert (sae.W_enc.grad[:2].norm(dim=-1) > 0).all()  # fitted to the residual on W_enc (x - b_dec) alone
    assert (sae.W_enc.grad[2:] == 0).all()  # AuxK touches the dead latents only


def test_gba_rule_moves_each_bias_toward_its_target():
    sae = make("gba", n_groups=2, highest_freq=0.5, lowest_freq=0.01, adapt_rate=0.1)
    sae.b_enc.fill_(-1.0)
    n = 1000
    sae.window_tokens.fill_(n)
    sae.window_fires[:] = 0.02 * n  # group 0 (target 0.5) fires less than its target; group 1 (0.01) more
    sae.window_max_pre[:] = 2.0
    sae.window_fires[5] = 0  # a latent that never fired is pulled up by its group's mean max pre-activation
    sae.window_max_pre[5] = 0.0
    sae.adapt_biases()
    group0, group1 = slice(6, D_SAE // 2), slice(D_SAE // 2, D_SAE)
    assert torch.equal(sae.b_enc[group0], torch.full((D_SAE // 2 - 6,), -1.0))  # within target: unchanged
    torch.testing.assert_close(sae.b_enc[group1], torch.full((D_SAE // 2,), -1.2))  # too often: -γ·max pre
    assert sae.b_enc[5] == pytest.approx(-1.0 + 0.1 * 2.0)
    assert sae.window_tokens == 0 and sae.window_fires.sum() == 0


def test_gba_training_keeps_groups_under_their_target_frequencies():
    sae = trained("gba", steps=80, adapt_tokens=1024)  # 20 adaptation windows in a short run
    codes = sae.encode(held_out())
    freq = (codes != 0).float().mean(0)
    per_group = torch.zeros(sae.cfg.n_groups).index_reduce_(0, sae.group, freq, "amax", include_self=False)
    targets = sae.target_freq.unique(sorted=True).flip(0)
    assert (per_group <= 2 * targets + 0.01).all(), (per_group, targets)
    assert per_group[0] > per_group[-1]


def test_archetypal_dictionary_rows_are_convex_combinations_within_delta(tmp_path):
    sae = trained("archetypal")
    mix = sae.mix.detach()
    assert (mix >= 0).all()
    torch.testing.assert_close(mix.sum(-1), torch.ones(D_SAE))
    assert (sae.relax.detach().norm(dim=-1) <= sae.relax_radius * (1 + 1e-5)).all()
    assert sae.relax.detach().norm(dim=-1).max() > 0  # the relaxation is used, not stuck at zero
    torch.testing.assert_close(sae.W_dec, mix @ sae.candidates + sae.relax.detach())
    assert sae.W_dec.shape == (D_SAE, D_IN)
    assert sae.W_dec is sae.W_dec  # fused once in eval mode

    sae.save(tmp_path / "sae")
    assert {"candidates", "mix", "relax"} <= set(load_file(str(tmp_path / "sae" / "sae.safetensors")))
    loaded = SAE.load(tmp_path / "sae")
    torch.testing.assert_close(loaded.W_dec, sae.W_dec, atol=0, rtol=0)


def test_archetypal_cache_follows_weight_changes():
    sae = make("archetypal").eval()
    first = sae.W_dec.clone()
    with torch.no_grad():
        sae.relax.add_(0.01)
    torch.testing.assert_close(sae.W_dec, first + 0.01)


def test_variational_samples_in_training_and_is_deterministic_at_eval():
    sae = make("variational", log_var_init=0.0)
    ds = data()
    sae.init_from_data(ds.batch(0))
    sae.train()
    x = ds.batch(1)
    a, b = sae.training_forward(x), sae.training_forward(x)
    assert not torch.equal(a.codes.values, b.codes.values)
    sae.eval()
    assert torch.equal(sae.encode(x), sae.encode(x))
    pre = sae.pre_acts(x)
    top = pre.topk(3, dim=-1).indices
    expected = torch.zeros_like(pre).scatter(-1, top, torch.relu(pre.gather(-1, top)))
    torch.testing.assert_close(sae.encode(x), expected)


def test_variational_kl_warms_up_from_zero():
    sae = make("variational", kl_warmup_tokens=2 * BATCH)
    assert first_step(sae).extras["kl_warmup"] == 0
    sae.tokens_seen.fill_(BATCH)
    assert first_step(sae).extras["kl_warmup"] == pytest.approx(0.5)


def test_gated_auxiliary_loss_trains_the_encoder_only():
    sae = make("gated")
    step = first_step(sae)
    _, aux = sae.loss_terms()["gate_reconstruction"]
    aux(step).backward()
    assert sae.W_dec.grad is None and sae.b_dec.grad is not None  # b_dec still centres the encoder input
    assert sae.W_enc.grad.abs().sum() > 0


def test_gated_magnitudes_do_not_shrink_with_the_penalty():
    sae = make("gated")
    x = held_out()[:32]
    with torch.no_grad():
        sae.b_enc.fill_(-0.1)  # a stricter gate changes which latents fire, not how much they say
    gate, codes = sae.gate_and_magnitude(x)
    fired = gate > 0
    shared = torch.nn.functional.linear(x - sae.b_dec, sae.W_enc)
    torch.testing.assert_close(codes[fired], torch.relu(shared)[fired])


def test_relu_reconstruction_uses_the_l1_penalty():
    sae = make("relu", l1_coef=0.5)
    step = first_step(sae)
    coef, l1 = sae.loss_terms()["l1"]
    assert coef == 0.5 and l1(step) > 0
    torch.testing.assert_close(fvu_of(step.x, step.x_hat), sae.loss_terms()["fvu"][1](step))


@pytest.mark.parametrize("arch", L1_VARIANTS)
def test_target_l0_steers_the_l1_weight_toward_it_from_either_side(arch):
    x = held_out()
    fixed = evaluate(trained(arch).eval(), x)["l0"]  # about 20 after 60 steps at the default weight
    fewer = trained(arch, target_l0=3, target_rate=0.05)
    more = trained(arch, target_l0=40, target_rate=0.05)
    assert fewer.l1_target.value > fewer.cfg.l1_coef > more.l1_target.value
    assert evaluate(fewer.eval(), x)["l0"] < 0.75 * fixed < fixed < evaluate(more.eval(), x)["l0"]


def test_steered_l1_weight_is_saved_and_loaded(tmp_path):
    sae = trained("relu", steps=10, target_l0=3)
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.l1_target.value == pytest.approx(sae.l1_target.value) != sae.cfg.l1_coef
    assert loaded.loss_terms()["l1"][0] == pytest.approx(sae.l1_target.value)
    assert make("relu").l1_target is None and "l1_target.log_coef" not in make("relu").state_dict()


@pytest.mark.parametrize(
    "arch, kwargs, message",
    [
        ("jumprelu", {"target_l0": 0}, "target_l0"),
        ("relu", {"target_l0": 64}, "target_l0"),
        ("gated", {"target_l0": 3, "target_rate": 0}, "target_rate"),
        ("relu", {"target_l0": 3, "l1_coef": 0}, "l1_coef"),
        ("jumprelu", {"bandwidth": 0}, "bandwidth"),
        ("jumprelu", {"window_tokens": 0}, "window_tokens"),
        ("jumprelu", {"window_tokens": 512.5}, "window_tokens"),
        ("gba", {"lowest_freq": 0.5, "highest_freq": 0.1}, "lowest_freq"),
        ("gba", {"activation": "gelu"}, "activation"),
        ("archetypal", {"n_candidates": 8}, "n_candidates"),
        ("variational", {"log_var_init": 5.0}, "log_var_init"),
        ("gated", {"l1_coef": -1.0}, "l1_coef"),
        ("relu", {"l1_coef": -1.0}, "l1_coef"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(arch, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAE.create(arch, d_in=D_IN, d_sae=D_SAE, **{**VARIANTS[arch], **kwargs})
