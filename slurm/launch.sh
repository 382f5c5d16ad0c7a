# shellcheck shell=bash
# shellcheck source-path=SCRIPTDIR
# Launch logic shared by the job scripts in slurm/ (sourced by them, never submitted):
# cluster profile -> ranks per node -> rendezvous address -> command -> run it with
# preemption forwarding, then requeue the job if the ranks stopped for preemption.
#
# Inputs, all from the environment (the job inherits the submitter's), all optional:
#   CLUSTER            h800 (default) | h100 | cpu: which slurm/env/<cluster>.sh to source; a GPU
#                      profile with no GPU visible exits 1 (only cpu trains on CPU)
#   CONFIG             config for the entry point (default: the job script's; smoke_cpu on cpu)
#   OVERRIDES          space-separated key=value config overrides ("train.steps=100 train.lr=1e-4")
#   ENTRY              training entry point (default launchers/train.py)
#   PYTHON             interpreter (default: the repository's .venv/bin/python, else python3)
#   GPUS_PER_NODE      ranks per GPU node (default: the GPUs visible in the job)
#   MASTER_ADDR        rendezvous host (default: the job's first node)
#   MASTER_PORT        rendezvous port (default: 20000 + job id % 20000)
#   RANK_EXIT_GRACE_S  seconds srun lets the other ranks run once one has exited (default 120)
#   SRUN_ARGS          extra srun flags for the site (--mpi=pmix, --cpu-bind=..., --container-image=...)
#   DRY_RUN=1          print the launch command and exit 0; nothing runs, no allocation needed
#
# Exit status of the job: the ranks' (0 done, 1 failed, 2 bad config); 75 (EX_TEMPFAIL,
# ds_parallel/train/trainer.py EXIT_PREEMPTED) means "checkpointed for preemption", on
# which the job requeues itself and the next start resumes from the run's latest checkpoint.

DSP_EXIT_PREEMPTED=75

dsp_log() {
    printf '[%s] %s\n' "$(date '+%F %T')" "$*" >&2
}

