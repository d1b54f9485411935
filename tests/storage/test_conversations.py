"""storage/conversations.py on its own (fast): a real SQLite file in a temporary folder."""
from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from storage.conversations import (LEAF, SCHEMA_VERSION, ConversationStore, NotFound, ReplyWriter, parse_export,
                                   title_from, to_markdown)


@pytest.fixture
def store(tmp_path):
    s = ConversationStore.open(str(tmp_path))
    yield s
    s.close()


def test_the_file_is_wal_and_versioned(store, tmp_path):
    assert store.file.startswith(str(tmp_path)) and store.file.endswith(".sqlite3")
    db = sqlite3.connect(store.file)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    store.close()
    with pytest.raises(RuntimeError, match="newer than this"):
        ConversationStore.open(str(tmp_path))


def test_title_from_the_first_user_message_and_newest_first(store):
    a = store.create("u1")
    store.append("u1", a, "user", "  What is   the capital\nof France?  ")
    store.append("u1", a, "assistant", "Paris.", meta={"model": "m", "tokens": 2})
    time.sleep(0.01)
    b = store.create("u1", title="")
    store.append("u1", b, "user", "x" * 200)
    listed = store.list("u1")
    assert [c.id for c in listed] == [b, a]
    assert listed[1].title == "What is the capital of France?" and listed[1].messages == 2
    assert len(listed[0].title) == 60 and listed[0].title.endswith("…")
    time.sleep(0.01)
    store.append("u1", a, "user", "And Germany?")     # a is updated: first again
    assert [c.id for c in store.list("u1")] == [a, b]
    assert store.list("u1")[0].title == "What is the capital of France?", "the title stays the first message's"
    assert title_from("") == ""


def test_another_owner_gets_the_same_error_as_a_missing_id(store):
    a = store.create("alice")
    m = store.append("alice", a, "user", "secret plans")
    errors = []
    for cid in (a, "0" * 32):
        with pytest.raises(NotFound) as e:
            store.get("bob", cid)
        errors.append(str(e.value).replace(cid, "ID"))
    assert errors[0] == errors[1] == "No conversation with id 'ID'."
    for call in (lambda: store.delete("bob", a), lambda: store.rename("bob", a, "x"),
                 lambda: store.append("bob", a, "user", "hi"), lambda: store.path("bob", a),
                 lambda: store.update("bob", m, content="pwned"), lambda: store.switch("bob", a, m)):
        with pytest.raises(NotFound):
            call()
    assert store.list("bob") == [] and store.list("bob", query="secret") == []
    assert store.get("alice", a)["messages"][0]["content"] == "secret plans"


def test_regenerate_and_edit_make_siblings_and_switch_continues_the_branch(store):
    c = store.create("u")
    u1 = store.append("u", c, "user", "Hi")
    a1 = store.append("u", c, "assistant", "Hello!")
    a2 = store.append("u", c, "assistant", "Hey!", parent=u1)        # regenerate
    a3 = store.append("u", c, "assistant", "Howdy!", parent=u1)      # again
    path = store.path("u", c)
    assert [m.id for m in path] == [u1, a3] and path[1].siblings == [a1, a2, a3]
    u2 = store.append("u", c, "user", "Tell me more")                  # continues a3
    assert [m.id for m in store.path("u", c)] == [u1, a3, u2]
    assert store.switch("u", c, a1) == a1
    assert [m.content for m in store.path("u", c)] == ["Hi", "Hello!"]
    assert store.switch("u", c, a3) == u2, "back to a3: the branch continues where it was"
    e1 = store.append("u", c, "user", "Hi there", parent=None)         # edit the first message
    p = store.path("u", c)
    assert [m.id for m in p] == [e1] and p[0].siblings == [u1, e1]
    data = store.get("u", c)
    assert data["path"] == [e1] and len(data["messages"]) == 6
    store.delete_message("u", e1)
    assert [m.id for m in store.path("u", c)] == [u1, a3, u2], "the newest remaining branch"


