"""Public prompt sets, read from a data folder, and the three concept datasets a prompt classifier is measured on.

The CSVs live beside the project, never inside it (see the folder's README). The folder is, first found: the
`folder` argument, the `SAE_GUARD_PROMPTS` environment variable, `../shared/data/prompts` next to the repository
root, the same path next to the working directory or one of its parents.

Every reader returns prompts cleaned one way: stripped, empty and NaN cells dropped, duplicates removed keeping
the first occurrence.

A concept dataset has three disjoint splits, each with `target` and `retain` prompts: `fit` (pick SAE features,
train a baseline), `calibrate` (set the threshold), `test` (report only). Membership is fixed by a seeded SHA-256
of the prompt (or pair, or celebrity), so it depends on neither file order nor Python's hash seed, and the counts
are exact. The evaluation-only prompts (UnlearnDiffAtk nudity, I2P sexual, COCO val, DiffusionDB val; COCO val
is a subset of COCO 30k) are kept out of every split and out of SAE training, so attack and flag rates are
measured on prompts no method saw.
Sizes with the shared data and seed 0 (`python -m sae_guard.prompts` prints them):

    concept    split      target  retain
    nudity     fit           112   22295
    nudity     calibrate      38    7432
    nudity     test           37    7431
    celebrity  fit           100    1500
    celebrity  calibrate      50     500
    celebrity  test          100     500
    vangogh    fit            20    1220
    vangogh    calibrate      10     410
    vangogh    test           20     420

`<concept>_registers` (what pipelines/minilm-prompts.toml names) adds the prompts written for each concept in many
registers (`register_prompts`, from concept_data/fitting.toml), split 0.6 / 0.2 / 0.2 by hash of their unit: a nudity
phrase, a benign sense, a target template, another person (`_with_registers`; fit sizes nudity 475 / 22624, celebrity
500 / 2436, Van Gogh 55 / 1300); a recipe that names them trains its SAE on their fit split only. The
held-out evaluation sets (`heldout`, concept_data/heldout.toml) are written apart from all of these and only
reported on.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

PROMPTS_ENV = "SAE_GUARD_PROMPTS"
SEED = 0
SHARED_SUBPATH = Path("shared") / "data" / "prompts"
# Split fractions (fit, calibrate, test). Nudity has thousands of prompts, so a 20% calibrate split already
# holds about 5,300 COCO captions (about 53 above a 1% threshold); the 50 Van Gogh pairs keep 40% for test.
NUDITY_FRACTIONS = (0.6, 0.2, 0.2)
VANGOGH_FRACTIONS = (0.4, 0.2, 0.4)
CELEBRITY_TEMPLATE_FRACTIONS = (0.4, 0.2, 0.4)  # of each celebrity's 5 templates: 2 fit, 1 calibrate, 2 test
ORDINARY_RETAIN = 1000  # COCO captions added to the retain side of the celebrity and Van Gogh concepts
SPLITS = ("fit", "calibrate", "test")
DIFFUSIONDB_VAL_SIZE = 2000
# DiffusionDB's prompt_nsfw >= 0.8 set is mostly insults, gore and slurs (a text toxicity score): a nudity target is
# one of its prompts that names nudity or sex, or asks for the sexualised pictures that Stable Diffusion draws nude
# (sexy, lingerie, seductive). The others belong to neither side of the nudity concept.
NUDITY_WORDS = re.compile(r"\b(nude|nudes|nudity|naked|nsfw|topless|sex|sexual|sexy|porn\w*|breasts?|nipples?|"
                          r"erotic\w*|genitals?|penis|vagina|undress\w*|hentai|boobs?|tits|lingerie|seductive|"
                          r"sensual\w*)\b", re.IGNORECASE)
USER_IMAGE_NSFW = 0.5  # a benign user prompt whose image scored this NSFW or more is left off the retain side

Unit = TypeVar("Unit")


def prompts_dir(folder: str | os.PathLike | None = None) -> Path:
    """The prompt-data folder (see the module docstring for the search order)."""
    if folder is not None:
        candidates = [Path(folder)]
    elif os.environ.get(PROMPTS_ENV):
        candidates = [Path(os.environ[PROMPTS_ENV])]
    else:
        repo_root = Path(__file__).resolve().parents[1]
        cwd = Path.cwd().resolve()
        candidates = [repo_root.parent / SHARED_SUBPATH] + [p / SHARED_SUBPATH for p in (cwd, *cwd.parents)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"prompt data folder not found (looked in {', '.join(map(str, candidates))}); pass `folder=` or set "
        f"{PROMPTS_ENV} to a folder holding the prompt CSVs"
    )


def clean(prompts: Iterable[str | None]) -> list[str]:
    """Strip, drop empty and NaN cells, de-duplicate keeping the first occurrence."""
    seen: set[str] = set()
    out = []
    for prompt in prompts:
        text = (prompt or "").strip()
        if text and text.lower() != "nan" and text not in seen:
            seen.add(text)
            out.append(text)
    return out


@lru_cache(maxsize=32)
def _rows(path: Path) -> tuple[dict[str, str], ...]:
    with open(path, newline="", encoding="utf-8") as handle:
        return tuple(csv.DictReader(handle))


def read_rows(filename: str, folder: str | os.PathLike | None = None, columns: Sequence[str] = ()) -> list[dict]:
    """The rows of one CSV as dicts, after checking that `columns` exist (a clear error beats a KeyError)."""
    path = prompts_dir(folder) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the prompt data folder")
    rows = _rows(path)
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise KeyError(f"{path.name} has no column(s) {missing}; it has {list(rows[0])}")
    return list(rows)


def read_prompts(filename: str, folder: str | os.PathLike | None = None, column: str = "prompt") -> list[str]:
    """One column of one CSV, cleaned."""
    return clean(row[column] for row in read_rows(filename, folder, [column]))


def coco(folder: str | os.PathLike | None = None) -> list[str]:
    """COCO captions (coco_30k.csv): ordinary prompts."""
    return read_prompts("coco_30k.csv", folder)


def coco_val(folder: str | os.PathLike | None = None) -> list[str]:
    """COCO val captions (coco_30k_val.csv, a subset of coco_30k): the flag-rate set for ordinary prompts."""
    return read_prompts("coco_30k_val.csv", folder)


def diffusiondb(folder: str | os.PathLike | None = None) -> list[str]:
    """10,000 real user prompts from DiffusionDB (diffusiondb10K.csv)."""
    return read_prompts("diffusiondb10K.csv", folder)


def diffusiondb_val(folder: str | os.PathLike | None = None, seed: int = SEED) -> list[str]:
    """A fixed 2,000-prompt sample of DiffusionDB 10k, for a flag rate on benign user prompts (evaluation only).

    All 10k have prompt_nsfw below 0.001, and they are written like the DiffusionDB NSFW targets, so their flag
    rate separates detecting the concept from detecting the DiffusionDB prompt style.
    """
    pool = diffusiondb(folder)
    return sorted(pool, key=lambda p: _hash_key(seed, "diffusiondb_val", p))[:DIFFUSIONDB_VAL_SIZE]


def diffusiondb_nsfw(folder: str | os.PathLike | None = None) -> list[str]:
    """DiffusionDB prompts with prompt_nsfw >= 0.8 (diffusiondb_nsfw.csv): the nudity target pool."""
    return read_prompts("diffusiondb_nsfw.csv", folder)


def i2p(category: str | None = None, folder: str | os.PathLike | None = None) -> list[str]:
    """I2P prompts; with `category`, only rows whose comma-separated `categories` include it (e.g. "sexual")."""
    rows = read_rows("i2p.csv", folder, ["prompt", "categories"])
    if category is not None:
        rows = [r for r in rows if category in _i2p_categories(r)]
    return clean(r["prompt"] for r in rows)


def _i2p_categories(row: dict) -> set[str]:
    """The categories of one i2p.csv row (its `categories` cell is comma-separated)."""
    return {c.strip() for c in (row["categories"] or "").split(",")}


def unlearndiffatk_nudity(folder: str | os.PathLike | None = None) -> list[str]:
    """The 142 I2P prompts of the UnlearnDiffAtk nudity benchmark (SD 1.4 drew nudity for them)."""
    return read_prompts("unlearndiffatk_nudity.csv", folder)


def celebrity_100(folder: str | os.PathLike | None = None) -> list[str]:
    """MACE's 100 erased + 100 other celebrities x 5 templates (celebrity_100_concepts.csv)."""
    return read_prompts("celebrity_100_concepts.csv", folder)


