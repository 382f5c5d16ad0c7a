# shellcheck shell=bash
# CPU-only profile: gloo collectives, one training rank per Slurm task. Only CLUSTER=cpu
# selects it (a GPU profile on a node without GPUs exits instead). For CI and functional
# checks, not speed.

# No GPUs per node: the job scripts launch one rank per task instead.
# shellcheck disable=SC2034  # read by slurm/launch.sh
NODE_GPUS=0

# DeepSpeed's CPU accelerator (gloo, no CUDA probing).
export DS_ACCELERATOR=cpu
# Ranks must not see GPUs even on a GPU node, or torch would pick NCCL. Slurm rewrites
# CUDA_VISIBLE_DEVICES inside each step, so the job scripts also clear it per rank (env).
export CUDA_VISIBLE_DEVICES=
# gloo picks the interface the host name resolves to; name one where that is wrong
# (multi-homed nodes), e.g. GLOO_SOCKET_IFNAME=eth0.
# export GLOO_SOCKET_IFNAME=eth0
# (No thread setting: on CPU the trainer runs cores // world-size torch threads per rank.)
