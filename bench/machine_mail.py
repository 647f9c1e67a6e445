"""Cost of machine-mail classification and reply splitting over the shared corpus.

    .venv/bin/python bench/machine_mail.py

Parses every corpus message once, then times, per message: ``parse_message`` (for scale),
``classify`` (with the raw bytes, as the worker calls it) and the reply split the worker
stores (``mailgw.process._reply_parts``). Prints mean, median, p99 and max. The machine is
shared: compare the three lines of one run with each other, not across runs.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailgw.machine_mail import ours_for  # noqa: E402
from mailgw.mail.classify import classify  # noqa: E402
from mailgw.mail.parse import parse_message  # noqa: E402
from mailgw.process import _reply_parts  # noqa: E402
from mailgw.settings import Settings  # noqa: E402
from mailgw.types import ParseError  # noqa: E402
from tests.corpus import CORPUS, iter_corpus_messages  # noqa: E402


def main() -> None:
    if not CORPUS.is_dir():
        sys.exit(f"corpus not found at {CORPUS}")
    messages = []
    for _, raw in iter_corpus_messages():
        try:
            messages.append((raw, parse_message(raw)))
        except ParseError:
            pass
    settings = Settings.model_validate({"queues": [{"name": "s", "addresses": ["s@example.com"]}]})
    ours = ours_for(settings)
    steps = [
        ("parse_message", lambda raw, mail: parse_message(raw)),
        ("classify", lambda raw, mail: classify(mail, "x@customer.test", raw=raw, ours=ours)),
        ("reply split", lambda raw, mail: _reply_parts(mail)),
    ]
    for label, step in steps:
        times = []
        for raw, mail in messages:
            start = time.perf_counter()
            step(raw, mail)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"{label:>14}: n={len(times)} mean {statistics.mean(times) * 1e6:7.0f} us  "
              f"median {statistics.median(times) * 1e6:6.0f} us  "
              f"p99 {times[int(len(times) * 0.99)] * 1e6:7.0f} us  max {times[-1] * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
