"""Conversations kept on the server: one SQLite file under the app's cache folder.

Why SQLite through the standard library and no ORM: the data is two tables, the queries are a
handful (a recursive CTE walks a branch), and stdlib ``sqlite3`` is already on every machine the
app runs on; an ORM (SQLAlchemy) would add a dependency, a session model to reason about across
Gradio's threads, and nothing we use. The database is embedded: no server to start.

Storage choices, each for a reason:

* **WAL mode, synchronous=NORMAL**: readers never wait for the writer, and a commit is durable
  against the *process* dying (SIGKILL, a crash): the WAL is in the OS's page cache, which survives
  the process. Only a power cut may lose the last commits; a streamed reply's last second is not
  worth an fsync per update.
* **One connection and one lock** (not one connection per thread): Gradio runs handlers on a pool
  of 40+ worker threads and on the event loop; SQLite serializes writers anyway, each call here is
  short (well under a millisecond, measured in tests/storage), and per-thread connections would be
  left open on threads that Gradio recycles. ``check_same_thread=False`` plus an ``RLock`` around
  every use is the documented way to share one connection. (The writer process, below, has its
  own: two connections to one WAL file is what SQLite's locking is for.)
* **Search with LIKE, not FTS5** (though this SQLite has FTS5): a streaming reply is rewritten
  about once a second, and an FTS index would rewrite its postings at every update; LIKE scans
  only the caller's own conversations (indexed by owner), which is fast at the sizes one person
  produces (tests/storage measures 20 000 messages).
* The schema is versioned with ``PRAGMA user_version``; a newer file than this code knows is refused
  with a clear message instead of being misread.

Writing as it happens: :class:`ReplyWriter` creates an assistant message at its first token and
rewrites it at most every ``interval`` seconds and at the end, so a reply cut by a crash keeps what
had streamed (up to the last interval). Streaming replies hand those writes over without waiting
(``ConversationStore.write``): a writer *process* with its own connection runs them in order, so
SQLite and its Python wrapping take no time under the server's GIL (see :class:`_WriterProcess`);
readers first wait for what was handed over (``settled``), so everyone reads their own writes.

Ownership: every call takes ``owner`` (an opaque key: ``user:<name>`` under --auth, a browser's
own id without; see ``ui.chat.owner_key``). A conversation id that is someone else's gets exactly
the same :class:`NotFound` as one that does not exist, so ids cannot be probed.

The API, for the Chat and Vision pages and for Compare (a comparison is one conversation whose user
message has two assistant children, one per model)::

    store = ConversationStore.open(cache_dir)
    cid = store.create(owner, kind="compare", system="Be brief.")
    u = store.append(owner, cid, "user", "What is AWQ?")               # child of the current leaf
    a = store.append(owner, cid, "assistant", text_a, parent=u, meta={"model": ..., "ttft": ...})
    b = store.append(owner, cid, "assistant", text_b, parent=u, meta={...})   # a sibling of a
    store.path(owner, cid)       # root..leaf (b now), each Message with .siblings = [a, b]
    store.switch(owner, cid, a)  # show branch a (the leaf becomes a's newest descendant)

or, while streaming, ``w = ReplyWriter(store, owner, cid, parent=u, meta=...)``, ``w.feed(text)``
per update and ``w.finish(text, stats)`` at the end.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import select
import sqlite3
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

SCHEMA_VERSION = 1
KINDS = ("chat", "vision", "compare")
ROLES = ("user", "assistant")
TITLE_CHARS = 60
EXPORT_FORMAT = "turbostudio-chat"
EXPORT_VERSION = 2
MAX_IMPORT_MESSAGES = 100_000
OWNED_CACHE = 10_000       # (owner, conversation) pairs ``known`` remembers (emptied when full)


class _Leaf:
    def __repr__(self) -> str:
        return "LEAF"

    def __reduce__(self):       # pickled to the writer process as this module's one LEAF
        return "LEAF"


LEAF = _Leaf()
"""``append``'s default parent: the conversation's current leaf (the end of the branch shown)."""


class NotFound(KeyError):
    """No such conversation or message *for this owner* (someone else's reads the same)."""

    def __init__(self, what: str, ident: str):
        self.message = f"No {what} with id {ident!r}."
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):       # back from the writer process (KeyError's own pickling loses ``what``)
        return (_not_found, (self.message,))


def _not_found(message: str) -> NotFound:
    e = NotFound.__new__(NotFound)
    e.message = message
    KeyError.__init__(e, message)
    return e


_SCHEMA = [
    """CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL CHECK (kind IN ('chat', 'vision', 'compare')),
        created REAL NOT NULL,
        updated REAL NOT NULL,
        system TEXT NOT NULL DEFAULT '',
        leaf TEXT)""",
    "CREATE INDEX conversations_owner ON conversations (owner, kind, updated DESC)",
    "CREATE INDEX conversations_updated ON conversations (updated)",
    """CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        conversation TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        parent TEXT REFERENCES messages (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL DEFAULT '',
        images TEXT NOT NULL DEFAULT '[]',
        meta TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        updated REAL NOT NULL)""",
    "CREATE INDEX messages_conversation ON messages (conversation, created)",
    "CREATE INDEX messages_parent ON messages (parent)",
]


