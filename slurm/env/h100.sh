# shellcheck shell=bash
# Environment for H100 SXM nodes (sourced by the job scripts in slurm/).
#
# Same shape as the H800 profile (8 GPUs per node on NVLink/NVSwitch, one 400 Gb/s
# InfiniBand NIC per GPU), so the same settings, kept in one place: h800.sh explains each.
# The H100's NVLink runs at the full 900 GB/s, which NCCL discovers itself. Site-specific
# differences common on H100 systems, set before sbatch: NCCL_IB_HCA listing exactly the
# compute NICs where extra ports serve storage, and NCCL_IB_GID_INDEX=3 on RoCE fabrics
# (many cloud offerings).

# Every H800 setting applies unchanged (each is a default the submitter's export overrides).
# shellcheck source=SCRIPTDIR/h800.sh
source "$(dirname "${BASH_SOURCE[0]}")/h800.sh"
