"""Many workers from one interpreter: import once, then ``fork`` one child per worker.

Starting a worker as its own interpreter costs an import of rush_hpc, redis-py (which imports
asyncio) and cloudpickle: ~0.2 s of CPU each, 5 s for 64 workers on two cores. A forked child
inherits the imported modules and costs a few milliseconds. Two users of the same child code:

* **groups** (``python -m rush_hpc worker --network N --worker-id A --worker-id B ...``): SSH hosts
  and SLURM jobs start ONE interpreter per host / job that forks its workers (``run_group``). The
  parent forwards the stop signals (SIGTERM, SIGINT, SIGUSR1, SIGUSR2: the walltime signal that
  ``#SBATCH --signal=B:USR2@...`` sends to the batch shell only) to its children (held while it
  forks, then sent to all), reaps them and exits when all have ended. It shows ``... worker
  --network N --group <n>``: no pid check for one of its workers matches it.
* **the fork server** (``forkserver.py``): for local workers, one pre-imported template process
  per interpreter path and controller process that forks workers on request.

Every child leads its own session (``os.setsid``: killing one worker's process group never kills
a sibling) and shows the command line of a single worker, ``python -m rush_hpc worker --network N
--worker-id <id>`` (rewritten in place on Linux, see ``set_cmdline``), so the pid checks of the
launchers (a pid from Redis must run this very worker) stay what they were. Before forking, the
parent opens no Redis connection and starts no thread: children share nothing but modules. A
child ends as an interpreter does (non-daemon threads joined, its own atexit handlers run; the
parent's were cleared at fork), then ``os._exit``.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from typing import Callable, Mapping, NoReturn, Sequence

logger = logging.getLogger(__name__)

#: the signals a group parent passes on to its workers (each leads its own session, so a signal
#: sent to the parent's process group does not reach them)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
#: space in the template's command line for a child's ``--network N --worker-id ID`` (names <= 200, ids <= 128)
_ROOM = "--room=" + "." * 400
FORK_ENV = "RUSH_HPC_FORK_SERVER"


def worker_argv(python: str, network: str, worker_id: str) -> list[str]:
    """The command line a worker shows (the same as ``WorkerCommand.argv``)."""
    return [python, "-m", "rush_hpc", "worker", "--network", network, "--worker-id", worker_id]


# -- the command line of a forked child ------------------------------------------------------
def _arg_area() -> tuple[int, int] | None:
    """Start and end address of this process's argv strings (Linux ``/proc/self/stat`` fields 48, 49)."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return None
    return (start, end) if 0 < start < end else None


def cmdline_room() -> int:
    """How many bytes ``set_cmdline`` may write (0: it cannot here)."""
    area = _arg_area()
    return area[1] - area[0] if area and sys.platform.startswith("linux") else 0


def set_cmdline(argv: Sequence[str]) -> bool:
    """Show ``argv`` as this process's command line (``/proc/<pid>/cmdline``, ``ps``), as
    setproctitle does: overwrite the original argv strings in place, padded with NULs. Python
    copied them at start-up, so nothing in this process reads them. False if it does not fit."""
    data = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    area = _arg_area()
    if not area or not sys.platform.startswith("linux") or len(data) > area[1] - area[0]:
        return False
    size = area[1] - area[0]
    ctypes.memmove(area[0], data.ljust(size, b"\0"), size)
    return True


# -- a forked worker -------------------------------------------------------------------------
def run_child(python: str, network: str, worker_id: str, output: str | None = None,
              errors: str | None = None, ready: int | None = None,
              prepare: Callable[[], None] | None = None) -> NoReturn:
    """In a freshly forked child: own session, default signals, own command line and output
    files (then it closes ``ready``: its pid passes the launchers' checks), then the same code
    path as ``rush_hpc worker``, and the end of an interpreter (``_exit_like_an_interpreter``);
    never returns."""
    code = 1
    try:
        atexit._clear()  # the parent's exit handlers are the parent's (a fresh interpreter has none)
        os.setsid()
        for signum in (*FORWARDED, signal.SIGCHLD):  # as in a fresh interpreter (SIGPIPE stays ignored)
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # a group parent blocks them while it forks
        if output is not None:
            _redirect(output, errors or output)
        if prepare is not None:
            prepare()
        set_cmdline(worker_argv(python, network, worker_id))
        if ready is not None:
            os.close(ready)
        sys.argv = [sys.argv[0], "worker", "--network", network, "--worker-id", worker_id]
        from .bootstrap import main

        main(network, worker_id)
    except SystemExit as exit_:
        code = _exit_status(exit_.code)
    except BaseException:  # noqa: BLE001 - a child never returns into its parent's code
        import traceback

        traceback.print_exc()
    finally:
        _exit_like_an_interpreter(code)


