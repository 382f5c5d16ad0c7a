# shellcheck shell=bash
# Environment for H100 SXM nodes (sourced by the job scripts in slurm/).
#
# Same shape as the H800 profile (8 GPUs per node on NVLink/NVSwitch, one 400 Gb/s
# InfiniBand NIC per GPU), so the same settings; the H100's NVLink runs at the full
# 900 GB/s, which NCCL discovers itself. Every value is a default: export the variable
# before sbatch to override it.

# Training ranks per node, one per GPU (DRY_RUN on a login node renders this many).
# shellcheck disable=SC2034  # read by slurm/launch.sh
NODE_GPUS=8

# Collectives go over the InfiniBand HCAs; "mlx5" is a prefix matching every ConnectX
# port. List them exactly where some ports serve storage (common on H100 systems with
# extra NICs for the storage fabric).
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
# NCCL's bootstrap and socket fallback use Ethernet: skip loopback and container bridges.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
# RoCE fabrics (many cloud H100 offerings) need the RoCEv2 GID, usually 3.
# export NCCL_IB_GID_INDEX=3
# IB retransmit timeout 4.096 us * 2^22 (~17 s): a fabric congested by thousands of GPUs'
# all-to-all traffic must not turn into "transport retry exceeded", which kills the job.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# The most retransmissions InfiniBand allows before that error, for the same reason.
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
# WARN prints only problems; INFO shows the chosen transports and rings (set INFO to debug).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# A failing or timed-out collective aborts the process: a dead peer ends the job, no hang.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# One hardware work queue per GPU so kernels run in launch order (Megatron-style TP
# communication overlap relies on it); raise it for tp=1 layouts if streams serialise.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# Variable-shape MoE tensors: expandable segments avoid allocator fragmentation.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# A few CPU threads per rank rather than one per core for each of the 8 ranks.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# DeepSpeed's CUDA accelerator.
export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
