"""The ``rush-hpc`` command line. Logging is configured here, never at import."""

from __future__ import annotations

import functools
import logging
import sys
import uuid
from typing import Any, Callable

import click

from .exceptions import RushError


def network_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--network and --url, shared by every subcommand that talks to a network."""
    func = click.option("--url", envvar="RUSH_HPC_URL", default=None,
                        help="Redis URL (redis://[user:password@]host:port/db or rediss://); "
                             "default: $RUSH_HPC_URL")(func)
    return click.option("--network", "-n", required=True, envvar="RUSH_HPC_NETWORK",
                        help="network name")(func)


@click.group()
@click.option("--debug", is_flag=True, help="show tracebacks and debug logs")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """rush-hpc: asynchronous, distributed computing over a shared Redis database."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--network", "-n", required=True, envvar="RUSH_HPC_NETWORK", help="network name")
@click.option("--worker-id", default=None, help="worker id (default: a new uuid)")
def worker(network: str, worker_id: str | None) -> None:
    """Run one worker (credentials from $RUSH_HPC_CREDENTIALS or $RUSH_HPC_URL + $RUSH_HPC_SECRET)."""
    from .bootstrap import main as bootstrap_main

    bootstrap_main(network, worker_id or uuid.uuid4().hex)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except RushError as error:
        if debug:
            raise
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
