"""The ``rush-hpc`` command line. Logging is configured here, never at import.

Errors print one line and exit 1 (``--debug`` shows the traceback). Tables show 8-character ids
(``--full-ids`` for all 32) and local times with their UTC offset; csv / json keep everything.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click

from .exceptions import ConfigError, RedisUnavailableError, RushError
from .frames import SHORT_ID_LENGTH, format_local, short_ids, to_local_times

if TYPE_CHECKING:
    import pandas as pd

    from .config import RedisConfig
    from .controller import Rush

#: seconds a Redis gets to answer the CLI's first PING: a port that accepts but never answers
#: (not Redis, or TLS expected) must not hang the command for the 60 s socket timeout
PROBE_TIMEOUT = 3.0
TIME_COLUMNS = ("launched_at", "started_at", "ended_at", "heartbeat")


def probe(config: RedisConfig, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail within seconds, in one line, when ``config`` does not point at a Redis that answers.

    Wrong passwords and refused connections are left to ``rsh()``, whose messages name the fix.
    """
    import redis

    client = config.client(socket_timeout=timeout, outage_timeout=0)
    try:
        client.ping()
    except redis.TimeoutError:
        raise RedisUnavailableError(
            f"{config} accepted the connection but did not answer within {timeout:g} s: is it a Redis "
            "server (and does it expect TLS, rediss://)?") from None
    except redis.exceptions.InvalidResponse as error:
        raise RedisUnavailableError(f"{config} does not speak the Redis protocol ({error}): check the "
                                    "host and port") from None
    except redis.ConnectionError as error:
        if "protocol" in str(error).lower():
            raise RedisUnavailableError(f"{config} does not speak the Redis protocol ({error}): check the "
                                        "host and port") from None
    except redis.RedisError:
        pass
    finally:
        client.close()


