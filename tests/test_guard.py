"""The guard on a real (tiny, random) CLIP text encoder with the real CLIP vocabulary."""

import threading

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import sae_guard
from sae_guard import SAE, Concept, guard
from sae_guard.concepts import load_concepts, save_concepts
from sae_guard.hooks.hookpoints import HookpointError, find_hookpoint, find_module

ANIMALS = ["dog", "cat", "horse", "lion", "tiger", "bird", "fish", "cow", "sheep", "goat", "duck", "bear"]
PLACES = ["in a field", "at the beach", "on a hill", "in the snow", "near a river", "in a city street",
          "under a tree", "at night", "in the rain", "on a farm", "in a zoo", "by the sea"]
TARGET = [f"a photo of a zebra {p}" for p in PLACES] + [f"a zebra and a {a}" for a in ANIMALS]
RETAIN = [f"a photo of a {a} {p}" for a in ANIMALS for p in PLACES[:6]]
HOOK = "text_model.encoder.layers.1"


@pytest.fixture(scope="module")
def clip(clip_tokenizer):
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77))
    return model.eval()


@pytest.fixture(scope="module")
def sae(clip, clip_tokenizer, one_thread):
    """Trained on one thread, so its figures do not depend on what earlier tests left torch's thread count at.

    Learning rate and dead window are pinned (the 1/sqrt(d_sae) rate and a tenth of the run) so that the concept
    these tests calibrate does not move with the library's defaults: with the narrow-input default (8x the rate,
    a 5k-token window) the SAE reconstructs better (FVU 0.002 against 0.008) but "a photo of a zebra at night"
    falls under the calibrated threshold."""
    torch.manual_seed(0)
    acts = sae_guard.harvest(clip, HOOK, TARGET + RETAIN, tokenizer=clip_tokenizer, mode="sequential")
    sae = SAE.create("topk", d_in=32, d_sae=256, k=8, dead_tokens=40_000)
    sae, _ = sae_guard.train(sae, acts.to_tensor(), tokens=400_000, batch_size=512, lr=1.6e-3, progress=False)
    return sae.eval()


def hooks_of(model):
    """Every forward hook and pre-hook on the model (transformers 5 adds recording hooks of its own)."""
    return {(name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


def concept():
    return Concept("zebra", target=TARGET, retain=RETAIN, n_features=8, fpr=0.05)


def encode(tok, texts):
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]


def test_flags_the_concept_and_edits_only_flagged_inputs(clip, clip_tokenizer, sae):
    g = guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer)
    try:
        c = g.concepts[0]
        assert c.calibration["fpr"] <= 0.05 and c.calibration["tpr"] >= 0.8
        texts = ["a zebra in the snow", "a photo of a dog at night"]
        with torch.no_grad():
            guarded = clip(input_ids=encode(clip_tokenizer, texts)).last_hidden_state
        verdicts = g.last_verdicts
        assert [v.flagged for v in verdicts] == [True, False]
        assert verdicts[0].concepts == ["zebra"] and verdicts[0].action == "deactivate"
        assert verdicts[1].action == "pass" and verdicts[0].tokens["zebra"]
        assert set(verdicts[0].scores) == {"zebra"} and verdicts[0].thresholds["zebra"] == c.threshold
    finally:
        g.detach()
    with torch.no_grad():
        plain = clip(input_ids=encode(clip_tokenizer, texts)).last_hidden_state
    assert torch.equal(guarded[1], plain[1])  # not flagged: bit-identical
    assert not torch.allclose(guarded[0], plain[0])  # flagged: edited


def test_scores_use_real_tokens_and_do_not_depend_on_the_batch(clip, clip_tokenizer, sae):
    with guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
        alone = g.classify(["a zebra at the beach"])[0].scores["zebra"]
        batch = g.classify(["a zebra at the beach", "a very long prompt " * 6, "cat"])[0].scores["zebra"]
        assert abs(alone - batch) <= 1e-5


def test_detach_restores_the_model_exactly(clip, clip_tokenizer, sae):
    ids = encode(clip_tokenizer, ["a zebra in the rain", "a dog"])
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    hooks = hooks_of(clip)
    with torch.no_grad():
        before = clip(input_ids=ids).last_hidden_state
    g = guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer)
    g.detach()
    with torch.no_grad():
        after = clip(input_ids=ids).last_hidden_state
    assert torch.equal(before, after)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in state.items())
    assert hooks_of(clip) == hooks


