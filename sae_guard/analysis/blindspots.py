"""Conceptual blindspots (Bohacek, Fel, Agrawala, Lubana 2025, arXiv 2506.19708): which dictionary concepts a
generative model draws less (suppressed) or more (exaggerated) often than they occur in the real images whose
captions it was given.

The statistic, as the paper's released code computes it (`energy_difference/compute_features.py`):
- a concept's energy on one image is its SAE code summed over every token of the image (class token included);
- its energy on a set is the mean over the set's images;
- delta(k) = E_gen(k) / (E_gen(k) + E_real(k)) in [0, 1]; the paper calls delta < 0.1 a suppressed blindspot and
  delta > 0.9 an exaggerated one. The relative difference (E_gen - E_real) / (E_gen + E_real) = 2 delta - 1 is
  what its cross-model plots read.
Concepts that fire on almost no image of either set (`min_fire`) have no meaningful delta and are left out of the
rankings. Per image pair (a real image and the one drawn from its caption) the same comparison over the whole
energy vector gives the datapoint-level score the paper reads memorisation from: near 0, the drawing reproduces the
real image's concepts; near 1, it shares none of them.

`compare_paired` is the same comparison restricted, concept by concept, to the caption pairs whose real image the
concept fires on: of what the real images of those captions show, how much their drawings keep. It reads a pair
blindspot (one colour-shape combination never drawn) that the pooled statistic misses when the concept's energy
over the whole set is dominated by drawings of other captions (not in the paper; its data has no pairs).

Concepts are named in words from the known ShapesWorld labels of the real images they fire on most (`label_concepts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..shapes.world import COLOURS, SHAPES

SUPPRESSED, EXAGGERATED = 0.1, 0.9  # the paper's delta thresholds
MIN_FIRE = 0.01  # a concept is ranked when it fires on at least this share of one set's images
TOP_IMAGES, MIN_SHARE = 20, 0.75  # a concept is named after what at least 75% of its 20 top real images share


def image_energy(codes: Tensor) -> Tensor:
    """(n_images, n_tokens, d_sae) codes -> (n_images, d_sae): each concept's code summed over an image's tokens."""
    if codes.ndim != 3:
        raise ValueError(f"codes must be (n_images, n_tokens, d_sae), got shape {tuple(codes.shape)}")
    if not torch.isfinite(codes).all() or (codes < 0).any():
        raise ValueError("codes must be finite and non-negative (the SAE's encoded activations)")
    return codes.sum(dim=1)


@dataclass
class EnergyComparison:
    """Per concept: mean energy over real and generated images, delta, and which concepts are ranked."""

    real: Tensor  # (d_sae,)
    generated: Tensor  # (d_sae,)
    delta: Tensor  # (d_sae,) E_gen / (E_gen + E_real); NaN where both are 0
    fire_real: Tensor  # (d_sae,) share of real images it fires on
    fire_generated: Tensor  # (d_sae,)
    ranked: Tensor  # (d_sae,) bool: fires on at least `min_fire` of one set's images

    @property
    def difference(self) -> Tensor:
        return self.generated - self.real

    @property
    def relative(self) -> Tensor:
        return 2 * self.delta - 1

    def suppressed(self) -> list[int]:
        """Ranked concepts, most suppressed first: delta ascending, then the larger energy lost first."""
        return self._order(self.delta, self.difference)

    def exaggerated(self) -> list[int]:
        """Ranked concepts, most exaggerated first: delta descending, then the larger energy gained first."""
        return self._order(-self.delta, -self.difference)

    def _order(self, primary: Tensor, secondary: Tensor) -> list[int]:
        index = self.ranked.nonzero().flatten().tolist()
        return sorted(index, key=lambda k: (primary[k].item(), secondary[k].item(), k))

    def rank_of(self, concepts: Sequence[int]) -> list[int]:
        """1-based places of `concepts` in the suppressed ranking (unranked concepts left out)."""
        place = {k: i + 1 for i, k in enumerate(self.suppressed())}
        return sorted(place[k] for k in concepts if k in place)


def compare(real: Tensor, generated: Tensor, min_fire: float = MIN_FIRE) -> EnergyComparison:
    """Compare per-image energies (n_real, d_sae) and (n_generated, d_sae) concept by concept."""
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"energies must be (n_images, d_sae) with the same d_sae, got {tuple(real.shape)} and "
                         f"{tuple(generated.shape)}")
    if not len(real) or not len(generated):
        raise ValueError("both image sets must hold at least one image")
    if not 0.0 <= min_fire <= 1.0:
        raise ValueError(f"min_fire must lie in [0, 1], got {min_fire}")
    e_real, e_gen = real.double().mean(0), generated.double().mean(0)
    total = e_real + e_gen
    delta = torch.where(total > 0, e_gen / total.clamp_min(1e-300), torch.full_like(total, float("nan")))
    fire_real, fire_gen = (real > 0).double().mean(0), (generated > 0).double().mean(0)
    ranked = (torch.maximum(fire_real, fire_gen) >= min_fire) & (total > 0)
    return EnergyComparison(e_real, e_gen, delta, fire_real, fire_gen, ranked)


def compare_paired(real: Tensor, generated: Tensor, min_fire: float = MIN_FIRE) -> EnergyComparison:
    """`compare` over paired energies ((n, d_sae) each, row i of both from caption i), each concept's means taken
    over the pairs whose real image it fires on only; a concept is ranked when it fires on at least `min_fire` of
    the real images. `fire_generated` is then the share of those pairs whose drawing it fires on too."""
    if real.shape != generated.shape or real.ndim != 2:
        raise ValueError(f"paired energies must both be (n, d_sae), got {tuple(real.shape)} and "
                         f"{tuple(generated.shape)}")
    if not 0.0 <= min_fire <= 1.0:
        raise ValueError(f"min_fire must lie in [0, 1], got {min_fire}")
    fires = (real > 0).double()
    count = fires.sum(0)
    e_real = (real.double() * fires).sum(0) / count.clamp_min(1)
    e_gen = (generated.double() * fires).sum(0) / count.clamp_min(1)
    total = e_real + e_gen
    delta = torch.where(total > 0, e_gen / total.clamp_min(1e-300), torch.full_like(total, float("nan")))
    kept = ((generated > 0).double() * fires).sum(0) / count.clamp_min(1)
    ranked = (count / len(real) >= min_fire) & (count > 0)
    return EnergyComparison(e_real, e_gen, delta, fires.mean(0), kept, ranked)


def pair_difference(real: Tensor, generated: Tensor) -> Tensor:
    """(n,) per caption: |e_real - e_gen|_1 / (|e_real|_1 + |e_gen|_1) in [0, 1] between a real image's energy
    vector and that of the image drawn from its caption (0: the same concepts in the same amounts)."""
    if real.shape != generated.shape or real.ndim != 2:
        raise ValueError(f"paired energies must both be (n, d_sae), got {tuple(real.shape)} and "
                         f"{tuple(generated.shape)}")
    total = real.abs().sum(1) + generated.abs().sum(1)
    return (real - generated).abs().sum(1) / total.clamp_min(1e-12)


def nearest_real(real: Tensor, generated: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """For each generated image, the real image whose energy vector is nearest by the `pair_difference` measure:
    (distance (n_gen,), index (n_gen,)). A distance near 0 is a near-copy of a real image."""
    distances, indices = [], []
    real_mass = real.abs().sum(1)
    for start in range(0, len(generated), chunk):
        g = generated[start:start + chunk]
        d = torch.cdist(g.double(), real.double(), p=1) / (g.abs().sum(1)[:, None] + real_mass[None]).clamp_min(1e-12)
        best = d.min(1)
        distances.append(best.values)
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)


# ------------------------------------------------------------------------------------------------ naming concepts
def attributes(labels: Sequence[Mapping]) -> tuple[list[str], Tensor]:
    """Attribute names and an (n_images, n_attributes) bool matrix of which ShapesWorld scene shows which: every
    colour, shape, colour-shape pair ("red circle") and background ("black background")."""
    names = list(COLOURS) + list(SHAPES) + [f"{c} {s}" for c in COLOURS for s in SHAPES]
    backgrounds = sorted({scene["background"] for scene in labels})
    names += [f"{b} background" for b in backgrounds]
    column = {name: i for i, name in enumerate(names)}
    matrix = torch.zeros(len(labels), len(names), dtype=torch.bool)
    for row, scene in enumerate(labels):
        matrix[row, column[f"{scene['background']} background"]] = True
        for item in scene["shapes"]:
            for name in (item["colour"], item["shape"], f"{item['colour']} {item['shape']}"):
                matrix[row, column[name]] = True
    return names, matrix


@dataclass(frozen=True)
class ConceptLabel:
    name: str  # the attribute, or "mixed" / "silent"
    share: float  # share of the concept's top images showing it
    lift: float  # share over the attribute's base rate in the labelling images
    top: tuple[int, ...]  # the top images (rows of the labelling set), highest energy first


def label_concepts(energy: Tensor, names: Sequence[str], present: Tensor, top: int = TOP_IMAGES,
                   min_share: float = MIN_SHARE) -> list[ConceptLabel]:
    """Name each concept after the attribute its `top` highest-energy images share: among the attributes at least
    `min_share` of them show, the one of largest lift over its base rate (so "red circle" beats "red" when they
    are all red circles, and "red" wins when their shapes vary). Fewer top images when fewer fire; a concept firing
    on none is "silent", one whose top images share nothing is "mixed" (its best attribute's share recorded)."""
    if energy.shape[0] != present.shape[0] or present.shape[1] != len(names):
        raise ValueError(f"energy has {energy.shape[0]} images and present {tuple(present.shape)}; names "
                         f"{len(names)}: they must agree")
    base = present.double().mean(0).clamp_min(1e-12)
    values, order = energy.double().topk(min(top, energy.shape[0]), dim=0)
    result = []
    for k in range(energy.shape[1]):
        rows = order[:, k][values[:, k] > 0]
        if not len(rows):
            result.append(ConceptLabel("silent", 0.0, 0.0, ()))
            continue
        share = present[rows].double().mean(0)
        lift = share / base
        eligible = share >= min_share
        if eligible.any():
            best = int(torch.where(eligible, lift, torch.full_like(lift, -1.0)).argmax())
            name = names[best]
        else:
            best = int(share.argmax())
            name = "mixed"
        result.append(ConceptLabel(name, share[best].item(), lift[best].item(), tuple(rows.tolist())))
    return result


def mentions(label: str, attribute: str) -> bool:
    """Whether a concept label names `attribute`: "red" is named by "red" and by "red circle"."""
    if label in ("mixed", "silent") or label.endswith(" background"):
        return False
    return label == attribute or attribute in label.split(" ")


def attribute_delta(comparison: EnergyComparison, labels: Sequence[ConceptLabel],
                    attributes_: Sequence[str]) -> dict[str, float | None]:
    """Per attribute: delta pooled over the ranked concepts whose label names it (sum of their generated energy
    over the sum of both); None when no ranked concept names it."""
    result: dict[str, float | None] = {}
    for attribute in attributes_:
        members = [k for k, label in enumerate(labels) if mentions(label.name, attribute) and comparison.ranked[k]]
        if not members:
            result[attribute] = None
            continue
        gen, real = comparison.generated[members].sum().item(), comparison.real[members].sum().item()
        result[attribute] = gen / (gen + real) if gen + real > 0 else None
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman's rank correlation (ties averaged) with its two-sided p-value, from scipy."""
    from scipy.stats import spearmanr

    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"Spearman needs two sequences of the same length, at least 3; got {len(x)} and {len(y)}")
    result = spearmanr(list(x), list(y))
    return {"rho": float(result.statistic), "p": float(result.pvalue), "n": len(x)}