def network_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--network and --url, shared by every subcommand that talks to an existing network."""
    @click.option("--network", "-n", required=True, envvar="RUSH_HPC_NETWORK", help="network name")
    @click.option("--url", envvar="RUSH_HPC_URL", default=None, show_envvar=True,
                  help="Redis URL: redis://[user:password@]host:port/db or rediss://...")
    @functools.wraps(func)
    def wrapper(network: str, url: str | None, **kwargs: Any) -> Any:
        if url is None:
            raise ConfigError("give --url or set RUSH_HPC_URL (the Redis of the network)")
        from .config import RedisConfig
        from .controller import rsh

        probe(RedisConfig.from_url(url))
        rush = rsh(network=network, url=url)
        try:
            return func(rush, **kwargs)
        finally:
            rush.close()

    return wrapper


def output_format(func: Callable[..., Any]) -> Callable[..., Any]:
    """--format, --limit and --full-ids: shared by the commands that print a frame."""
    func = click.option("--full-ids", is_flag=True, help="show 32-character ids in tables (default: 8)")(func)
    func = click.option("--limit", type=click.IntRange(min=1), default=None,
                        help="show only the N most recent rows")(func)
    return click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
                        show_default=True, help="table for people (short ids); csv / json keep everything")(func)


def echo_frame(frame: pd.DataFrame, fmt: str, limit: int | None = None, full_ids: bool = False) -> None:
    """Print ``frame``: csv / json in full, a table with short ids and local times."""
    total = len(frame)
    if limit is not None:
        frame = frame.tail(limit)
    frame = to_local_times(frame, TIME_COLUMNS)
    if fmt == "csv":
        click.echo(frame.to_csv(index=False), nl=False)
    elif fmt == "json":  # local ISO times with their offset (pandas would write UTC)
        for column in TIME_COLUMNS:
            if column in frame.columns:
                frame[column] = frame[column].map(lambda t: None if t is None or t != t else t.isoformat())
        click.echo(frame.to_json(orient="records", date_format="iso", default_handler=str))
    else:
        table = frame if full_ids else short_ids(frame)
        click.echo(table.to_string(index=False) if len(frame) else "(none)")
        if len(frame) < total:
            click.echo(f"({len(frame)} of {total} rows; --limit)", err=True)


def network_exists(rush: Rush) -> bool:
    """Whether the network has workers, tasks or a stored worker loop.

    Log records alone do not count: a worker's last record may land just after a reset.
    """
    keys = rush.keys
    return bool(rush.redis.exists(keys.workers, keys.all_tasks, keys.payload, keys.payload_meta))


def require_network(rush: Rush) -> None:
    if not network_exists(rush):
        raise ConfigError(f"network {rush.network!r} does not exist at {rush.config} (no workers, tasks or "
                          "worker loop): check --network / RUSH_HPC_NETWORK")


def resolve_worker_ids(rush: Rush, given: Sequence[str]) -> list[str]:
    """Full ids for ``given`` ids or unique prefixes (tables show 8 characters); unknown ones raise."""
    known = rush.worker_ids
    resolved, unknown = [], []
    for value in given:
        matches = [w for w in known if w == value] or [w for w in known if w.startswith(value)]
        if len(matches) == 1:
            resolved.append(matches[0])
        elif len(matches) > 1:
            raise ConfigError(f"worker id {value!r} matches {len(matches)} workers of network {rush.network!r}: "
                              "give more characters")
        else:
            unknown.append(value)
    if unknown:
        raise ConfigError(f"unknown worker id(s) in network {rush.network!r}: {', '.join(unknown)} "
                          "(`rush-hpc workers` lists them)")
    return resolved


def worker_table(info: pd.DataFrame, now: float, full_ids: bool = False, width: int = 100) -> list[str]:
    """One line per worker, within ``width`` columns: id, state, host, pid, launcher, job, start, beat, reason."""
    import pandas as pd

    id_width = 32 if full_ids else SHORT_ID_LENGTH

    def seconds(value: Any) -> float | None:
        return None if value is None or pd.isna(value) else float(pd.Timestamp(value).timestamp())

    lines = [f"{'worker_id':<{id_width}}  {'state':<10}  {'host':<14}  {'pid':>7}  {'launcher':<8}  "
             f"{'job_id':<10}  {'started':<15}  {'beat':>5}  reason"]
    for row in info.itertuples(index=False):
        host = row.hostname if isinstance(row.hostname, str) else row.host if isinstance(row.host, str) else "-"
        started = seconds(row.started_at) or seconds(row.launched_at)
        beat = seconds(row.heartbeat)
        reason = row.reason.strip().splitlines()[0] if isinstance(row.reason, str) and row.reason.strip() else ""
        text = (f"{row.worker_id[:id_width]:<{id_width}}  {str(row.state):<10}  {host[:14]:<14}  "
                f"{str(row.pid or '-')[:7]:>7}  {str(row.launcher or '-')[:8]:<8}  {str(row.job_id or '-')[:10]:<10}  "
                f"{format_local(started, with_date=False):<15}  "
                f"{f'{max(0.0, now - beat):.1f}s' if beat else '-':>5}  {reason}")
        lines.append(text if len(text) <= width else text[:width - 3] + "...")
    return lines


@click.group()
@click.option("--debug", is_flag=True, help="show tracebacks and debug logs")
@click.version_option(package_name="rush-hpc")
def cli(debug: bool) -> None:
    """rush-hpc: asynchronous, distributed computing over a shared Redis database."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--network", "-n", required=True, envvar="RUSH_HPC_NETWORK", help="network name")
@click.option("--worker-id", "worker_ids", multiple=True,
              help="worker id (default: a new uuid); repeatable or a,b,...: one interpreter forks one "
              "worker per id")
@click.option("--log-dir", default=None, help="with several ids: each worker writes <log-dir>/<id>.log")
@click.option("--pid-file", default=None, help="with several ids: '<id> <pid>' lines, once all are forked")
def worker(network: str, worker_ids: tuple[str, ...], log_dir: str | None, pid_file: str | None) -> None:
    """Run one worker, or several forked from this interpreter (credentials from
    $RUSH_HPC_CREDENTIALS, or $RUSH_HPC_URL + $RUSH_HPC_SECRET)."""
    from .spawner import split_ids

    ids = split_ids(worker_ids)
    if len(ids) > 1 or log_dir or pid_file:
        from .spawner import run_group

        sys.exit(run_group(network, ids or [uuid.uuid4().hex], log_dir=log_dir, pid_file=pid_file))
    from .bootstrap import main as bootstrap_main

    bootstrap_main(network, ids[0] if ids else uuid.uuid4().hex)


