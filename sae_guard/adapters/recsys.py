"""Recommenders: a compact SASRec (Kang & McAuley, 2018) and the adapter that guards it.

Inputs are item-id histories (lists of ints, 1..n_items). They are LEFT-padded to the model's window, so the last
column is always the last real item: the user representation there, `final_norm`'s output before the product with
the item embeddings, is what scores at guard time. Histories longer than the window keep their most recent
`max_len` items (as SASRec itself does); empty histories and unknown item ids are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import Adapter, ModelCall, device_of


class SASRec(nn.Module):
    """Self-attentive sequential recommender: causal transformer over item embeddings, scores = state @ items."""

    def __init__(self, n_items: int, max_len: int = 50, d: int = 64, n_layers: int = 2, n_heads: int = 1,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.config = dict(n_items=n_items, max_len=max_len, d=d, n_layers=n_layers, n_heads=n_heads, dropout=dropout)
        self.n_items, self.max_len = n_items, max_len
        self.items = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.positions = nn.Embedding(max_len, d)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, n_heads, d, dropout, batch_first=True,
                                                               norm_first=True) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d)  # its output is the user representation (the guard's hookpoint)
        nn.init.normal_(self.items.weight, std=d ** -0.5)  # unit-norm items: logits start near N(0, 1)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, ids: Tensor) -> Tensor:
        """(batch, T) left-padded ids -> (batch, T, d) user states at every position."""
        T = ids.shape[1]
        x = self.items(ids) * math.sqrt(self.items.embedding_dim)
        x = self.dropout(x + self.positions(torch.arange(self.max_len - T, self.max_len, device=ids.device)))
        pad = ids == 0
        x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        # a position reads itself and the real items before it, never padding (so padding changes nothing); a
        # padding position reads only itself (no empty softmax row) and is zeroed after every layer
        eye = torch.eye(T, dtype=torch.bool, device=ids.device)
        blocked = (torch.triu(torch.ones(T, T, dtype=torch.bool, device=ids.device), 1) | pad[:, None, :]) & ~eye
        blocked = blocked.repeat_interleave(self.config["n_heads"], 0)
        for layer in self.layers:
            x = layer(x, src_mask=blocked)
            x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        return self.final_norm(x)

    def scores(self, ids: Tensor) -> Tensor:
        """(batch, n_items + 1) scores of every item as the next one (column 0, padding, is -inf)."""
        s = self(ids)[:, -1] @ self.items.weight.T
        s[:, 0] = -math.inf
        return s


def pad_histories(histories: Sequence[Sequence[int]], n_items: int, max_len: int) -> Tensor:
    """Left-pad to the longest (at most `max_len`); refuse what the model cannot read, naming the history."""
    if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence) or not len(histories):
        raise TypeError("a recommender guard takes a non-empty list of item-id histories (lists of ints)")
    rows = []
    for i, h in enumerate(histories):
        h = h.tolist() if isinstance(h, Tensor) else list(h)
        if not h:
            raise ValueError(f"history {i} is empty: a SASRec has nothing to read; drop it or give it an item")
        bad = [x for x in h if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= n_items]
        if bad:
            raise ValueError(f"history {i} holds unknown item ids {bad[:5]}: ids are ints in 1..{n_items} "
                             "(0 is padding); map new items to known ids or drop them")
        rows.append(h[-max_len:])  # longer histories: the most recent max_len items, as in training
    T = max(map(len, rows))
    return torch.tensor([[0] * (T - len(r)) + r for r in rows], dtype=torch.long)


class RecAdapter(Adapter):
    """Item histories -> SASRec calls; the last position (the user representation that is scored) speaks."""

    name = "recsys"

    @classmethod
    def matches(cls, model: Any) -> bool:
        return isinstance(model, SASRec)

    def default_hookpoint(self, model: nn.Module) -> str:
        return "final_norm"

    def prepare(self, model: nn.Module, inputs: Sequence[Any]) -> ModelCall:
        ids = pad_histories(inputs, model.n_items, model.max_len).to(device_of(model))
        return ModelCall.one_row_each(ids.shape[0], ids)

    def positions(self, model: nn.Module):
        def last_position(args: tuple, kwargs: dict) -> Tensor:
            ids = args[0] if args else kwargs["ids"]
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, -1] = ids[:, -1] != 0
            return mask
        return last_position

    def probe_inputs(self) -> list[Any]:
        return [[1]]


def training_windows(sequences: Sequence[Sequence[int]], max_len: int) -> tuple[Tensor, Tensor]:
    """(inputs, next items) windows of max_len + 1 items, newest first, each left-padded."""
    xs, ys = [], []
    for seq in sequences:
        for end in range(len(seq), 1, -max_len):
            chunk = list(seq[max(0, end - max_len - 1):end])
            chunk = [0] * (max_len + 1 - len(chunk)) + chunk
            xs.append(chunk[:-1]); ys.append(chunk[1:])
    return torch.tensor(xs), torch.tensor(ys)


def fit_sasrec(model: SASRec, sequences: Sequence[Sequence[int]], epochs: int = 30, batch_size: int = 128,
               lr: float = 1e-3, seed: int = 0, log=print) -> SASRec:
    """Next-item training with a full softmax over the catalogue (cheap at 1.7k items, faster than sampled BCE)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = training_windows(sequences, model.max_len)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    model.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(x), generator=g), 0.0
        for i in range(0, len(x), batch_size):
            b = order[i:i + batch_size]
            logits = model(x[b]) @ model.items.weight.T
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y[b].flatten(), ignore_index=0)
            opt.zero_grad(); loss.backward(); opt.step()
            total += loss.item() * len(b)
        if log and (epoch % 5 == 4 or epoch == epochs - 1):
            log(f"epoch {epoch + 1}/{epochs} loss {total / len(x):.3f}")
    return model.eval()


@torch.no_grad()
def rank_metrics(scores: Tensor, seen: Sequence[Sequence[int]], targets: Tensor, k: int = 10) -> dict[str, Tensor]:
    """Full ranking over the catalogue, items already in the history excluded: per-user hit@k, ndcg@k, top-k."""
    scores = scores.clone()
    for row, items in enumerate(seen):
        keep = scores[row, targets[row]].clone()
        scores[row, list(items)] = -math.inf
        scores[row, targets[row]] = keep
    rank = (scores > scores.gather(1, targets[:, None])).sum(1)
    hit = (rank < k).float()
    return {"hit": hit, "ndcg": hit / torch.log2(rank.float() + 2), "top": scores.topk(k, dim=1).indices}


def save_sasrec(model: SASRec, folder: str | Path) -> Path:
    """config.json + model.safetensors (stock formats, a few hundred KB for MovieLens-100k)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def load_sasrec(folder: str | Path) -> SASRec:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no SASRec (config.json and model.safetensors); build one with "
                                "`python benchmarks/recsys.py --out DIR`")
    model = SASRec(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
