import sys

from mailgw.signals import defer_sighup

if "run" in sys.argv[1:]:  # before the heavy imports (see mailgw/signals.py)
    defer_sighup()

from mailgw.cli import main  # noqa: E402

main()