def test_search_rename_delete_cascades(store):
    a = store.create("u")
    store.append("u", a, "user", "Tell me about 100% pure_wool")
    b = store.create("u")
    store.append("u", b, "user", "Something else")
    store.append("u", b, "assistant", "About Zebras")
    assert [c.id for c in store.list("u", query="zebra")] == [b], "message text, case-insensitive"
    assert [c.id for c in store.list("u", query="100%")] == [a]
    assert store.list("u", query="0%_") == [], "LIKE wildcards in the query are literal"
    store.rename("u", b, "  Animals  ")
    assert [c.id for c in store.list("u", query="animals")] == [b]
    with pytest.raises(ValueError, match="empty"):
        store.rename("u", b, "  ")
    store.delete("u", b)
    assert [c.id for c in store.list("u")] == [a]
    db = sqlite3.connect(store.file)
    assert db.execute("SELECT COUNT(*) FROM messages WHERE conversation = ?", (b,)).fetchone()[0] == 0


def test_kinds_are_listed_apart(store):
    store.create("u", kind="vision")
    c = store.create("u", kind="chat")
    assert [s.id for s in store.list("u", kind="chat")] == [c]
    with pytest.raises(ValueError, match="kind must be"):
        store.create("u", kind="video")


def test_retention_deletes_what_was_not_updated_in_n_days(store):
    old = store.create("u")
    store.append("u", old, "user", "old")
    new = store.create("v")
    assert store.purge(30, now=time.time() + 31 * 86400) == 2
    fresh = store.create("u")
    assert store.purge(30) == 0 and [c.id for c in store.list("u")] == [fresh]
    assert not store.owns("v", new)


def test_a_streaming_reply_is_written_at_its_first_token_and_then_throttled(store):
    c = store.create("u")
    u = store.append("u", c, "user", "Count")
    w = ReplyWriter(store, "u", c, parent=u, meta={"model": "m"}, interval=0.2)
    w.feed("")
    assert w.id is None, "nothing before the first text"
    w.feed("1")
    assert store.path("u", c)[-1].content == "1"
    assert store.path("u", c)[-1].meta["finish_reason"] == "streaming"
    w.feed("1 2")
    assert store.path("u", c)[-1].content == "1", "not rewritten within the interval"
    time.sleep(0.25)
    w.feed("1 2 3")
    assert store.path("u", c)[-1].content == "1 2 3"
    assert w.finish("1 2 3 4", {"tokens": 4, "finish_reason": "stop"}) == w.id
    m = store.path("u", c)[-1]
    assert m.content == "1 2 3 4" and m.meta == {"model": "m", "tokens": 4, "finish_reason": "stop"}
    assert ReplyWriter(store, "u", c, parent=u).finish("", None) is None


def test_one_store_from_many_threads(store):
    c = store.create("u")
    errors = []

    def work(i):
        try:
            for j in range(20):
                store.append("u", c, "user", f"{i}-{j}", parent=None)
                store.list("u")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and store.summary("u", c).messages == 160


