"""Per-trajectory prefix KV caches for the student, kept within a memory budget.

Each trajectory's accepted prefix grows by one chunk per step. Keeping the student's keys and
values for it means each step computes only the candidates' tokens instead of the whole
sequence again. Entries are evicted least-recently-used when the budget is exceeded; an evicted
trajectory is simply recomputed on its next step.

Written here rather than taken from transformers: its caches serve generation (one growing
sequence); we need many sequences, prefix matching by token ids, and eviction by bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

KV = list[tuple[Any, Any]]  # per layer (keys, values), each (batch, kv_heads, tokens, head_dim)


@dataclass
class PrefixEntry:
    ids: list[int]  # the tokens whose keys/values are held
    kv: KV  # batch 1

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


class PrefixCache:
    """LRU map from a trajectory key to its PrefixEntry, bounded by bytes. The scoring thread
    reads and writes it; the event loop drops entries of ended trajectories: hence the lock."""

    def __init__(self, budget_bytes: int):
        self._lock = threading.Lock()
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Any, PrefixEntry] = OrderedDict()
        self.bytes = 0
        self.peak_bytes = 0
        self.evictions = 0

    def get(self, key: Any) -> PrefixEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Any, entry: PrefixEntry) -> None:
        size = entry.nbytes
        with self._lock:
            self._drop(key)
            if size > self.budget_bytes:
                return  # larger than the whole budget: never kept
            while self._entries and self.bytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.bytes += size
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def drop(self, key: Any) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: Any) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.nbytes

    def __len__(self) -> int:
        return len(self._entries)


def slice_kv(kv: KV, row: int, length: int) -> KV:
    """Row `row`'s first `length` positions, as batch 1 (views, no copy)."""
    return [(k[row : row + 1, :, :length], v[row : row + 1, :, :length]) for k, v in kv]


def to_cache(kv: KV | None):
    from transformers import DynamicCache

    return DynamicCache() if not kv else DynamicCache(ddp_cache_data=kv)


def from_cache(cache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.x); take whichever the model has."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def supports_prefix_cache(config) -> bool:
    """Sliding-window and recurrent layers drop old positions: their caches cannot be cut back."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)