@dataclass
class Message:
    """One message of a conversation's tree. ``parent`` None: a first message (several first
    messages are branches too). ``meta`` (assistant replies): model, backend, device, dtype, format,
    kv_quant, params (sampling), ttft, tokens, tokens_per_s, seconds, finish_reason, ... ``siblings``
    (filled by ``path``): the ids of every child of ``parent`` in creation order, this one included."""

    id: str
    conversation: str
    parent: str | None
    role: str
    content: str
    images: list[str]
    meta: dict
    created: float
    updated: float
    siblings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Summary:
    """A conversation as the side list shows it."""

    id: str
    title: str
    kind: str
    created: float
    updated: float
    messages: int

    def to_dict(self) -> dict:
        return asdict(self)


def title_from(text: str) -> str:
    """A title from a first message: its words on one line, cut at ``TITLE_CHARS``."""
    line = " ".join((text or "").split())
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"


def new_id() -> str:
    """A new message or conversation id."""
    return _new_id()


def _new_id() -> str:
    return uuid.uuid4().hex        # random: an id says nothing about another owner's ids


def _like(text: str) -> str:
    return "%" + re.sub(r"([%_\\])", r"\\\1", text) + "%"


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WRITES = frozenset({"append", "update", "set_system", "set_leaf", "switch", "rename", "delete_message"})
"""The store's methods that may be handed to the writer process (``ConversationStore.write``)."""


class _WriterProcess:
    """The parent's end of the store's writer *process*: a child Python (``_serve_writes``) with its
    own connection to the same file, fed through a pipe.

    Why a process and not the writer thread alone: a streaming reply's writes (SQLite and its
    Python wrapping, ~0.3 ms of CPU each, with a GIL hand-off around every statement) ran under the
    GIL that the event loop streaming every reply needs; measured on the 2-core machine, the writer
    thread used ~1.2 ms of CPU per /chat request, ~5% of the event loop thread's, and /chat kept
    0.960 / 0.936 of its tokens/s at 16 / 64 users with history on (target: 0.98). Here the server only pickles a small tuple and writes it to a pipe (no thread wakes
    up); SQLite runs on the other core.

    Why a plain ``subprocess`` and a pickle stream, not ``multiprocessing``: its spawn and forkserver
    starts re-import the parent's ``__main__`` (app.py: Gradio, seconds and ~150 MB) in the child, and
    fork is unsafe in a process with threads (and, on the GPU machine, CUDA); the child here imports
    this module only (stdlib). Framing is pickle's own (a pickle stream is self-delimiting).

    Order: one pipe, one child reading it in order, so writes land in the order handed over.
    Acknowledgements: an op sent with ``ack`` gets its result (or exception) back on the child's
    stdout, read by one thread here that resolves its future; ``sync`` (an empty op with an ack)
    is how ``settled`` waits. The pipe is non-blocking: when it is full (the child behind by more
    than the pipe's buffer), the frames wait in a backlog that one flusher thread writes, so the
    event loop never blocks on a slow disk. If the child dies, ``alive`` turns False and the store
    falls back to its writer thread (what was in flight is lost, and said on stderr)."""

    PIPE_BYTES = 1 << 20        # asked of Linux (F_SETPIPE_SZ; at most /proc/sys/fs/pipe-max-size)

    def __init__(self, path: str):
        """``path``: the database file (the child opens its own connection to it)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from storage.conversations import _serve_writes; _serve_writes()", path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_ROOT, close_fds=True)
        self._fd = self.proc.stdin.fileno()
        try:
            import fcntl

            fcntl.fcntl(self._fd, 1031, self.PIPE_BYTES)       # F_SETPIPE_SZ (Linux); a default pipe otherwise
        except OSError:
            pass
        os.set_blocking(self._fd, False)
        self.alive = True
        self._lock = threading.Lock()
        self._backlog: collections.deque[memoryview] = collections.deque()
        self._more = threading.Condition(self._lock)
        self._seq = 0
        self._waiting: dict[int, Future] = {}
        threading.Thread(target=self._read_acks, daemon=True, name="history-writer-acks").start()
        threading.Thread(target=self._flush, daemon=True, name="history-writer-pipe").start()

    def send(self, method: str | None, args: tuple = (), kwargs: dict | None = None, ack: bool = False):
        """Hand ``method(*args, **kwargs)`` over (None: nothing, a sync point); with ``ack`` a future
        of its result. Raises what pickling raises (the caller falls back) or OSError if the child
        is gone."""
        with self._lock:
            if not self.alive:
                raise BrokenPipeError("the history writer process has ended")
            seq = 0
            if ack:
                self._seq += 1
                seq = self._seq
            data = pickle.dumps((seq, method, args, kwargs or {}), protocol=pickle.HIGHEST_PROTOCOL)
            fut = None
            if ack:
                fut = self._waiting[seq] = Future()
            if self._backlog:               # behind a backlog: in order, written by the flusher
                self._backlog.append(memoryview(data))
                return fut
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._gone_locked()
                raise
            if n < len(data):
                self._backlog.append(memoryview(data)[n:])
                self._more.notify()
            return fut

    def _flush(self) -> None:
        while True:
            with self._lock:
                while not self._backlog and self.alive:
                    self._more.wait()
                if not self.alive:
                    return
            select.select([], [self._fd], [], 1.0)
            with self._lock:
                while self._backlog and self.alive:
                    head = self._backlog[0]
                    try:
                        n = os.write(self._fd, head)
                    except BlockingIOError:
                        break
                    except OSError:
                        self._gone_locked()
                        return
                    if n < len(head):
                        self._backlog[0] = head[n:]
                        break
                    self._backlog.popleft()

    def _read_acks(self) -> None:
        out = self.proc.stdout
        while True:
            try:
                seq, result, error = pickle.load(out)
            except Exception:  # noqa: BLE001 - EOF or a torn frame: the child has ended
                break
            with self._lock:
                fut = self._waiting.pop(seq, None)
            if fut is not None:
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
        with self._lock:
            self._gone_locked()

    def _gone_locked(self) -> None:
        if self.alive and self.proc.poll() is None and not self.proc.stdin.closed:
            sys.stderr.write("history: the writer process stopped answering; writes go to a thread now\n")
        was = self.alive
        self.alive = False
        self._more.notify_all()
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(BrokenPipeError("the history writer process ended before this write"))
        if was and self.proc.poll() is not None and self.proc.returncode not in (0, None):
            sys.stderr.write(f"history: the writer process ended with {self.proc.returncode}\n")

    def close(self, timeout: float = 30.0) -> None:
        """Let every write handed over land, then end the child (it exits at the end of its input)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if not self._backlog or not self.alive:
                    break
            time.sleep(0.01)
        with self._lock:
            self.alive = False
            self._more.notify_all()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_quietly(fut: Future, timeout: float = 60.0) -> None:
    """Wait for a sync point of the writer process; its failure (the child gone) was said already."""
    try:
        fut.result(timeout)
    except Exception:  # noqa: BLE001 - a sync point carries no result; a dead child is reported once
        pass