@cli.command()
@network_options
def status(rush: Rush) -> None:
    """The <Rush> summary: running workers and task counts (and the elastic-workers policy, if any)."""
    click.echo(str(rush))
    policy = rush.adapt_status()
    if policy:
        line = (f"* Adapt: {policy.get('status')} ({policy.get('launcher')}, {policy.get('minimum')}.."
                f"{policy.get('maximum')} workers, {policy.get('alive', '?')} alive, {policy.get('started')} "
                f"started; controller {policy.get('controller')})")
        click.echo(line + (f"\n  {policy['error']}" if policy.get("error") else ""))


@cli.command()
@network_options
@output_format
def workers(rush: Rush, fmt: str, limit: int | None, full_ids: bool) -> None:
    """Worker info: id, state, host, pid, launcher, job id, start, heartbeat age, reason.

    The table fits 100 columns (the reason's first line, shortened); csv / json have every field.
    """
    info = rush.worker_info
    if len(info):
        info = info.sort_values(["launched_at", "started_at", "worker_id"], na_position="first")
    if fmt != "table":
        echo_frame(info, fmt, limit, full_ids)
        return
    if not len(info):
        click.echo("(none)")
        return
    shown = info.tail(limit) if limit is not None else info
    click.echo("\n".join(worker_table(shown, time.time(), full_ids)))
    if len(shown) < len(info):
        click.echo(f"({len(shown)} of {len(info)} workers; --limit)", err=True)


@cli.command()
@network_options
@click.option("--state", "states", multiple=True, type=click.Choice(["queued", "running", "finished", "failed"]),
              help="only tasks in these states (repeatable); default: all")
@output_format
def tasks(rush: Rush, states: tuple[str, ...], fmt: str, limit: int | None, full_ids: bool) -> None:
    """Tasks with their inputs, results and state (in creation order; --limit: the newest)."""
    echo_frame(rush.fetch_tasks_with_state(states or ("queued", "running", "finished", "failed")), fmt, limit,
               full_ids)


@cli.command()
@network_options
@click.option("--follow", "-f", is_flag=True, help="keep printing new records until Ctrl-C")
@click.option("--worker-id", "worker_ids", multiple=True, help="only these workers (id or prefix; repeatable)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="start with only the N newest records")
@click.option("--full-ids", is_flag=True, help="show 32-character worker ids (default: 8)")
@click.option("--interval", default=0.5, show_default=True, help="--follow: seconds between reads")
def logs(rush: Rush, follow: bool, worker_ids: tuple[str, ...], limit: int | None, full_ids: bool,
         interval: float) -> None:
    """Worker log records stored in Redis (local time with the UTC offset).

    --follow keeps up by record sequence number, also once the log reached its cap.
    """
    from .logs import LogFollower

    wanted = resolve_worker_ids(rush, worker_ids) if worker_ids else None
    follower = LogFollower(rush.redis, rush.keys.log)
    id_width = 32 if full_ids else SHORT_ID_LENGTH
    first = True
    try:
        while True:
            dropped = follower.dropped
            frame = follower.read(wanted)
            if follower.dropped > dropped and not first:
                click.echo(f"... {follower.dropped - dropped} record(s) trimmed by the log cap before they "
                           "were read", err=True)
            if first and limit is not None:
                frame = frame.tail(limit)
            for record in frame.itertuples():
                stamp = format_local(record.time.timestamp())
                click.echo(f"{stamp} {record.worker_id[:id_width]} {record.level} {record.message}")
            first = False
            if not follow:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@cli.command()
@network_options
@click.option("--kill", is_flag=True, help="kill now instead of asking the workers to terminate")
@click.option("--worker-id", "worker_ids", multiple=True, help="only these workers (repeatable)")
def stop(rush: Rush, kill: bool, worker_ids: tuple[str, ...]) -> None:
    """Stop workers: terminate gracefully (default) or kill. Ids may be the 8-character prefixes."""
    require_network(rush)
    worker_ids = tuple(resolve_worker_ids(rush, worker_ids))
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
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.05),
              help="seconds between refreshes (the rate is measured over it)")
