"""The cyclic garbage collector of a long-running gateway or worker process.

A worker allocates many short-lived objects a message (the parsed tree, its headers, the
ORM rows and statements of a batch): with CPython's default threshold (a young-generation
collection every 700 allocations net) it ran about 140 young and a dozen middle collections
and a full one per 1,000 messages, and each full collection walked every object the process
holds, the imported modules (SQLAlchemy, the email package, bleach, Jinja2) and the compiled
config included: ~0.1 ms a message, 5-6 % of the worker alone (bench/RESULTS.md, issue 8
session 6). ``settle`` is called once a process has started and loaded its config: what exists
then lives as long as the process and moves out of the collector's sight
(``gc.freeze``), and the young generation is collected every ``GEN0`` allocations instead
of 700 (0.02 ms a message). Reference counting frees almost everything as before; the
collector is only for cycles, and those wait a little longer.

A SIGHUP reload replaces the config after ``settle``: cycles in the old one are not freed (a
few hundred kilobytes a reload at most).
"""

from __future__ import annotations

import gc

GEN0 = 10_000

__all__ = ["GEN0", "settle"]


def settle() -> None:
    """Freeze what the process holds after start-up and collect the young generation less
    often. Idempotent: a later call freezes what has been added since."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0, gen1, gen2)
