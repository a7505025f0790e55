"""Concept dictionaries for a recommender's SAE: which item and user attributes predict each latent's firing.

RecSAE reads latents by the attributes of what fires them. Here each latent is paired, on FIT users, with the
attribute whose presence best predicts its firing (F1), and that pairing is then scored on HELD-OUT users, so a
"confident" concept is one that generalises rather than one chosen to fit.
"""

from __future__ import annotations

import torch

from ..recsys_data import AGE_BANDS, DECADES, GENRES

def attributes(data, users, last_items):
    """(n, A) bool: the last item's genres and decade, the user's age band, gender, occupation."""
    occupations = sorted(set(data.user_occupation))
    names = list(GENRES) + list(DECADES) + [b[2] for b in AGE_BANDS] + ["female", "male"] + occupations
    rows = []
    for u, item in zip(users, last_items):
        row = data.item_genres[item].tolist() + [data.item_decade[item].item() == i for i in range(len(DECADES))]
        row += [lo <= data.user_age[u] < hi for lo, hi, _ in AGE_BANDS]
        row += [data.user_gender[u] == "F", data.user_gender[u] == "M"]
        row += [data.user_occupation[u] == o for o in occupations]
        rows.append(row)
    return torch.tensor(rows), names


def concept_dictionary(fires_fit, attrs_fit, fires_held, attrs_held):
    """Per latent: the attribute whose presence best predicts its firing on the fit users (F1), and that pairing's
    precision, recall and F1 on held-out users. Confidence = held-out F1; lift = held-out precision / base rate."""
    def f1_table(fires, attrs):
        f, a = fires.float(), attrs.float()
        both = f.T @ a  # (latents, attrs)
        precision = both / f.sum(0)[:, None].clamp_min(1)
        recall = both / a.sum(0)[None].clamp_min(1)
        return precision, recall, 2 * precision * recall / (precision + recall).clamp_min(1e-9)
    _, _, f1 = f1_table(fires_fit, attrs_fit)
    best = f1.argmax(1)
    p, r, f = f1_table(fires_held, attrs_held)
    idx = torch.arange(len(best))
    base = attrs_held.float().mean(0)[best]
    return best, p[idx, best], r[idx, best], f[idx, best], p[idx, best] / base.clamp_min(1e-9)
