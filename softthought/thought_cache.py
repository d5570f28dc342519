"""Bounded LRU of soft thoughts keyed by (auxiliary checkpoint version, sha256 of the summary).

Keying on the version means thoughts of an old checkpoint can never be served for a new one.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def summary_key(version: str, summary: str) -> tuple[str, str]:
    return version, hashlib.sha256(summary.encode()).hexdigest()


class ThoughtCache:
    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: str, summary: str) -> np.ndarray | None:
        key = summary_key(version, summary)
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, version: str, summary: str, thoughts: np.ndarray) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[summary_key(version, summary)] = thoughts
            self._items.move_to_end(summary_key(version, summary))
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