# The writer process's niceness. Its writes are never waited for while a reply streams, so when every
# core is busy (64 streams on 2 cores: the server and the load generator) its CPU is better spent on
# the server: at nice 10 Linux gives it about a tenth of a nice-0 process's share while they compete,
# several times what it needs (0.28-0.35 ms a /chat request at 64 users against the server's ~14 ms),
# and all of a core that would idle; readers that wait for it (``settled``) wait at most for that
# backlog. Measured at 64 users on the 2-core machine (bench/bench_history.py, 2026-12-02): history
# on/off 0.959 at nice 0 (9 rounds); 0.981-0.993 paired by round at nice 10 (31-41 rounds), where
# the history-on app's /chat *without* storing cost as much CPU per request as with it.
WRITER_NICE = 10


def _serve_writes() -> None:
    """The writer process (``python -c ... _serve_writes()  DB``): the store's writes read from
    stdin in order, each in its own transaction as in the parent; results of acknowledged ones
    back on stdout. A failing write is undone alone (its error to the parent if it asked, else to
    stderr); the rest go on. Ends at the end of its input (the parent closed it, or died: what was
    handed over before still lands)."""
    try:
        # background work: when the server, its clients and this process want more CPU than there
        # is, the server goes first (see WRITER_NICE)
        os.nice(WRITER_NICE)
    except OSError:
        pass
    store = ConversationStore(sys.argv[1], writer_process=False)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            seq, method, args, kwargs = pickle.load(inp)
        except EOFError:
            break
        result = error = None
        try:
            if method is not None:
                if method not in _WRITES:
                    raise ValueError(f"{method!r} is not a write the history writer runs")
                result = getattr(store, method)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - one failed write is undone (its transaction) and reported
            error = e
            if not seq:
                sys.stderr.write(f"history: {method} failed: {e}\n")
        if seq:
            try:
                data = pickle.dumps((seq, result, error))
            except Exception as e:  # noqa: BLE001 - an unpicklable error still answers
                data = pickle.dumps((seq, None, RuntimeError(repr(e))))
            out.write(data)
            out.flush()
    store.close()


