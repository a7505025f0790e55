"""Prompt readers and concept splits: disjoint, deterministic, pairs and templates kept apart as documented."""

from __future__ import annotations

import itertools

import pytest

from sae_guard import prompts as P

CONCEPT_NAMES = sorted(P.CONCEPTS)


@pytest.fixture(scope="module")
def folder():
    try:
        return P.prompts_dir()
    except FileNotFoundError as error:
        pytest.skip(f"prompt data not available ({error}); CI has it at ../shared/data/prompts")


@pytest.fixture(scope="module")
def datasets(folder):
    return {name: P.concept(name, folder) for name in CONCEPT_NAMES}


def test_clean_strips_drops_empty_and_nan_and_keeps_first_occurrence():
    assert P.clean([" a ", "", None, "NaN", "nan", "b", "a", "  "]) == ["a", "b"]


def test_missing_folder_names_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(P.PROMPTS_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=P.PROMPTS_ENV):
        P.prompts_dir()


def test_pairs_drop_repeats_and_prompt_reuse(tmp_path):
    (tmp_path / "concept_pairs_toy.csv").write_text(
        "sensitive prompt,normal prompt\na,b\na,b\n a ,c\nd,\ne,f\n", encoding="utf-8"
    )
    assert P.concept_pairs("toy", tmp_path) == [("a", "b"), ("e", "f")]


def test_wrong_column_gives_a_clear_error(tmp_path):
    (tmp_path / "coco_30k.csv").write_text("caption\nx\n", encoding="utf-8")
    with pytest.raises(KeyError, match="no column"):
        P.coco(tmp_path)


@pytest.mark.parametrize("name", CONCEPT_NAMES)
def test_splits_are_disjoint_and_non_empty(datasets, name):
    data = datasets[name]
    parts = {(s, side): getattr(data.split(s), side) for s in P.SPLITS for side in ("target", "retain")}
    for prompts in parts.values():
        assert prompts and len(set(prompts)) == len(prompts)
    for (a, pa), (b, pb) in itertools.combinations(parts.items(), 2):
        assert not set(pa) & set(pb), f"{name}: {a} and {b} share prompts"


@pytest.mark.parametrize("name", CONCEPT_NAMES)
def test_splits_are_deterministic_and_follow_the_seed(folder, datasets, name):
    assert P.concept(name, folder) == datasets[name]
    assert P.concept(name, folder, seed=1) != datasets[name]


@pytest.mark.parametrize("name", ["nudity", "vangogh"])
def test_each_pair_stays_in_one_split(folder, datasets, name):
    data = datasets[name]
    pairs = P.concept_pairs(name, folder)
    assert pairs
    for sensitive, normal in pairs:
        target_split = [s for s in P.SPLITS if sensitive in data.split(s).target]
        retain_split = [s for s in P.SPLITS if normal in data.split(s).retain]
        assert len(target_split) == 1 and target_split == retain_split


def _split_members(data, side: str, prompts_of: dict[str, str]) -> dict[str, dict[str, set[str]]]:
    """unit -> split -> the prompts of that unit found on `side` of the split."""
    members: dict[str, dict[str, set[str]]] = {}
    for split in P.SPLITS:
        for prompt in getattr(data.split(split), side):
            if prompt in prompts_of:  # other prompts (ordinary captions, the base data) are not units here
                members.setdefault(prompts_of[prompt], {s: set() for s in P.SPLITS})[split].add(prompt)
    return members


def test_celebrity_targets_split_by_template_and_retains_by_person(folder, datasets):
    data = datasets["celebrity"]
    assert len(data.target_names) == 50
    name_of = {row["prompt"].strip(): row["class"].strip() for row in P.read_rows("celebrity_target.csv", folder)}
    templates = {name: {s: {p.replace(name, "{}") for p in prompts} for s, prompts in seen.items()}
                 for name, seen in _split_members(data, "target", name_of).items()}
    assert set(templates) == set(data.target_names)
    for name, seen in templates.items():
        assert all(seen.values()), f"{name} is missing from a split"
        assert not seen["test"] & (seen["fit"] | seen["calibrate"]), name
    test_templates = set().union(*(seen["test"] for seen in templates.values()))
    fit_templates = set().union(*(seen["fit"] for seen in templates.values()))
    assert test_templates == fit_templates  # rotation: every template is in every split for some names

    person_of = {row["prompt"].strip(): row["class"].strip() for row in P.read_rows("celebrity_remain.csv", folder)}
    _, written = P._register_units("celebrity", folder)
    person_of |= dict(written)  # the register's sentences about other people, in every split as the data's own
    people = _split_members(P.celebrity_registers(folder), "retain", person_of)
    assert set(people) == set(P._celebrity_people(folder)) and len(people) >= 120
    assert all(sum(bool(prompts) for prompts in seen.values()) == 1 for seen in people.values())
    per_split = {s: sum(bool(seen[s]) for seen in people.values()) for s in P.SPLITS}
    assert tuple(per_split.values()) == P._cut_sizes(len(people), P.NUDITY_FRACTIONS)  # 0.6 / 0.2 / 0.2 of them