def test_hidden_states_record_the_edit(clip, clip_tokenizer, sae):
    ids = encode(clip_tokenizer, ["a zebra in a zoo"])
    with torch.no_grad():
        plain = clip(input_ids=ids, output_hidden_states=True).hidden_states[2]
        with guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
            out = clip(input_ids=ids, output_hidden_states=True)
            assert g.last_verdicts[0].flagged
    assert not torch.allclose(out.hidden_states[2], plain)  # layer 1's output, as recorded, is the edited one


def test_both_transformers_path_forms_resolve(clip, clip_tokenizer, sae):
    modules = []
    for name in ("encoder.layers.1", "text_model.encoder.layers.1"):
        with guard(clip, sae=sae, concepts=[concept()], hookpoint=name, tokenizer=clip_tokenizer) as g:
            modules.append(g.gates[0].hookpoint.module)
    assert modules[0] is modules[1] and modules[0] is clip.get_submodule(g.gates[0].hookpoint.name)


def test_fp16_model_is_guarded_in_fp32(clip, clip_tokenizer, sae):
    half = CLIPTextModel(clip.config).eval()
    half.load_state_dict(clip.state_dict())
    half = half.to(torch.float16)
    fitted = concept()
    guard(clip, sae=sae, concepts=[fitted], hookpoint=HOOK, tokenizer=clip_tokenizer).detach()  # fitted in fp32
    ids = encode(clip_tokenizer, TARGET[:4])
    states = sae_guard.hooks.capture.capture_hidden(find_hookpoint(half, HOOK), input_ids=ids)
    with guard(half, sae=sae, concepts=[fitted], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
        with torch.no_grad():
            out = half(input_ids=ids).last_hidden_state
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        mask = g.gates[0].mask_fn((ids,), {})
        b, _ = mask.nonzero(as_tuple=True)
        codes = sae.encode_sparse(states[mask].float())  # the fp16 states, encoded in fp32
        expected = fitted.score_codes(codes, b, len(ids), sae.W_dec)[0]
        assert [v.scores["zebra"] for v in g.last_verdicts] == pytest.approx(expected.tolist())
        assert [v.flagged for v in g.last_verdicts] == (expected > fitted.threshold).tolist()


def test_edit_modes(clip, clip_tokenizer, sae):
    ids = encode(clip_tokenizer, ["a zebra by the sea"])
    outs = {}
    for mode, strength in [("deactivate", 0.0), ("deactivate", -8.0), ("scale", 2.0), ("clamp", 0.0), ("steer", 3.0)]:
        with guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer, mode=mode,
                   strength=strength):
            with torch.no_grad():
                outs[(mode, strength)] = clip(input_ids=ids).last_hidden_state
    torch.testing.assert_close(outs[("deactivate", 0.0)], outs[("clamp", 0.0)])
    assert not torch.allclose(outs[("deactivate", 0.0)], outs[("deactivate", -8.0)])
    assert not torch.allclose(outs[("scale", 2.0)], outs[("steer", 3.0)])
    with pytest.raises(ValueError, match="strength <= 0"):
        guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer, strength=1.0)


