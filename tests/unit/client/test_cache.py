"""The client's model cache: bounded to ``cache_models``, least recently used out first."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flctl.client import ClientCache


def _blob(cache: ClientCache, content: bytes, age_s: float) -> str:
    digest = hashlib.sha256(content).hexdigest()
    path = cache.path(digest)
    path.write_bytes(content)
    stamp = path.stat().st_mtime - age_s
    os.utime(path, (stamp, stamp))
    return digest


def test_make_room_keeps_the_most_recently_used_models(tmp_path: Path) -> None:
    cache = ClientCache(tmp_path, keep=3)
    oldest = _blob(cache, b"a", 400)
    old = _blob(cache, b"b", 300)
    recent = _blob(cache, b"c", 200)
    newest = _blob(cache, b"d", 100)
    coming = hashlib.sha256(b"e").hexdigest()

    evicted = cache.make_room(coming)

    # room for the coming model: the two most recently used stay, with it that makes three
    assert sorted(evicted) == sorted([oldest, old])
    assert not cache.has(oldest) and not cache.has(old)
    assert cache.has(recent) and cache.has(newest)


def test_a_used_model_moves_to_the_front(tmp_path: Path) -> None:
    cache = ClientCache(tmp_path, keep=2)
    first = _blob(cache, b"first", 300)
    second = _blob(cache, b"second", 200)
    cache.used(first)  # read again (a cache hit): now the most recent

    assert cache.make_room(hashlib.sha256(b"third").hexdigest()) == [second]
    assert cache.has(first)


def test_keep_one_leaves_only_the_coming_model(tmp_path: Path) -> None:
    cache = ClientCache(tmp_path, keep=1)
    digests = [_blob(cache, bytes([i]), 100 - i) for i in range(3)]
    assert sorted(cache.make_room(hashlib.sha256(b"next").hexdigest())) == sorted(digests)
    assert list((tmp_path / "blobs").iterdir()) == []


def test_partial_downloads_of_other_models_go_and_its_own_stays(tmp_path: Path) -> None:
    cache = ClientCache(tmp_path)
    coming = hashlib.sha256(b"coming").hexdigest()
    stale = hashlib.sha256(b"stale").hexdigest()
    cache.partial(coming).write_bytes(b"half of it")
    cache.partial(stale).write_bytes(b"a model the coordinator moved past")

    cache.make_room(coming)

    assert cache.partial(coming).read_bytes() == b"half of it"
    assert not cache.partial(stale).exists()


def test_training_outputs_of_dead_processes_go_and_live_ones_stay(tmp_path: Path) -> None:
    cache = ClientCache(tmp_path)
    # a process that has ended: its pid is free (it was reaped by run)
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = tmp_path / "partial" / f"update-{int(ended.stdout)}-1"
    ours = tmp_path / "partial" / f"update-{os.getpid()}-2"
    odd = tmp_path / "partial" / "update-notapid"
    for path in (dead, ours, odd):
        path.write_bytes(b"x")

    cache.make_room(hashlib.sha256(b"next").hexdigest())

    assert not dead.exists() and not odd.exists()
    assert ours.exists()


def test_the_coming_model_is_never_evicted(tmp_path: Path) -> None:
    cache = ClientCache(tmp_path, keep=1)
    have = _blob(cache, b"have", 100)
    assert cache.make_room(have) == []
    assert cache.has(have)


def test_a_cache_keeps_at_least_one_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        ClientCache(tmp_path, keep=0)