@click.option("--iterations", default=0, help="stop after this many frames (0: until Ctrl-C)")
@click.option("--once", is_flag=True, help="print one frame (after one interval, to measure the rate) and exit")
@click.option("--target", type=click.IntRange(min=1), default=None, help="finished tasks expected: show an ETA")
@click.option("--rows", default=20, show_default=True, help="at most this many worker rows")
@click.option("--full-ids", is_flag=True, help="show 32-character worker ids (default: 8)")
def top(rush: Rush, interval: float, iterations: int, once: bool, target: int | None, rows: int,
        full_ids: bool) -> None:
    """A live view: tasks/s, task counts, finished tasks per worker, heartbeat ages, ETA (--target).

    On a terminal it redraws in place; otherwise (a pipe, a log) it prints a plain frame per interval.
    """
    from .top import TopView

    view = TopView(rush, target=target, full_ids=full_ids, rows=rows)
    frames = 1 if once else iterations
    live = sys.stdout.isatty() and not once
    try:
        if live:
            _top_live(view, interval, frames)
            return
        view.sample()  # the first sample only starts the rate measurement
        shown = 0
        while not frames or shown < frames:
            time.sleep(interval)
            lines = view.render(view.sample(), width=200 if full_ids else 80, interval=interval)
            click.echo("\n".join(line.text for line in lines) + "\n")
            shown += 1
    except KeyboardInterrupt:
        return


def _top_live(view: Any, interval: float, frames: int) -> None:
    """Redraw in place with rich (no flicker; lost / failed workers in red)."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console()

    def frame() -> Text:
        text = Text()
        for line in view.render(view.sample(), width=console.width, interval=interval):
            text.append(line.text + "\n", style=line.style or "")
        return text

    shown = 0
    with Live(frame(), console=console, auto_refresh=False, vertical_overflow="visible") as live:
        while not frames or shown < frames:
            time.sleep(interval)
            live.update(frame(), refresh=True)
            shown += 1


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
@click.option("--yes", is_flag=True, help="wipe the network first even if it already has keys")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: on a terminal only)")
def demo(name: str, n_workers: int, n_tasks: int | None, url: str | None, network: str | None, launcher: str,
         hosts: tuple[str, ...], ssh_config: str | None, partition: str | None, python: str | None,
         keep: bool, yes: bool, progress: bool | None) -> None:
    """Run one of the vignette's examples (it resets the network before and, without --keep, after)."""
    import importlib

    from .config import RedisConfig
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
    if url is not None:
        probe(RedisConfig.from_url(url))
    rush = rsh(network=network or f"demo-{name}", url=url)
    try:
        if not yes and network_exists(rush):
            keep = True  # never wipe what we refused to touch
            raise ConfigError(f"network {rush.network!r} already exists at {rush.config}; the demo would delete "
                              "its tasks and workers: pass --yes to wipe it, or choose another --network")
        rush.reset()
        module.run(rush, n_workers=n_workers, launcher=launcher, progress=progress, **options)
    finally:
        if not keep:
            rush.reset()
        rush.close()


def demo_main(name: str) -> None:
    """``python -m rush_hpc.examples.NAME [options]``: the demo command for one example."""
    main(["demo", name, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> None:
    """The console script: one-line errors (RushError, Redis errors), exit codes 1 / 130."""
    import redis

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
    except redis.RedisError as error:
        if "--debug" in args:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, redis.exceptions.NoPermissionError):
            message += "; the Redis (ACL) user needs access to the network's keys, rush:{NETWORK}:*"
        click.echo(f"error: Redis: {message} ({type(error).__name__}; --debug shows the traceback)", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
