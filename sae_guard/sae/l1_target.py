"""An L1 coefficient that steers itself to a target L0, for the penalty-sparsified SAEs (ReLU, Gated).

How many latents an L1 penalty leaves firing depends on the data: the same coefficient gives one L0 on one
dictionary and twice it on another, so a user who wants L0 k would have to search for it per dataset. With
`target_l0` set, the coefficient is instead a running multiplier: after each optimizer step, log λ moves by
`rate * log(L0 / target_l0)` of that batch (dual ascent on log λ), so too many latents firing raises the penalty and
too few lowers it, and the run settles where the batch L0 meets the target. It starts at the config's `l1_coef`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_RANGE = (math.log(1e-4), math.log(1e3))  # λ stays within [1e-4, 1e3]


class L1Target(nn.Module):
    """The steered coefficient. A buffer, so a checkpoint resumes with the coefficient it stopped at."""

    def __init__(self, start: float, target_l0: float, rate: float) -> None:
        super().__init__()
        if not start > 0:
            raise ValueError(f"a steered L1 coefficient must start > 0, got l1_coef={start}")
        self.target_l0, self.rate = float(target_l0), float(rate)
        self.register_buffer("log_coef", torch.tensor(math.log(start)))
        self.value = start  # a float mirror of exp(log_coef), read by loss_terms without a device sync

    @torch.no_grad()
    def update(self, l0: Tensor) -> None:
        """One step of dual ascent from the batch's mean L0 (already reduced over processes)."""
        ratio = (l0.float().clamp_min(1e-3) / self.target_l0).log()
        self.log_coef.add_(self.rate * ratio).clamp_(*LOG_RANGE)
        self.value = float(self.log_coef.exp())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.value = float(self.log_coef.exp())


def check_target(cfg) -> None:
    """Validate the `target_l0` / `target_rate` fields a config shares with the other penalty SAEs."""
    if cfg.target_l0 is not None and not 0 < cfg.target_l0 < cfg.d_sae:
        raise ValueError(f"target_l0 must be in (0, d_sae={cfg.d_sae}), got {cfg.target_l0}")
    if not cfg.target_rate > 0:
        raise ValueError(f"target_rate must be > 0, got {cfg.target_rate}")
    if cfg.target_l0 is not None and not cfg.l1_coef > 0:
        raise ValueError("with target_l0 set, l1_coef is the steered coefficient's start and must be > 0")


def make(cfg) -> L1Target | None:
    """The steered coefficient of a config that names a target L0, else None (a fixed `l1_coef`)."""
    return L1Target(cfg.l1_coef, cfg.target_l0, cfg.target_rate) if cfg.target_l0 is not None else None


def coefficient(sae) -> float:
    """The L1 weight of this step: the steered one with a target, else the config's."""
    return sae.l1_target.value if sae.l1_target is not None else sae.cfg.l1_coef


@torch.no_grad()
def after_step(sae, fired: Tensor) -> None:
    """Steer toward the target from a (B, d_sae) mask of the latents that fired this step."""
    if sae.l1_target is not None:
        l0 = sae.all_reduce(fired.sum(-1).float().mean()) / _world()
        sae.l1_target.update(l0)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
