"""The training loop: it learns, it resumes exactly, and bad data fails clearly."""

import json

import pytest
import torch

import sae_guard
from sae_guard import SAE
from sae_guard.sae.metrics import evaluate
from sae_guard.synthetic import planted, recovery
from sae_guard.train import TrainingDiverged


def small_data():
    return planted(d=16, n_atoms=32, active=3, seed=3, batch_size=256)


def test_training_recovers_planted_atoms():
    ds = small_data()
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=16, d_sae=64, k=3)
    sae, figures = sae_guard.train(sae, ds, tokens=300_000, batch_size=256, progress=False)
    held_out = ds.sample(8192, torch.Generator().manual_seed(99))[0]
    assert evaluate(sae, held_out)["fvu"] < 0.2
    assert recovery(sae.W_dec, ds.atoms) >= 0.8
    assert figures["steps"] == 1172 and figures["tokens_per_second"] > 0
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_tensor_and_iterable_data_both_train():
    x = small_data().sample(4096, torch.Generator().manual_seed(0))[0]
    for data in (x, list(x.split(500))):
        torch.manual_seed(0)
        sae, figures = sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), data,
                                       tokens=20_000, batch_size=256, progress=False)
        assert figures["fvu"] < 1.0


# batchtopk: its warm-up ends at step 13 of the 40; relu with a target L0: its steered L1 weight resumes too;
# jumprelu reading its window on every third token: the resumed run samples the rows the uninterrupted one did
@pytest.mark.parametrize("arch, options", [("topk", {"k": 3}), ("batchtopk", {"k": 3}), ("relu", {"target_l0": 3}),
                                           ("jumprelu", {"target_l0": 3, "window_tokens": 96})])
def test_resume_finishes_with_the_same_weights(tmp_path, arch, options):
    ds = small_data()

    def run(checkpoint_dir, tokens):
        torch.manual_seed(0)
        sae = SAE.create(arch, d_in=16, d_sae=64, dead_tokens=2048, **options)
        return sae_guard.train(sae, ds, tokens=tokens, batch_size=256, progress=False,
                               checkpoint_dir=checkpoint_dir,
                               checkpoint_every=256 * 10 if checkpoint_dir else None)

    reference, ref_figures = run(None, 256 * 40)

    class Interrupt(Exception):
        pass

    # interrupt the first run after 25 steps by making the data stream fail
    calls = {"n": 0}
    original = ds.batch

    def failing_batch(step):
        calls["n"] += 1
        if step >= 25:
            raise Interrupt
        return original(step)

    ds.batch = failing_batch
    with pytest.raises(Interrupt):
        run(tmp_path, 256 * 40)
    ds.batch = original
    assert (tmp_path / "checkpoint" / "trainer_state.json").exists()
    resumed, figures = run(tmp_path, 256 * 40)
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p, atol=0, rtol=0, msg=name)


def test_resume_refuses_a_different_run(tmp_path):
    ds = small_data()
    sae = SAE.create("topk", d_in=16, d_sae=64, k=3)
    sae_guard.train(sae, ds, tokens=256 * 4, batch_size=256, progress=False, checkpoint_dir=tmp_path,
                    checkpoint_every=512)
    with pytest.raises(ValueError, match="another run"):
        sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), ds, tokens=256 * 8, batch_size=256,
                        progress=False, checkpoint_dir=tmp_path)


def test_bad_data_is_a_clear_error():
    sae = SAE.create("topk", d_in=16, d_sae=64, k=3)
    with pytest.raises(ValueError, match="empty"):
        sae_guard.train(sae, torch.zeros(0, 16), tokens=100, batch_size=10, progress=False)
    with pytest.raises(ValueError, match="expects \\(batch, 16\\)"):
        sae_guard.train(sae, torch.randn(100, 15), tokens=100, batch_size=10, progress=False)
    bad = torch.randn(100, 16)
    bad[57, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        sae_guard.train(sae, bad, tokens=1000, batch_size=100, progress=False)
    with pytest.raises(ValueError, match="empty"):
        sae_guard.train(sae, [], tokens=100, batch_size=10, progress=False)


def test_bf16_autocast_trains():
    ds = small_data()
    torch.manual_seed(0)
    sae, figures = sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), ds, tokens=256 * 40,
                                   batch_size=256, progress=False, autocast=True)
    assert sae.W_enc.dtype == torch.float32
    assert figures["fvu"] < 0.9


def test_a_checkpoint_dir_alone_checkpoints_and_an_interrupted_run_resumes(tmp_path):
    ds = small_data()

    def run(tokens=256 * 40):
        torch.manual_seed(0)
        return sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), ds, tokens=tokens, batch_size=256,
                               progress=False, checkpoint_dir=tmp_path)

    original = ds.batch

    def interrupted(step):
        if step >= 25:
            raise KeyboardInterrupt
        return original(step)

    ds.batch = interrupted
    with pytest.raises(KeyboardInterrupt):
        run()
    ds.batch = original
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 24  # every tenth of the run (4 steps of 40): the last before step 25
    resumed, _ = run()
    torch.manual_seed(0)
    reference, _ = sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), ds, tokens=256 * 40,
                                   batch_size=256, progress=False)
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p, atol=0, rtol=0, msg=name)


def test_a_finished_runs_folder_refuses_new_data_and_another_config(tmp_path):
    ds = small_data()
    torch.manual_seed(0)
    trained, _ = sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), ds, tokens=256 * 8, batch_size=256,
                                 progress=False, checkpoint_dir=tmp_path)
    other = planted(d=16, n_atoms=32, active=3, seed=4, batch_size=256)
    with pytest.raises(ValueError, match="another run \\(it differs in data\\)"):
        sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), other, tokens=256 * 8, batch_size=256,
                        progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="differs in config"):
        sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=4), ds, tokens=256 * 8, batch_size=256,
                        progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="differs in lr"):
        sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), ds, tokens=256 * 8, batch_size=256, lr=1e-3,
                        progress=False, checkpoint_dir=tmp_path)
    again, _ = sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), ds, tokens=256 * 8, batch_size=256,
                               progress=False, checkpoint_dir=tmp_path)  # the same run: its finished weights
    torch.testing.assert_close(again.W_dec, trained.W_dec, atol=0, rtol=0)


def test_an_absurd_learning_rate_stops_with_a_clear_error():
    ds = small_data()
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        sae_guard.train(SAE.create("topk", d_in=16, d_sae=64, k=3), ds, tokens=256 * 200, batch_size=256, lr=1e3,
                        progress=False)
