"""``profile_worker.py`` with one SLA configured, so that every ticket gets its clocks.

The same arguments and output as ``profile_worker.py`` (``--store``, ``--count``, ``--seed``,
``--dump``, ``--profile``...); the home it makes has an SLA with first response, update and
solution goals and two notice levels (issue 6), so a new ticket starts two clocks and a
follow-up reads them.

    .venv/bin/python bench/profile_worker_sla.py --count 1000
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SLA = {"name": "standard", "first_response": 60, "update": 120, "solution": 480,
       "levels": [{"percent": 75}, {"percent": 100}]}


def main() -> None:
    import profile_worker
    import yaml

    import mailgw.home

    init_home = mailgw.home.init_home

    def with_sla(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = init_home(path, *args, **kwargs)
        config = Path(path) / "config/mailgw.yaml"
        data = yaml.safe_load(config.read_text())
        data["slas"] = [SLA]
        config.write_text(yaml.safe_dump(data))
        return out

    mailgw.home.init_home = with_sla  # profile_worker imports it inside main()
    profile_worker.main()


if __name__ == "__main__":
    main()
