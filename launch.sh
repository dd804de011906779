#!/usr/bin/env bash
# Start dpo_jax.main on several processes: a TPU VM pod, a SLURM GPU cluster, or this machine.
# Every mode prints the exact commands before it runs them. See docs/scale.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage:
  launch.sh tpu NAME ZONE [--project P] [--install git|tarball] [--git-url URL] -- <main args>
      Run `python3 -m dpo_jax.main <main args>` on every worker of the TPU VM NAME through
      `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "..."`.
      First the repository is put in ~/dpo_jax on each worker and pip installed from there
      (with jax[tpu]); main then runs in ~/dpo_jax so --config=configs/... paths resolve:
        --install git      (default) git clone URL at COMMIT (URL: --git-url, else this
                           checkout's `origin` remote; COMMIT: this checkout's HEAD, so every
                           worker runs the same code; it must be pushed).
        --install tarball  `git archive HEAD` to dpo_jax.tar.gz, copied to each worker with
                           `gcloud compute tpus tpu-vm scp` and unpacked (no git access needed
                           on the workers; uncommitted changes are NOT included).
      The workers get DPO_JAX_TPU_POD=1, so main calls jax.distributed.initialize() with no
      arguments (topology from the TPU metadata). --workdir must be shared by all workers.

  launch.sh slurm NODES GPUS_PER_NODE [--dry-run] [--partition P] [--time HH:MM:SS]
                  [--job-name N] [--script FILE] [--signal-before S] -- <main args>
      Write an sbatch script (one task per node, all GPUS_PER_NODE GPUs to that task, srun
      starts the tasks; main reads SLURM_NTASKS/SLURM_PROCID/SLURM_STEP_NODELIST) and submit it
      with sbatch. The job is requeueable and gets SIGTERM S seconds (default 120) before its
      time limit: the run checkpoints and exits 0, and the requeued job resumes from it.
      --dry-run prints the script and the sbatch command without running anything.

  launch.sh local N [--devices-per-process D] -- <main args>
      Start N processes of `python -m dpo_jax.main` here (CPU, D fake devices each, default 4),
      coordinator 127.0.0.1:<free port>, process ids 0..N-1. Prints "process I pid P" per
      process, forwards SIGTERM/SIGINT to all, waits for all, and exits non-zero as soon as one
      fails (the others are then terminated). For testing multi-host code on one machine.
      $PYTHON selects the interpreter (default: python).

Long-context examples (each sequence split over mesh.shape.context devices; docs/scale.md,
"Long context"; configs/long_context.py):
  launch.sh tpu my-v5p-64 us-east5-a -- --config=configs/long_context.py:tpu_v5p_64 \
      --workdir=/mnt/shared/runs/lc --config.model.hf_path=/mnt/shared/models/Llama-3.1-8B \
      --config.data.path=/mnt/shared/data/long_pairs.jsonl        # fsdp 8 x context 4
  launch.sh slurm 8 8 --time 24:00:00 -- --config=configs/long_context.py:gpu_8x8 \
      --workdir=/shared/runs/lc --config.model.hf_path=/shared/models/Llama-3.1-8B \
      --config.data.path=/shared/data/long_pairs.jsonl            # fsdp 8 x context 8
  launch.sh local 2 --devices-per-process 4 -- --config=configs/long_context.py:smoke \
      --workdir=/tmp/runs/lc                                       # data 2 x context 4, CPU
EOF
}

say() { printf '+ %s\n' "$*" >&2; }
quote_args() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; printf '%s' "${out% }"; }

[[ $# -ge 1 ]] || { usage; exit 2; }
mode=$1; shift
case "$mode" in -h|--help|help) usage; exit 0 ;; esac

# ------------------------------------------------------------------------------------- tpu
if [[ $mode == tpu ]]; then
  [[ $# -ge 2 ]] || { usage; exit 2; }
  name=$1 zone=$2; shift 2
  project="" install=git git_url=""
  while [[ $# -gt 0 && $1 != -- ]]; do
    case $1 in
      --project) project=$2; shift 2 ;;
      --install) install=$2; shift 2 ;;
      --git-url) git_url=$2; shift 2 ;;
      *) echo "launch.sh tpu: unknown option $1" >&2; exit 2 ;;
    esac
  done
  [[ ${1:-} == -- ]] && shift
  gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all)
  gcloud_scp=(gcloud compute tpus tpu-vm scp dpo_jax.tar.gz "$name:~/" --zone "$zone" --worker=all)
  if [[ -n $project ]]; then gcloud_ssh+=(--project "$project"); gcloud_scp+=(--project "$project"); fi
  case $install in
    git)
      url=${git_url:-$(git remote get-url origin)}
      commit=$(git rev-parse HEAD)
      setup="rm -rf ~/dpo_jax && git clone -q $url ~/dpo_jax && git -C ~/dpo_jax checkout -q $commit" ;;
    tarball)
      say git archive --format=tar.gz -o dpo_jax.tar.gz HEAD
      git archive --format=tar.gz -o dpo_jax.tar.gz HEAD
      say "${gcloud_scp[@]}"
      "${gcloud_scp[@]}"
      setup="rm -rf ~/dpo_jax && mkdir ~/dpo_jax && tar xzf ~/dpo_jax.tar.gz -C ~/dpo_jax" ;;
    *) echo "launch.sh tpu: --install is git or tarball, not $install" >&2; exit 2 ;;
  esac
  setup+=" && pip install -U 'jax[tpu]' && pip install -e ~/dpo_jax"
  say "${gcloud_ssh[@]}" --command "$setup"
  "${gcloud_ssh[@]}" --command "$setup"
  run="cd ~/dpo_jax && DPO_JAX_TPU_POD=1 python3 -m dpo_jax.main $(quote_args "$@")"
  say "${gcloud_ssh[@]}" --command "$run"
  exec "${gcloud_ssh[@]}" --command "$run"
