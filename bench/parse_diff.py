"""Differential check and CPU cost of parsing and of building the acknowledgement.

``--dump FILE`` writes one line per message: its name and a SHA-256 of every field of the
``ParsedMail`` that ``parse_message`` returns (``repr`` of each, attachments' bytes
included), or of the exception it raised. Two versions of the code must write the same
file over the same messages; run it with each version on ``PYTHONPATH`` and compare with
``diff`` (or ``--compare A B``, which names the fields that differ).

The messages: the generated benchmark corpus (``bench/gen_corpus.py``, ``--count`` per
seed, ``--seeds``) and every message of the shared corpus (``../shared/corpus``, as
``tests/corpus.py`` lists them) unless ``--no-shared``.

``--prepared`` adds to each line a hash of ``reply_parts`` and of ``classify`` of the
result (what ``mailgw.process.prepare`` computes; a made-up envelope).

``--time`` measures, in this process, CPU ms per message of ``parse_message``, of
``reply_parts`` + ``classify`` (``prepare``) and of the
acknowledgement (``Renderer.render`` of ``ack_new``/``ack_followup`` and
``build_message`` with the headers ``mailgw.process`` gives it) over the generated corpus,
in ``--rounds`` rounds (the median is printed).

    PYTHONPATH=. .venv/bin/python bench/parse_diff.py --dump /tmp/after.txt
    PYTHONPATH=/tmp/base .venv/bin/python bench/parse_diff.py --dump /tmp/before.txt
    diff /tmp/before.txt /tmp/after.txt && echo identical
    PYTHONPATH=. .venv/bin/python bench/parse_diff.py --time --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))
sys.path.append(str(ROOT))  # after PYTHONPATH: the code under test comes from there

FIELDS = ("message_id", "in_reply_to", "references", "subject", "from_addr", "from_name",
          "to", "cc", "reply_to", "date", "text", "html", "attachments", "headers", "defects")


def _hash(value: object) -> str:
    # repr keeps types apart (list/tuple, str/None) and is stable for these values.
    return hashlib.sha256(repr(value).encode("utf-8", "surrogatepass")).hexdigest()[:16]


# What mailgw.process.prepare computes from a parsed message (--prepared): the envelope
# is made up, the same for every version compared.
PREPARED = ("reply_parts", "class")


def prepared(parsed, raw: bytes) -> tuple[object, object]:  # type: ignore[no-untyped-def]
    """``reply_parts`` and ``classify`` of a parsed message, as ``process.prepare`` calls
    them (envelope sender: its From; recipient: support@example.com; our address and
    loop header: support@example.com, X-Mailgw-Loop)."""
    from mailgw.mail.classify import Ours, classify
    from mailgw.mail.reply import reply_parts

    ours = Ours(addresses=frozenset({"support@example.com"}), loop_header="X-Mailgw-Loop")
    return (reply_parts(parsed.text, parsed.html),
            classify(parsed, parsed.from_addr or None, raw=raw,
                     rcpt_tos=("support@example.com",), ours=ours))


def digest(raw: bytes, with_prepared: bool = False) -> str:
    """The fields of ``parse_message(raw)``, each hashed, as one line's value; with
    ``with_prepared`` also ``reply_parts`` and ``classify`` of the result."""
    from mailgw.mail.parse import parse_message

    try:
        parsed = parse_message(raw)
    except Exception as exc:  # ParseError for what is not mail; anything else is a bug
        return f"raised {type(exc).__name__}: {exc}"
    out = [type(parsed).__name__]
    for name in FIELDS:
        out.append(f"{name}={_hash(getattr(parsed, name))}")
    if with_prepared:
        for name, value in zip(PREPARED, prepared(parsed, raw), strict=True):
            out.append(f"{name}={_hash(value)}")
    return " ".join(out)


def fingerprint(raw: bytes) -> str:
    """``digest`` in 16 hex characters: one value for the whole result (the golden file)."""
    return hashlib.sha256(digest(raw).encode()).hexdigest()[:16]


# The sample tests/test_parse_fast.py checks against tests/data/parse_golden.txt: a
# generated corpus of its own seed, and every GOLDEN_STEP-th message of the shared corpus.
GOLDEN_SEED, GOLDEN_COUNT, GOLDEN_STEP = 11, 300, 3


def golden_sample() -> Iterator[tuple[str, bytes]]:
    yield from generated([GOLDEN_SEED], GOLDEN_COUNT)
    for index, (name, raw) in enumerate(shared()):
        if index % GOLDEN_STEP == 0:
            yield name, raw


def generated(seeds: list[int], count: int) -> Iterator[tuple[str, bytes]]:
    from gen_corpus import generate

    for seed in seeds:
        for index, (_, raw) in enumerate(generate(count, seed=seed)):
            yield f"gen/{seed}/{index}", raw


def shared() -> Iterator[tuple[str, bytes]]:
    from tests.corpus import CORPUS, iter_corpus_messages

    if CORPUS.is_dir():
        yield from iter_corpus_messages()


def dump(path: Path, seeds: list[int], count: int, with_shared: bool,
         with_prepared: bool = False) -> int:
    n = 0
    with path.open("w") as f:
        sources = [generated(seeds, count)] + ([shared()] if with_shared else [])
        for source in sources:
            for name, raw in source:
                f.write(f"{name} {digest(raw, with_prepared)}\n")
                n += 1
    return n


def compare(a: Path, b: Path) -> int:
    left = dict(line.rstrip("\n").split(" ", 1) for line in a.open())
    right = dict(line.rstrip("\n").split(" ", 1) for line in b.open())
    bad = 0
    for name in sorted(left.keys() | right.keys()):
        x, y = left.get(name), right.get(name)
        if x == y:
            continue
        bad += 1
        if x is None or y is None:
            print(f"{name}: only in {'B' if x is None else 'A'}")
            continue
        fields = [p.split("=")[0] for p, q in zip(x.split(), y.split(), strict=False) if p != q]
        print(f"{name}: {' '.join(fields) or 'differs'}")
    print(f"{len(left)} / {len(right)} messages, {bad} differ")
    return 1 if bad else 0


def _ack_args(parsed, index: int):  # type: ignore[no-untyped-def]
    """What mailgw.process._queue_ack gives render and build_message, for a made-up ticket."""
    number = f"20261127{index:08d}"
    tag = f"[Ticket#{number}]"
    context = {
        "ticket": {"number": number, "title": parsed.subject or "(no subject)", "queue": "raw",
                   "state": "new", "priority": "normal"},
        "article": {"subject": parsed.subject, "from_addr": parsed.from_addr,
                    "from_name": parsed.from_name, "text": parsed.text},
        "customer": parsed.from_addr, "tag": tag,
        "queue": {"name": "Support", "address": "support@example.com"}, "reopened": False,
    }
    return number, tag, context


def time_it(seeds: list[int], count: int, rounds: int) -> None:
    from mailgw.mail.parse import parse_message
    from mailgw.outbound.render import Renderer, build_message

    messages = [raw for _, raw in generated(seeds, count)]
    renderer = Renderer(ROOT / "templates")
    parsed = [parse_message(raw) for raw in messages]  # warm: imports, caches
    acks = [_ack_args(p, i) for i, p in enumerate(parsed)]

    def ack_all() -> None:
        for i, (p, (number, tag, context)) in enumerate(zip(parsed, acks, strict=True)):
            template = "ack_new" if i % 3 else "ack_followup"
            rendered = renderer.render(template, context)
            refs = [*p.references, *([p.message_id] if p.message_id else [])][-19:]
            build_message(
                from_addr="support@example.com", from_name="Example Support",
                to=[p.from_addr or "someone@example.net"], subject=f"{tag} {rendered.subject}",
                body=rendered.body, message_id=f"mailgw.{i}.1795000000.0123456789ab.abc@example.com",
                in_reply_to=p.message_id, references=refs,
                extra_headers={"Auto-Submitted": "auto-replied", "X-Auto-Response-Suppress": "All",
                               "Precedence": "bulk", "X-Mailgw-Loop": "support@example.com",
                               "X-Mailgw-Ticket": number})

    def parse_all() -> None:
        for raw in messages:
            parse_message(raw)

    def prepare_all() -> None:
        for p, raw in zip(parsed, messages, strict=True):
            prepared(p, raw)

    results: dict[str, list[float]] = {"parse": [], "prepare": [], "ack": []}
    for _ in range(rounds):
        for label, fn in (("parse", parse_all), ("prepare", prepare_all), ("ack", ack_all)):
            start = time.process_time()
            fn()
            results[label].append((time.process_time() - start) / len(messages) * 1000)
    load = os.getloadavg()[0]
    for label, values in results.items():
        runs = " ".join(f"{v:.3f}" for v in values)
        print(f"{label}: {statistics.median(values):.3f} ms CPU/msg (runs {runs}), "
              f"{len(messages)} messages, load {load:.1f}")


def main() -> None:
    # The email package picks a random boundary when it serialises an attached message that
    # has none: seeded, two runs' fingerprints compare (review, session 6).
    random.seed(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path)
    ap.add_argument("--golden", type=Path,
                    help="write the sample's fingerprints (tests/data/parse_golden.txt)")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-shared", action="store_true")
    ap.add_argument("--prepared", action="store_true",
                    help="--dump: also reply_parts and classify of each message")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    import mailgw

    print(f"mailgw from {Path(mailgw.__file__).parent}", file=sys.stderr)
    if args.compare:
        sys.exit(compare(*args.compare))
    if args.golden:
        with args.golden.open("w") as f:
            for name, raw in golden_sample():
                f.write(f"{name} {fingerprint(raw)}\n")
    if args.dump:
        start = time.monotonic()
        n = dump(args.dump, seeds, args.count, not args.no_shared, args.prepared)
        print(f"{n} messages in {time.monotonic() - start:.1f} s -> {args.dump}")
    if args.time:
        time_it(seeds[:1], args.count, args.rounds)


if __name__ == "__main__":
    main()
