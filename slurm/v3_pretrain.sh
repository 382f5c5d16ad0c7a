#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# DeepSeek-V3 pretraining on Slurm: one training rank per GPU, started by srun, ranks from
# Slurm's variables. Submit from the repository root (the log goes to ./logs):
#
#   mkdir -p logs && sbatch slurm/v3_pretrain.sh                 # 8 H800 nodes, V3 671B config
#   CLUSTER=h100 CONFIG=configs/v2_lite_16b.yaml sbatch --nodes=1 slurm/v3_pretrain.sh
#   OVERRIDES="train.steps=1000 train.lr=1e-4" sbatch --nodes=16 --account=A --partition=P slurm/v3_pretrain.sh
#   DRY_RUN=1 bash slurm/v3_pretrain.sh                          # print the srun command only
#   CLUSTER=cpu sbatch --nodes=1 --ntasks-per-node=2 slurm/v3_pretrain.sh   # gloo, tiny V3
#   (on a cluster without GPUs in its GRES, also --gpus-per-node=0)
#
# Environment: CLUSTER (h800 | h100 | cpu, default h800: slurm/env/<cluster>.sh), CONFIG
# (default configs/v3_671b_cluster.yaml; configs/smoke_cpu.yaml when CLUSTER=cpu),
# OVERRIDES (space-separated key=value), DRY_RUN=1, and the rest listed in slurm/launch.sh.
# Nodes, tasks per node, partition, account, time: sbatch flags override the lines below.
#
# Preemption: Slurm sends SIGUSR1 to this script 10 minutes before the time limit (or use
# `scancel --signal=USR1 --batch <job>`); it relays the signal to every rank, the ranks
# write a checkpoint and exit 75, and the script requeues the job. The requeued job runs
# this script again with the same job id and out_dir and resumes from the checkpoint.
# Slurm holds a requeued job for about 2 minutes before it may start again.
#
# --nodes=8: V3's layout (ep=64, pp pending) needs a multiple of 64 ranks; the paper ran 2048
# H800s (256 nodes). --open-mode=append keeps every restart of the job in one log.
#SBATCH --job-name=v3-pretrain
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
set -euo pipefail

# Under sbatch this file runs from Slurm's spool directory: the repository is where the
# job was submitted from.
DSP_REPO=${DSP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -f $DSP_REPO/slurm/launch.sh ]] || DSP_REPO=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=launch.sh
source "$DSP_REPO/slurm/launch.sh"

# Falls back to CLUSTER=cpu (and configs/smoke_cpu.yaml) where no GPU is visible.
dsp_srun_job configs/v3_671b_cluster.yaml