def test_threads_get_their_own_verdicts(clip, clip_tokenizer, sae):
    with guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
        # one flagged zebra prompt and one passed dog prompt, whichever the CPU's rounding puts past the threshold
        zebra = next((t for t in TARGET if g.classify([t])[0].flagged), None)
        assert zebra is not None, "the zebra concept flags none of its own target prompts"
        texts = (zebra, "a photo of a dog at night")
        alone = {t: g.classify([t])[0].flagged for t in texts}
        assert alone == {texts[0]: True, texts[1]: False}  # one flagged, one not: a mix-up would show
        results = {}

        def run(text):
            for _ in range(5):
                with torch.no_grad():
                    clip(input_ids=encode(clip_tokenizer, [text]))
                results.setdefault(text, []).append(g.last_verdicts[0].flagged)

        threads = [threading.Thread(target=run, args=(t,)) for t in texts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {t: [alone[t]] * 5 for t in texts}


def test_bad_input_is_a_clear_error_and_leaves_the_model_alone(clip, clip_tokenizer, sae):
    hooks = hooks_of(clip)
    with pytest.raises(HookpointError, match="no module 'encoder.layer.1'"):
        guard(clip, sae=sae, concepts=[concept()], hookpoint="encoder.layer.1", tokenizer=clip_tokenizer)
    wide = SAE.create("topk", d_in=64, d_sae=128, k=4)
    with pytest.raises(ValueError, match="d_in=64 does not match the width 32"):
        guard(clip, sae=wide, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer)
    with pytest.raises(ValueError, match="no target inputs"):
        guard(clip, sae=sae, concepts=[Concept("empty", target=[], retain=RETAIN)], hookpoint=HOOK,
              tokenizer=clip_tokenizer)
    assert hooks_of(clip) == hooks
    with guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
        empty, long = g.classify(["", "zebra " * 200])
        assert long.flagged and long.windows > 1  # over-long: every window of 77 tokens is read
        assert (empty.flagged, empty.action, empty.scores) == (False, "pass", {"zebra": 0.0})  # nothing asked
        gate = g.gates[0]
        bad = torch.zeros(1, 5, 32)
        bad[0, 2, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            gate.apply(bad)


def test_a_probe_concept_edits_only_its_positive_latents_and_survives_save_and_load(clip, clip_tokenizer, sae,
                                                                                     tmp_path):
    texts = ["a photo of a zebra in the snow", "a photo of a dog at night"]
    probe = Concept("zebra", target=TARGET, retain=RETAIN, strategy="probe", n_features=8, fpr=0.05)
    with guard(clip, sae=sae, concepts=[probe], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
        assert probe.calibration["readout"] == "linear" and 0 < probe.features.numel() <= 8
        verdicts = g.classify(texts)
        assert [v.flagged for v in verdicts] == [True, False] and verdicts[0].tokens["zebra"]
        edited = g.policies[0].members[0].nonzero().squeeze(-1).tolist()
        assert sorted(edited) == sorted(probe.features[probe.weights > 0].tolist())
        with torch.no_grad():
            guarded = clip(input_ids=encode(clip_tokenizer, texts)).last_hidden_state
    with torch.no_grad():
        plain = clip(input_ids=encode(clip_tokenizer, texts)).last_hidden_state
    assert torch.equal(guarded[1], plain[1]) and not torch.allclose(guarded[0], plain[0])

    loaded = load_concepts(save_concepts([probe], tmp_path))[0]
    assert torch.equal(loaded.weights, probe.weights) and loaded.threshold == probe.threshold
    with guard(clip, sae=sae, concepts=[loaded], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
        assert [v.scores for v in g.classify(texts)] == [v.scores for v in verdicts]


def test_an_edited_input_is_edited_at_its_padding_too():
    """A UNet reads every position of the prompt, and past CLIP's end token the states have read the whole prompt:
    the latents edited on an input's real tokens are edited at its padding as well, where they fire there; other
    latents, and inputs with no edit, are left alone."""
    from sae_guard.hooks.gate import Edit, Gate
    from sae_guard.hooks.hookpoints import Hookpoint

    sae = SAE.create("topk", d_in=8, d_sae=8, k=2).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
    e = torch.eye(8)
    hidden = torch.stack([
        torch.stack([5 * e[3], 4 * e[3] + 2 * e[1], 3 * e[5]]),  # input 0: real token, then two padding positions
        torch.stack([5 * e[3], 4 * e[3], 3 * e[5]]),  # input 1: the same latent, nothing decided for it
    ])
    real = torch.tensor([[True, False, False], [True, False, False]])

    def decide(call):  # edit latent 3 of input 0 only
        return (call.codes.indices == 3) & (call.prompt_index == 0)[:, None] & (call.codes.values != 0)

    module = torch.nn.Identity()
    gate = Gate(Hookpoint("layer", module, module), sae, decide, Edit("deactivate", 0.0))
    out = gate.apply(hidden, real)
    torch.testing.assert_close(out[0], torch.stack([0 * e[3], 2 * e[1], 3 * e[5]]))  # latent 3 gone everywhere
    assert torch.equal(out[1], hidden[1])


def test_a_feature_map_is_gated_position_by_position():
    """A UNet block's output (batch, channels, height, width): each position is a token of width `channels`, the
    chosen latent is edited where it fires, the map keeps its layout, and an input with no edit is untouched."""
    from diffusers import UNet2DConditionModel

    from sae_guard.hooks.gate import Edit, Gate
    from sae_guard.hooks.hookpoints import find_hookpoint, hidden_of

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2).eval()
    point = find_hookpoint(unet, "up_blocks.0.attentions.0")
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4).eval()
    inputs = (torch.randn(2, 4, 8, 8), 10, torch.randn(2, 5, 32))
    seen = {}
    handle = point.module.register_forward_hook(lambda _m, _a, out: seen.update(map=hidden_of(out)))
    with torch.no_grad():
        plain = unet(*inputs).sample
    handle.remove()
    feature_map = seen["map"]
    assert feature_map.ndim == 4 and feature_map.shape[1] == 16

    tokens = feature_map[0].flatten(1).T  # (positions, channels) of input 0
    with torch.no_grad():
        codes = sae.encode(tokens)
    target = int(codes.sum(0).argmax())
    expected = (tokens - codes[:, target:target + 1] * sae.W_dec[target]).T.reshape(feature_map[0].shape)

    def decide(call):  # latent `target` of input 0 only
        return (call.codes.indices == target) & (call.prompt_index == 0)[:, None] & (call.codes.values != 0)

    gate = Gate(point, sae, decide, Edit("deactivate", 0.0))
    out = gate.apply(feature_map)
    assert out.shape == feature_map.shape
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[1], feature_map[1])

    gate.attach()
    try:
        with torch.no_grad():
            guarded = unet(*inputs).sample
    finally:
        gate.detach()
    assert not torch.allclose(guarded[0], plain[0])
    assert torch.equal(guarded[1], plain[1])
    with pytest.raises(ValueError, match="SAE width d_in=8"):
        Gate(point, SAE.create("topk", d_in=8, d_sae=16, k=2), decide).apply(feature_map)


def test_an_sae_recorded_at_another_hookpoint_is_refused_unless_allowed(clip, clip_tokenizer, sae):
    import copy

    hooks = hooks_of(clip)

    moved = copy.deepcopy(sae)
    moved.cfg.metadata["hookpoint"] = "text_model.encoder.layers.2"
    with pytest.raises(ValueError, match="trained at hookpoint 'text_model.encoder.layers.2'.*allow_other_hookpoint"):
        guard(clip, sae=moved, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer)
    assert hooks_of(clip) == hooks
    with guard(clip, sae=moved, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer,
               allow_other_hookpoint=True) as g:
        assert g.gates[0].hookpoint.name.endswith("layers.1")
    moved.cfg.metadata["hookpoint"] = "encoder.layers.1"  # the other transformers spelling of the same module
    with guard(clip, sae=moved, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer):
        pass
    with guard(clip, sae=moved, concepts=[concept()], tokenizer=clip_tokenizer) as g:  # default: the recorded one
        assert g.gates[0].hookpoint.module is find_module(clip, HOOK)


def test_unusable_saes_and_arguments_are_clear_errors(clip, clip_tokenizer, sae):
    import copy

    hooks = hooks_of(clip)
    with pytest.raises(TypeError, match="needs a model or a pipeline"):
        guard(None, sae=sae, concepts=[concept()])
    with pytest.raises(TypeError, match="needs sae="):
        guard(clip, sae=None, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer)
    broken = copy.deepcopy(sae)
    with torch.no_grad():
        broken.W_dec[3, 1] = float("nan")
    with pytest.raises(ValueError, match="W_dec holds NaN or inf"):
        guard(clip, sae=broken, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer)
    with torch.device("meta"):
        ghost = SAE.create("topk", d_in=32, d_sae=256, k=8)
    with pytest.raises(ValueError, match="meta device"):
        guard(clip, sae=ghost, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer, batch_size=0)
    assert hooks_of(clip) == hooks
    with guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
        with pytest.raises(TypeError, match="not None"):
            g.classify(None)
        with pytest.raises(TypeError, match="input 1 is a int"):
            g.classify(["a zebra", 123])
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            g.classify(["a zebra"], batch_size=0)


def test_special_tokens_never_score(clip, clip_tokenizer, sae):
    with guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer) as g:
        ids = encode(clip_tokenizer, ["a zebra", ""])
        mask = g.gates[0].mask_fn((ids,), {})
        assert mask.sum(-1).tolist() == [2, 0]  # "a", "zebra": not <|startoftext|>, <|endoftext|> or padding
        bare = g.classify(["", "<|startoftext|>", "<|endoftext|>"])
        assert [v.scores for v in bare] == [{"zebra": 0.0}] * 3 and not any(v.flagged for v in bare)