def test_export_import_v2_keeps_branches_and_v1_still_imports(store):
    c = store.create("u", system="Be brief.")
    u = store.append("u", c, "user", "Hi", images=["/x/cat.png"])
    store.append("u", c, "assistant", "A", meta={"model": "m1", "tokens_per_s": 9.5})
    b = store.append("u", c, "assistant", "B", parent=u, meta={"model": "m2"})
    data = json.loads(json.dumps(store.export("u", c)))
    assert data["version"] == 2 and data["system"] == "Be brief." and data["leaf"] == b
    assert [m["content"] for m in data["messages"]] == ["Hi", "B"], "v1's shape: the branch shown"
    assert data["messages"][1]["stats"]["model"] == "m2"
    new = store.import_data("w", data)
    p = store.path("w", new)
    assert [m.content for m in p] == ["Hi", "B"] and len(p[1].siblings) == 2
    assert p[0].images == ["/x/cat.png"] and store.get("w", new)["system"] == "Be brief."
    v1 = {"format": "turbostudio-chat", "version": 1, "system": "", "messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "R", "stats": {"tokens": 3}}]}
    one = store.import_data("w", v1)
    assert [(m.content, m.meta) for m in store.path("w", one)] == [("Q", {}), ("R", {"tokens": 3})]
    assert store.list("w", query="Q")[0].title == "Q"
    md = to_markdown(data, details=lambda meta: meta.get("model", ""))
    assert "# Hi" in md and "**Assistant** (version 2 of 2)" in md and "<sub>m2</sub>" in md
    assert "![image](cat.png)" in md and "Be brief." in md


@pytest.mark.parametrize("data, fragment", [
    ({"version": 3, "messages": []}, "unknown export version"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role user/assistant"),
    ({"version": 2, "tree": [{"id": "b", "parent": "a", "role": "user", "content": "x"}]}, "before its parent"),
    ({"version": 2, "tree": [], "leaf": "zz"}, "not one of the messages"),
    ("nope", "expected a list"),
])
def test_malformed_imports_say_what_is_wrong(data, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_export(data)


def test_search_and_a_long_branch_are_fast(store):
    """Figures for the docstring's claims: LIKE over 20 000 messages of one owner; the path of a
    1 000-message conversation (what opening it reads)."""
    c, others = store.create("u"), [store.create("u") for _ in range(19)]
    with store._tx() as db:          # bulk insert: the figure is about reading
        prev = None
        for i in range(20000):
            mid = f"m{i}"
            db.execute("INSERT INTO messages (id, conversation, parent, role, content, created, updated) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (mid, c if i < 1000 else others[i // 1000 - 1],
                                                         prev if i % 1000 else None,
                                                         "user" if i % 2 == 0 else "assistant",
                                                         f"message number {i} about nothing", i, i))
            prev = mid
        db.execute("UPDATE conversations SET leaf = 'm999' WHERE id = ?", (c,))
    t0 = time.perf_counter()
    assert [x.id for x in store.list("u", query="number 19999")] == [others[-1]]
    search = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = store.path("u", c)
    walk = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = store.append("u", c, "assistant", "x")
    store.update("u", m, content="xy")
    write = (time.perf_counter() - t0) / 2
    assert len(path) == 1000
    print(f"LIKE over 20000 messages {search * 1000:.1f} ms; path of 1000 {walk * 1000:.1f} ms; "
          f"one write {write * 1000:.2f} ms")
    assert search < 1.0 and walk < 1.0
    assert path[-1].parent == "m998" and LEAF is not None


def test_writes_handed_over_land_in_order_and_a_failing_one_alone_is_undone(store):
    """``later``: a streaming reply's writes go to the writer thread without waiting; they land in
    the order given (the final text after the partial ones, however many wait in one batch), a write
    that fails is undone alone, and a reader right after sees every write handed over before."""
    cid = store.create("alice")
    uid = store.append("alice", cid, "user", "Hi")
    w = ReplyWriter(store, "alice", cid, parent=uid, meta={"model": "m"}, interval=0.0)
    texts = [("Hel" + "l" * i) for i in range(200)]
    for t in texts:
        w.feed_later(t)
    bad = store.later(store.append, "alice", "no-such-conversation", "user", "x")
    w.finish_later("Hello!", {"tokens": 3})
    store.later(store.append, "alice", cid, "user", "And then?")
    got = store.get("alice", cid)                       # settled: every write above has landed
    reply = next(m for m in got["messages"] if m["role"] == "assistant")
    assert reply["content"] == "Hello!" and reply["meta"]["tokens"] == 3, reply
    assert [m.content for m in store.path("alice", cid)] == ["Hi", "Hello!", "And then?"]
    with pytest.raises(NotFound):
        bad.result(timeout=5)


def test_handed_over_writes_run_in_a_writer_process_and_survive_the_server_killed(tmp_path):
    """``write`` hands a write to the store's writer *process* (SQLite off the server's GIL): the
    server killed (SIGKILL) right after handing a reply's writes over loses none of them (the child
    reads what is in the pipe and commits it), and they land in the order given."""
    import os
    import subprocess
    import sys

    code = """if True:
        import os, signal, sys
        from storage.conversations import ConversationStore, ReplyWriter
        s = ConversationStore.open(sys.argv[1])
        cid = s.create("alice")
        s.write("append", "alice", cid, "user", "Count", mid="u1")
        w = ReplyWriter(s, "alice", cid, parent="u1", interval=0.0)
        for i in range(1, 51):
            w.feed_later(" ".join(str(k) for k in range(1, i + 1)))
        print(cid, s._process.proc.pid, os.getpid(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)      # no close, no atexit: the child has the pipe's rest
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -9, r.stderr
    cid, child, parent = r.stdout.split()
    assert child != parent, "the writes ran in a process of their own"
    deadline = time.time() + 20
    while time.time() < deadline:               # the orphaned writer ends at the end of its input
        try:
            os.kill(int(child), 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    s = ConversationStore.open(str(tmp_path))
    try:
        path = s.path("alice", cid)
        assert [m.role for m in path] == ["user", "assistant"]
        assert path[-1].content == " ".join(str(k) for k in range(1, 51)), "the last text handed over landed last"
    finally:
        s.close()


def test_writer_process_keeps_ownership_order_and_falls_back_to_the_thread(store):
    """Through the process, another owner's conversation is refused like a missing one (the error
    comes back to an acknowledged write), LEAF still means the branch shown, a reader sees its
    own writes at once; an argument that does not pickle, or the child gone, sends writes to the
    writer thread, in order, instead of losing them."""
    cid = store.create("alice")
    first = store.write("append", "alice", cid, "user", "Hi", ack=True).result(timeout=10)
    assert store._process is not None and store._process.proc.pid
    with pytest.raises(NotFound) as e:
        store.write("append", "bob", cid, "user", "mine now?", ack=True).result(timeout=10)
    assert str(e.value) == f"No conversation with id {cid!r}."
    with pytest.raises(ValueError, match="not one of the store's writes"):
        store.write("purge", 0)
    store.write("append", "alice", cid, "assistant", "Hello", parent=LEAF)     # the leaf: under "Hi"
    assert [m.content for m in store.path("alice", cid)] == ["Hi", "Hello"]     # settled by the read
    assert store.path("alice", cid)[-1].parent == first

    class Unpicklable(dict):
        def __reduce__(self):
            raise TypeError("not across a pipe")

    w = ReplyWriter(store, "alice", cid, parent=first, meta=Unpicklable(model="m"), interval=0.0)
    w.feed_later("A")                           # meta does not pickle: this write goes to the thread
    w.feed_later("A B")                         # and this one after it (not overtaking it)
    assert store.get("alice", cid)["messages"][-1]["content"] == "A B"
    assert w.finish_later("A B C", {"tokens": 3}).result(timeout=10) == w.id

    store._process.proc.kill()
    store._process.proc.wait(10)
    deadline = time.time() + 10
    while store._process.alive and time.time() < deadline:     # its ack reader sees the pipe close
        time.sleep(0.02)
    store.write("append", "alice", cid, "user", "Still there?")
    assert store.path("alice", cid)[-1].content == "Still there?"
    assert store.path("alice", cid)[-2].content == "A B C"


def test_ownership_remembered_until_deleted(store):
    """``known`` (the event loop's check before /chat appends: no SQLite) is True only for what
    ``owns`` confirmed, never for another owner, and no longer once the conversation is deleted
    or purged."""
    a, b = store.create("alice"), store.create("alice")
    assert not store.known("alice", a) and store.owns("alice", a) and store.known("alice", a)
    assert not store.owns("bob", a) and not store.known("bob", a) and not store.known("alice", {"x": 1})
    store.delete("alice", a)
    assert not store.known("alice", a) and not store.owns("alice", a)
    assert store.owns("alice", b) and store.purge(0, now=time.time() + 1) == 1
    assert not store.known("alice", b) and not store.owns("alice", b)
