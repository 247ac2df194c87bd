#!/bin/bash
# rush-hpc workers: one worker per task of this job array.
# Rendered by rush_hpc.launchers.sbatch from rush_hpc/templates/sbatch.sh; copy and edit it freely, then
# pass template="/path/to/copy.sh" to start_sbatch_workers(). Placeholders: $${directives},
# $${setup}, $${worker_ids}, $${environment}, $${python}, $${network}; a literal dollar sign is $$$$.
${directives}

set -e
# --- setup ---
${setup}

# --- one rush-hpc worker per array task ---
worker_ids=(${worker_ids})
${environment}
exec ${python} -m rush_hpc worker --network ${network} --worker-id "$${worker_ids[$$SLURM_ARRAY_TASK_ID]}"
