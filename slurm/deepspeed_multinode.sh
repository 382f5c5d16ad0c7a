#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Training through DeepSpeed's own multi-node launcher instead of srun: the batch script
# (on the job's first node) writes a DeepSpeed hostfile from the Slurm node list
# ("<host> slots=<ranks per node>") and runs `deepspeed --hostfile`, which starts the
# ranks on every node itself (pdsh over ssh by default; DS_LAUNCHER=slurm makes it use
# srun, openmpi/mpich use mpirun). Use it where that is how the cluster is set up, e.g.
# passwordless ssh between nodes and DeepSpeed's per-node launcher preferred over srun.
#
#   mkdir -p logs && sbatch slurm/deepspeed_multinode.sh
#   DRY_RUN=1 bash slurm/deepspeed_multinode.sh        # print hostfile and command only
#
# Environment: as slurm/v3_pretrain.sh (CLUSTER, CONFIG, OVERRIDES, DRY_RUN, ...; see
# slurm/launch.sh), plus DS_LAUNCHER (pdsh | slurm | openmpi | mpich ..., default pdsh) and
# HOSTFILE (where to write it). The profile's variables reach the remote ranks through a
# DeepSpeed environment file (DS_ENV_FILE), since pdsh passes on only NCCL_*/PYTHON*.
# Preemption works as in v3_pretrain.sh: SIGUSR1 is relayed to the ranks on every node,
# they checkpoint and exit 75, and the job requeues itself. --nodes=256: the default config's
# layout, as in v3_pretrain.sh (which says why).
#SBATCH --job-name=ds-multinode
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

DSP_REPO=${DSP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -f $DSP_REPO/slurm/launch.sh ]] || DSP_REPO=${SLURM_SUBMIT_DIR:-$PWD}
# shellcheck source=launch.sh
source "$DSP_REPO/slurm/launch.sh"

dsp_init configs/v3_671b_cluster.yaml
DS_LAUNCHER=${DS_LAUNCHER:-pdsh}
# DeepSpeed's hostfile wants equal slots per host; on CPU the job's tasks split evenly.
slots=${RANKS_PER_NODE:-$((WORLD / NODES))}
mapfile -t hosts < <(dsp_hostnames "$NODELIST")
scratch=${TMPDIR:-/tmp}/dsp-${SLURM_JOB_ID:-dry}
HOSTFILE=${HOSTFILE:-$scratch/hostfile}
export DS_ENV_FILE=${DS_ENV_FILE:-$scratch/deepspeed_env}
# Absolute, so that the ranks' command line ("python -u <ENTRY> ...") is recognisable.
entry=$DSP_REPO/$ENTRY

cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
# One host runs locally; DeepSpeed would still insist on ssh to it first.
if ((${#hosts[@]} == 1)); then cmd+=(--no_ssh_check); fi
cmd+=("$entry" --config "$CONFIG" "${DSP_OVERRIDES[@]}")

if [[ ${DRY_RUN:-0} == 1 ]]; then
    for host in "${hosts[@]}"; do dsp_log "dry run: $HOSTFILE: $host slots=$slots"; done
else
    mkdir -p "$(dirname "$HOSTFILE")" "$(dirname "$DS_ENV_FILE")"
    trap 'rm -rf "$scratch"' EXIT # rewritten at every start of the job
    for host in "${hosts[@]}"; do echo "$host slots=$slots"; done >"$HOSTFILE"
    # The profile's settings for the remote ranks, KEY=VALUE per line.
    env | grep -E '^(NCCL_|TORCH_NCCL_|CUDA_DEVICE_MAX_CONNECTIONS=|PYTORCH_CUDA_ALLOC_CONF=|OMP_NUM_THREADS=|DS_ACCELERATOR=|GLOO_SOCKET_IFNAME=)' \
        >"$DS_ENV_FILE" || true
fi

# SIGUSR1 -> the ranks. With srun they form a job step, which scancel signals; otherwise
# they run under DeepSpeed's launch.py on each node: "python -u <entry>" matches the ranks
# only (launch.py's own command line has "-u -m deepspeed.launcher.launch").
# shellcheck disable=SC2317  # called through DSP_FORWARD
dsp_forward_to_ranks() {
    local pattern="-u $entry"
    if [[ $DS_LAUNCHER == slurm ]]; then
        scancel --signal="$1" "$SLURM_JOB_ID" || true
    elif ((${#hosts[@]} == 1)); then
        pkill -"$1" -f -- "$pattern" || true
    else
        pdsh -w "$(IFS=,; echo "${hosts[*]}")" "pkill -$1 -f -- '$pattern'" || true
    fi
}
DSP_FORWARD=dsp_forward_to_ranks
dsp_launch "${cmd[@]}"
