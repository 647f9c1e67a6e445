import sys

from mailgw.signals import defer_sighup, dump_stacks_on_sigusr1

if "run" in sys.argv[1:]:  # before the heavy imports (see mailgw/signals.py)
    defer_sighup()
    dump_stacks_on_sigusr1()

from mailgw.cli import main  # noqa: E402

main()