class ConversationStore:
    """Conversations and their message trees in one SQLite file (see the module's docstring)."""

    def __init__(self, path: str, writer_process: bool | None = None):
        """``path``: the database file (created with its folder), or ":memory:". ``writer_process``:
        whether writes handed over (``write``) run in a writer process (started at the first one);
        None: yes for a file (":memory:" is this connection's alone: its writer thread then)."""
        self.file = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self._stop = threading.Event()
        self._retention: threading.Thread | None = None
        # the one writer thread of streaming replies (``later``): a stream hands its writes over and
        # goes on; they land in the order given (a reply's last text after its partial ones)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-writer")
        # streaming replies' writes (``write``): the writer process, started at the first one
        self._use_process = (path != ":memory:" and os.name == "posix") if writer_process is None \
            else bool(writer_process)
        self._process: _WriterProcess | None = None
        self._process_lock = threading.Lock()
        self._thread_pending = 0           # ``later`` calls not yet run (``write`` keeps behind them)
        self._owned: set[tuple[str, str]] = set()      # (owner, id) ``owns`` found: ``known``

    def _writer_process(self) -> "_WriterProcess | None":
        """The writer process, started at the first call (None: writes stay on the writer thread)."""
        if not self._use_process:
            return None
        proc = self._process
        if proc is None:
            with self._process_lock:
                if self._process is None and self._use_process:
                    try:
                        self._process = _WriterProcess(os.path.abspath(self.file))
                    except OSError as e:
                        sys.stderr.write(f"history: no writer process ({e}); writes go to a thread\n")
                        self._use_process = False
                        return None
                proc = self._process
        if not proc.alive:
            self._use_process = False
            return None
        return proc

    def write(self, method: str, *args, ack: bool = False, **kwargs) -> Future | None:
        """Hand the write ``method(*args, **kwargs)`` (one of append, update, set_system, set_leaf,
        switch, rename, delete_message) over without waiting: it lands after every write handed
        over before it (``later``'s too), on the writer process (see ``_WriterProcess``); the caller
        only pickles a tuple. With ``ack``, a future of its result (or its exception); without, a
        failing write is undone alone and said on the writer's stderr. Falls back to the writer
        thread (``later``) where there is no process (":memory:", it died, or an argument does not
        pickle)."""
        if method not in _WRITES:
            raise ValueError(f"{method!r} is not one of the store's writes ({', '.join(sorted(_WRITES))})")
        proc = self._writer_process()
        if proc is not None and not self._pending_thread:
            try:
                return proc.send(method, args, kwargs, ack=ack)
            except OSError:
                pass                     # the child is gone (said once on stderr): the thread from now on
            except Exception:  # noqa: BLE001 - an argument the pipe cannot carry (pickling): this write on the thread
                pass
        fut = self.later(getattr(self, method), *args, **kwargs)
        return fut if ack else None

    @property
    def _pending_thread(self) -> bool:
        """Writes handed to the thread wait there (a process write now would overtake them)."""
        return self._thread_pending > 0

    def later(self, fn, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the store's writer thread, after every write handed over
        before it (``write``'s included: the thread first waits for the writer process to be
        through them); returns its future (``asyncio.wrap_future`` to wait from the event loop).
        For what cannot go to the process (a closure: the page taking back a reply). Streaming
        replies write through ``write`` without waiting: with a thread per write
        (``asyncio.to_thread``) each stream waited for its write, and 64 streams waited for each
        other behind the store's lock (history on cost 25% of /chat's tokens/s at 64 users on the
        2-core machine)."""
        proc = self._process
        sync = proc.send(None, ack=True) if proc is not None and proc.alive else None
        with self._process_lock:
            self._thread_pending += 1

        def run():
            try:
                if sync is not None:
                    _wait_quietly(sync)
                return fn(*args, **kwargs)
            finally:
                with self._process_lock:
                    self._thread_pending -= 1

        return self._writer.submit(run)

    def settled(self) -> None:
        """Wait until every write handed over so far (``write`` and ``later``) has landed: a reader
        sees its own writes (a client reading a conversation right after its reply ended). On the
        writer thread itself, only the process's writes are waited for."""
        if not threading.current_thread().name.startswith("history-writer"):
            self._writer.submit(lambda: None).result()
        proc = self._process
        if proc is not None and proc.alive:
            try:
                _wait_quietly(proc.send(None, ack=True))
            except OSError:
                pass

    @classmethod
    def open(cls, cache_dir: str) -> "ConversationStore":
        """The app's store: ``<cache_dir>/history/conversations.sqlite3``."""
        return cls(os.path.join(cache_dir, "history", "conversations.sqlite3"))

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.file} has conversation schema {version}, newer than this "
                                   f"TurboStudio's {SCHEMA_VERSION}: update the app or start with another "
                                   "--cache-dir (or --no-history)")
            if version < 1:
                for stmt in _SCHEMA:
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; rolled back if the block raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        self._stop.set()
        self._writer.shutdown(wait=True)       # the writes handed over land before the file closes
        with self._process_lock:
            proc, self._process, self._use_process = self._process, None, False
        if proc is not None:
            proc.close()
        with self._lock:
            try:
                self._db.close()
            except sqlite3.ProgrammingError:
                pass

    # ------------------------------------------------------------------ ownership
    def _own(self, db, owner: str, cid: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM conversations WHERE id = ? AND owner = ?",
                         (str(cid or ""), owner)).fetchone()
        if row is None:
            raise NotFound("conversation", str(cid))
        return row

    def _own_message(self, db, owner: str, mid: str) -> sqlite3.Row:
        row = db.execute("SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation "
                         "WHERE m.id = ? AND c.owner = ?", (str(mid or ""), owner)).fetchone()
        if row is None:
            raise NotFound("message", str(mid))
        return row

    def owns(self, owner: str, cid: str) -> bool:
        """Whether ``cid`` is one of ``owner``'s conversations."""
        if self.known(owner, cid):
            return True
        with self._lock:
            try:
                self._own(self._db, owner, cid)
            except NotFound:
                return False
            if len(self._owned) >= OWNED_CACHE:
                self._owned.clear()
            self._owned.add((owner, str(cid)))      # under the lock: a delete cannot come in between
            return True

    def known(self, owner: str, cid: str) -> bool:
        """``owns`` from memory alone (no SQLite, safe on the event loop): True if ``owns`` said so
        before and the conversation was not deleted since (only this process deletes
        conversations: ``delete``, ``purge``); False means "ask ``owns``", not "not the owner's"."""
        return isinstance(cid, str) and (owner, cid) in self._owned

    # ------------------------------------------------------------------ conversations
    def create(self, owner: str, kind: str = "chat", title: str = "", system: str = "") -> str:
        """A new, empty conversation of ``kind`` (chat | vision | compare); returns its id."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        cid, now = _new_id(), time.time()
        with self._tx() as db:
            db.execute("INSERT INTO conversations (id, owner, title, kind, created, updated, system) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (cid, owner, title_from(title), kind, now, now, system or ""))
        return cid

    def list(self, owner: str, kind: str | None = None, query: str = "", limit: int = 200) -> list[Summary]:
        """The owner's conversations, newest (last updated) first; ``query`` matches the title or
        any message's text (case-insensitive for ASCII, SQLite's LIKE)."""
        self.settled()
        args: list = [owner]
        where = "c.owner = ?"
        if kind:
            where += " AND c.kind = ?"
            args.append(kind)
        query = (query or "").strip()
        if query:
            pat = _like(query)
            where += (" AND (c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages s WHERE "
                      "s.conversation = c.id AND s.content LIKE ? ESCAPE '\\'))")
            args += [pat, pat]
        rows = self._read(f"SELECT c.id, c.title, c.kind, c.created, c.updated, (SELECT COUNT(*) FROM messages m "
                          f"WHERE m.conversation = c.id) AS n FROM conversations c WHERE {where} "
                          f"ORDER BY c.updated DESC LIMIT ?", (*args, int(limit)))
        return [Summary(r["id"], r["title"] or "New conversation", r["kind"], r["created"], r["updated"], r["n"])
                for r in rows]

    def get(self, owner: str, cid: str) -> dict:
        """A conversation whole: its fields, every message (the tree: each has its ``parent``), the
        current ``leaf`` and the ``path`` of ids from the first message to it (the branch shown)."""
        self.settled()
        with self._lock:
            row = self._own(self._db, owner, cid)
            msgs = [self._message(r) for r in self._db.execute(
                "SELECT * FROM messages WHERE conversation = ? ORDER BY created, rowid", (cid,))]
        path = [m.id for m in self._path_of(msgs, row["leaf"])]
        return {"id": row["id"], "title": row["title"], "kind": row["kind"], "system": row["system"],
                "created": row["created"], "updated": row["updated"], "leaf": row["leaf"], "path": path,
                "messages": [m.to_dict() for m in msgs]}

    def summary(self, owner: str, cid: str) -> Summary:
        self.settled()
        with self._lock:
            r = self._own(self._db, owner, cid)
            n = self._db.execute("SELECT COUNT(*) FROM messages WHERE conversation = ?", (cid,)).fetchone()[0]
        return Summary(r["id"], r["title"] or "New conversation", r["kind"], r["created"], r["updated"], n)

    def rename(self, owner: str, cid: str, title: str) -> None:
        title = " ".join((title or "").split())
        if not title:
            raise ValueError("A title cannot be empty.")
        with self._tx() as db:
            self._own(db, owner, cid)
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title[:200], cid))

    def set_system(self, owner: str, cid: str, system: str) -> None:
        with self._tx() as db:
            row = self._own(db, owner, cid)
            if row["system"] != (system or ""):
                db.execute("UPDATE conversations SET system = ? WHERE id = ?", (system or "", cid))

    def delete(self, owner: str, cid: str) -> None:
        """Delete a conversation and all its messages (cascade)."""
        with self._tx() as db:
            self._own(db, owner, cid)
            db.execute("DELETE FROM conversations WHERE id = ?", (cid,))
            self._owned.discard((owner, cid))

    def purge(self, days: float, now: float | None = None) -> int:
        """Delete every conversation (any owner's) not updated in ``days`` days; returns how many."""
        cutoff = (time.time() if now is None else now) - days * 86400
        with self._tx() as db:
            self._owned.clear()
            return db.execute("DELETE FROM conversations WHERE updated < ?", (cutoff,)).rowcount

    def start_retention(self, days: float | None, every: float = 86400) -> None:
        """Purge now and then every ``every`` seconds (daily) in a daemon thread; None/0: keep all."""
        if not days or self._retention is not None:
            return
        self.purge(days)

        def loop():
            while not self._stop.wait(every):
                try:
                    self.purge(days)
                except sqlite3.Error:
                    pass

        self._retention = threading.Thread(target=loop, daemon=True, name="history-retention")
        self._retention.start()

    # ------------------------------------------------------------------ messages
    def append(self, owner: str, cid: str, role: str, content: str, *, parent=LEAF, images=(),
               meta: dict | None = None, mid: str | None = None) -> str:
        """Add a message and make it the conversation's leaf; returns its id.

        ``parent``: ``LEAF`` (the default) continues the branch shown; a message id adds a child
        of that message (a sibling of its other children: regenerate and edit); None adds a first
        message. The first user message gives an untitled conversation its title. ``mid``: the new
        message's id when the caller made it (``new_id``: a write handed to ``later`` whose id is
        needed before it lands), else a new one."""
        if role not in ROLES:
            raise ValueError(f"role must be user or assistant, got {role!r}")
        mid, now = mid or _new_id(), time.time()
        with self._tx() as db:
            conv = self._own(db, owner, cid)
            if parent is LEAF:
                parent = conv["leaf"]
            elif parent is not None:
                p = db.execute("SELECT conversation FROM messages WHERE id = ?", (parent,)).fetchone()
                if p is None or p["conversation"] != cid:
                    raise NotFound("message", str(parent))
            db.execute("INSERT INTO messages (id, conversation, parent, role, content, images, meta, created, "
                       "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (mid, cid, parent, role, content or "", json.dumps(list(images or ())),
                        json.dumps(meta or {}, default=str), now, now))
            title = conv["title"] or (title_from(content) if role == "user" else "")
            db.execute("UPDATE conversations SET leaf = ?, updated = ?, title = ? WHERE id = ?",
                       (mid, now, title, cid))
        return mid

    def update(self, owner: str, mid: str, content: str | None = None, meta: dict | None = None) -> None:
        """Rewrite a message's text and/or merge ``meta`` into its metadata (a streaming reply)."""
        now = time.time()
        with self._tx() as db:
            row = self._own_message(db, owner, mid)
            merged = {**json.loads(row["meta"] or "{}"), **(meta or {})} if meta else None
            db.execute("UPDATE messages SET content = COALESCE(?, content), meta = COALESCE(?, meta), "
                       "updated = ? WHERE id = ?",
                       (content, json.dumps(merged, default=str) if merged is not None else None, now, mid))
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, row["conversation"]))

    def delete_message(self, owner: str, mid: str) -> None:
        """Delete a message and its descendants; the leaf moves to its parent's newest branch."""
        with self._tx() as db:
            row = self._own_message(db, owner, mid)
            db.execute("DELETE FROM messages WHERE id = ?", (mid,))
            cid, parent = row["conversation"], row["parent"]
            leaf = self._newest_descendant(db, cid, parent)
            db.execute("UPDATE conversations SET leaf = ?, updated = ? WHERE id = ?", (leaf, time.time(), cid))

    def _newest_descendant(self, db, cid: str, mid: str | None) -> str | None:
        """Follow the newest child from ``mid`` (None: the newest first message) down to a leaf."""
        cur = mid
        while True:
            if cur is None:
                r = db.execute("SELECT id FROM messages WHERE conversation = ? AND parent IS NULL "
                               "ORDER BY created DESC, rowid DESC LIMIT 1", (cid,)).fetchone()
            else:
                r = db.execute("SELECT id FROM messages WHERE parent = ? ORDER BY created DESC, rowid DESC "
                               "LIMIT 1", (cur,)).fetchone()
            if r is None:
                return cur
            cur = r["id"]

    def switch(self, owner: str, cid: str, mid: str) -> str:
        """Show the branch through message ``mid``: the leaf becomes its newest descendant (or
        ``mid`` itself); returns the new leaf."""
        with self._tx() as db:
            self._own(db, owner, cid)
            row = db.execute("SELECT conversation FROM messages WHERE id = ?", (mid,)).fetchone()
            if row is None or row["conversation"] != cid:
                raise NotFound("message", str(mid))
            leaf = self._newest_descendant(db, cid, mid)
            db.execute("UPDATE conversations SET leaf = ? WHERE id = ?", (leaf, cid))
        return leaf

    def set_leaf(self, owner: str, cid: str, mid: str | None) -> None:
        """Make ``mid`` the end of the branch shown (None: an empty branch, before any message)."""
        with self._tx() as db:
            self._own(db, owner, cid)
            if mid is not None:
                row = db.execute("SELECT conversation FROM messages WHERE id = ?", (mid,)).fetchone()
                if row is None or row["conversation"] != cid:
                    raise NotFound("message", str(mid))
            db.execute("UPDATE conversations SET leaf = ? WHERE id = ?", (mid, cid))

    def path(self, owner: str, cid: str, leaf=LEAF) -> list[Message]:
        """The branch from the first message to ``leaf`` (default: the conversation's), each
        message with its ``siblings``."""
        self.settled()
        with self._lock:
            conv = self._own(self._db, owner, cid)
            leaf = conv["leaf"] if leaf is LEAF else leaf
            if leaf is None:
                return []
            # one scan of the conversation, walked here: a recursive CTE plus a query for the
            # siblings cost more at 1 000 messages (measured), and only the path's rows are decoded
            rows = self._db.execute("SELECT * FROM messages WHERE conversation = ? ORDER BY created, rowid",
                                    (cid,)).fetchall()
        by_id = {r["id"]: r for r in rows}
        kids: dict[str | None, list[str]] = {}
        for r in rows:
            kids.setdefault(r["parent"], []).append(r["id"])
        if leaf not in by_id:
            raise NotFound("message", str(leaf))
        out, cur = [], leaf
        while cur is not None:
            m = self._message(by_id[cur])
            m.siblings = kids.get(m.parent, [m.id])
            out.append(m)
            cur = m.parent
        return out[::-1]

    def conversation(self, owner: str, cid: str) -> dict:
        """A conversation's own fields (id, title, kind, system, created, updated, leaf), no messages."""
        with self._lock:
            return dict(self._own(self._db, owner, cid))

    @staticmethod
    def _message(r: sqlite3.Row) -> Message:
        return Message(r["id"], r["conversation"], r["parent"], r["role"], r["content"],
                       json.loads(r["images"] or "[]"), json.loads(r["meta"] or "{}"), r["created"], r["updated"])

    @staticmethod
    def _path_of(msgs: list[Message], leaf: str | None) -> list[Message]:
        by_id = {m.id: m for m in msgs}
        out = []
        while leaf is not None and leaf in by_id:
            out.append(by_id[leaf])
            leaf = by_id[leaf].parent
        return out[::-1]

    # ------------------------------------------------------------------ export / import
    def export(self, owner: str, cid: str) -> dict:
        """The conversation as JSON (format ``turbostudio-chat`` version 2): ``messages`` is the
        branch shown in version 1's shape (role, content, stats: a version-1 reader still reads
        it), ``tree`` every message with its parent, images and metadata, ``leaf`` the branch shown."""
        self.settled()
        data = self.get(owner, cid)
        by_id = {m["id"]: m for m in data["messages"]}
        shown = [by_id[i] for i in data["path"]]
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "title": data["title"], "kind": data["kind"],
                "system": data["system"], "created": data["created"], "updated": data["updated"],
                "messages": [{"role": m["role"], "content": m["content"],
                              **({"images": m["images"]} if m["images"] else {}),
                              **({"stats": m["meta"]} if m["meta"] else {})} for m in shown],
                "tree": [{k: m[k] for k in ("id", "parent", "role", "content", "images", "meta", "created")}
                         for m in data["messages"]],
                "leaf": data["leaf"]}

    def import_data(self, owner: str, data, kind: str | None = None) -> str:
        """A new conversation from an export: version 2 (the whole tree), version 1 or a bare list
        of OpenAI-style messages (one branch). Raises ValueError saying what is wrong."""
        tree, leaf = parse_export(data)
        meta = data if isinstance(data, dict) else {}
        kind = kind or (meta.get("kind") if meta.get("kind") in KINDS else "chat")
        cid = self.create(owner, kind, title=str(meta.get("title") or ""), system=str(meta.get("system") or ""))
        ids: dict[str, str] = {}
        now = time.time()
        with self._tx() as db:
            for i, m in enumerate(tree):      # parents come before children (parse_export checks)
                new = _new_id()
                ids[m["id"]] = new
                created = float(m.get("created") or now) if isinstance(m.get("created"), (int, float)) else now
                db.execute("INSERT INTO messages (id, conversation, parent, role, content, images, meta, created, "
                           "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (new, cid, ids.get(m["parent"]) if m["parent"] is not None else None, m["role"],
                            m["content"], json.dumps(m["images"]), json.dumps(m["meta"], default=str),
                            created + i * 1e-6, now))
            title = str(meta.get("title") or "") or next(
                (title_from(m["content"]) for m in tree if m["role"] == "user"), "")
            db.execute("UPDATE conversations SET leaf = ?, title = ? WHERE id = ?",
                       (ids.get(leaf) if leaf is not None else None, title_from(title), cid))
        return cid