def test_a_guarded_model_refuses_copies_until_detached(clip, clip_tokenizer, sae):
    import copy
    import pickle

    g = guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer)
    with pytest.raises(TypeError, match="call guard.detach\\(\\) first"):
        copy.deepcopy(clip)
    with pytest.raises(TypeError, match="call guard.detach\\(\\) first"):
        pickle.dumps(clip)
    g.detach()
    assert isinstance(copy.deepcopy(clip), CLIPTextModel)


def test_a_guard_has_a_readable_repr(clip, clip_tokenizer, sae):
    with guard(clip, sae=sae, concepts=[concept()], hookpoint=HOOK, tokenizer=clip_tokenizer, mode="scale",
               strength=0.5) as g:
        text = repr(g)
    assert text.startswith("Guard(CLIPTextModel,") and "encoder.layers.1' (text, attached)" in text
    assert "architecture='topk', d_in=32, d_sae=256" in text and "edit=scale(0.5)" in text
    assert "Concept('zebra', coverage, " in text and "threshold" in text and "TPR" in text
    assert len(text.splitlines()) == 4  # the guard, its gate, its concept, the closing bracket


def test_a_module_of_no_family_is_guarded_on_tensors():
    from sae_guard.adapters.registry import adapter_for
    from sae_guard.adapters.text import TextAdapter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    assert type(adapter_for(model)).__name__ == "Adapter"
    assert isinstance(adapter_for(CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                               num_attention_heads=2))), TextAdapter)
    sae = SAE.create("topk", d_in=8, d_sae=16, k=2)
    x = torch.randn(64, 6)
    direction = torch.zeros(6)
    direction[0] = 4.0
    target, retain = list(x[:32] + direction), list(x[32:] - direction)
    with guard(model, sae=sae, concepts=[Concept("up", target=target, retain=retain, n_features=2, fpr=0.1)],
               hookpoint="1") as g:
        verdicts = g.classify(torch.stack(target[:4] + retain[:4]))
        assert len(verdicts) == 8
        with pytest.raises(ValueError, match="different shapes"):
            g.classify([torch.randn(6), torch.randn(5)])


