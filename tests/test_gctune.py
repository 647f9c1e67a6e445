"""mailgw.gctune: a started process hides what it holds from the cyclic collector."""

from __future__ import annotations

import subprocess
import sys

from mailgw.gctune import GEN0


def test_settle_freezes_the_start_up_objects_and_raises_the_young_threshold():
    # In a child: freezing is process-wide and would change the test run's own collector.
    code = (
        "import gc, json\n"
        "import mailgw.worker\n"  # what a worker process imports
        "before = (gc.get_freeze_count(), gc.get_threshold()[0])\n"
        "from mailgw.gctune import settle\n"
        "settle()\n"
        "cycle = []; cycle.append(cycle); del cycle\n"  # a cycle made afterwards
        "young = gc.get_count()[0]\n"
        "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold()[0],"
        " gc.collect(), young]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    import json

    (frozen_before, threshold_before), frozen, threshold, collected, young = json.loads(out)
    assert frozen_before == 0 and threshold_before == 700
    assert frozen > 10_000  # the imported modules' objects
    assert threshold == GEN0
    assert collected >= 1  # a cycle made after settle is still collected
    assert young >= 1