def _exit_status(value: object) -> int:
    """``sys.exit(value)`` as an interpreter's exit status (None: 0; text: printed, 1)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _exit_like_an_interpreter(code: int) -> NoReturn:
    """End a forked worker as ``python -m rush_hpc worker`` would end: wait for the loop's
    non-daemon threads, run the atexit handlers it registered, flush, then ``os._exit`` (never
    the parent's cleanup: its atexit list was cleared at fork)."""
    try:
        try:
            threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls first
        except BaseException:  # noqa: BLE001 - e.g. Ctrl-C while waiting: exit anyway
            pass
        atexit._run_exitfuncs()  # prints the errors of handlers that raise, as at exit
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - exiting anyway
                pass
    finally:
        os._exit(code)


def _redirect(output: str, errors: str) -> None:
    """stdin from /dev/null, stdout / stderr to the worker's own files (created 0600)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, output), (2, errors)):
        if fd == 2 and path == output:
            os.dup2(1, 2)  # one file, one offset
            continue
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)


def fork_worker(python: str, network: str, worker_id: str, output: str | None = None,
                errors: str | None = None, ready: int | None = None) -> int:
    """Fork one worker; returns its pid in the parent. The child closes its copy of ``ready``
    once it shows its own command line (see ``wait_ready``)."""
    pid = os.fork()
    if pid == 0:
        run_child(python, network, worker_id, output, errors, ready)
    return pid


def wait_ready(read: int, write: int) -> None:
    """Close our write end and wait for EOF: every child closed its copy (or died). Until then a
    child may still show its parent's command line, and a pid check would call it gone."""
    os.close(write)
    while os.read(read, 64):
        pass
    os.close(read)


def exit_code(status: int) -> int:
    """A ``waitpid`` status as ``Popen.returncode`` (negative: killed by that signal)."""
    return os.waitstatus_to_exitcode(status)


def preload() -> None:
    """Import what every worker imports before its loop (once, in the parent of the forks)."""
    import email.parser  # noqa: F401 - redis-py reads its version from the package metadata per connection
    import encodings.idna  # noqa: F401 - host names of connections
    import importlib.metadata  # noqa: F401
    import pickle  # noqa: F401
    import platform

    import cloudpickle  # noqa: F401 - the payload

    import rush_hpc.bootstrap  # noqa: F401

    platform.python_version()  # parsed once, cached
    _read_redis_version_once()
    gc.freeze()  # what is imported now is never collected: the children's collections skip it (and copy less)


def _read_redis_version_once() -> None:
    """redis-py reads its own version from the package metadata for every new client (~2 ms of
    parsing; a worker and its heartbeat child make several). It cannot change in a running
    process: read it once here, in the parent of the forks, and let the children reuse it."""
    try:
        import redis.utils
    except ImportError:
        return
    read = getattr(redis.utils, "get_lib_version", None)
    if callable(read):
        version = read()
        redis.utils.get_lib_version = lambda: version


# -- groups: one interpreter per SSH host / SLURM job ----------------------------------------
def run_group(network: str, worker_ids: Sequence[str], *, log_dir: str | None = None,
              pid_file: str | None = None) -> int:
    """Fork one worker per id, pass stop signals on, wait for all; returns 0 once all ended (each
    worker records how it ended in Redis; one that died is reported on stderr, and a SLURM job
    state must not blame its siblings), 1 if a worker could not be forked.

    ``log_dir``: each worker writes ``<log_dir>/<id>.log`` (else they share this process's output);
    ``pid_file``: written (atomically) with one ``<id> <pid>`` line per worker once all are forked.
    """
    preload()  # once, here, for every child
    python = sys.orig_argv[0] if getattr(sys, "orig_argv", None) else sys.executable
    # this process names no worker: a pid check for one of them must never match it
    set_cmdline([python, "-m", "rush_hpc", "worker", "--network", network, "--group", str(len(worker_ids))])
    children: dict[int, str] = {}
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: _forward(children, signum))
    # a stop signal that comes while we fork waits until every worker is forked, then reaches all
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    read, write = os.pipe()
    code = 0
    for worker_id in worker_ids:
        log = os.path.join(log_dir, f"{worker_id}.log") if log_dir else None
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            children[fork_worker(python, network, worker_id, log, log, write)] = worker_id
        except OSError as error:
            print(f"rush-hpc: cannot fork worker {worker_id}: {error}", file=sys.stderr, flush=True)
            code = 1
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # the handler runs now: `children` is complete
    wait_ready(read, write)
    if pid_file:
        temporary = f"{pid_file}.tmp"
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write("".join(f"{w} {pid}\n" for pid, w in children.items()))
        os.replace(temporary, pid_file)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        worker_id = children.pop(pid)
        returned = exit_code(status)
        if returned != 0:
            print(f"rush-hpc: worker {worker_id} (pid {pid}) ended with {returned}", file=sys.stderr, flush=True)
    return code


def split_ids(values: Sequence[str]) -> list[str]:
    """``--worker-id`` values: each one id or a comma-separated list (``a,b``: what a job script
    template with one id placeholder per array task passes for several workers per job)."""
    return [i for value in values for i in value.split(",") if i]


def job_groups(worker_ids: Sequence[str], per_job: int) -> list[list[str]]:
    """Ids in groups of ``per_job`` (the last one may be smaller): one SLURM job per group."""
    if per_job < 1:
        raise ValueError(f"workers_per_job must be >= 1, got {per_job!r}")
    return [list(worker_ids[i:i + per_job]) for i in range(0, len(worker_ids), per_job)]


def _forward(children: Mapping[int, str], signum: int) -> None:
    for pid in list(children):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