@pytest.mark.parametrize("name", CONCEPT_NAMES)
def test_register_units_stay_in_one_split_and_every_split_gets_some(folder, name):
    """A nudity phrase, benign sense, target template or other person never straddles fit and calibrate/test."""
    data = getattr(P, f"{name}_registers")(folder)
    for side, units in zip(("target", "retain"), P._register_units(name, folder)):
        members = _split_members(data, side, dict(units))
        assert len(members) == len({u for _, u in units}) >= 3, (name, side)
        assert all(sum(bool(prompts) for prompts in seen.values()) == 1 for seen in members.values()), (name, side)
        assert all(any(seen[s] for seen in members.values()) for s in P.SPLITS), (name, side)


@pytest.mark.parametrize("name", ["celebrity", "vangogh"])
def test_ordinary_captions_join_the_retain_side(folder, datasets, name):
    coco = set(P.coco(folder))
    data = datasets[name]
    ordinary = [len(coco & set(data.split(s).retain)) for s in P.SPLITS]
    assert sum(ordinary) == P.ORDINARY_RETAIN and min(ordinary) > 0
    assert not coco & {p for s in P.SPLITS for p in data.split(s).target}


def test_training_prompts_exclude_calibrate_test_and_evaluation_prompts(folder, datasets):
    training = set(P.sae_training_prompts(folder))
    assert len(training) > 20_000
    for data in datasets.values():
        assert not training & data.held_out(), data.name
        assert set(data.fit.target) <= training  # fit prompts are allowed and included by default
    assert not training & set(P.evaluation_prompts(folder))
    assert set(P.sae_training_prompts(folder, include_fit=False)) < training


def test_celebrity_contexts_give_every_name_the_same_share_of_ordinary_contexts(folder, datasets):
    prompts = P.celebrity_contexts(folder, per_name=5)
    names = datasets["celebrity"].target_names + tuple(P._named_prompts("celebrity_remain.csv", folder))
    assert len(names) == 150 and len(prompts) == 5 * len(names)
    for name in names:
        assert sum(p.startswith(name) or f" {name}" in p for p in prompts) >= 5, name
    val = set(P.coco_val(folder))
    slots = {P._PERSON.sub("\0", c, count=1) for c in P.coco(folder) if c not in val and P._PERSON.search(c)}
    owner = [next(n for n in sorted(names, key=len, reverse=True) if n in p) for p in prompts]
    assert all(p.replace(n, "\0", 1) in slots for p, n in zip(prompts, owner))  # a COCO train caption's person
    assert P.celebrity_contexts(folder, per_name=5) == prompts  # deterministic


def test_celebrity_in_captions_keeps_captions_and_people_to_their_splits(folder, datasets):
    """Every target in captions of every split; another person only in their own split (the one celebrity_registers
    puts them in); no caption context in two splits; COCO val never a context; nothing held out reused."""
    data, base = P.celebrity_in_captions(folder), P.celebrity_registers(folder)
    val = set(P.coco_val(folder))
    slots = {P._PERSON.sub("{}", c, count=1) for c in P.coco(folder) if c not in val and P._PERSON.search(c)}
    added = {s: (set(data.split(s).target) - set(base.split(s).target),
                 set(data.split(s).retain) - set(base.split(s).retain)) for s in P.SPLITS}
    people = sorted([*data.target_names, *P._celebrity_people(folder)], key=len, reverse=True)

    def context(prompt: str) -> tuple[str, str]:
        name = next(n for n in people if prompt.startswith(n) or f" {n}" in prompt)
        return name, prompt.replace(name, "{}", 1)

    contexts = {}
    for s, (targets, others) in added.items():
        assert targets and others, s
        named = [context(p) for p in (*targets, *others)]
        assert {n for n, _ in named if n in data.target_names} == set(data.target_names), s
        for name, _ in (context(p) for p in others):
            assert any(name in p for p in base.split(s).retain), (s, name)  # their register split
        contexts[s] = {c for _, c in named}
        assert contexts[s] <= slots, s  # a COCO train caption's person, never COCO val's
    for a, b in itertools.combinations(P.SPLITS, 2):
        assert not contexts[a] & contexts[b], (a, b)
    used = {p for s in P.SPLITS for side in (data.split(s).target, data.split(s).retain) for p in side}
    for round in P.HELDOUT_ROUNDS:
        held = P.heldout("celebrity", folder, round)
        assert not (set(held.target) | set(held.nearmiss)) & used, round
    assert P.celebrity_in_captions(folder).sizes() == data.sizes()  # deterministic


