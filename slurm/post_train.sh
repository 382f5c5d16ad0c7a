#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Post-training jobs (SFT, GRPO, the R1 pipeline: launchers/post_train.py) on Slurm, with the
# launch, preemption and requeue logic of slurm/v3_pretrain.sh. Submit from the repository root:
#
#   mkdir -p logs && CONFIG=configs/my_r1.yaml sbatch slurm/post_train.sh
#   DRY_RUN=1 CONFIG=configs/my_r1.yaml bash slurm/post_train.sh
#   CLUSTER=cpu sbatch --nodes=1 --ntasks-per-node=2 slurm/post_train.sh   # R1-Zero in miniature
#   CLUSTER=cpu CONFIG=configs/sft_cpu.yaml sbatch --nodes=1 --ntasks-per-node=2 slurm/post_train.sh
#
# The config's post_train.kind picks SFT, GRPO or a pipeline of phases; a requeued job
# resumes a pipeline at its current phase. CONFIG is required except on CLUSTER=cpu
# (default there: configs/r1_zero_cpu.yaml).
#
# Environment: CONFIG, OVERRIDES, CLUSTER, DRY_RUN and the rest in slurm/launch.sh (ENTRY
# defaults to launchers/post_train.py here). Post-training needs far fewer GPUs than
# pretraining: 2 nodes, 12 hours by default.
#SBATCH --job-name=post-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
set -euo pipefail

DSP_REPO=${DSP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -f $DSP_REPO/slurm/launch.sh ]] || DSP_REPO=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=launch.sh
source "$DSP_REPO/slurm/launch.sh"

ENTRY=${ENTRY:-launchers/post_train.py}
if [[ ${CLUSTER:-h800} == cpu ]]; then CONFIG=${CONFIG:-configs/r1_zero_cpu.yaml}; fi
# No default GPU config (""): CONFIG names the post-training one; exit 2 without it.
dsp_srun_job ""