def parse_export(data) -> tuple[list[dict], str | None]:
    """(tree in parent-first order, leaf id) from an export of any version; ValueError if malformed."""
    if isinstance(data, dict) and data.get("version", 1) not in (1, 2):
        raise ValueError(f"unknown export version {data.get('version')!r} (this app reads 1 and 2)")
    if isinstance(data, dict) and data.get("version") == 2 and "tree" in data:
        raw = data["tree"]
        if not isinstance(raw, list):
            raise ValueError("'tree' must be a list of messages")
        if len(raw) > MAX_IMPORT_MESSAGES:
            raise ValueError(f"{len(raw)} messages; at most {MAX_IMPORT_MESSAGES} may be imported")
        seen: set = set()
        tree = []
        for m in raw:
            if not isinstance(m, dict) or not isinstance(m.get("id"), str):
                raise ValueError("each message of 'tree' needs a string id")
            if m.get("parent") is not None and m["parent"] not in seen:
                raise ValueError(f"message {m['id']!r} comes before its parent {m['parent']!r}")
            tree.append(_checked(m, m["id"], m.get("parent")))
            seen.add(m["id"])
        leaf = data.get("leaf")
        if leaf is not None and leaf not in seen:
            raise ValueError(f"leaf {leaf!r} is not one of the messages")
        return tree, leaf
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list):
        raise ValueError("expected a list of messages")
    if len(msgs) > MAX_IMPORT_MESSAGES:
        raise ValueError(f"{len(msgs)} messages; at most {MAX_IMPORT_MESSAGES} may be imported")
    tree, parent = [], None
    for i, m in enumerate(msgs):
        t = _checked(m, str(i), parent)
        tree.append(t)
        parent = t["id"]
    return tree, parent


