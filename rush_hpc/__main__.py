"""``python -m rush_hpc``: the CLI; ``worker`` takes a fast path that skips click (start-up time)."""

import sys


def _main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["worker"] and "--help" not in args:
        import argparse
        import uuid

        parser = argparse.ArgumentParser(prog="rush-hpc worker")
        parser.add_argument("--network", "-n")
        parser.add_argument("--worker-id", action="append", default=[],
                            help="repeatable, or a,b,...: one interpreter forks one worker per id")
        parser.add_argument("--log-dir", default=None, help="with several ids: each writes <log-dir>/<id>.log")
        parser.add_argument("--pid-file", default=None, help="with several ids: '<id> <pid>' lines, once forked")
        parser.add_argument("--fork-server", action="store_true", help=argparse.SUPPRESS)
        parser.add_argument("--room", default=None, help=argparse.SUPPRESS)
        options = parser.parse_args(args[1:])
        if options.fork_server:
            from .forkserver import serve

            sys.exit(serve())
        if not options.network:
            parser.error("the following arguments are required: --network/-n")
        ids = [i for value in options.worker_id for i in value.split(",") if i]  # spawner.split_ids
        if len(ids) > 1 or options.log_dir or options.pid_file:
            from .spawner import run_group

            sys.exit(run_group(options.network, ids or [uuid.uuid4().hex],
                               log_dir=options.log_dir, pid_file=options.pid_file))
        from .bootstrap import main as bootstrap_main

        bootstrap_main(options.network, ids[0] if ids else uuid.uuid4().hex)
    from .cli import main

    main()


_main()