fi

# ----------------------------------------------------------------------------------- slurm
if [[ $mode == slurm ]]; then
  [[ $# -ge 2 ]] || { usage; exit 2; }
  nodes=$1 gpus=$2; shift 2
  dry=0 partition="" time_limit="" job=dpo_jax script="" before=120
  while [[ $# -gt 0 && $1 != -- ]]; do
    case $1 in
      --dry-run) dry=1; shift ;;
      --partition) partition=$2; shift 2 ;;
      --time) time_limit=$2; shift 2 ;;
      --job-name) job=$2; shift 2 ;;
      --script) script=$2; shift 2 ;;
      --signal-before) before=$2; shift 2 ;;
      *) echo "launch.sh slurm: unknown option $1" >&2; exit 2 ;;
    esac
  done
  [[ ${1:-} == -- ]] && shift
  script=${script:-$job.sbatch}
  {
    echo "#!/bin/bash"
    echo "#SBATCH --job-name=$job"
    echo "#SBATCH --nodes=$nodes"
    echo "#SBATCH --ntasks-per-node=1"
    echo "#SBATCH --gpus-per-node=$gpus"
    echo "#SBATCH --requeue"
    echo "#SBATCH --open-mode=append"
    echo "#SBATCH --signal=TERM@$before"
    echo "#SBATCH --output=$job-%j.out"
    [[ -n $partition ]] && echo "#SBATCH --partition=$partition"
    [[ -n $time_limit ]] && echo "#SBATCH --time=$time_limit"
    echo "# One task per node sees all $gpus GPUs of its node; dpo_jax.distributed reads"
    echo "# SLURM_NTASKS, SLURM_PROCID and SLURM_STEP_NODELIST (coordinator: the first node)."
    echo "srun --kill-on-bad-exit=1 python -m dpo_jax.main $(quote_args "$@")"
  } > "$script"
  say "cat $script"
  cat "$script" >&2
  say sbatch "$script"
  if [[ $dry == 1 ]]; then echo "launch.sh slurm: dry run, nothing submitted" >&2; exit 0; fi
  exec sbatch "$script"
fi

# ----------------------------------------------------------------------------------- local
if [[ $mode == local ]]; then
  [[ $# -ge 1 ]] || { usage; exit 2; }
  n=$1; shift
  per=4
  while [[ $# -gt 0 && $1 != -- ]]; do
    case $1 in
      --devices-per-process) per=$2; shift 2 ;;
      *) echo "launch.sh local: unknown option $1" >&2; exit 2 ;;
    esac
  done
  [[ ${1:-} == -- ]] && shift
  py=${PYTHON:-python}
  port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # The scheduler flag keeps XLA:CPU collectives in program order (see tests/conftest.py).
  xla="--xla_force_host_platform_device_count=$per --xla_cpu_enable_concurrency_optimized_scheduler=false"
  pids=()
  for ((i = 0; i < n; i++)); do
    say JAX_PLATFORMS=cpu "XLA_FLAGS='$xla'" DPO_JAX_COORDINATOR=127.0.0.1:$port \
        DPO_JAX_NUM_PROCESSES=$n DPO_JAX_PROCESS_ID=$i "$py" -m dpo_jax.main "$(quote_args "$@")"
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla" DPO_JAX_COORDINATOR=127.0.0.1:$port \
      DPO_JAX_NUM_PROCESSES=$n DPO_JAX_PROCESS_ID=$i "$py" -m dpo_jax.main "$@" &
    pids+=($!)
    echo "process $i pid $!"
  done
  stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
  trap stop_all TERM INT
  remaining=$n
  declare -A finished=()
  while ((remaining > 0)); do
    for i in "${!pids[@]}"; do
      p=${pids[$i]}
      [[ -n ${finished[$p]:-} ]] && continue
      kill -0 "$p" 2>/dev/null && continue
      rc=0; wait "$p" || rc=$?
      finished[$p]=1; remaining=$((remaining - 1))
      if ((rc != 0)); then
        echo "launch.sh local: process $i (pid $p) exited with $rc; stopping the others" >&2
        stop_all; sleep 2
        for q in "${pids[@]}"; do kill -KILL "$q" 2>/dev/null || true; done
        wait || true
        exit "$rc"
      fi
    done
    sleep 0.2
  done
  exit 0
fi

echo "launch.sh: unknown mode $mode" >&2; usage; exit 2
