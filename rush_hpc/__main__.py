"""``python -m rush_hpc``: the CLI; ``worker`` takes a fast path that skips click (start-up time)."""

import sys


def _main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["worker"] and "--help" not in args:
        import argparse
        import uuid

        parser = argparse.ArgumentParser(prog="rush-hpc worker")
        parser.add_argument("--network", "-n", required=True)
        parser.add_argument("--worker-id", default=None)
        options = parser.parse_args(args[1:])
        from .bootstrap import main as bootstrap_main

        bootstrap_main(options.network, options.worker_id or uuid.uuid4().hex)
    from .cli import main

    main()


_main()
