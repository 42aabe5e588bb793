"""Sampling the index: per-item weights for modality-balanced sampling (:func:`modality_weights`) and
:class:`ResumableSampler`, an infinite, rank-sharded, seeded stream of ``(item_index, item_seed)``
tuples with an exact resume point (advanced by the training loop).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from training.data.index import Item


def modality_weights(items: Sequence[Item]) -> np.ndarray:
    """Per-item weights (float64, summing to 1) giving every modality the same total weight."""
    if not items:
        return np.zeros(0, dtype=np.float64)
    names = [it.modality for it in items]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    n_modalities = len(counts)
    return np.array([1.0 / (n_modalities * counts[name]) for name in names], dtype=np.float64)


class ResumableSampler(Sampler):
    """Infinite, seeded, rank-sharded stream of ``(item_index, item_seed)`` tuples.

    Epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(num_items)`` or, with
    ``weights``, ``epoch_size`` (default ``num_items``) draws with replacement by those weights.
    The epoch's order is padded by wrapping around to a multiple of ``world_size`` and rank ``r``
    takes positions ``r, r + world_size, ...``: every rank yields :attr:`epoch_length` tuples per
    epoch and the ranks never overlap within an epoch (except on the wrapped padding).
    ``item_seed`` is a deterministic 63-bit int of ``(seed, epoch, position in the padded epoch
    order)``; seed the item's augmentation RNG with it.

    Resuming: the *committed* state is ``{"epoch", "position"}``, where ``position`` counts the
    tuples of this rank consumed in that epoch.  Iterating does not change it: a DataLoader
    prefetches (the sampler runs ahead of the training loop), so the loop calls
    :meth:`advance` with the number of tuples it actually consumed (``batch_size * grad_accum``
    per optimiser step, per rank) and checkpoints :meth:`state_dict`.  ``iter()`` always starts
    at the committed state, so after :meth:`load_state_dict` (or with the same ``advance`` calls)
    a new iterator yields exactly the continuation of the uninterrupted stream.
    :meth:`state_at` gives the state after a total number of consumed tuples.  There is no
    ``__len__``: the stream is infinite (``len(DataLoader)`` is undefined; train by steps).
    """

    def __init__(
        self,
        num_items: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Optional[Sequence[float]] = None,
        epoch_size: Optional[int] = None,
    ):
        if num_items <= 0:
            raise ValueError("num_items must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        super().__init__()
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (self.num_items,) or (w < 0).any() or not w.sum() > 0:
                raise ValueError("weights must be num_items non-negative numbers with a positive sum")
            self.weights = w / w.sum()
        elif epoch_size is not None:
            raise ValueError("epoch_size is only used with weights (a permutation has num_items positions)")
        self.epoch_size = int(epoch_size) if epoch_size is not None else self.num_items
        if self.epoch_size <= 0:
            raise ValueError("epoch_size must be positive")
        self.epoch_length = -(-self.epoch_size // self.world_size)  # per rank, per epoch
        self._epoch = 0
        self._position = 0

    # -- order ----------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The full (all ranks, unpadded) item order of ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        if self.weights is None:
            return rng.permutation(self.num_items)
        return rng.choice(self.num_items, size=self.epoch_size, replace=True, p=self.weights)

    def rank_positions(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, positions in the padded epoch order) of this rank for ``epoch``."""
        order = self.epoch_order(epoch)
        positions = np.arange(self.rank, self.epoch_length * self.world_size, self.world_size)
        return order[positions % order.size], positions

    def item_seed(self, epoch: int, position: int) -> int:
        """Deterministic augmentation seed of the padded position ``position`` of ``epoch``."""
        state = np.random.SeedSequence([self.seed, int(epoch), int(position)]).generate_state(2, np.uint32)
        return int((int(state[0]) << 31) ^ int(state[1]))

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield from the committed state onwards, forever; the committed state is not changed."""
        epoch, start = self._epoch, self._position
        while True:
            indices, positions = self.rank_positions(epoch)
            for k in range(start, self.epoch_length):
                yield int(indices[k]), self.item_seed(epoch, int(positions[k]))
            epoch, start = epoch + 1, 0

    # -- state ----------------------------------------------------------------------------
    def advance(self, consumed: int) -> None:
        """Commit ``consumed`` more tuples of this rank as used by the training loop."""
        if consumed < 0:
            raise ValueError("consumed must be >= 0")
        total = self._epoch * self.epoch_length + self._position + int(consumed)
        self._epoch, self._position = divmod(total, self.epoch_length)

    def state_dict(self) -> dict:
        """The committed state ``{"epoch", "position"}`` (see :meth:`advance`)."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Commit ``state`` (from :meth:`state_dict` or :meth:`state_at`); the next ``iter()`` continues there."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.epoch_length:
            raise ValueError(f"invalid sampler state {state} (epoch length {self.epoch_length})")
        self._epoch, self._position = divmod(epoch * self.epoch_length + position, self.epoch_length)

    def state_at(self, consumed: int) -> dict:
        """The state after ``consumed`` tuples of this rank in total, counted from epoch 0 position 0."""
        if consumed < 0:
            raise ValueError("consumed must be >= 0")
        return {"epoch": consumed // self.epoch_length, "position": consumed % self.epoch_length}