def test_concepts_refuse_impossible_settings(clip, clip_tokenizer, sae):
    from sae_guard.concepts import MIN_CALIBRATE, PoorConceptWarning

    with pytest.raises(TypeError, match="not one string"):
        Concept("nudity", target="a naked woman", retain=RETAIN)
    with pytest.raises(TypeError, match="retain must be a list"):
        Concept("nudity", target=TARGET, retain=42)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_features must be a positive integer"):
            Concept("zebra", target=TARGET, retain=RETAIN, n_features=bad)
    hooks = hooks_of(clip)
    cases = [(Concept("same", target=RETAIN, retain=list(reversed(RETAIN))), "target and retain inputs are the same"),
             (Concept("one", target=["a photo of a zebra"], retain=RETAIN), f"at least {MIN_CALIBRATE}"),
             (Concept("few", target=TARGET, retain=RETAIN[:6]), "held-out retain inputs"),
             (Concept("given", target=TARGET, retain=RETAIN, calibrate_target=TARGET[:2]),
              f"pass calibrate_target with at least {MIN_CALIBRATE}")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            guard(clip, sae=sae, concepts=[bad], hookpoint=HOOK, tokenizer=clip_tokenizer)
    assert hooks_of(clip) == hooks
    # examples that do not tell the concept apart: an error if it never flags, a warning naming its fit if it seldom does
    lookalikes = [f"a photo of a {a} {p}" for a in ANIMALS[6:] for p in PLACES[:4]]
    with pytest.raises(ValueError, match="flags none of its held-out target inputs .*strategy 'mean_contrast'"):
        guard(clip, sae=sae, concepts=[Concept("blurred", target=lookalikes, retain=RETAIN, strategy="mean_contrast",
                                               n_features=2, fpr=0.01)],
              hookpoint=HOOK, tokenizer=clip_tokenizer)
    # a zebra concept calibrated on 4 zebra prompts among 10 other animals: its calibrate TPR stays well under 50%
    mixed = Concept("mixed", target=TARGET[4:], retain=RETAIN, calibrate_target=TARGET[:4] + lookalikes[:10],
                    n_features=8, fpr=0.05)
    with pytest.warns(PoorConceptWarning, match="flags only .*strategy 'coverage', .* fitted on 20 target"):
        guard(clip, sae=sae, concepts=[mixed], hookpoint=HOOK, tokenizer=clip_tokenizer).detach()
    assert 0 < mixed.calibration["tpr"] < 0.5


@pytest.mark.parametrize("mode, strength, error", [
    ("deactivate", float("nan"), ValueError), ("scale", float("inf"), ValueError), ("steer", -1e9, ValueError),
    ("clamp", 1e5, ValueError), ("scale", "2", TypeError), ("scale", True, TypeError)])
def test_edit_strengths_that_would_corrupt_states_are_refused(mode, strength, error):
    with pytest.raises(error, match="strength"):
        sae_guard.Edit(mode, strength)
    assert sae_guard.Edit("deactivate", -8.0).strength == -8.0


def test_a_nan_steering_direction_is_refused():
    with pytest.raises(ValueError, match="direction holds NaN"):
        sae_guard.Edit("steer", 2.0, torch.tensor([1.0, float("nan")]))
