import numpy as np

from softthought.thought_cache import ThoughtCache


def test_lru_evicts_least_recently_used():
    cache = ThoughtCache(capacity=2)
    a, b, c = (np.full((2, 3), i, dtype=np.float32) for i in range(3))
    cache.put("v1", "a", a)
    cache.put("v1", "b", b)
    assert cache.get("v1", "a") is a  # a is now the most recent
    cache.put("v1", "c", c)
    assert cache.get("v1", "b") is None and cache.get("v1", "a") is a and cache.get("v1", "c") is c
    assert len(cache) == 2


def test_versions_never_share_entries():
    cache = ThoughtCache()
    cache.put("v1", "same summary", np.zeros(1))
    assert cache.get("v2", "same summary") is None


def test_zero_capacity_stores_nothing():
    cache = ThoughtCache(capacity=0)
    cache.put("v1", "x", np.zeros(1))
    assert cache.get("v1", "x") is None
