#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# DeepSeek-V3 pretraining on Slurm: one training rank per GPU, started by srun, ranks from
# Slurm's variables. Submit from the repository root (the log goes to ./logs):
#
#   mkdir -p logs && sbatch slurm/v3_pretrain.sh                 # 256 H800 nodes, V3 671B config
#   CLUSTER=h100 CONFIG=configs/v2_lite_16b.yaml sbatch --nodes=1 slurm/v3_pretrain.sh
#   OVERRIDES="train.steps=1000 train.lr=1e-4" sbatch --nodes=128 --account=A --partition=P slurm/v3_pretrain.sh
#   DRY_RUN=1 bash slurm/v3_pretrain.sh                          # print the srun command only
#   CLUSTER=cpu sbatch --nodes=1 --ntasks-per-node=2 slurm/v3_pretrain.sh   # gloo, tiny V3
#   (on a cluster without GPUs in its GRES, also --gpus-per-node=0)
#
# Environment: CLUSTER (h800 | h100 | cpu, default h800: slurm/env/<cluster>.sh), CONFIG
# (default configs/v3_671b_cluster.yaml; configs/smoke_cpu.yaml when CLUSTER=cpu),
# OVERRIDES (space-separated key=value), DRY_RUN=1, and the rest listed in slurm/launch.sh.
# Nodes, tasks per node, partition, account, time: sbatch flags override the lines below.
# A GPU profile on a node where no GPU is visible exits 1; only CLUSTER=cpu trains on CPU.
#
# Preemption: Slurm sends SIGUSR1 to this script 10 minutes before the time limit (or use
# `scancel --signal=USR1 --batch <job>`); it relays the signal to every rank, the ranks
# write a checkpoint and exit 75, and the script requeues the job. The requeued job runs
# this script again with the same job id and out_dir and resumes from the checkpoint.
# Slurm holds a requeued job for about 2 minutes before it may start again.
#
# --nodes=256: the V3 report's cluster and layout, 2048 H800s as tp=1 x pp=16 (DualPipeV) x
# dp=128 (ep=64 x edp=2), ZeRO-1, V3's selective recompute. Planned 41.8 GiB per GPU on the
# busiest pipeline rank (weights 3.8, grads 3.8, optimizer 5.0, activations 29.2), under the
# 67.1 GiB the trainer's pre-flight check allows on an 80 GB GPU (10% headroom), with
# 1024-token sequences (configs/v3_671b_cluster.yaml says why not the report's 4096).
# --nodes=128 fits too (46.9 GiB); fewer nodes cannot hold the 671B model: `python launchers/plan.py --config
# configs/v3_671b_cluster.yaml --world <ranks> --gpu-mem-gib 80` says what does.
# --open-mode=append keeps every restart of the job in one log.
#SBATCH --job-name=v3-pretrain
#SBATCH --nodes=256
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

dsp_srun_job configs/v3_671b_cluster.yaml
