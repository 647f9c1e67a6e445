"""Where the end-to-end time goes (bench/smtp_bench.py ``--stats``; issue 8, session 4).

``smtp_bench.py --stats`` puts this directory on the PYTHONPATH of ``mailgw run`` (and so of
its worker processes) with ``MAILGW_E2ESTATS=DIR`` set. In every such process it counts, and
writes to ``DIR/<pid>.json`` at exit:

- SQLite: the wall time and count of ``BEGIN IMMEDIATE`` (the wait for the write lock,
  SQLite's busy handler sleeping included), of ``COMMIT`` (the WAL write and its fsync) and
  how long the write lock was held (``BEGIN IMMEDIATE`` returned until commit or rollback),
  by thread name; ``sqlite3.connect`` is given a connection class whose cursors time them;
- the worker thread: batches run, messages handled, time inside ``run_batch`` and time
  waiting for a wake-up, and the number of passes that found nothing to claim;
- the sender thread: passes, mails sent, time inside ``run_once`` and waiting;
- (session 6) each process's ``/proc/self/io`` at exit, the WAL file's largest size (the
  gateway samples it every 5 ms), and the worker's ``_waiting``, ``_gather``, ``_claim_in``.

(Session 7) ``MAILGW_E2E_SWITCH=0.0005`` sets ``sys.setswitchinterval`` in each process.

Experiments (session 6): ``MAILGW_E2E_PRAGMAS="a=1;b=2"`` runs those PRAGMAs on every SQLite
connection; ``MAILGW_E2E_GC=freeze`` calls ``gc.freeze()`` when a worker thread starts.
(Session 7) ``MAILGW_E2E_WORKER="linger=0.05;min_batch=48"`` sets those attributes on each
worker before its first claim; ``MAILGW_E2E_INTAKE_LINGER=0.005`` the intake writer's
linger (``mailgw.queue.LINGER``); ``MAILGW_E2E_PROFILE=worker`` profiles the named threads
(cProfile, thread CPU) into ``DIR/<role>-<pid>-<thread>.prof``.

With ``MAILGW_E2E_FLOCK=1`` (``smtp_bench.py --flock``), an experiment: SQLite writers queue
on ``flock`` of ``<db>-wlock`` before ``BEGIN IMMEDIATE`` (released at commit or rollback), so
the next writer is woken at once instead of by the busy handler's next poll.

Nothing here is imported by mailgw itself; without ``MAILGW_E2ESTATS`` it does nothing.
"""

import os