def _checked(m, mid: str, parent) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise ValueError("each message needs role user/assistant and text content")
    images = m.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError("a message's images must be a list of file names")
    meta = m.get("meta") if isinstance(m.get("meta"), dict) else m.get("stats")
    return {"id": mid, "parent": parent, "role": m["role"], "content": m["content"], "images": images,
            "meta": meta if isinstance(meta, dict) and m["role"] == "assistant" else {},
            "created": m.get("created")}


def to_markdown(export: dict, details=None) -> str:
    """Markdown of an export's branch shown (``export`` from ``ConversationStore.export``), each
    reply followed by its details line (``details(meta) -> str``), and a note where a message has
    other versions."""
    lines = [f"# {export.get('title') or 'Conversation'}", ""]
    if export.get("system"):
        lines += [f"> **System:** {export['system']}", ""]
    tree = export.get("tree") or []
    kids: dict = {}
    for m in tree:
        kids.setdefault(m["parent"], []).append(m["id"])
    by_id = {m["id"]: m for m in tree}
    path, cur = [], export.get("leaf")
    while cur is not None and cur in by_id:
        path.append(by_id[cur])
        cur = by_id[cur]["parent"]
    for m in path[::-1]:
        sibs = kids.get(m["parent"], [m["id"]])
        head = "**User**" if m["role"] == "user" else "**Assistant**"
        if len(sibs) > 1:
            head += f" (version {sibs.index(m['id']) + 1} of {len(sibs)})"
        lines += [head, ""]
        lines += [f"![image]({os.path.basename(p)})" for p in m.get("images") or []]
        lines += [m["content"], ""]
        if m["role"] == "assistant" and m.get("meta") and details is not None:
            d = details(m["meta"])
            if d:
                lines += [f"<sub>{d}</sub>", ""]
    return "\n".join(lines).rstrip() + "\n"


