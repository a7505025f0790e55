"""A readout of each token's code, the input's verdict its strongest token's: the `token_probe` strategy.

`probe` weighs each latent's largest activation over the whole input, so latents from different tokens add up and a
readout can lean on which words come together, the prompt's style, as much as on the concept. A name is one
token's business: "Adam Driver" is in the code of "driver" after "adam", whatever the sentence around it. Here a
token's score is `sum_j w_j z_tj` over its own code and an input's score is its largest token score, so the verdict
rests on one token, the one `--explain` names (`scoring.token_readout_scores`).

Fitting is multiple-instance logistic regression (a target input must have some token above the line, a retain
input none): both classes weighted equally, each input's token scores pooled by log-sum-exp while fitting (a
smooth max) and by the max when scoring. The loss is minimised by full-batch Adam with a soft threshold of
`lr * penalty` after each step, so a latent keeps a weight only while its gradient keeps one sign steadily enough
for Adam's normalised step to outrun the shrink. At a penalty of 1 or more no weight holds (one only flickers), so
the fit first runs at 2, where the bias and Adam's moments settle alone, then walks a fixed path of penalties below 1
with warm starts; the readout is the last point of the path with at most `n_features` latents (if more enter at
once, the strongest `n_features` of them).

Why not an exact L1 path in gradient units, as `probe` solves: in a scratch trial on the MiniLM celebrity data
(proximal gradient with backtracking, float64), its readouts of up to two thousand latents ranked the calibrate
targets no better than chance against unseen people; this one's figures are in model_cards/minilm-prompts.md
("Token readout").
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sae.codes import SparseCodes
from .scoring import input_maxima

SETTLE_PENALTY = 2.0  # in units of a full step: clears every weight while the bias settles
PENALTIES = tuple(2 ** (-i / 4) for i in range(1, 25))  # 0.84, 0.71, 0.59, ... 0.016
STEPS_PER_PENALTY = 300
LEARNING_RATE = 0.05

# encode(inputs)'s result: the codes of every real token (N, k), each token's input index (N,), the input count
TokenCodes = tuple[SparseCodes, Tensor, int]


def token_probe(target: TokenCodes, retain: TokenCodes, n_features: int = 256) -> tuple[Tensor, Tensor]:
    """The latents and signed weights of the multiple-instance readout with at most `n_features` latents."""
    if not target[2] or not retain[2]:
        raise ValueError("token_probe needs both target and retain inputs to fit a readout")
    d_sae = int(max(int(target[0].indices.max()), int(retain[0].indices.max()))) + 1
    sides = [(codes.values.detach().float().clamp_min(0).cpu(), codes.indices.cpu(), index.cpu(), n, label)
             for (codes, index, n), label in ((target, 1.0), (retain, 0.0))]
    weights = torch.zeros(d_sae, requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.Adam([weights, bias], lr=LEARNING_RATE)

    def descend(penalty: float, steps: int) -> Tensor:
        for _ in range(steps):
            loss = sum(0.5 * _side_loss(weights, bias, *side) for side in sides)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                weights.copy_(weights.sign() * (weights.abs() - LEARNING_RATE * penalty).clamp_min(0))
        return weights.detach()

    descend(SETTLE_PENALTY, 2 * STEPS_PER_PENALTY)
    best = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
    for penalty in PENALTIES:
        fitted = descend(penalty, STEPS_PER_PENALTY)
        nonzero = fitted.nonzero().squeeze(-1)
        if nonzero.numel() > n_features:
            if not best[0].numel():  # the first latents enter together: keep the strongest of them
                nonzero = nonzero[fitted[nonzero].abs().topk(n_features).indices.sort().values]
                best = (nonzero, fitted[nonzero].clone())
            break
        if nonzero.numel():
            best = (nonzero, fitted[nonzero].clone())
    return best


def _side_loss(weights: Tensor, bias: Tensor, values: Tensor, indices: Tensor, index: Tensor, n: int,
               label: float) -> Tensor:
    """Mean logistic loss of one class, each input's token scores pooled by log-sum-exp."""
    per_token = (weights[indices] * values).sum(-1) + bias
    top = input_maxima(per_token.detach(), index, n)  # log-sum-exp, shifted by each input's max for stability
    pooled = top + torch.zeros(n).scatter_add(0, index, torch.exp(per_token - top[index])).clamp_min(1e-30).log()
    return torch.nn.functional.softplus(-pooled if label else pooled).mean()
