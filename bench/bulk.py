"""Bulk-load rows for the benchmarks that pre-populate a store (sla_sweep_bench.py,
sla_report_bench.py): one transaction, executemany INSERTs on SQLite (times as SQLite's
text), COPY on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any


def quoted(cols: Iterable[str]) -> str:
    return ", ".join(f'"{c}"' for c in cols)


def write_rows(engine: Any, tables: Sequence[tuple[str, Sequence[str], Sequence[tuple]]]) -> None:
    """Insert each (table, columns, rows) in one transaction of the engine's raw driver."""
    sqlite = engine.dialect.name == "sqlite"
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if sqlite:
            cur.execute("BEGIN")
        for table, cols, batch in tables:
            if sqlite:
                cur.executemany(
                    f"INSERT INTO {table} ({quoted(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [tuple(v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime)
                           else v for v in r) for r in batch])
            else:
                with cur.copy(f"COPY {table} ({quoted(cols)}) FROM STDIN") as cp:
                    for r in batch:
                        cp.write_row(r)
        if sqlite:
            cur.execute("COMMIT")
        else:
            raw.commit()
    finally:
        raw.close()
