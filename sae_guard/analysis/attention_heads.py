"""Which attention heads an attention-output SAE's features live in (Kissane et al. 2024, arXiv 2406.17759).

An SAE trained on the concatenated head outputs before the output projection (TransformerLens'
hook_z: (tokens, n_heads * d_head)) has decoder rows that split into one slice per head. A feature's
share of its squared decoder norm in each head says which heads write it; most features sit almost
wholly in one head, which makes per-head feature lists meaningful.

    shares = head_shares(sae.W_dec, n_heads)            # (d_sae, n_heads), rows sum to 1
    report = head_report(sae.W_dec, n_heads, codes, tokens)

"Unrelated feature families" are found without labels: a head's top features are linked when they
fire on the same tokens (Jaccard of their firing sets >= `link`), and families are the connected
groups; a head with two or more families of its own carries several unrelated things.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor


def head_shares(W_dec: Tensor, n_heads: int) -> Tensor:
    """(d_sae, n_heads): each feature's share of its squared decoder norm in each head's slice."""
    d_sae, d_in = W_dec.shape
    if n_heads < 1 or d_in % n_heads:
        raise ValueError(f"decoder width {d_in} does not split into {n_heads} heads; pass the model's head count "
                         "for an SAE trained on hook_z (n_heads * d_head)")
    energy = W_dec.detach().float().reshape(d_sae, n_heads, d_in // n_heads).pow(2).sum(-1)
    return energy / energy.sum(-1, keepdim=True).clamp_min(1e-12)


def families(fires: Tensor, link: float = 0.2) -> list[list[int]]:
    """Connected groups of columns of `fires` (tokens, n) bool whose firing sets overlap (Jaccard >= link)."""
    f = fires.float()
    inter = f.T @ f
    counts = f.sum(0)
    jaccard = inter / (counts[:, None] + counts[None, :] - inter).clamp_min(1)
    adjacent = (jaccard >= link) & (counts[:, None] > 0) & (counts[None, :] > 0)
    seen, groups = set(), []
    for start in range(f.shape[1]):
        if start in seen or counts[start] == 0:
            continue
        stack, group = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            group.append(i)
            for j in adjacent[i].nonzero().flatten().tolist():
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        groups.append(sorted(group))
    return groups


@dataclass
class HeadFeatures:
    head: int
    features: list[int]                     # the head's own features (share >= min_share), by share
    families: list[list[int]] = field(default_factory=list)
    examples: dict[int, list[str]] = field(default_factory=dict)  # feature -> top-activating contexts


def head_report(W_dec: Tensor, n_heads: int, codes: Tensor | None = None, contexts: Sequence[str] | None = None,
                min_share: float = 0.8, top: int = 8, n_examples: int = 3, link: float = 0.2) -> list[HeadFeatures]:
    """Per head: its top features (most alive first when codes are given), their families and example contexts.

    codes: optional dense (tokens, d_sae) activations; contexts: one string per token (e.g. the text up to
    and including it) to show as top-activating examples.
    """
    shares = head_shares(W_dec, n_heads)
    if codes is not None and codes.shape[1] != shares.shape[0]:
        raise ValueError(f"codes have {codes.shape[1]} latents but the decoder has {shares.shape[0]}")
    if contexts is not None and (codes is None or len(contexts) != codes.shape[0]):
        raise ValueError("contexts need codes, one context per row of codes")
    owner, best = shares.argmax(-1), shares.amax(-1)
    report = []
    for head in range(n_heads):
        own = ((owner == head) & (best >= min_share)).nonzero().flatten()
        rank = codes[:, own].gt(0).float().mean(0) if codes is not None else best[own]
        own = own[rank.argsort(descending=True)][:top].tolist()
        entry = HeadFeatures(head, own)
        if codes is not None and own:
            entry.families = [[own[i] for i in g] for g in families(codes[:, own] > 0, link)]
            if contexts is not None:
                for feat in own:
                    values = codes[:, feat]
                    idx = values.topk(min(n_examples, len(values))).indices
                    entry.examples[feat] = [contexts[i] for i in idx.tolist() if values[i] > 0]
        report.append(entry)
    return report


def share_multi_family(report: Sequence[HeadFeatures]) -> float:
    """The share of heads (with any feature of their own) that carry two or more families."""
    live = [h for h in report if h.features]
    return sum(len(h.families) >= 2 for h in live) / len(live) if live else 0.0
