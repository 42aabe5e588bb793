"""The per-case slice-embedding cache of the fast execution path (see :class:`models.inference.engine.BoxPromptEngine`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import torch

if TYPE_CHECKING:
    from models.inference.engine import EngineStats


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class SliceCache:
    """Per-case slice embeddings, bounded by ``budget_bytes``: an entry that does not fit is not stored.

    Entries are owned copies (never views of a batch output or of a tensor someone else holds),
    and :meth:`get` hands out a fresh copy, so a caller that modifies the embedding it received
    cannot change what a later box sees (the aliasing bug of medficientsam's C++ cache).
    """

    def __init__(self, budget_bytes: int, stats: EngineStats):
        self.budget_bytes = int(budget_bytes)
        self.stats = stats
        self._entries: Dict[int, torch.Tensor] = {}
        self.bytes = 0

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: int) -> Optional[torch.Tensor]:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.cache_misses += 1
            return None
        self.stats.cache_hits += 1
        return entry.clone()

    def pop(self, key: int) -> torch.Tensor:
        """Remove and return the entry itself (the caller owns it from now on); a cache hit."""
        entry = self._entries.pop(key)
        self.bytes -= _nbytes(entry)
        self.stats.cache_hits += 1
        return entry

    def put(self, key: int, embedding: torch.Tensor) -> bool:
        """Store an owned copy of ``embedding`` if it fits in the budget as is (nothing is evicted);
        False if nothing was stored."""
        size = _nbytes(embedding)
        if key in self._entries:
            self.bytes -= _nbytes(self._entries.pop(key))
        if self.bytes + size > self.budget_bytes:
            return False
        self._entries[key] = embedding.clone(memory_format=torch.contiguous_format)
        self.bytes += size
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.bytes)
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