def art_100(folder: str | os.PathLike | None = None) -> list[str]:
    """MACE's artists x 5 style templates (art_100_concepts.csv)."""
    return read_prompts("art_100_concepts.csv", folder)


def character(folder: str | os.PathLike | None = None) -> list[str]:
    """Prompts about cartoon characters (character.csv)."""
    return read_prompts("character.csv", folder)


# the person a caption is about, replaced by a name in `celebrity_contexts`
_PERSON = re.compile(r"\b(a|the|one) (man|woman|person|boy|girl|guy|lady|player|skier|surfer|skateboarder)\b",
                     re.IGNORECASE)


def _person_captions(folder: str | os.PathLike | None = None) -> list[str]:
    """COCO captions, COCO val left out, whose subject is one person (`_PERSON`): where a name can stand in."""
    held_out = set(coco_val(folder))
    return [c for c in coco(folder) if c not in held_out and _PERSON.search(c)]


def celebrity_contexts(folder: str | os.PathLike | None = None, per_name: int = 80, seed: int = SEED) -> list[str]:
    """Every celebrity of the celebrity concept (its 50 targets and 100 others) in `per_name` ordinary contexts.

    A COCO caption's first person ("a man", "the woman", "a skier", ...) is replaced by the name: "Aaron Paul
    standing under an umbrella looking up." The shared sets name each celebrity in five templates only, too few
    for an SAE to spend latents on telling one name from another; these prompts give every name, target or not,
    the same share of varied text. No label enters: targets and others are treated alike, the concept's
    template-held-out splits are untouched, and COCO val captions are never used as contexts.
    """
    names = sorted({*_named_prompts("celebrity_target.csv", folder), *_named_prompts("celebrity_remain.csv", folder)})
    contexts = _person_captions(folder)
    rng = random.Random(seed)
    return [_PERSON.sub(name, context, count=1) for name in names for context in rng.sample(contexts, per_name)]


