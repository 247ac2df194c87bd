"""The ``rush-hpc`` command line. Logging is configured here, never at import.

Errors print one line and exit 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

import click

from .exceptions import ConfigError, RushError

if TYPE_CHECKING:
    from .controller import Rush


def network_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--network and --url, shared by every subcommand that talks to an existing network."""
    @click.option("--network", "-n", required=True, envvar="RUSH_HPC_NETWORK", help="network name")
    @click.option("--url", envvar="RUSH_HPC_URL", default=None, show_envvar=True,
                  help="Redis URL: redis://[user:password@]host:port/db or rediss://...")
    @functools.wraps(func)
    def wrapper(network: str, url: str | None, **kwargs: Any) -> Any:
        if url is None:
            raise ConfigError("give --url or set RUSH_HPC_URL (the Redis of the network)")
        from .controller import rsh

        rush = rsh(network=network, url=url)
        try:
            return func(rush, **kwargs)
        finally:
            rush.close()

    return wrapper


def output_format(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
                        show_default=True)(func)


def echo_frame(frame, fmt: str) -> None:
    if fmt == "csv":
        click.echo(frame.to_csv(index=False), nl=False)
    elif fmt == "json":
        click.echo(frame.to_json(orient="records", date_format="iso", default_handler=str))
    else:
        click.echo(frame.to_string(index=False) if len(frame) else "(none)")