class ReplyWriter:
    """Writes one streaming assistant reply as it happens: created at its first text, rewritten at
    most every ``interval`` seconds while it streams, and once more at the end with its stats, so a
    crash keeps what streamed up to the last interval. A reply without any text is never written.

    What to write is decided here, when the text is handed in (the reply's id is made then, so a
    caller knows it before the write lands); ``feed``/``finish`` write at once, ``feed_later``/
    ``finish_later`` hand the same writes to the store's writer process (``ConversationStore.write``)."""

    def __init__(self, store: ConversationStore, owner: str, cid: str, parent, meta: dict | None = None,
                 interval: "float | Callable[[], float]" = 0.5):
        """``parent``: the user message replied to (or LEAF); ``meta``: what produced the reply
        (model, backend, params, ...), merged with the stats at ``finish``; ``interval``: seconds
        between two writes while it streams (or a function giving them: fewer under load)."""
        self.store, self.owner, self.cid, self.parent = store, owner, cid, parent
        self.meta = dict(meta or {})
        self.interval = interval
        self.id: str | None = None
        self._last = 0.0
        self._written = ""

    def _interval(self) -> float:
        return self.interval() if callable(self.interval) else self.interval

    def due(self, text: str) -> bool:
        """Whether ``feed(text)`` would write now."""
        if not text:
            return False
        return self.id is None or (text != self._written and time.monotonic() - self._last >= self._interval())

    def _next(self, text: str) -> tuple | None:
        """The write ``feed(text)`` makes now, as (method, args, kwargs), or None (none due)."""
        if not self.due(text):
            return None
        self._last = time.monotonic()
        return self._op(text, {**self.meta, "finish_reason": "streaming"})

    def _last_write(self, text: str, stats: dict | None) -> tuple | None:
        """The write ``finish`` makes (None: no text ever, nothing to write)."""
        if not text and self.id is None:
            return None
        meta = {**self.meta, **(stats or {})}
        return self._op(text, meta, meta=meta)

    def _op(self, text: str, created: dict, **update) -> tuple:
        """The reply's first write creates it (``append`` under an id made now, with ``created`` as
        its metadata); a later one sets its text (and ``update``'s other fields)."""
        self._written = text
        if self.id is None:
            self.id = new_id()
            return ("append", (self.owner, self.cid, "assistant", text),
                    {"parent": self.parent, "meta": created, "mid": self.id})
        return "update", (self.owner, self.id), {"content": text, **update}

    def _hand(self, op: tuple, ack: bool = False) -> Future | None:
        """Hand ``op`` to the store's writer (``ConversationStore.write``)."""
        method, args, kwargs = op
        return self.store.write(method, *args, ack=ack, **kwargs)

    def _now(self, op: tuple | None) -> None:
        if op is not None:
            method, args, kwargs = op
            try:
                getattr(self.store, method)(*args, **kwargs)
            except BaseException:
                if method == "append":          # not written: the next call tries to create it again
                    self.id = None
                raise

    def feed(self, text: str) -> None:
        """The reply so far (the whole text, not a delta), written now if due."""
        self._now(self._next(text))

    def feed_later(self, text: str) -> None:
        """``feed`` handed to the store's writer (``ConversationStore.write``), not waited for."""
        op = self._next(text)
        if op is not None:
            self._hand(op)

    def finish_later(self, text: str, stats: dict | None = None, wait: bool = True) -> Future | None:
        """``finish`` after every ``feed_later`` handed over before it; its future gives the id once
        the write has landed. ``wait`` False: no future (None), and no acknowledgement read back
        from the writer process (a caller that goes on: readers of the store settle anyway)."""
        op = self._last_write(text, stats)
        if not wait:
            if op is not None:
                self._hand(op)
            return None
        out: Future = Future()
        if op is None:
            out.set_result(None)
            return out
        mid = self.id
        landed = self._hand(op, ack=True)

        def done(f: Future) -> None:
            if f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(mid)

        landed.add_done_callback(done)
        return out

    def finish(self, text: str, stats: dict | None = None) -> str | None:
        """The final text and its stats; returns the message id (None when nothing was written)."""
        self._now(self._last_write(text, stats))
        return self.id


__all__ = ["ConversationStore", "Message", "Summary", "NotFound", "ReplyWriter", "LEAF", "KINDS",
           "parse_export", "to_markdown", "title_from", "SCHEMA_VERSION"]
