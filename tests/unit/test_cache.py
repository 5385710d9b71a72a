"""The one bounded cache (serve_app/cache.py): bounds, recency, counters, one build per key."""

import threading
import time

import pytest

from serve_app.cache import BoundedCache


def test_entries_and_bytes_bound_it_oldest_first_and_the_counters_add_up():
    cache: BoundedCache[str, bytes] = BoundedCache(max_entries=4, max_bytes=10, size_of=len)
    for key in "abc":
        cache.put(key, b"xxx")
    assert cache.get("a") == b"xxx" and cache.get("zz") is None  # a is now the newest
    cache.put("d", b"xxx")  # 12 bytes > 10: b, the least recently used, goes
    assert list(cache) == ["c", "a", "d"] and cache.stats.bytes == 9 and cache.stats.evictions == 1
    assert cache.pop("c") == b"xxx" and cache.stats.as_dict() | {"build_seconds": 0} == {
        "hits": 1, "misses": 1, "evictions": 1, "entries": 2, "bytes": 6, "build_seconds": 0}
    cache.put("huge", b"x" * 50)  # larger than the bound alone: kept, everything older goes
    assert list(cache) == ["huge"] and cache.stats.entries == 1
    cache.clear()
    assert len(cache) == 0 and cache.stats.bytes == 0


def test_peek_and_touch_count_nothing():
    cache: BoundedCache[str, int] = BoundedCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.peek("a") == 1 and "b" in cache
    cache.touch("a")
    cache.put("c", 3)
    assert list(cache) == ["a", "c"] and cache.stats.hits == cache.stats.misses == 0


def test_a_value_many_threads_ask_for_at_once_is_built_once():
    cache: BoundedCache[str, int] = BoundedCache(max_entries=8)
    calls, start = [], threading.Barrier(8)

    def build() -> int:
        calls.append(1)
        time.sleep(0.05)  # long enough for every thread to be waiting on it
        return 42

    def ask() -> None:
        start.wait()
        assert cache.get_or_build("k", build) == 42

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and cache.stats.misses == 1 and cache.stats.hits == 7
    assert cache.stats.build_seconds >= 0.05


def test_a_failed_build_caches_nothing():
    cache: BoundedCache[str, int] = BoundedCache(max_entries=2)

    def fail() -> int:
        raise ValueError("no")

    for _ in range(2):
        with pytest.raises(ValueError):
            cache.get_or_build("k", fail)
    assert "k" not in cache and cache.stats.misses == 2
