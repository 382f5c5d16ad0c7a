#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Post-training jobs (SFT, RL) on Slurm, with the launch, preemption and requeue logic of
# slurm/v3_pretrain.sh. Submit from the repository root:
#
#   mkdir -p logs && CONFIG=configs/my_sft.yaml sbatch slurm/post_train.sh
#   DRY_RUN=1 CONFIG=configs/my_sft.yaml bash slurm/post_train.sh
#
# For now this runs launchers/train.py: ds_parallel has no post-training trainer yet (SFT,
# GRPO and the R1 pipeline are planned under ds_parallel/rl/), so a "post-training" job is
# continued next-token training on CONFIG (for SFT: an indexed corpus of formatted
# conversations, a lower train.lr, train.out_dir seeded with the pretrained checkpoint).
# When a dedicated entry point lands, point ENTRY at it (ENTRY=launchers/<it>.py);
# nothing else here changes. CONFIG is required except on CLUSTER=cpu (tiny V3 smoke).
#
# Environment: CONFIG, OVERRIDES, CLUSTER, ENTRY, DRY_RUN and the rest in slurm/launch.sh.
# Post-training needs far fewer GPUs than pretraining: 2 nodes, 12 hours by default.
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

# No default GPU config (""): CONFIG names the post-training one; exit 2 without it.
dsp_srun_job ""
