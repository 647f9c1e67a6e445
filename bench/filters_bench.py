"""Filter pipeline speed: 200 rules of mixed kinds over real messages.

    .venv/bin/python bench/filters_bench.py [--rules 200] [--messages 2000] [--rounds 5]

Measures rule evaluation only (MessageView + Pipeline.run on mail parsed beforehand): what
the worker adds per message. The target is under 0.2 ms per message for 200 rules. Messages
come from ../shared/corpus (the Apache list mboxes and the rest); without it, generated ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgw.filters.engine import MessageView  # noqa: E402
from mailgw.filters.loader import load_pipeline  # noqa: E402
from mailgw.mail.parse import parse_message  # noqa: E402
from mailgw.settings import Settings  # noqa: E402

KINDS = [
    # (condition, action) templates; {i} makes every rule distinct, as real rule sets are.
    ("sender_domain: {{one_of: [customer{i}.example, partner{i}.example]}}",
     "company: Customer {i}"),
    (r"subject: {{regex: '(?i)\b(order|ticket)[ -]?#?{i}\d*\b'}}", "tags: [order-{i}]"),
    ("subject: 'project-{i} '", "category: project-{i}"),
    ("header: {{name: X-Customer-Id, equals: 'C{i}'}}", "fields: {{customer_id: 'C{i}'}}"),
    ("recipient: {{equals: 'team{i}@example.com'}}", "queue: billing"),
    ("all: [{{spam: {{score_above: {i}.5}}}}, {{not: {{sender_domain: trusted{i}.example}}}}]",
     "priority: 5"),
    ("body: 'reference code rc-{i}-'", "tags: [rc-{i}]"),
    ("any: [{{sender: {{equals: 'ceo{i}@bigcorp.example'}}}}, "
     "{{header: {{name: X-Priority, equals: '{i}'}}}}]", "urgency: high"),
    (r"attachment: {{name: {{regex: '(?i)^invoice-{i}\d+\.pdf$'}}}}", "queue: billing"),
    ("follow_up: false\n      subject: {{regex: '(?i)^\\[svc{i}\\]'}}", "service: svc{i}"),
]


def make_rules(n: int) -> str:
    lines = ["rules:"]
    for i in range(n):
        cond, action = KINDS[i % len(KINDS)]
        k = i // len(KINDS)
        lines += [f"  - name: rule-{i:03d}", "    when:",
                  f"      {cond.format(i=k)}", f"    then: {{{action.format(i=k)}}}"]
    return "\n".join(lines) + "\n"


def messages(limit: int) -> list:
    corpus = ROOT.parent / "shared" / "corpus"
    out = []
    if corpus.is_dir():
        sys.path.insert(0, str(ROOT))
        from tests.corpus import iter_corpus_messages

        for _, raw in iter_corpus_messages(corpus):
            try:
                out.append(parse_message(raw))
            except Exception:  # noqa: BLE001 - not mail; the worker would quarantine it
                continue
            if len(out) >= limit:
                break
    while len(out) < min(limit, 200):
        i = len(out)
        raw = (f"From: user{i}@customer{i % 30}.example\r\nTo: support@example.com\r\n"
               f"Subject: Order #{i} is late\r\nX-Spam-Score: {i % 9}.1\r\n\r\n"
               f"Hello, reference code rc-{i % 25}-x.\r\n").encode()
        out.append(parse_message(raw))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-index", action="store_true",
                    help="run every rule in full (no prefilter), for comparison")
    args = ap.parse_args()
    settings = Settings.model_validate({"queues": [
        {"name": "support", "addresses": ["support@example.com"]},
        {"name": "billing", "addresses": ["billing@example.com"]}]})
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "filters"
        d.mkdir()
        (d / "bench.yaml").write_text(make_rules(args.rules))
        t0 = time.perf_counter()
        pipeline = load_pipeline(d, settings)
        if args.no_index:
            pipeline.index = None
        load_ms = (time.perf_counter() - t0) * 1000
    mails = messages(args.messages)
    rcpts = ("support@example.com",)
    per_round = []
    matched = 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for mail in mails:
            _, trace = pipeline.run(MessageView(mail, queue="support", rcpt_tos=rcpts))
        per_round.append((time.perf_counter() - t0) / len(mails) * 1000)
    for mail in mails:
        matched += len(pipeline.run(MessageView(mail, queue="support"))[1].matched)
    anchored = sum(r.guard is not None for r in pipeline.rules)
    print(f"rules: {len(pipeline.rules)} (loaded and compiled in {load_ms:.0f} ms); "
          f"prefilter: {'off' if args.no_index else f'{anchored} rules anchored'}")
    print(f"messages: {len(mails)}, rounds: {args.rounds}, rule hits per message: "
          f"{matched / len(mails):.2f}")
    print(f"evaluation per message: median {statistics.median(per_round):.4f} ms, "
          f"best {min(per_round):.4f} ms, worst {max(per_round):.4f} ms")
    target = 0.2
    verdict = "OK" if statistics.median(per_round) < target else "TOO SLOW"
    print(f"target < {target} ms per message: {verdict}")


if __name__ == "__main__":
    main()
