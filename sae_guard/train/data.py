"""Activation streams for training: deterministic, shuffled, and able to resume at any step.

Batch `i` of a stream depends only on the data, the seed and `i`, so an interrupted run that
restarts from a checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor


class TensorStream:
    """Batches drawn from an in-memory (N, d_in) tensor, a fresh permutation every epoch."""

    def __init__(self, data: Tensor, batch_size: int, seed: int) -> None:
        if data.ndim != 2:
            raise ValueError(f"activation data must be an (N, d_in) tensor, got shape {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise ValueError("activation data is empty: no rows to train on")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.data.shape[0], generator=gen), epoch
        return self._perm

    def batch(self, step: int) -> Tensor:
        n = self.data.shape[0]
        start = step * self.batch_size
        parts, pos = [], start
        while pos < start + self.batch_size:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, start + self.batch_size - pos)
            parts.append(self._permutation(epoch)[offset : offset + take])
            pos += take
        return self.data[torch.cat(parts)]

    def iterate(self, start_step: int) -> Iterator[Tensor]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


class BufferedStream:
    """Batches from an iterable of activation chunks, mixed through a shuffle buffer.

    The buffer holds up to `buffer_size` rows; when full, it is shuffled and its first half served,
    so neighbouring tokens of one document rarely share a batch. The iterable is re-iterated from
    the start on every epoch and on resume (skipped batches are drawn but not trained on).
    """

    def __init__(self, source: Iterable[Tensor], batch_size: int, seed: int, buffer_size: int | None = None) -> None:
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.buffer_size = max(buffer_size or 16 * batch_size, 2 * batch_size)

    def _rows(self) -> Iterator[Tensor]:
        epoch = 0
        while True:
            produced = False
            for chunk in self.source:
                chunk = torch.as_tensor(chunk)
                if chunk.ndim == 1:
                    chunk = chunk[None]
                if chunk.ndim != 2:
                    raise ValueError(f"activation chunks must be (n, d_in), got shape {tuple(chunk.shape)}")
                if chunk.shape[0]:
                    produced = True
                    yield chunk
            if not produced:
                raise ValueError(f"activation data is empty: the iterable yielded no rows on pass {epoch + 1}")
            if iter(self.source) is self.source:  # a one-shot iterator cannot be replayed
                return
            epoch += 1

    def iterate(self, start_step: int) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        buffer: list[Tensor] = []
        held = 0
        step = 0
        rows = self._rows()
        exhausted = False
        while True:
            while held < self.buffer_size and not exhausted:
                try:
                    chunk = next(rows)
                except StopIteration:
                    exhausted = True
                    break
                buffer.append(chunk)
                held += chunk.shape[0]
            if held < self.batch_size:
                if exhausted:
                    raise ValueError(
                        f"the activation iterator ran out after {step} batches; pass a re-iterable "
                        "(a list, a tensor or a harvest) to train for more tokens than it holds"
                    )
            pool = torch.cat(buffer)
            pool = pool[torch.randperm(pool.shape[0], generator=gen)]
            serve = max(self.batch_size, (pool.shape[0] // 2) // self.batch_size * self.batch_size)
            serve = min(serve, pool.shape[0] // self.batch_size * self.batch_size)
            for i in range(0, serve, self.batch_size):
                if step >= start_step:
                    yield pool[i : i + self.batch_size]
                step += 1
            buffer, held = [pool[serve:]], pool.shape[0] - serve


def make_stream(data, batch_size: int, seed: int):
    """A resumable stream for a tensor, or for an iterable of activation chunks (e.g. a harvest)."""
    if isinstance(data, Tensor):
        return TensorStream(data, batch_size, seed)
    if hasattr(data, "iterate") and hasattr(data, "batch_size"):  # already a resumable stream
        if data.batch_size != batch_size:
            if not hasattr(data, "with_batch_size"):
                raise ValueError(f"stream yields batches of {data.batch_size}, but batch_size={batch_size}")
            data = data.with_batch_size(batch_size)
        return data
    if hasattr(data, "__iter__"):
        return BufferedStream(data, batch_size, seed, getattr(data, "buffer_size", None))
    raise TypeError(f"cannot train on {type(data).__name__}: pass an (N, d_in) tensor or an iterable of batches")
