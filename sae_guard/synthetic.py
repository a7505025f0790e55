"""Planted dictionaries: activations made of known sparse features, for measuring SAE recovery.

Each sample is a sparse non-negative mixture of unit atoms plus Gaussian noise. Atoms fire
independently with Zipf-like probabilities (a few common, many rare) and log-normal magnitudes, as
features in real activations seem to. The hierarchical version makes "child" atoms fire only with
their "parent", the pattern that invites feature absorption.

A `PlantedDataset` is a resumable stream: batch i is a pure function of (seed, i).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor


@dataclass
class PlantedDataset:
    atoms: Tensor  # (n_atoms, d) unit rows
    probs: Tensor  # (n_atoms,) firing probability of each atom (children: given their parent)
    parents: Tensor | None = None  # (n_atoms,) index of the parent atom, -1 for roots
    magnitude_sigma: float = 0.5
    noise: float = 0.02
    seed: int = 0
    batch_size: int = 4096

    @property
    def d(self) -> int:
        return self.atoms.shape[1]

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`n` samples and their true (n, n_atoms) coefficients."""
        active = torch.rand(n, self.n_atoms, generator=generator) < self.probs
        if self.parents is not None:
            roots = self.parents < 0
            child = ~roots
            active[:, child] &= active[:, self.parents[child]]
        mags = torch.exp(self.magnitude_sigma * torch.randn(n, self.n_atoms, generator=generator))
        coeffs = active * mags
        x = coeffs @ self.atoms + self.noise * torch.randn(n, self.d, generator=generator)
        return x, coeffs

    def batch(self, step: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.sample(self.batch_size, gen)[0]

    def iterate(self, start_step: int) -> Iterator[Tensor]:
        """The resumable-stream protocol `train` accepts."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def with_batch_size(self, batch_size: int) -> "PlantedDataset":
        return PlantedDataset(self.atoms, self.probs, self.parents, self.magnitude_sigma, self.noise, self.seed,
                              batch_size)

    def expected_l0(self) -> float:
        if self.parents is None:
            return self.probs.sum().item()
        p = self.probs.clone()
        child = self.parents >= 0
        p[child] = p[child] * self.probs[self.parents[child]]
        return p.sum().item()


def _unit_atoms(n: int, d: int, gen: torch.Generator) -> Tensor:
    atoms = torch.randn(n, d, generator=gen)
    return atoms / atoms.norm(dim=-1, keepdim=True)


def _zipf(n: int, exponent: float, total: float, gen: torch.Generator) -> Tensor:
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    p = ranks.pow(-exponent)
    p = (p * total / p.sum()).float()
    return p[torch.randperm(n, generator=gen)]


def planted(d: int = 128, n_atoms: int = 512, active: float = 6.0, zipf_exponent: float = 0.6,
            magnitude_sigma: float = 0.5, noise: float = 0.02, seed: int = 0, batch_size: int = 4096) -> PlantedDataset:
    """Independent atoms: about `active` fire per sample, with Zipf(`zipf_exponent`) frequencies."""
    gen = torch.Generator().manual_seed(seed)
    atoms = _unit_atoms(n_atoms, d, gen)
    probs = _zipf(n_atoms, zipf_exponent, active, gen).clamp(max=0.9)
    return PlantedDataset(atoms, probs, None, magnitude_sigma, noise, seed, batch_size)


def planted_hierarchical(d: int = 128, n_parents: int = 128, children_per_parent: int = 3, active: float = 6.0,
                         child_prob: float = 0.4, zipf_exponent: float = 0.6, magnitude_sigma: float = 0.5,
                         noise: float = 0.02, seed: int = 0, batch_size: int = 4096) -> PlantedDataset:
    """Parents fire like `planted`; each child fires with `child_prob` only when its parent fires.

    An SAE can then fold a parent into its children's latents ("absorption"); recovering parents and
    children separately is the harder test.
    """
    gen = torch.Generator().manual_seed(seed)
    n_children = n_parents * children_per_parent
    atoms = _unit_atoms(n_parents + n_children, d, gen)
    parent_total = active / (1 + children_per_parent * child_prob)
    parent_probs = _zipf(n_parents, zipf_exponent, parent_total, gen).clamp(max=0.9)
    probs = torch.cat([parent_probs, torch.full((n_children,), child_prob)])
    parents = torch.cat([torch.full((n_parents,), -1), torch.arange(n_parents).repeat_interleave(children_per_parent)])
    return PlantedDataset(atoms, probs, parents, magnitude_sigma, noise, seed, batch_size)


@torch.no_grad()
def recovery(W_dec: Tensor, atoms: Tensor, threshold: float = 0.9) -> float:
    """Share of true atoms whose best-matching decoder row has cosine >= threshold."""
    dec = W_dec.float() / W_dec.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return ((atoms.float() @ dec.T).amax(-1) >= threshold).float().mean().item()
