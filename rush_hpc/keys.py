"""Every Redis key name of a rush network, built in this one module.

All keys of network ``N`` start with ``rush:{N}:``. The ``{N}`` hash tag puts a whole network in one
Redis Cluster slot, so the Lua scripts (which touch task hashes they derive from ids) stay legal
there, and ``reset()`` finds everything with one ``SCAN MATCH rush:{N}:*`` (or, for an ACL user denied
SCAN, from ``fixed_keys()`` plus the per-task and per-worker keys of the ids the network lists).

==================================  ======  ================================================
key                                 type    holds
==================================  ======  ================================================
rush:{N}:tasks:all                  list    every task id, in creation order
rush:{N}:tasks:queued               list    ids waiting in the shared queue
rush:{N}:tasks:priority:<worker>    list    ids waiting for one worker (popped before the shared queue)
rush:{N}:tasks:priority_workers     set     workers that have a priority list
rush:{N}:tasks:wake                 list    wake-up tokens for workers blocked in pop_task (capped)
rush:{N}:tasks:running              set     ids being evaluated
rush:{N}:tasks:finished             list    finished rows as JSON, append-only (incremental fetch by index)
rush:{N}:tasks:failed               list    ids that failed, append-only
rush:{N}:task:<id>                  hash    xs, ys, xs_extra, ys_extra, condition, state, worker_id,
                                            max_retries, n_retries, pop_request; once finished only
                                            state, row (index of its finished row), signed pickles
rush:{N}:workers                    set     every worker id ever launched or registered
rush:{N}:workers:<state>            set     launched / running / terminated / killed / lost / failed
rush:{N}:worker:<id>                hash    pid, hostname, launcher, host, job_id, python, state, reason, ...
rush:{N}:worker:<id>:heartbeat      string  refreshed by the worker, expires when it stops beating
rush:{N}:worker:<id>:control        list    "terminate" / "kill" messages for that worker
rush:{N}:worker:<id>:tasks          set     ids of the running tasks this worker holds (ownership)
rush:{N}:worker:<id>:wake           list    wake-up tokens for its priority tasks (capped)
rush:{N}:adapt                      hash    the elastic-workers policy: bounds, launcher, status, error
rush:{N}:log                        list    worker log records (JSON), capped
rush:{N}:log:seq                    string  how many log records were ever written (logs --follow)
rush:{N}:payload                    string  the signed, pickled worker loop + globals of the latest start
rush:{N}:payload:meta               string  its signed JSON meta: environment fingerprint, size, spill path
rush:{N}:payload:batch:<b>          string  the payload of one start call (batch b, content-addressed)
rush:{N}:payload:batch:<b>:meta     string  its signed meta; a worker loads its own batch (RUSH_HPC_BATCH)
rush:{N}:payload:batches            set     the batch ids, for a reset without SCAN
==================================  ======  ================================================
"""

from __future__ import annotations

import re

from .exceptions import ConfigError

_NETWORK_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")
TASK_STATES = ("queued", "running", "finished", "failed")
WORKER_STATES = ("launched", "running", "terminated", "killed", "lost", "failed")


class NetworkKeys:
    """Key names of one network; pure string building, no I/O."""

    def __init__(self, network: str) -> None:
        if not isinstance(network, str) or not _NETWORK_NAME.match(network):
            raise ConfigError(
                f"network name must be 1-200 characters of letters, digits and _.:- ; got {network!r}")
        self.network = network
        self.prefix = f"rush:{{{network}}}:"
        self.task_prefix = self.prefix + "task:"
        self.worker_prefix = self.prefix + "worker:"
        self.worker_set_prefix = self.prefix + "workers:"
        self.all_tasks = self.prefix + "tasks:all"
        self.queued = self.prefix + "tasks:queued"
        self.priority_workers = self.prefix + "tasks:priority_workers"
        self.wake = self.prefix + "tasks:wake"
        self.running = self.prefix + "tasks:running"
        self.finished = self.prefix + "tasks:finished"
        self.failed = self.prefix + "tasks:failed"
        self.workers = self.prefix + "workers"
        self.log = self.prefix + "log"
        self.payload = self.prefix + "payload"
        self.payload_meta = self.prefix + "payload:meta"
        self.payload_batches = self.prefix + "payload:batches"
        self.log_seq = self.log + ":seq"
        self.adapt = self.prefix + "adapt"
        self.pattern = self.prefix + "*"

    def task(self, task_id: str) -> str:
        return self.task_prefix + task_id

    @property
    def priority_prefix(self) -> str:
        return self.prefix + "tasks:priority:"

    def priority(self, worker_id: str) -> str:
        return self.priority_prefix + worker_id

    def worker(self, worker_id: str) -> str:
        return self.worker_prefix + worker_id

    def worker_state_set(self, state: str) -> str:
        return self.worker_set_prefix + state

    def heartbeat(self, worker_id: str) -> str:
        return self.worker_prefix + worker_id + ":heartbeat"

    def control(self, worker_id: str) -> str:
        return self.worker_prefix + worker_id + ":control"

    def held_tasks(self, worker_id: str) -> str:
        return self.worker_prefix + worker_id + ":tasks"

    def worker_wake(self, worker_id: str) -> str:
        return self.worker_prefix + worker_id + ":wake"

    def batch_payload(self, batch: str | None) -> str:
        """The payload key of one start call; ``None``: the latest one."""
        return self.payload if batch is None else self.prefix + "payload:batch:" + batch

    def batch_payload_meta(self, batch: str | None) -> str:
        return self.payload_meta if batch is None else self.prefix + "payload:batch:" + batch + ":meta"

    def fixed_keys(self) -> list[str]:
        """Every key of the network whose name does not depend on a task or worker id."""
        return [self.all_tasks, self.queued, self.priority_workers, self.wake, self.running, self.finished,
                self.failed, self.workers, self.log, self.log_seq, self.payload, self.payload_meta, self.adapt,
                self.payload_batches,
                *(self.worker_state_set(state) for state in WORKER_STATES)]

    def worker_keys(self, worker_id: str) -> list[str]:
        """Every key of one worker."""
        return [self.worker(worker_id), self.heartbeat(worker_id), self.control(worker_id),
                self.held_tasks(worker_id), self.worker_wake(worker_id),
                self.priority(worker_id)]
