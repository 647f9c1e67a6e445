"""Profiling hook for the gateway process under benchmark load (bench/profile_gateway.py).

``bench/profile_gateway.py`` puts this directory on the gateway's PYTHONPATH with
``MAILGW_GWPROF=DIR`` set. In the gateway process (not in its ``--supervised`` worker
children), every thread then gets its name as its OS thread name (``/proc/PID/task/*/comm``,
so the benchmark can read each thread's CPU time from outside) and, with
``MAILGW_GWPROF_CPROFILE=1``, a cProfile profiler of its own (timed by the thread's CPU
time, so waiting for a lock or the network costs nothing), written to ``DIR/<thread>.prof``
when the process exits. Nothing here is imported by mailgw itself.
"""

import os
import sys

_DIR = os.environ.get("MAILGW_GWPROF")
if _DIR and "--supervised" not in sys.argv and "worker" not in sys.argv:
    import atexit
    import ctypes
    import threading

    _libc = ctypes.CDLL(None)
    _profiles = []  # (thread name, profiler)
    _cprofile = os.environ.get("MAILGW_GWPROF_CPROFILE") == "1"

    def _name_thread(name):
        _libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME

    def _start(name):
        if not _cprofile:
            return None
        import cProfile
        import time

        prof = cProfile.Profile(time.thread_time)  # this thread's CPU time, not the clock
        _profiles.append((name, prof))
        prof.enable()
        return prof

    _run = threading.Thread.run

    def run(self):
        _name_thread(self.name)
        prof = _start(self.name)
        try:
            _run(self)
        finally:
            if prof is not None:
                prof.disable()

    threading.Thread.run = run
    _name_thread("main")
    _start("main")

    @atexit.register
    def _dump():
        for i, (name, prof) in enumerate(_profiles):
            try:
                prof.disable()  # effective for this (the main) thread's profiler only
                prof.dump_stats(os.path.join(_DIR, f"{i:02d}-{name}.prof"))
            except Exception as exc:  # noqa: BLE001 - a profile lost is not an error
                print(f"gwhook: {name}: {exc}", file=sys.stderr)
