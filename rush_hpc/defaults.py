"""Every default of rush-hpc in one place, with the reason for its value.

Signatures use these names instead of literals, so that a default changes in one place and the
launchers cannot drift apart (the two SLURM launchers once disagreed on the signal delay).
"""

from __future__ import annotations

#: Seconds between two heartbeats of a worker. One beat is one small SET with a TTL.
HEARTBEAT_PERIOD = 1.0
#: Seconds without a beat after which a worker counts as lost. Several periods, so that a busy
#: Redis or a short GC pause does not make a healthy worker "lost".
HEARTBEAT_EXPIRE = 5.0
#: The same for SLURM workers: nodes are farther away and a loaded compute node stalls longer.
SLURM_HEARTBEAT_EXPIRE = 10.0

#: Seconds before a SLURM job's time limit at which the worker gets SIGUSR2 (``--signal``) and
#: terminates after its current task. Both SLURM launchers use it.
SIGNAL_DELAY_S = 60
#: SLURM time limit of a worker job when none is given.
SLURM_TIME = "01:00:00"
#: SLURM job name of worker jobs.
SLURM_JOB_NAME = "rush-worker"
#: Seconds a sacct answer is reused for the same job ids (lost-worker checks poll often).
SACCT_CACHE_S = 1.0
#: Seconds between two squeue checks of pending jobs while waiting for workers (a reason that will
#: not clear is reported once two checks in a row agree on it).
SQUEUE_INTERVAL_S = 2.0

#: Seconds ``stop_workers(type="kill")`` waits for workers to answer the kill message before
#: the launcher kills them by force.
KILL_GRACE = 3.0
#: Seconds between two lost-worker checks of ``start_monitor``.
MONITOR_INTERVAL = 5.0
#: Seconds ``wait_for_workers`` waits by default.
WAIT_TIMEOUT = 60.0
#: Seconds between two polls of ``wait_for_workers``.
WAIT_POLL = 0.02

#: Seconds to connect to an SSH host.
SSH_CONNECT_TIMEOUT = 10.0
#: Seconds between two SSH checks of workers that have not registered yet (each is a round trip).
SSH_CHECK_INTERVAL = 3.0
#: Where SSH workers write their logs and credentials on the remote host.
SSH_LOG_DIR = "~/.rush-hpc/logs"

#: Seconds a subprocess of a launcher (sbatch, sacct, scancel, squeue) may run.
COMMAND_TIMEOUT = 60.0
#: Lines of a worker's output shown in start failures (read only from paths held in memory).
OUTPUT_TAIL_LINES = 20
#: Log level of workers.
LOG_LEVEL = "INFO"