_DIR = os.environ.get("MAILGW_E2ESTATS")
if _DIR:
    import atexit
    import fcntl
    import json
    import sqlite3
    import threading
    import time

    _FLOCK = os.environ.get("MAILGW_E2E_FLOCK") == "1"
    if os.environ.get("MAILGW_E2E_SWITCH"):
        # Experiment (session 7): the interpreter's switch interval (default 0.005 s), the
        # longest a thread waits to take the GIL back from a thread running Python.
        import sys

        sys.setswitchinterval(float(os.environ["MAILGW_E2E_SWITCH"]))
    _phase = threading.local()  # the timed loop method running on this thread
    _stats = {}  # key -> [count, seconds]
    _lock = threading.Lock()

    def _add(key, dt, n=1):
        with _lock:
            c = _stats.setdefault(key, [0, 0.0])
            c[0] += n
            c[1] += dt

    class _Cursor(sqlite3.Cursor):
        def execute(self, sql, *args):
            head = sql[:16].upper() if isinstance(sql, str) else ""
            if head.startswith(("BEGIN", "COMMIT")):
                t = time.perf_counter()
                if _FLOCK and head.startswith("BEGIN IMMEDIATE"):
                    self.connection._lock()
                try:
                    return super().execute(sql, *args)
                finally:
                    kind = head.split()[0] + (" " + head.split()[1] if head.startswith("BEGIN")
                                              and len(head.split()) > 1 else "")
                    t1 = time.perf_counter()
                    _add(f"sqlite {kind} [{threading.current_thread().name}]", t1 - t)
                    if kind == "BEGIN IMMEDIATE":
                        self.connection._held = t1
                        self.connection._held_cpu = time.thread_time()
                    elif kind == "COMMIT":
                        self.connection._release()
            return super().execute(sql, *args)

    class _Connection(sqlite3.Connection):
        def cursor(self, factory=_Cursor):
            return super().cursor(factory)

        _held = None  # when this connection's BEGIN IMMEDIATE returned (holds the lock)

        _lockfd = None

        def _lock(self):
            # Experiment (MAILGW_E2E_FLOCK=1): writers queue on a kernel lock of a file
            # beside the database before BEGIN IMMEDIATE, and are woken the moment it is
            # released, instead of SQLite's busy handler polling in sleeps of 1..100 ms.
            if self._lockfd is None:
                db = self.execute("PRAGMA database_list").fetchone()[2]
                self._lockfd = os.open(db + "-wlock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)

        def _unlock(self):
            if self._lockfd is not None:
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)

        def _release(self):
            if _FLOCK:
                self._unlock()
            if self._held is not None:
                name = threading.current_thread().name
                _add(f"sqlite write lock held [{name}]", time.perf_counter() - self._held)
                # The same, as the holder's thread CPU (steadier than the wall time on a
                # shared machine, where a holder is often descheduled), and by the loop
                # method it was taken in (worker _claim / _store, ...; session 5).
                _add(f"sqlite write lock held, thread CPU [{name}]",
                     time.thread_time() - self._held_cpu)
                phase = getattr(_phase, "name", None)
                if phase:
                    _add(f"sqlite write lock held [{name}] in {phase}",
                         time.perf_counter() - self._held)
                self._held = None

        def commit(self):
            t = time.perf_counter()
            if self._held is not None:
                # (session 7) The part of the hold before COMMIT: the holder's statements.
                # The rest is COMMIT itself: the WAL write and fsync under the lock, then,
                # after SQLite let the lock go, the thread's wait to take the GIL back
                # (up to a switch interval when another thread of the process runs Python):
                # "held" counts that wait as held, "held before COMMIT" does not.
                _add(f"sqlite write lock held before COMMIT [{threading.current_thread().name}]",
                     t - self._held)
            try:
                return super().commit()
            finally:
                _add(f"sqlite commit() [{threading.current_thread().name}]",
                     time.perf_counter() - t)
                self._release()

        def rollback(self):
            try:
                return super().rollback()
            finally:
                self._release()

    _connect = sqlite3.connect
    # Experiment (issue 8, session 6): MAILGW_E2E_PRAGMAS="mmap_size=268435456;..." is run
    # as PRAGMAs on every SQLite connection these processes open, to compare settings
    # without a change to mailgw.
    _PRAGMAS = [p.strip() for p in os.environ.get("MAILGW_E2E_PRAGMAS", "").split(";")
                if p.strip()]

    def connect(*args, **kw):
        kw.setdefault("factory", _Connection)
        conn = _connect(*args, **kw)
        for p in _PRAGMAS:
            conn.execute(f"PRAGMA {p}").fetchall()
        return conn

    sqlite3.connect = connect
    sqlite3.dbapi2.connect = connect  # what SQLAlchemy's pysqlite dialect calls

    _thread_run = threading.Thread.run

    def _patch(name):
        """Wrap the loop methods once the thread that runs them starts (modules imported)."""
        import sys

        if name == "worker" and "mailgw.worker" in sys.modules:
            cls = sys.modules["mailgw.worker"].Worker
            if not getattr(cls, "_e2e", False):
                cls._e2e = True
                batch = cls.run_batch

                def run_batch(self):
                    t = time.perf_counter()
                    n = batch(self)
                    dt = time.perf_counter() - t
                    _add("worker run_batch" if n else "worker empty pass", dt)
                    _add("worker messages", 0.0, n)
                    return n

                cls.run_batch = run_batch
                tune = dict(kv.split("=") for kv in
                            os.environ.get("MAILGW_E2E_WORKER", "").split(";") if kv)
                if tune:
                    # Experiment (session 7): MAILGW_E2E_WORKER="linger=0.05;min_batch=48;
                    # batch_size=128" set on each worker before its first claim.
                    claim = cls._claim

                    def tuned_claim(self):
                        if not getattr(self, "_e2e_tuned", False):
                            self._e2e_tuned = True
                            for k, v in tune.items():
                                setattr(self, k, type(getattr(self, k))(float(v)))
                        return claim(self)

                    cls._claim = tuned_claim
                for meth in ("_claim", "_parse", "_store", "release_next", "_release",
                             "_waiting", "_gather", "_claim_in"):
                    _time_method(cls, meth, f"worker {meth}")
                _wrap_wait("worker")
        if name == "intake-writer" and os.environ.get("MAILGW_E2E_INTAKE_LINGER"):
            # Experiment (session 7): the intake writer's linger (mailgw.queue.LINGER).
            writer = getattr(getattr(threading.current_thread(), "_target", None), "__self__",
                             None)
            if writer is not None:
                writer.linger = float(os.environ["MAILGW_E2E_INTAKE_LINGER"])
        if name == "worker" and os.environ.get("MAILGW_E2E_GC") == "freeze":
            # Experiment (session 6): the objects that exist when the worker starts (modules,
            # mappers, settings, filters) are left out of the cyclic collector's passes.
            import gc

            gc.freeze()
        if name == "sender" and "mailgw.outbound.sender" in sys.modules:
            cls = sys.modules["mailgw.outbound.sender"].Sender
            if not getattr(cls, "_e2e", False):
                cls._e2e = True
                once = cls.run_once

                def run_once(self, stop=None):
                    t = time.perf_counter()
                    n = once(self, stop)
                    _add("sender run_once" if n else "sender empty pass",
                         time.perf_counter() - t)
                    _add("sender mails", 0.0, n)
                    return n

                cls.run_once = run_once
                for meth in ("_claim", "_record", "_release"):
                    _time_method(cls, meth, f"sender {meth}")
                _wrap_wait("sender")

    def _time_method(cls, meth, key):
        orig = getattr(cls, meth)

        def timed(self, *args, **kw):
            t, c = time.perf_counter(), time.thread_time()
            outer, _phase.name = getattr(_phase, "name", None), meth
            try:
                return orig(self, *args, **kw)
            finally:
                _phase.name = outer
                _add(key, time.perf_counter() - t)
                _add(key + " (thread CPU)", time.thread_time() - c)

        setattr(cls, meth, timed)

    _waiters = set()  # names of the threads whose Event.wait is timed
    _event_wait = threading.Event.wait

    def _timed_wait(self, timeout=None):
        name = threading.current_thread().name
        if name not in _waiters:
            return _event_wait(self, timeout)
        t = time.perf_counter()
        r = _event_wait(self, timeout)
        _add(f"{name} wait ({'woken' if r else 'timed out'})", time.perf_counter() - t)
        return r

    def _wrap_wait(name):
        # Time in Event.wait on the loop's thread: waiting for a wake-up (or the poll).
        _waiters.add(name)
        threading.Event.wait = _timed_wait

    _PROFILE = os.environ.get("MAILGW_E2E_PROFILE", "")  # thread names, comma-separated

    def run(self):
        try:
            _patch(self.name)
        except Exception as exc:  # noqa: BLE001 - statistics lost are not an error
            print(f"e2ehook: {exc}", flush=True, file=__import__("sys").stderr)
        if self.name not in _PROFILE.split(","):
            _thread_run(self)
            return
        # Experiment (session 7): MAILGW_E2E_PROFILE=worker,sender profiles those threads
        # (cProfile on the thread's CPU clock) into DIR/<role>-<pid>-<thread>.prof.
        import cProfile
        import sys

        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            _thread_run(self)
        finally:
            prof.disable()
            role = "worker-process" if "--supervised" in sys.argv else "gateway"
            prof.dump_stats(os.path.join(_DIR, f"{role}-{os.getpid()}-{self.name}.prof"))

    threading.Thread.run = run

    def _wal_sampler():
        # The WAL file's largest size during the run (session 6: checkpoints), sampled
        # every 5 ms by the gateway process (not its workers).
        import sys

        url = os.environ.get("MAILGW_STORE_URL", "")
        if not url.startswith("sqlite:///"):
            return
        wal = url[len("sqlite:///"):] + "-wal"
        biggest = _wal_max

        def sample():
            time.sleep(0.2)  # sys.argv is not set yet while sitecustomize runs
            if "--supervised" in getattr(sys, "argv", ()):
                return
            while True:
                try:
                    biggest[0] = max(biggest[0], os.stat(wal).st_size)
                except OSError:
                    pass
                time.sleep(0.005)

        threading.Thread(target=sample, name="e2e-wal-sampler", daemon=True).start()

    _wal_max = [0]
    _wal_sampler()

    @atexit.register
    def _dump():
        import sys

        role = "worker-process" if "--supervised" in sys.argv else "gateway"
        if _wal_max[0]:
            _add("wal file max size (total: MB/1000)", _wal_max[0] / 1e9)
        # The process's I/O (session 6): bytes and read/write calls, the WAL's and the
        # database file's included (rchar/wchar: every read()/write(), page cache hits too).
        try:
            with open("/proc/self/io") as f:
                for line in f:
                    k, v = line.split(":")
                    if k in ("rchar", "wchar", "syscr", "syscw", "write_bytes"):
                        _add(f"io {k} (n: processes, total: value/1000)", int(v) / 1e6)
        except OSError:
            pass
        try:
            with open(os.path.join(_DIR, f"{role}-{os.getpid()}.json"), "w") as f:
                json.dump(_stats, f)
        except OSError:
            pass