def concept_pairs(name: str, folder: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(sensitive, normal) pairs of concept_pairs_{name}.csv, cleaned.

    Repeated rows are dropped, and so is any later pair that reuses a prompt of an earlier one, so splitting by
    pair can never put one prompt in two splits.
    """
    columns = ("sensitive prompt", "normal prompt")
    rows = read_rows(f"concept_pairs_{name}.csv", folder, columns)
    used: set[str] = set()
    pairs = []
    for row in rows:
        sensitive, normal = ((row[c] or "").strip() for c in columns)
        pair = (sensitive, normal)
        if clean(pair) != list(pair) or used & set(pair):
            continue
        used.update(pair)
        pairs.append(pair)
    return pairs


def evaluation_prompts(folder: str | os.PathLike | None = None, seed: int = SEED) -> list[str]:
    """Prompts kept for evaluation only: the attack sets (UnlearnDiffAtk nudity, I2P sexual), COCO val and
    DiffusionDB val."""
    return clean([*unlearndiffatk_nudity(folder), *i2p("sexual", folder), *coco_val(folder),
                  *diffusiondb_val(folder, seed)])


@dataclass(frozen=True)
class Split:
    """One split of a concept dataset: prompts showing the concept and prompts that must pass."""

    target: list[str]
    retain: list[str]


@dataclass(frozen=True)
class ConceptData:
    """A concept's fit / calibrate / test splits; `target_names` lists the named targets (celebrity only)."""

    name: str
    fit: Split
    calibrate: Split
    test: Split
    target_names: tuple[str, ...] = ()

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def without_test(self) -> ConceptData:
        """The view a method may be fitted on: fit and calibrate, the test split emptied."""
        return replace(self, test=Split([], []))

    def held_out(self) -> set[str]:
        """Every calibrate and test prompt (both sides): never to be used for training an SAE."""
        return {p for s in (self.calibrate, self.test) for p in (*s.target, *s.retain)}

    def sizes(self) -> dict[str, dict[str, int]]:
        return {s: {"target": len(self.split(s).target), "retain": len(self.split(s).retain)} for s in SPLITS}


def _hash_key(seed: int, salt: str, key: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{salt}\x1f{key}".encode()).hexdigest()


def _cut_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    n_fit, n_calibrate = round(n * fractions[0]), round(n * fractions[1])
    return n_fit, n_calibrate, n - n_fit - n_calibrate


def _split_units(
    units: Sequence[Unit], fractions: tuple[float, float, float], seed: int, salt: str, key: Callable[[Unit], str]
) -> tuple[list[Unit], list[Unit], list[Unit]]:
    """Order units by their seeded hash and cut them at the fractions: exact sizes, stable membership."""
    ordered = sorted(units, key=lambda u: _hash_key(seed, salt, key(u)))
    n_fit, n_calibrate, _ = _cut_sizes(len(ordered), fractions)
    return ordered[:n_fit], ordered[n_fit : n_fit + n_calibrate], ordered[n_fit + n_calibrate :]


def _paired_dataset(
    name: str, pairs: Sequence[tuple[str, str]], targets: Sequence[str], retains: Sequence[str],
    fractions: tuple[float, float, float], seed: int,
) -> ConceptData:
    """Split unpaired targets, unpaired retains and pairs separately (each at the fractions), then join them."""
    pair_parts = _split_units(pairs, fractions, seed, f"{name}/pairs", "\x1f".join)
    target_parts = _split_units(targets, fractions, seed, f"{name}/target", str)
    retain_parts = _split_units(retains, fractions, seed, f"{name}/retain", str)
    splits = [
        Split(target=t + [s for s, _ in p], retain=r + [n for _, n in p])
        for p, t, r in zip(pair_parts, target_parts, retain_parts)
    ]
    return ConceptData(name, *splits)


CONCEPT_NAMES = ("nudity", "celebrity", "vangogh")  # the concepts with written prompts (see CONCEPTS)
FITTING_FILE = Path(__file__).with_name("concept_data") / "fitting.toml"
REGISTER_SIZE = 600  # generated nudity prompts a side


@lru_cache(maxsize=1)
def _fitting() -> dict:
    with open(FITTING_FILE, "rb") as handle:
        return tomllib.load(handle)


def _register_units(name: str, folder: str | os.PathLike | None = None, seed: int = SEED
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`register_prompts` as (prompt, unit) pairs: the unit is what a split must keep whole (see `_with_registers`).

    Nudity: the nudity phrase of a target, the benign sense or clothed scene of a retain. Celebrity and Van Gogh:
    the template of a target (every target name is in every split, in templates the fit split lacks), the person of
    a retain (the people in calibrate and test are never seen in fit).
    """
    spec = _fitting()[name]
    if name == "nudity":
        rng = random.Random(seed)

        def draw(templates: list[str], fill: dict[str, list[str]], n: int) -> list[tuple[str, str]]:
            out: dict[str, str] = {}
            while len(out) < n:
                template = rng.choice(templates)
                values = {k: rng.choice(v) for k, v in fill.items()}
                prompt = next(iter(clean([template.format(**values)])), None)
                unit = next(values[k] for k in ("nude", "benign", "neutral") if f"{{{k}}}" in template)
                if prompt is not None:
                    out.setdefault(prompt, unit)
            return list(out.items())

        words = {k: spec[k] for k in ("subject", "place", "style", "neutral")}
        targets = draw(spec["target_templates"], {**words, "nude": spec["nude"]}, REGISTER_SIZE)
        retains = draw(spec["retain_templates"], {**words, "benign": spec["benign"]}, REGISTER_SIZE)
        target_prompts = {p for p, _ in targets}
        return targets, [(p, u) for p, u in retains if p not in target_prompts]
    if name == "celebrity":
        target_names = sorted(_named_prompts("celebrity_target.csv", folder))
        others = _celebrity_people(folder)
    else:
        target_names, others = spec["target_names"], spec["other_names"]
    targets = {t.format(n): t for n in target_names for t in spec["templates"]}
    retains = {t.format(n): n for n in others for t in spec["templates"]}
    keep = lambda units: [(p, units[p]) for p in clean(units)]  # noqa: E731
    return keep(targets), keep(retains)


def register_prompts(name: str, folder: str | os.PathLike | None = None, seed: int = SEED
                     ) -> tuple[list[str], list[str]]:
    """(targets, retains) written for a concept in many registers (`concept_data/fitting.toml`).

    Nudity: explicit subjects in plain, euphemistic, misspelt, foreign and prompt-engineering words, against the
    same subjects, places and styles clothed and the benign senses of naked / bare / nude / breast / anatomy
    (REGISTER_SIZE a side, drawn with `seed` from templates x word lists). Celebrity: every target name in
    ordinary sentences, against every other celebrity of the data and other people in the same sentences. Van
    Gogh: his name in several spellings in style templates, against other painters in the same templates. The
    retains share the targets' style, so a concept cannot be learnt from the style alone.
    """
    targets, retains = _register_units(name, folder, seed)
    return [p for p, _ in targets], [p for p, _ in retains]


def written_prompts(folder: str | os.PathLike | None = None, seed: int = SEED,
                    names: Iterable[str] = tuple(CONCEPT_NAMES)) -> set[str]:
    """Every `register_prompts` prompt. An SAE trains on them only through a register dataset's fit split
    (`training_pool`), never on their calibrate or test parts."""
    return {p for name in names if name in CONCEPT_NAMES for side in register_prompts(name, folder, seed) for p in side}


def _split_grouped(units: Sequence[tuple[str, str]], seed: int, salt: str, groups: Sequence[str] | None = None
                   ) -> tuple[list[str], list[str], list[str]]:
    """Split (prompt, unit) pairs 0.6 / 0.2 / 0.2 by unit, in file order: all prompts of a unit share a split.

    The units are cut as `groups` (default: the units present) are, so two sets of prompts about the same people,
    split with the same `groups` and salt, put each person in the same split.
    """
    groups = list(dict.fromkeys(u for _, u in units)) if groups is None else list(groups)
    parts = [set(part) for part in _split_units(groups, NUDITY_FRACTIONS, seed, salt, str)]
    return tuple([p for p, u in units if u in part] for part in parts)  # type: ignore[return-value]


def _celebrity_people(folder: str | os.PathLike | None = None) -> list[str]:
    """Every person on a celebrity retain side: the 100 others of celebrity_remain.csv and the register's others."""
    return list(dict.fromkeys([*sorted(_named_prompts("celebrity_remain.csv", folder)),
                               *_fitting()["celebrity"]["other_names"]]))


def _with_registers(data: ConceptData, folder: str | os.PathLike | None, seed: int) -> ConceptData:
    """Add `register_prompts` to every split, each side cut 0.6 / 0.2 / 0.2 by its unit (`_register_units`).

    Cutting by unit, not by prompt, makes the calibrate split a test of transfer: its nudity phrases, benign
    senses, target templates and other people are absent from the fit split (and so from SAE training), so a
    readout or SAE chosen on calibrate is chosen for how it holds on wordings and people it was not fitted on.
    """
    targets, retains = _register_units(data.name, folder, seed)
    t = _split_grouped(targets, seed, f"{data.name}/register-target")
    if data.name == "celebrity":  # the same person in the same split as in `celebrity`'s own retains
        r = _split_grouped(retains, seed, "celebrity/people", _celebrity_people(folder))
    else:
        r = _split_grouped(retains, seed, f"{data.name}/register-retain")
    splits = [Split(s.target + tt, s.retain + rr) for s, tt, rr in zip((data.fit, data.calibrate, data.test), t, r)]
    return replace(data, fit=splits[0], calibrate=splits[1], test=splits[2])


def nudity(folder: str | os.PathLike | None = None, seed: int = SEED) -> ConceptData:
    """Nudity: target = DiffusionDB NSFW prompts naming nudity (`NUDITY_WORDS`) + sensitive pair sides; retain =
    COCO 30k + benign user prompts
    (`user_prompts`: DiffusionDB and I2P, the targets' own sources) + normal pair sides.

    Each pair's two sides share a split. Evaluation-only prompts (see `evaluation_prompts`) are removed from both
    pools, and so is any prompt found in both pools. Fractions 0.6 / 0.2 / 0.2 (see the module docstring).
    """
    excluded = set(evaluation_prompts(folder, seed))
    pairs = [p for p in concept_pairs("nudity", folder) if not excluded & set(p)]
    excluded |= {prompt for pair in pairs for prompt in pair}
    scored = diffusiondb_nsfw(folder)
    targets = [p for p in scored if p not in excluded and NUDITY_WORDS.search(p)]
    excluded |= set(scored)
    retains = [p for p in [*coco(folder), *user_prompts(folder, seed)] if p not in excluded]
    return _paired_dataset("nudity", pairs, targets, retains, NUDITY_FRACTIONS, seed)


def user_prompts(folder: str | os.PathLike | None = None, seed: int = SEED) -> list[str]:
    """Benign prompts written the way the nudity targets are: DiffusionDB 10k prompts (all prompt_nsfw < 0.001)
    outside DiffusionDB val whose image was not scored NSFW (image_nsfw < USER_IMAGE_NSFW), and the I2P prompts of
    other categories whose SD images showed no nudity (nudity_percentage 0); none naming nudity (`NUDITY_WORDS`).

    Retains from the targets' own sources, so a readout cannot learn the DiffusionDB or I2P prompt style as the
    concept; COCO captions alone differ from the targets in style as much as in content.
    """
    excluded = {*evaluation_prompts(folder, seed), *diffusiondb_nsfw(folder)}
    rows = read_rows("diffusiondb10K.csv", folder, ["prompt", "image_nsfw"])
    diffusiondb_benign = [r["prompt"] for r in rows if (_number(r["image_nsfw"]) or 0.0) < USER_IMAGE_NSFW]
    rows = read_rows("i2p.csv", folder, ["prompt", "categories", "nudity_percentage"])
    i2p_benign = [r["prompt"] for r in rows if "sexual" not in _i2p_categories(r)
                  and _number(r["nudity_percentage"]) == 0.0]
    return [p for p in clean([*diffusiondb_benign, *i2p_benign]) if p not in excluded and not NUDITY_WORDS.search(p)]


def _number(cell: str | None) -> float | None:
    try:
        return float(cell) if cell not in (None, "") else None
    except ValueError:
        return None


def _with_ordinary(data: ConceptData, folder: str | os.PathLike | None, seed: int, names: Sequence[str],
                   n: int = ORDINARY_RETAIN) -> ConceptData:
    """Add `n` COCO captions and `n` benign user prompts (`user_prompts`) to the retain sides (split 0.6 / 0.2 /
    0.2): a guard must also pass ordinary prompts, in the captions' style and in the prompt writers'.

    Concepts whose own retain set holds only look-alikes (other celebrities, the same scenes without the style)
    would otherwise be calibrated without a single ordinary prompt, and could flag everyday captions or the
    artist-laden prompts of DiffusionDB. User prompts naming any of the concept's `names` are left out.
    """
    excluded = set(evaluation_prompts(folder, seed)) | {p for s in SPLITS for p in data.split(s).target}
    key = lambda p: _hash_key(seed, f"{data.name}/ordinary", p)
    captions = sorted((p for p in coco(folder) if p not in excluded), key=key)[:n]
    named = re.compile("|".join(re.escape(name) for name in names), re.IGNORECASE)
    users = sorted((p for p in user_prompts(folder, seed) if p not in excluded and not named.search(p)), key=key)[:n]
    fit, calibrate, test = (c + u for c, u in zip(
        _split_units(captions, NUDITY_FRACTIONS, seed, f"{data.name}/ordinary", str),
        _split_units(users, NUDITY_FRACTIONS, seed, f"{data.name}/ordinary-users", str)))
    return replace(data, fit=Split(data.fit.target, data.fit.retain + fit),
                   calibrate=Split(data.calibrate.target, data.calibrate.retain + calibrate),
                   test=Split(data.test.target, data.test.retain + test))


def vangogh(folder: str | os.PathLike | None = None, seed: int = SEED) -> ConceptData:
    """Van Gogh style: target / retain = sensitive / normal sides of the 50 pairs, 20 / 10 / 20 pairs per split,
    plus ordinary COCO captions on the retain side (`_with_ordinary`)."""
    data = _paired_dataset("vangogh", concept_pairs("vangogh", folder), [], [], VANGOGH_FRACTIONS, seed)
    return _with_ordinary(data, folder, seed, ["gogh"])


def _named_prompts(filename: str, folder: str | os.PathLike | None) -> dict[str, list[str]]:
    """Prompts grouped by their `class` column (file order), each prompt once."""
    grouped: dict[str, list[str]] = {}
    seen: set[str] = set()
    for row in read_rows(filename, folder, ["class", "prompt"]):
        name, prompt = (row["class"] or "").strip(), (row["prompt"] or "").strip()
        if clean([name, prompt]) == [name, prompt] and prompt not in seen:
            seen.add(prompt)
            grouped.setdefault(name, []).append(prompt)
    return grouped


def _split_by_template(
    grouped: dict[str, list[str]], seed: int, salt: str
) -> tuple[list[str], list[str], list[str]]:
    """Per name, rotate its templates by the name's hashed rank and cut them 2 / 1 / 2 (of 5).

    A template is the prompt with the name replaced by "{}". Rotation makes each template land in each split for
    about the same number of names, so the test prompts of a name use templates never seen with that name in
    fit or calibrate, while no template is special to one split.
    """
    def template(name: str, prompt: str) -> str:
        if name not in prompt:
            raise ValueError(f"prompt {prompt!r} does not contain its class {name!r}")
        return prompt.replace(name, "{}")

    canonical = list(dict.fromkeys(template(n, p) for n, prompts in grouped.items() for p in prompts))
    parts: tuple[list[str], list[str], list[str]] = ([], [], [])
    for rank, name in enumerate(sorted(grouped, key=lambda n: _hash_key(seed, salt, n))):
        prompts = sorted(grouped[name], key=lambda p: canonical.index(template(name, p)))
        if len(prompts) < 3:
            raise ValueError(f"{name!r} has {len(prompts)} templates; splitting by template needs at least 3")
        shift = rank % len(prompts)
        rotated = prompts[shift:] + prompts[:shift]
        n_fit, n_calibrate, _ = _cut_sizes(len(rotated), CELEBRITY_TEMPLATE_FRACTIONS)
        parts[0].extend(rotated[:n_fit])
        parts[1].extend(rotated[n_fit : n_fit + n_calibrate])
        parts[2].extend(rotated[n_fit + n_calibrate :])
    return parts


def celebrity(folder: str | os.PathLike | None = None, seed: int = SEED) -> ConceptData:
    """Celebrities: target = celebrity_target.csv (50 names x 5 templates), retain = celebrity_remain.csv (100).

    Ordinary captions and user prompts join the retain side (`_with_ordinary`). The targets are split by template
    per celebrity (`_split_by_template`): every target name is in every split, and a name's 2 test templates are
    never seen with it in fit or calibrate. The retains are split by person (`_celebrity_people`, 0.6 / 0.2 / 0.2,
    each person in the same split as in the register prompts): the people kept in calibrate and test are never seen
    in fit, so the threshold is set against people the readout was not fitted to pass. `target_names` holds the 50
    names.
    """
    targets = _named_prompts("celebrity_target.csv", folder)
    retains = _named_prompts("celebrity_remain.csv", folder)
    overlap = set(targets) & set(retains)
    if overlap:
        raise ValueError(f"celebrities both to erase and to keep: {sorted(overlap)}")
    target_parts = _split_by_template(targets, seed, "celebrity/target")
    retain_parts = _split_grouped([(p, n) for n, prompts in retains.items() for p in prompts], seed,
                                  "celebrity/people", _celebrity_people(folder))
    splits = [Split(target=t, retain=r) for t, r in zip(target_parts, retain_parts)]
    return _with_ordinary(ConceptData("celebrity", *splits, target_names=tuple(targets)), folder, seed, list(targets))


CONCEPTS: dict[str, Callable[..., ConceptData]] = {"nudity": nudity, "celebrity": celebrity, "vangogh": vangogh}


def nudity_registers(folder: str | os.PathLike | None = None, seed: int = SEED) -> ConceptData:
    """`nudity` plus its written prompts in many registers (`register_prompts`) in every split."""
    return _with_registers(nudity(folder, seed), folder, seed)


def celebrity_registers(folder: str | os.PathLike | None = None, seed: int = SEED) -> ConceptData:
    """`celebrity` plus every target and other people in written ordinary sentences (`register_prompts`)."""
    return _with_registers(celebrity(folder, seed), folder, seed)


CAPTION_CONTEXTS = 200  # COCO captions about one person, cut 0.6 / 0.2 / 0.2 like the register units
CAPTIONS_PER_PERSON = 10  # a target's are drawn from every split in those shares; another person's from theirs


def _captions_by_split(folder: str | os.PathLike | None, seed: int) -> list[list[str]]:
    """CAPTION_CONTEXTS COCO captions (not COCO val) whose subject is one person ("a man", "the skier"), with the
    person replaced by "{}", cut into fit / calibrate / test by hash."""
    escaped = (c.replace("{", "(").replace("}", ")") for c in _person_captions(folder))  # "{}" marks the person
    slots = sorted({_PERSON.sub("{}", c, count=1) for c in escaped})
    chosen = random.Random(seed).sample(slots, min(CAPTION_CONTEXTS, len(slots)))
    return [list(part) for part in _split_units(chosen, NUDITY_FRACTIONS, seed, "celebrity/captions", str)]


def celebrity_in_captions(folder: str | os.PathLike | None = None, seed: int = SEED) -> ConceptData:
    """`celebrity_registers` plus every person of it in ordinary COCO captions: "Tom Hanks riding a wave on top of a
    surfboard".

    Each target is put in CAPTIONS_PER_PERSON captions, drawn from each split in its share, and each other person in
    as many of their own split's, so a split's captions and other people are new to the splits before it. With
    hundreds of contexts on both sides a readout cannot lean on the sentence around a name, and the threshold is set
    on names in sentences the readout never saw, as a user's would be.
    """
    data = celebrity_registers(folder, seed)
    captions = _captions_by_split(folder, seed)
    shares = _cut_sizes(CAPTIONS_PER_PERSON, NUDITY_FRACTIONS)
    people = _split_units(_celebrity_people(folder), NUDITY_FRACTIONS, seed, "celebrity/people", str)

    def fill(name: str, pool: list[str], n: int) -> list[str]:
        rng = random.Random(_hash_key(seed, "celebrity/captions", name))
        return clean(c.format(name) for c in rng.sample(pool, min(n, len(pool))))

    splits = []
    for index, split in enumerate((data.fit, data.calibrate, data.test)):
        targets = [p for name in data.target_names for p in fill(name, captions[index], shares[index])]
        others = [p for name in people[index] for p in fill(name, captions[index], CAPTIONS_PER_PERSON)]
        splits.append(Split(split.target + targets, split.retain + others))
    return replace(data, fit=splits[0], calibrate=splits[1], test=splits[2])


def vangogh_registers(folder: str | os.PathLike | None = None, seed: int = SEED) -> ConceptData:
    """`vangogh` plus his name and other painters' in the same written style templates (`register_prompts`)."""
    return _with_registers(vangogh(folder, seed), folder, seed)


def concept(name: str, folder: str | os.PathLike | None = None, seed: int = SEED) -> ConceptData:
    """A concept dataset by name (one of `CONCEPTS`)."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; expected one of {sorted(CONCEPTS)}")
    return CONCEPTS[name](folder, seed)


HELDOUT_FILE = Path(__file__).with_name("concept_data") / "heldout.toml"
# Each round of held-out sets was written before any result on it was read; a round that has been read for many
# builds shapes what is tried next, so a later round is written to report the builds after it.
HELDOUT_ROUNDS = {1: HELDOUT_FILE, 2: HELDOUT_FILE.with_name("heldout2.toml"),
                  3: HELDOUT_FILE.with_name("heldout3.toml")}


@dataclass(frozen=True)
class HeldOut:
    """A concept's held-out evaluation prompts: `target` must be flagged, `nearmiss` must pass."""

    name: str
    target: list[str]
    nearmiss: list[str]


def _casings(text: str) -> list[str]:
    """A name as people type it: as written, lower case, upper case."""
    return list(dict.fromkeys([text, text.lower(), text.upper()]))


def heldout(name: str, folder: str | os.PathLike | None = None, round: int = 1) -> HeldOut:
    """The held-out evaluation set of a concept (`concept_data/heldout.toml`; `round=N`: heldoutN.toml), for
    reporting only.

    Written separately from every fitting source, with templates and words of its own, so a figure on it says how
    a concept holds on prompts it was never shaped by. Celebrity: every target name (from the data folder) and
    every non-target person of the file, in each of the file's ordinary sentences, in three casings.
    """
    if round not in HELDOUT_ROUNDS:
        raise ValueError(f"no held-out round {round}; the rounds are {sorted(HELDOUT_ROUNDS)}")
    path = HELDOUT_ROUNDS[round]
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    if name not in raw:
        raise ValueError(f"no held-out set for concept {name!r}; {path} has {sorted(raw)}")
    entry = raw[name]
    if name != "celebrity":
        return HeldOut(name, clean(entry["target"]), clean(entry["nearmiss"]))
    targets = sorted(_named_prompts("celebrity_target.csv", folder))

    def sentences(names: Sequence[str]) -> list[str]:
        return clean(t.format(cased) for n in names for cased in _casings(n) for t in entry["templates"])

    return HeldOut(name, sentences(targets), sentences(entry["nontarget_names"]))


def sae_training_prompts(
    folder: str | os.PathLike | None = None, seed: int = SEED, include_fit: bool = True,
    exclude_evaluation: bool = True,
) -> list[str]:
    """Prompts to train the SAE on: COCO, DiffusionDB 10k and NSFW, I2P, celebrity_100, art_100, character, with
    the three concepts' register datasets (what pipelines/minilm-prompts.toml names); see `training_pool`."""
    sources = [coco, diffusiondb, diffusiondb_nsfw, i2p, celebrity_100, art_100, character]
    pool = [p for source in sources for p in source(folder=folder)]
    datasets = [nudity_registers(folder, seed), celebrity_registers(folder, seed), vangogh_registers(folder, seed)]
    return training_pool(pool, datasets, folder, seed, include_fit, exclude_evaluation)


def training_pool(pool: Sequence[str], datasets: Sequence[ConceptData], folder: str | os.PathLike | None = None,
                  seed: int = SEED, include_fit: bool = True, exclude_evaluation: bool = True) -> list[str]:
    """An SAE's training prompts: `pool` plus, with `include_fit`, each concept's fit split, minus every calibrate
    and test prompt of every concept (a threshold or a test figure never rests on a prompt the SAE was trained on)
    and, with `exclude_evaluation`, the attack sets, COCO val and DiffusionDB val (`evaluation_prompts`).

    Written register prompts train it only through a fit split named in `datasets`, never through a pool.
    """
    fit = [p for d in datasets for p in (*d.fit.target, *d.fit.retain)] if include_fit else []
    removed = set().union(*(d.held_out() for d in datasets))
    removed |= written_prompts(folder, seed, [d.name for d in datasets]) - set(fit)
    if exclude_evaluation:
        removed |= set(evaluation_prompts(folder, seed))
    return [p for p in clean([*pool, *fit]) if p not in removed]


def main() -> None:
    """Print the concept datasets' split sizes and the sizes of the other sets (`python -m sae_guard.prompts`)."""
    print(f"{'concept':10} {'split':10} {'target':>6} {'retain':>6}")
    for name in CONCEPTS:
        for split, size in concept(name).sizes().items():
            print(f"{name:10} {split:10} {size['target']:6d} {size['retain']:6d}")
    others = {
        "sae_training_prompts": sae_training_prompts(), "coco_val": coco_val(),
        "diffusiondb_val": diffusiondb_val(), "unlearndiffatk_nudity": unlearndiffatk_nudity(),
        "i2p(sexual)": i2p("sexual"),
    }
    for label, prompts in others.items():
        print(f"{label:22} {len(prompts):6d}")


if __name__ == "__main__":
    main()
