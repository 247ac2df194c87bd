#!/bin/bash
# rush-hpc workers: one worker per task of this job array.
# Rendered by rush_hpc.launchers.sbatch from rush_hpc/templates/sbatch.sh; copy and edit it freely, then
# pass template="/path/to/copy.sh" to start_sbatch_workers(). Placeholders: ${directives},
# ${setup}, ${worker_ids}, ${environment}, ${python}, ${network}; a literal dollar sign is $$.
#SBATCH --account=proj-1
#SBATCH --array=0-2%2
#SBATCH --comment=rush-hpc:golden-net
#SBATCH --constraint='a'"'"'; echo foo'
#SBATCH --cpus-per-task=1
#SBATCH --error='/shared/rush logs/rush-batch1-%a.err'
#SBATCH --exclusive
#SBATCH --job-name='rush worker'
#SBATCH --mem=4G
#SBATCH --output='/shared/rush logs/rush-batch1-%a.out'
#SBATCH --partition=cpu
#SBATCH --signal=B:USR2@60
#SBATCH --time=120

set -e
# --- setup ---
module load python/3.11

# --- one rush-hpc worker per array task ---
worker_ids=(w0 w1 w2)
export RUSH_HPC_CREDENTIALS='/shared/rush logs/credentials.json'
export RUSH_HPC_LAUNCHER=sbatch
exec /opt/venv/bin/python -m rush_hpc worker --network golden-net --worker-id "${worker_ids[$SLURM_ARRAY_TASK_ID]}"
