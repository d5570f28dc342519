"""The store suite, run against SQLite and a real PostgreSQL server alike (`store_url` is parametrized)."""

import sqlite3
import threading

from softthought.store import DEFAULT_TENANT, open_store
from softthought.store.base import SCHEMA_VERSION


def test_put_get_delete_and_versions(store_url):
    store = open_store(store_url)
    assert store.get("t", "alice") is None
    first = store.put("t", "alice", "Answer in French.")
    assert (first.user, first.summary, first.version) == ("alice", "Answer in French.", 1)
    second = store.put("t", "alice", "Answer in German.")
    assert second.version == 2 and second.updated_at >= first.updated_at
    assert store.get("t", "alice") == second
    assert store.delete("t", "alice") is True
    assert store.delete("t", "alice") is False
    assert store.get("t", "alice") is None


def test_survives_reopening(store_url):
    open_store(store_url).put("t", "bob", "Short answers.")
    reopened = open_store(store_url)
    assert reopened.get("t", "bob").summary == "Short answers."
    assert reopened.schema_version() == SCHEMA_VERSION


def test_tenants_are_apart(store_url):
    store = open_store(store_url)
    store.put("a", "sam", "Answer in French.")
    assert store.get("b", "sam") is None  # B can neither read...
    assert store.delete("b", "sam") is False  # ...nor delete A's user
    assert store.put("b", "sam", "Answer in German.").version == 1  # the same id in B is another user
    assert store.get("a", "sam").summary == "Answer in French."
    assert store.get("b", "sam").summary == "Answer in German."


def test_concurrent_writers_lose_no_update_and_never_share_a_version(store_url):
    store = open_store(store_url)
    seen = {"carol": [], **{f"user-{i}": [] for i in range(4)}}

    def writer(i):
        for j in range(20):
            seen["carol"].append(store.put("t", "carol", f"summary {i}-{j}").version)
            seen[f"user-{i}"].append(store.put("t", f"user-{i}", f"summary {j}").version)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(seen["carol"]) == list(range(1, 81))  # 80 writes, 80 distinct versions, none lost
    assert store.get("t", "carol").version == 80
    assert all(store.get("t", f"user-{i}").version == 20 for i in range(4))


def test_a_version_is_never_given_twice_to_a_user_deletes_included(store_url):
    store = open_store(store_url)
    assert [store.put("t", "u", s).version for s in ("a", "b")] == [1, 2]
    assert store.delete("t", "u") and store.get("t", "u") is None
    assert store.put("t", "u", "c").version == 3  # not 1 again: version 1 already named "a"
    assert store.delete("t", "u") and not store.delete("t", "u")
    assert open_store(store_url).put("t", "u", "d").version == 4  # remembered across reopening
    assert store.put("t", "other", "x").version == 1


def test_sqlite_uses_wal(tmp_path):
    open_store(f"sqlite:///{tmp_path}/sub/prefs.db").put("t", "bob", "x")
    with sqlite3.connect(tmp_path / "sub" / "prefs.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_first_release_sqlite_file_opens_and_migrates(tmp_path):
    """The first release's file: one namespace of users, deleted versions in retired_versions, no schema version."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE preferences (user TEXT PRIMARY KEY, summary TEXT NOT NULL, version INTEGER NOT NULL,
                                      updated_at REAL NOT NULL);
            CREATE TABLE retired_versions (user TEXT PRIMARY KEY, version INTEGER NOT NULL);
            INSERT INTO preferences VALUES ('alice', 'Answer in French.', 3, 1.0), ('bob', 'Be brief.', 1, 2.0);
            INSERT INTO retired_versions VALUES ('bob', 5), ('gone', 7);
        """)
    store = open_store(str(path))
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get(DEFAULT_TENANT, "alice").summary == "Answer in French."
    assert store.get(DEFAULT_TENANT, "alice").version == 3
    assert store.put(DEFAULT_TENANT, "alice", "x").version == 4
    assert store.put(DEFAULT_TENANT, "bob", "x").version == 6  # after its retired version 5, not its current 1
    assert store.put(DEFAULT_TENANT, "gone", "x").version == 8
    assert store.get("other", "alice") is None
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"schema_version", "preferences", "version_counters", "onboarding_sessions", "preference_evidence",
                      "stored_completions"}
    assert store.get(DEFAULT_TENANT, "bob").summary_source == "put"  # what a client wrote before the memory existed


def test_the_store_benchmark_measures_each_operation(store_url):
    from softthought.store.bench import measure

    result = measure(store_url, ops=8, threads=2)
    for op in ("put", "get"):
        assert 0 < result[op]["p50_ms"] <= result[op]["p99_ms"] and result[op]["per_s_2_threads"] > 0
    assert open_store(store_url).get("bench", "u7").summary == "summary 7"


def test_replicas_opening_a_fresh_store_together_create_it_once(store_url):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        stores = list(pool.map(lambda _: open_store(store_url), range(8)))  # each would create the tables alone
    assert [s.schema_version() for s in stores] == [SCHEMA_VERSION] * 8
    assert stores[0].put("t", "u", "x").version == 1 and stores[7].get("t", "u").summary == "x"


def test_a_learned_summary_keeps_its_source_and_profile(store_url):
    store = open_store(store_url)
    profile = [{"preference": "language:fr", "instruction_id": "language:response_language", "kwargs": {"language": "fr"},
                "probability": 0.97}]
    learned = store.put("t", "u", "Please always answer me in French.", "onboarding", profile)
    assert store.get("t", "u") == learned and learned.to_dict()["profile"] == profile
    assert store.put("t", "u", "Be brief.").to_dict() | {"updated_at": 0} == {
        "user": "u", "summary": "Be brief.", "version": 2, "updated_at": 0, "summary_source": "put", "profile": None}


def test_sessions_evidence_and_kept_completions_belong_to_one_tenants_user_and_are_forgotten_with_it(store_url):
    import time

    store = open_store(store_url)
    store.save_session("s1", "t", "u", {"asked": ["q1"]}, time.time() + 60)
    store.save_session("s1", "t", "u", {"asked": ["q1", "q2"]}, 0)  # an update keeps the expiry
    state, expires = store.load_session("s1", "t", "u")
    assert state == {"asked": ["q1", "q2"]} and expires > time.time()
    assert store.load_session("s1", "other", "u") is None and store.load_session("s1", "t", "v") is None
    store.set_evidence("t", "u", [{"question": "q1", "answer": "o2"}])
    assert store.evidence("t", "u") == [{"question": "q1", "answer": "o2"}] and store.evidence("t2", "u") == []
    for i in range(5):
        store.keep_completion(f"c{i}", "t", "u", [f"reply {i}"], keep_s=60, most=3)
    kept = [store.completion(f"c{i}", "t", "u") for i in range(5)]
    assert kept == [None, None, ("u", ["reply 2"]), ("u", ["reply 3"]), ("u", ["reply 4"])]
    assert store.completion("c4", "t") == ("u", ["reply 4"])  # by id alone, within the tenant
    assert store.completion("c4", "t2", "u") is None and store.completion("c4", "t2") is None
    assert store.completion("c4", "t", "v") is None
    store.keep_completion("old", "t", "u", ["x"], keep_s=-1, most=3)
    assert store.completion("old", "t", "u") is None  # expired
    store.end_session("s1")
    assert store.load_session("s1", "t", "u") is None
    store.save_session("s2", "t", "u", {}, time.time() + 60)
    assert store.forget("t", "u") is True and store.forget("t", "u") is False
    assert store.load_session("s2", "t", "u") is None and store.evidence("t", "u") == [] and store.completion("c4", "t", "u") is None
