"""Saving and loading: atomic writes, refusing pickles, clear errors on bad folders."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_guard import SAE
from sae_guard.sae import SAEFormatError


def test_pickles_are_refused(tmp_path):
    pt = tmp_path / "sae.pt"
    torch.save({"W": torch.zeros(2)}, pt)
    with pytest.raises(SAEFormatError, match="pickle"):
        SAE.load(pt)
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({"W": torch.zeros(2)}, folder / "ae.pt")
    with pytest.raises(SAEFormatError, match="refuses"):
        SAE.load(folder)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SAEFormatError, match="does not exist"):
        SAE.load(tmp_path / "nothing")
    sae = SAE.create("topk", d_in=4, d_sae=8, k=2)
    path = sae.save(tmp_path / "ok")
    (path / "sae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SAEFormatError, match="not a readable safetensors"):
        SAE.load(path)
    path = sae.save(tmp_path / "ok2")
    (path / "cfg.json").write_text("{broken")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        SAE.load(path)


def test_weights_that_do_not_match_the_config(tmp_path):
    sae = SAE.create("topk", d_in=4, d_sae=8, k=2)
    path = sae.save(tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["d_sae"] = 16
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="shape"):
        SAE.load(path)


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    a = SAE.create("topk", d_in=4, d_sae=8, k=2)
    b = SAE.create("topk", d_in=4, d_sae=8, k=2)
    a.save(tmp_path / "sae")
    b.save(tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    torch.testing.assert_close(SAE.load(tmp_path / "sae").W_dec, b.W_dec)


def test_the_same_sae_saves_to_the_same_bytes(tmp_path):
    # safetensors writes metadata keys in hash order: unsorted, ten saves of two keys agree 1 time in 512
    sae = SAE.create("topk", d_in=4, d_sae=8, k=2)
    files = [sae.save(tmp_path / f"sae{i}") / "sae.safetensors" for i in range(10)]
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"architecture": "topk", "format": "sae_guard"}
    torch.testing.assert_close(SAE.load(files[0].parent).W_dec, sae.W_dec)


def test_failed_save_keeps_the_previous_folder(tmp_path, monkeypatch):
    a = SAE.create("topk", d_in=4, d_sae=8, k=2)
    a.save(tmp_path / "sae")
    import sae_guard.sae.io as io

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        SAE.create("topk", d_in=4, d_sae=8, k=2).save(tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    torch.testing.assert_close(SAE.load(tmp_path / "sae").W_dec, a.W_dec)


def test_unknown_architecture_in_cfg(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"architecture": "mystery", "d_in": 4, "d_sae": 8}))
    save_file({"W_dec": torch.zeros(8, 4)}, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match="unknown SAE architecture 'mystery'"):
        SAE.load(folder)


def test_nan_or_inf_weights_are_refused_at_load(tmp_path):
    sae = SAE.create("topk", d_in=4, d_sae=8, k=2)
    with torch.no_grad():
        sae.b_enc[3] = float("inf")
    path = sae.save(tmp_path / "broken")
    with pytest.raises(SAEFormatError, match=r"broken: topk weights \['b_enc'\] hold NaN or inf"):
        SAE.load(path)


def test_a_config_missing_sizes_or_with_wrong_types_is_refused(tmp_path):
    path = SAE.create("topk", d_in=4, d_sae=8, k=2).save(tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    for change, message in [({"d_sae": None}, "has no 'd_sae'"), ({"k": 2.5}, "k must be int, got 2.5"),
                            ({"k": "2"}, "k must be int, got '2'"), ({"k": True}, "k must be int, got True")]:
        broken = {key: value for key, value in {**cfg, **change}.items() if value is not None}
        (path / "cfg.json").write_text(json.dumps(broken))
        with pytest.raises(SAEFormatError, match=message):
            SAE.load(path)
    with pytest.raises(ValueError, match="k must be int, got 2.5"):
        SAE.create("topk", d_in=4, d_sae=8, k=2.5)


def test_saving_onto_a_file_or_a_foreign_folder_is_refused_and_loses_nothing(tmp_path):
    sae = SAE.create("topk", d_in=4, d_sae=8, k=2)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(SAEFormatError, match="is an existing file"):
        sae.save(notes)
    assert notes.read_text() == "keep me"
    with pytest.raises(SAEFormatError, match="holding other files"):
        sae.save(tmp_path)
    assert notes.read_text() == "keep me"
    sae.save(tmp_path / "sae")
    sae.save(tmp_path / "sae")  # an SAE folder is replaced whole, as before
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
