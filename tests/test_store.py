import sqlite3
import threading

from softthought.store import PreferenceStore


def test_put_get_delete_and_versions(tmp_path):
    store = PreferenceStore(tmp_path / "prefs.db")
    assert store.get("alice") is None
    first = store.put("alice", "Answer in French.")
    assert (first.user, first.summary, first.version) == ("alice", "Answer in French.", 1)
    second = store.put("alice", "Answer in German.")
    assert second.version == 2 and second.updated_at >= first.updated_at
    assert store.get("alice") == second
    assert store.delete("alice") is True
    assert store.delete("alice") is False
    assert store.get("alice") is None


def test_survives_reopening_and_uses_wal(tmp_path):
    path = tmp_path / "sub" / "prefs.db"
    PreferenceStore(path).put("bob", "Short answers.")
    assert PreferenceStore(path).get("bob").summary == "Short answers."
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_writers_lose_no_update(tmp_path):
    store = PreferenceStore(tmp_path / "prefs.db")

    def writer(i):
        for j in range(20):
            store.put("carol", f"summary {i}-{j}")
            store.put(f"user-{i}", f"summary {j}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert store.get("carol").version == 80
    assert all(store.get(f"user-{i}").version == 20 for i in range(4))


def test_a_version_is_never_given_twice_to_a_user_deletes_included(tmp_path):
    store = PreferenceStore(tmp_path / "p.db")
    assert [store.put("u", s).version for s in ("a", "b")] == [1, 2]
    assert store.delete("u") and store.get("u") is None
    assert store.put("u", "c").version == 3  # not 1 again: version 1 already named "a"
    assert store.delete("u") and not store.delete("u")
    assert PreferenceStore(tmp_path / "p.db").put("u", "d").version == 4  # remembered across reopening
    assert store.put("other", "x").version == 1