# The job's host names, one per line. scontrol expands any Slurm node list; without it
# (DRY_RUN off the cluster) one bracket group per entry is expanded here: gpu[001-002,007].
dsp_hostnames() {
    local list=$1 hosts entry prefix ranges suffix range r lo hi i
    if command -v scontrol >/dev/null 2>&1 \
        && hosts=$(timeout 10 scontrol show hostnames "$list" 2>/dev/null) && [[ -n $hosts ]]; then
        printf '%s\n' "$hosts"
        return
    fi
    # Split at commas outside brackets.
    local entries=() depth=0 current="" c
    for ((i = 0; i < ${#list}; i++)); do
        c=${list:i:1}
        case $c in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
        esac
        if [[ $c == "," && $depth == 0 ]]; then
            entries+=("$current")
            current=""
        else
            current+=$c
        fi
    done
    entries+=("$current")
    for entry in "${entries[@]}"; do
        if [[ $entry != *"["* ]]; then
            echo "$entry"
            continue
        fi
        prefix=${entry%%"["*}
        ranges=${entry#*"["}
        suffix=${ranges#*"]"}
        ranges=${ranges%%"]"*}
        IFS=, read -r -a range <<<"$ranges"
        for r in "${range[@]}"; do
            lo=${r%-*}
            hi=${r#*-}
            for ((i = 10#$lo; i <= 10#$hi; i++)); do
                printf '%s%0*d%s\n' "$prefix" "${#lo}" "$i" "$suffix"
            done
        done
    done
}

# GPUs visible to this shell (Slurm confines them to the job's allocation).
dsp_visible_gpus() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || n=0
    fi
    echo "$n"
}

# Value of "#SBATCH --<name>=<value>" in the job script itself, else $2: what DRY_RUN
# renders outside an allocation, so it shows the defaults sbatch would apply.
dsp_sbatch_default() {
    local value
    value=$(sed -n "s/^#SBATCH --$1=\([^ ]*\).*/\1/p" "$0" 2>/dev/null | head -n1)
    echo "${value:-$2}"
}

# dsp_init [GPU_CONFIG]: profile, ranks, rendezvous, config and the override list. Sets
# CLUSTER, NODES, WORLD, RANKS_PER_NODE (GPUs per node; empty on CPU, where ranks follow
# Slurm's task layout), NODELIST, MASTER_ADDR/PORT (exported), PYTHON, ENTRY, CONFIG and
# DSP_OVERRIDES. CONFIG defaults to the tiny CPU smoke config on CLUSTER=cpu, else to
# GPU_CONFIG; a job script without a GPU_CONFIG requires CONFIG off the CPU profile.
dsp_init() {
    cd "$DSP_REPO" || exit 2
    CLUSTER=${CLUSTER:-h800}
    if [[ ! -f slurm/env/$CLUSTER.sh ]]; then
        dsp_log "unknown CLUSTER=$CLUSTER: no slurm/env/$CLUSTER.sh (use h800, h100 or cpu)"
        exit 2
    fi
    # shellcheck source=/dev/null
    source "slurm/env/$CLUSTER.sh"

    NODES=${SLURM_JOB_NUM_NODES:-$(dsp_sbatch_default nodes 1)}
    if [[ $CLUSTER != cpu ]]; then
        RANKS_PER_NODE=${GPUS_PER_NODE:-$(dsp_visible_gpus)}
        if ((RANKS_PER_NODE == 0)) && [[ ${DRY_RUN:-0} == 1 ]]; then
            RANKS_PER_NODE=$NODE_GPUS
            dsp_log "dry run: no GPU visible here; rendering $RANKS_PER_NODE ranks per node as on $CLUSTER nodes"
        elif ((RANKS_PER_NODE == 0)); then
            # Never a silent CPU run: a GPU job on a broken node would train the CPU smoke
            # model and end COMPLETED.
            dsp_log "no GPU visible on $(hostname -s) for CLUSTER=$CLUSTER: not starting (set CLUSTER=cpu to train on CPU)"
            exit 1
        fi
    fi
    if [[ $CLUSTER == cpu ]]; then
        # One rank per Slurm task: the job's task count, or the script's defaults.
        WORLD=${SLURM_NTASKS:-$((NODES * $(dsp_sbatch_default ntasks-per-node 1)))}
        RANKS_PER_NODE=
    else
        WORLD=$((NODES * RANKS_PER_NODE))
    fi

    NODELIST=${SLURM_JOB_NODELIST:-$(hostname -s)}
    # sed, not head: head exits after one line, and the SIGPIPE of a node list still being
    # written would fail the pipeline (pipefail) and end the script with 141.
    MASTER_ADDR=${MASTER_ADDR:-$(dsp_hostnames "$NODELIST" | sed -n 1p)}
    # A port per job, so jobs sharing a node do not collide; stable across requeues.
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    export MASTER_ADDR MASTER_PORT
    # Ranks come from Slurm's variables (or the launcher's): a stray RANK/WORLD_SIZE from
    # the submitting shell would take precedence in ds_parallel/parallel/init.py.
    unset RANK WORLD_SIZE LOCAL_RANK

    if [[ -z ${PYTHON:-} ]]; then
        PYTHON=python3
        if [[ -x .venv/bin/python ]]; then PYTHON=$DSP_REPO/.venv/bin/python; fi
    fi
    ENTRY=${ENTRY:-launchers/train.py}
    read -r -a DSP_OVERRIDES <<<"${OVERRIDES:-}"

    if [[ $CLUSTER == cpu ]]; then
        CONFIG=${CONFIG:-configs/smoke_cpu.yaml}
    else
        CONFIG=${CONFIG:-${1:-}}
    fi
    if [[ -z $CONFIG ]]; then
        dsp_log "set CONFIG=<config>: ${SLURM_JOB_NAME:-$0} has no default config on CLUSTER=$CLUSTER"
        exit 2
    fi
}

# The srun command: one rank per GPU (or per task on CPU), ranks from Slurm's variables.
dsp_srun_command() {
    DSP_CMD=(srun --nodes="$NODES" --ntasks="$WORLD")
    # GPU nodes: exactly one rank per GPU on every node. CPU: Slurm's task layout as given.
    if [[ -n $RANKS_PER_NODE ]]; then DSP_CMD+=(--ntasks-per-node="$RANKS_PER_NODE"); fi
    # A rank that exits must not kill its peers at once: on preemption every rank exits 75
    # after the checkpoint and srun must report that 75, not the SIGKILL of a slower peer.
    # --wait bounds a hang instead: once one rank is gone the rest get RANK_EXIT_GRACE_S.
    DSP_CMD+=(--kill-on-bad-exit=0 --wait="${RANK_EXIT_GRACE_S:-120}" --label)
    local extra=()
    read -r -a extra <<<"${SRUN_ARGS:-}"
    DSP_CMD+=("${extra[@]}")
    # Slurm sets CUDA_VISIBLE_DEVICES per step on GPU nodes; the CPU profile must hide them.
    if [[ $CLUSTER == cpu ]]; then DSP_CMD+=(env CUDA_VISIBLE_DEVICES=); fi
    DSP_CMD+=("$PYTHON" -u "$ENTRY" --config "$CONFIG" "${DSP_OVERRIDES[@]}")
}

# dsp_srun_job [GPU_CONFIG]: the whole job of an srun job script (dsp_init, then srun
# under dsp_launch).
dsp_srun_job() {
    dsp_init "$@"
    dsp_srun_command
    dsp_launch "${DSP_CMD[@]}"
}

dsp_forward_to_child() {
    kill -"$1" "$DSP_CHILD" 2>/dev/null || true
}

_dsp_on_usr1() {
    DSP_SIGNALLED=1
    dsp_log "SIGUSR1 (preemption warning): asking every rank to checkpoint and exit"
    "${DSP_FORWARD:-dsp_forward_to_child}" USR1
}

_dsp_on_term() {
    DSP_SIGNALLED=1
    DSP_GOT_TERM=1
    dsp_log "SIGTERM: passing it to the ranks (they checkpoint if Slurm's KillWait allows)"
    "${DSP_FORWARD:-dsp_forward_to_child}" TERM
}

# Run "$@" (or print it under DRY_RUN). SIGUSR1 to this shell (sbatch --signal=B:USR1@..,
# scancel --signal=USR1 --batch) reaches every rank through DSP_FORWARD (default: the
# child, i.e. srun, which relays it to all tasks). Ranks exiting 75 -> scontrol requeue.
dsp_launch() {
    local line rc=0
    line=$(printf '%q ' "$@")
    dsp_log "job ${SLURM_JOB_ID:-(none)} start ${SLURM_RESTART_COUNT:-0}: cluster=$CLUSTER nodes=$NODES" \
        "ranks=$WORLD master=$MASTER_ADDR:$MASTER_PORT config=$CONFIG"
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "${line% }"
        exit 0
    fi
    dsp_log "launch: ${line% }"
    DSP_GOT_TERM=0
    trap _dsp_on_usr1 USR1
    trap _dsp_on_term TERM
    "$@" &
    DSP_CHILD=$!
    while :; do
        DSP_SIGNALLED=0
        if wait "$DSP_CHILD"; then rc=0; else rc=$?; fi
        # A trapped signal interrupts `wait` with a status > 128: wait again for the ranks.
        ((DSP_SIGNALLED && rc > 128)) || break
    done
    trap - USR1 TERM
    if ((rc == DSP_EXIT_PREEMPTED)); then
        if ((DSP_GOT_TERM)) || [[ -z ${SLURM_JOB_ID:-} ]]; then
            # scancel, or Slurm's own preemption (which requeues by itself when so configured).
            dsp_log "ranks checkpointed and exited ($rc) after SIGTERM: not requeueing"
        else
            dsp_log "ranks checkpointed for preemption (exit $rc): requeueing job $SLURM_JOB_ID"
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0 # Slurm ends this shell; the next start resumes from the latest checkpoint
            fi
            dsp_log "scontrol requeue failed (job not requeueable?): resubmit the same command to resume"
        fi
    fi
    dsp_log "ranks exited with status $rc"
    exit "$rc"
}
