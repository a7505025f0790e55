"""Concepts of a recommender's SAE: which item and user attributes predict each latent's firing, and genre fans.

RecSAE reads latents by the attributes of what fires them. Here each latent is paired, on FIT users, with the
attribute whose presence best predicts its firing (F1), and that pairing is then scored on HELD-OUT users, so a
"confident" concept is one that generalises rather than one chosen to fit. Users are split by id parity
(`split_users`): even ids fit, odd ids are held out, everywhere in the recommender family.
"""

from __future__ import annotations

import torch

from ..recsys_data import AGE_BANDS, DECADES, GENRES

RECENT = 20  # a user's taste is read from their last RECENT items (SASRec weighs recent items most)
FAN_QUANTILE, NON_FAN_QUANTILE = 0.8, 0.5  # fans: top 20% by genre share among fit users; non-fans: bottom half


def split_users(n_users: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) user indices: even and odd ids."""
    return list(range(0, n_users, 2)), list(range(1, n_users, 2))


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


def genre_shares(data, histories) -> torch.Tensor:
    """(users, genres): the share of each genre among a user's last RECENT items."""
    return torch.stack([data.item_genres[torch.tensor(h[-RECENT:])].float().mean(0) for h in histories])


def fan_labels(data, histories, genre: str, fit_users) -> torch.Tensor:
    """Per user: 1 a fan of the genre, 0 not, -1 in between (neither side), by quantiles over the fit users."""
    share = genre_shares(data, histories)[:, GENRES.index(genre)]
    fit = share[list(fit_users)]
    high, low = torch.quantile(fit, FAN_QUANTILE), torch.quantile(fit, NON_FAN_QUANTILE)
    labels = torch.full_like(share, -1, dtype=torch.long)
    labels[share <= low] = 0
    labels[(share >= high) & (share > low)] = 1
    return labels


def genre_fans(data, genre: str, users) -> tuple[list[list[int]], list[list[int]]]:
    """A genre concept's data: (target, retain) histories of the given (fit) users, fans against non-fans."""
    if genre not in GENRES:
        raise ValueError(f"{genre!r} is not a MovieLens genre; genres: {', '.join(GENRES)}")
    histories = [s[:-1] for s in data.sequences]
    labels = fan_labels(data, histories, genre, users)
    return ([histories[u] for u in users if labels[u] == 1], [histories[u] for u in users if labels[u] == 0])