@click.group()
@click.option("--debug", is_flag=True, help="show tracebacks and debug logs")
@click.version_option(package_name="rush-hpc")
def cli(debug: bool) -> None:
    """rush-hpc: asynchronous, distributed computing over a shared Redis database."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--network", "-n", required=True, envvar="RUSH_HPC_NETWORK", help="network name")
@click.option("--worker-id", default=None, help="worker id (default: a new uuid)")
def worker(network: str, worker_id: str | None) -> None:
    """Run one worker (credentials from $RUSH_HPC_CREDENTIALS, or $RUSH_HPC_URL + $RUSH_HPC_SECRET)."""
    from .bootstrap import main as bootstrap_main

    bootstrap_main(network, worker_id or uuid.uuid4().hex)


@cli.command()
@network_options
def status(rush: Rush) -> None:
    """The <Rush> summary: running workers and task counts."""
    click.echo(str(rush))


@cli.command()
@network_options
@output_format
def workers(rush: Rush, fmt: str) -> None:
    """Worker info: id, state, pid, host, launcher, job id, heartbeat, reason."""
    echo_frame(rush.worker_info, fmt)


@cli.command()
@network_options
@click.option("--state", "states", multiple=True, type=click.Choice(["queued", "running", "finished", "failed"]),
              help="only tasks in these states (repeatable); default: all")
@output_format
def tasks(rush: Rush, states: tuple[str, ...], fmt: str) -> None:
    """Tasks with their inputs, results and state."""
    echo_frame(rush.fetch_tasks_with_state(states or ("queued", "running", "finished", "failed")), fmt)


@cli.command()
@network_options
@click.option("--follow", "-f", is_flag=True, help="keep printing new records until Ctrl-C")
@click.option("--worker-id", "worker_ids", multiple=True, help="only these workers (repeatable)")
def logs(rush: Rush, follow: bool, worker_ids: tuple[str, ...]) -> None:
    """Worker log records stored in Redis."""
    seen = 0
    while True:
        frame = rush.read_log(worker_ids or None)
        for record in frame.iloc[seen:].itertuples():
            click.echo(f"{record.time:%Y-%m-%d %H:%M:%S} {record.worker_id} {record.level} {record.message}")
        seen = len(frame)
        if not follow:
            return
        time.sleep(0.5)


@cli.command()
@network_options
@click.option("--kill", is_flag=True, help="kill now instead of asking the workers to terminate")
@click.option("--worker-id", "worker_ids", multiple=True, help="only these workers (repeatable)")
def stop(rush: Rush, kill: bool, worker_ids: tuple[str, ...]) -> None:
    """Stop workers: terminate gracefully (default) or kill."""
    rush.stop_workers(type="kill" if kill else "terminate", worker_ids=list(worker_ids) or None)
    click.echo(f"{'killed' if kill else 'asked to terminate'}: {', '.join(worker_ids) or 'all workers'}")
    unknown = rush._supervisor.not_force_killed if kill else []
    if unknown:
        click.echo(f"unknown: {len(unknown)} worker(s) did not answer and cannot be killed from here (only the "
                   f"controller that started them knows their hosts): {', '.join(unknown)}")


@cli.command()
@network_options
def lost(rush: Rush) -> None:
    """Detect lost workers now (expired heartbeat, ended process or SLURM job)."""
    ids = rush.detect_lost_workers()
    click.echo("\n".join(ids) if ids else "no lost workers")
    unknown = rush._supervisor.unchecked
    if unknown:
        click.echo(f"unknown: {len(unknown)} running worker(s) cannot be checked from here, only by their heartbeat "
                   f"(only the controller that started them knows their hosts): {', '.join(unknown)}")


@cli.command()
@network_options
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def reset(rush: Rush, yes: bool) -> None:
    """Kill the workers and delete every key of the network."""
    if not yes:
        click.confirm(f"delete every key of network {rush.network!r}?", abort=True)
    rush.reset()
    click.echo(f"network {rush.network} reset")


@cli.command("worker-script")
@network_options
@click.option("--python", default="python3", show_default=True, help="interpreter on the worker's side")
@click.option("--credentials-file", default=None, help="write the secrets to this 0600 file and name it")
@click.option("--show-secrets", is_flag=True, help="print the password and signing secret in clear text")
def worker_script(rush: Rush, python: str, credentials_file: str | None, show_secrets: bool) -> None:
    """The shell line that starts one worker of the network anywhere."""
    click.echo(rush.worker_script(python=python, credentials_file=credentials_file, show_secrets=show_secrets))


@cli.command()
@network_options
@click.option("--interval", default=1.0, show_default=True, help="seconds between refreshes")
@click.option("--iterations", default=0, help="stop after this many refreshes (0: until Ctrl-C)")
def top(rush: Rush, interval: float, iterations: int) -> None:
    """A live view of the workers and task counts."""
    count = 0
    try:
        while True:
            info = rush.worker_info
            lines = [time.strftime("%H:%M:%S"), str(rush), ""]
            if len(info):
                counts = info["state"].value_counts().to_dict()
                lines.append("workers: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
                columns = ["worker_id", "state", "hostname", "launcher", "job_id", "heartbeat"]
                lines.append(info[columns].tail(20).to_string(index=False))
            if sys.stdout.isatty():
                click.clear()
            click.echo("\n".join(lines))
            count += 1
            if iterations and count >= iterations:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@cli.command()
@click.argument("name", type=click.Choice(["random-search", "median-stopping", "bayesian-optimization"]))
@click.option("--workers", "n_workers", default=4, show_default=True, help="number of workers")
@click.option("--tasks", "n_tasks", default=None, type=int, help="finished tasks to stop at (example's default)")
@click.option("--url", envvar="RUSH_HPC_URL", default=None, help="Redis URL; default: an embedded Redis")
@click.option("--network", default=None, help="network name (default: demo-<name>)")
@click.option("--launcher", type=click.Choice(["local", "ssh", "slurm"]), default="local", show_default=True)
@click.option("--host", "hosts", multiple=True, help="ssh: a host (repeatable); --workers per host")
@click.option("--ssh-config", default=None, help="ssh: an ssh_config file")
@click.option("--partition", default=None, help="slurm: partition")
@click.option("--python", default=None, help="ssh/slurm: interpreter on the workers' side")
@click.option("--keep", is_flag=True, help="do not reset the network at the end")
def demo(name: str, n_workers: int, n_tasks: int | None, url: str | None, network: str | None, launcher: str,
         hosts: tuple[str, ...], ssh_config: str | None, partition: str | None, python: str | None,
         keep: bool) -> None:
    """Run one of the vignette's examples."""
    import importlib

    from .controller import rsh

    module = importlib.import_module(f".examples.{name.replace('-', '_')}", __package__)
    options: dict[str, Any] = {}
    if launcher == "ssh":
        if not hosts:
            raise ConfigError("--launcher ssh needs at least one --host")
        options.update(hosts=list(hosts), ssh_config=ssh_config)
    if launcher == "slurm" and partition:
        options["partition"] = partition
    if python:
        options["python"] = python
    if n_tasks is not None:
        options["n_tasks"] = n_tasks
    rush = rsh(network=network or f"demo-{name}", url=url)
    try:
        rush.reset()
        module.run(rush, n_workers=n_workers, launcher=launcher, progress=sys.stderr.isatty(), **options)
    finally:
        if not keep:
            rush.reset()
        rush.close()


def demo_main(name: str) -> None:
    """``python -m rush_hpc.examples.NAME [options]``: the demo command for one example."""
    main(["demo", name, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="rush-hpc", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except RushError as error:
        if "--debug" in args:
            raise
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
