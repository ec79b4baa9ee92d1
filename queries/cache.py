"""Results of named queries, cached per (query, parameters, page, format, watermark).

The watermark in the key is the consistency LSN the query's read models stood at when the result
was computed: the result shows at least every transaction up to it. A request is answered from
the cache only under the key of the position the read models stand at *now*, which is at least
the `min_lsn` the client asked for (the service waits or answers 202 before looking), so a hit
never returns data older than the watermark asked for. When the read models move on, the key
changes and the old entries are never read again; they age out of the LRU.

No position known (transaction metadata off, nothing recorded yet): nothing is cached, since no
key would ever change. Entries also expire after `ttl_s`, which bounds how long a read model that
is stuck behind an incomplete transaction keeps serving the same answer.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class CacheKey:
    query: str
    params: tuple[tuple[str, str | None], ...]
    page: tuple[int, int]  # limit, offset
    fmt: str
    watermark_lsn: int


class ResultCache(Generic[V]):
    def __init__(self, max_entries: int, ttl_s: float = 60.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def get(self, key: CacheKey, count_miss: bool = True) -> V | None:
        """The entry under `key`, if there is a live one; `count_miss=False`: a look that will be
        repeated by the caller's slower path when it misses (that one counts the miss)."""
        if not self.enabled or key.watermark_lsn <= 0:
            return None
        with self._lock:
            found = self._entries.get(key)
            if found is not None and time.monotonic() - found[0] <= self.ttl_s:
                self._entries.move_to_end(key)
                self.hits += 1
                return found[1]
            if found is not None:
                del self._entries[key]
            if count_miss:
                self.misses += 1
            return None

    def put(self, key: CacheKey, value: V) -> None:
        if not self.enabled or key.watermark_lsn <= 0:
            return
        with self._lock:
            self._entries[key] = (time.monotonic(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