def test_attack_and_flag_readers_return_prompts(folder):
    attacks = P.unlearndiffatk_nudity(folder)
    sexual = P.i2p("sexual", folder)
    assert len(attacks) > 100 and len(sexual) > 500
    assert set(sexual) < set(P.i2p(folder=folder))
    assert len(P.coco_val(folder)) > 1000
    assert len(P.diffusiondb_val(folder)) == P.DIFFUSIONDB_VAL_SIZE
    assert set(P.diffusiondb_val(folder)) <= set(P.diffusiondb(folder))


def test_nudity_splits_hold_no_evaluation_prompt(folder, datasets):
    data = datasets["nudity"]
    nudity_prompts = {p for s in P.SPLITS for side in ("target", "retain") for p in getattr(data.split(s), side)}
    assert not nudity_prompts & set(P.evaluation_prompts(folder))


@pytest.mark.parametrize("round", sorted(P.HELDOUT_ROUNDS))
def test_heldout_sets_are_apart_from_every_fitting_and_training_prompt(folder, datasets, round):
    training = set(P.sae_training_prompts(folder))
    earlier = {p for r in P.HELDOUT_ROUNDS if r < round for name in CONCEPT_NAMES
               for p in (*P.heldout(name, folder, r).target, *P.heldout(name, folder, r).nearmiss)}
    for name in CONCEPT_NAMES:
        held = P.heldout(name, folder, round)
        assert len(held.target) >= 20 and len(held.nearmiss) >= 20
        assert not set(held.target) & set(held.nearmiss)
        used = {p for s in P.SPLITS for side in (datasets[name].split(s).target, datasets[name].split(s).retain)
                for p in side}
        targets, retains = P.register_prompts(name, folder)
        written = set(targets) | set(retains)
        assert not (set(held.target) | set(held.nearmiss)) & (used | training | written | earlier), name


@pytest.mark.parametrize("round", sorted(P.HELDOUT_ROUNDS))
def test_heldout_celebrity_names_every_target_in_three_casings_and_no_target_among_the_others(folder, datasets,
                                                                                               round):
    held = P.heldout("celebrity", folder, round)
    names = datasets["celebrity"].target_names
    for name in names:
        for cased in (name, name.lower(), name.upper()):
            assert any(cased in p for p in held.target), cased
    assert not any(n.lower() in p.lower() for n in names for p in held.nearmiss)
    with pytest.raises(ValueError, match="no held-out set"):
        P.heldout("cats", folder, round)
    with pytest.raises(ValueError, match="no held-out round"):
        P.heldout("celebrity", folder, max(P.HELDOUT_ROUNDS) + 1)


def test_register_datasets_add_the_written_prompts_to_every_split_and_train_the_sae_on_their_fit_split(folder):
    for name in CONCEPT_NAMES:
        plain, written = P.concept(name, folder), getattr(P, f"{name}_registers")(folder)
        targets, retains = P.register_prompts(name, folder)
        for split in P.SPLITS:
            extra_t = set(written.split(split).target) - set(plain.split(split).target)
            extra_r = set(written.split(split).retain) - set(plain.split(split).retain)
            assert extra_t and extra_t <= set(targets) and extra_r and extra_r <= set(retains), (name, split)
        assert not set(targets) & set(retains)
    written, training = P.written_prompts(folder), set(P.sae_training_prompts(folder))
    fit_splits = [getattr(P, f"{name}_registers")(folder).fit for name in CONCEPT_NAMES]
    fits = {p for split in fit_splits for p in (*split.target, *split.retain)}
    assert written & fits and written & training == written & fits  # fit splits train the SAE, nothing else does
