import threading

import pytest

from llmrec_ray.config import StoreConfig
from llmrec_ray.store import ConflictError, Store, StoreError


def test_bytes_list_move_delete(store_cfg):
    store = Store.from_config(store_cfg)
    store.write_bytes("a/x.bin", b"1")
    store.write_bytes("a/b/y.bin", b"22")
    assert store.list("a") == ["a/b/y.bin", "a/x.bin"]
    assert store.read_bytes("a/b/y.bin") == b"22"
    store.move("a/x.bin", "q/x.bin")
    assert not store.exists("a/x.bin") and store.read_bytes("q/x.bin") == b"1"
    store.delete_prefix("a")
    assert store.list("a") == []
    with pytest.raises(StoreError, match="does not exist"):
        store.read_bytes("a/x.bin")


def test_compare_and_swap(store_cfg):
    store = Store.from_config(store_cfg)
    assert store.read_json("p.json").etag is None
    etag = store.put_json("p.json", {"v": 1}, None)
    with pytest.raises(ConflictError):
        store.put_json("p.json", {"v": 9}, None)  # If-None-Match: it exists now
    etag2 = store.put_json("p.json", {"v": 2}, etag)
    with pytest.raises(ConflictError, match="another writer"):
        store.put_json("p.json", {"v": 3}, etag)  # stale etag
    got = store.read_json("p.json")
    assert got.value == {"v": 2} and got.etag == etag2


def test_racing_writers_exactly_one_wins(store_cfg):
    store = Store.from_config(store_cfg)
    etag = store.put_json("ptr.json", {"v": 0}, None)
    wins, conflicts = [], []

    def writer(i):
        s = Store.from_config(store_cfg)  # separate clients, as separate processes would have
        try:
            s.put_json("ptr.json", {"v": i}, etag)
            wins.append(i)
        except ConflictError:
            conflicts.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(conflicts) == 7
    assert store.read_json("ptr.json").value == {"v": wins[0]}


def test_bad_uri():
    with pytest.raises(StoreError, match="unsupported scheme"):
        Store(StoreConfig(uri="gs://x/y"))
