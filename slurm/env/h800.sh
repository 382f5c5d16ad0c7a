# shellcheck shell=bash
# Environment for DeepSeek-style H800 nodes (sourced by the job scripts in slurm/).
#
# The V3 cluster (V3 report, section 3): 8 H800 GPUs per node joined by NVLink/NVSwitch
# (the H800's NVLink runs at 400 GB/s, under half the H100's 900), InfiniBand between
# nodes. Every value below is a default: export the variable before sbatch to
# override it (the job inherits the submitter's environment). NIC names differ per site:
# check `ibv_devinfo` / `ip -br link` on a compute node.

# Training ranks per node, one per GPU (used to render DRY_RUN on a login node; inside a
# job the GPUs actually visible win).
# shellcheck disable=SC2034  # read by slurm/launch.sh
NODE_GPUS=8

# Collectives go over the InfiniBand HCAs; "mlx5" is a prefix matching every ConnectX
# port. List them exactly (e.g. mlx5_0,mlx5_3,...) where some ports serve storage instead.
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
# NCCL's bootstrap and socket fallback use Ethernet: skip loopback and container bridges
# (a bridge address is unreachable from other nodes and hangs the first collective).
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
# RoCE fabrics need the RoCEv2 GID (usually 3); plain InfiniBand needs nothing.
# export NCCL_IB_GID_INDEX=3
# IB retransmit timeout 4.096 us * 2^22 (~17 s): a fabric congested by thousands of GPUs'
# all-to-all traffic must not turn into "transport retry exceeded", which kills the job.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# The most retransmissions InfiniBand allows before that error, for the same reason.
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
# WARN prints only problems; INFO shows the chosen transports and rings (set INFO to debug).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# A collective that errors or times out aborts the communicator and the process, so a dead
# peer ends the job within parallel.timeout_s instead of hanging every other rank.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# One hardware work queue per GPU: kernels run in launch order, which Megatron-style
# tensor-parallel communication overlap relies on. Layouts without TP (V3: tp=1) may gain
# from more queues (e.g. 8) when a profile shows ZeRO/EP streams serialising.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# MoE tensors change shape every step (tokens per expert vary); expandable segments stop
# the caching allocator from fragmenting into out-of-memory errors.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# DGX-class nodes have ~112 cores for 8 ranks: a few threads each for CPU-side work,
# without every rank spawning one thread per core.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# DeepSpeed's CUDA accelerator (launchers/train.py guesses it from /dev/nvidia0 otherwise).
export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
