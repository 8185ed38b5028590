#!/usr/bin/env bash
# One node, torchrun: one process per GPU, or NPROC processes on the CPU.
#
#   launch/train.sh configs/llama-7b.yaml [key.sub=value ...]          # every visible GPU
#   NGPU=4 launch/train.sh configs/llama-7b.yaml parallel.tp=4          # the first 4 of them
#   NPROC=4 launch/train.sh configs/debug.yaml parallel.tp=2 train.device=cpu   # 4 CPU processes (gloo)
#
# NGPU   processes, one per GPU (default: the number of GPUs torch sees, honouring CUDA_VISIBLE_DEVICES)
# NPROC  CPU mode: this many processes on the CPU, each with OMP_NUM_THREADS = cores / NPROC;
#        train.device=cpu is passed before your overrides
# OMP_NUM_THREADS   kept if you set it; else cores / processes (at least 1)
# PYTHON            interpreter with bigtrain installed (default: .venv/bin/python)
# TORCHRUN_ARGS     extra torchrun arguments, e.g. "--max-restarts 2"
#
# Multi-node jobs: slurm/train.sbatch. One process without torchrun: launch/debug.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: [NGPU=N | NPROC=N] $0 CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
}
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac
CONFIG=$1
shift
[ -f "$CONFIG" ] || { echo "$0: config file '$CONFIG' does not exist" >&2; exit 2; }

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || {
  echo "$0: $PY not found; run 'bash launch/setup.sh' (or 'make setup') first, or set PYTHON" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
EXTRA=()
if [ -n "${NPROC:-}" ]; then
  is_count "$NPROC" || { echo "$0: NPROC=$NPROC is not a positive integer" >&2; exit 2; }
  PROCS=$NPROC
  EXTRA=(train.device=cpu)
  MODE="cpu"
else
  if [ -n "${NGPU:-}" ]; then
    is_count "$NGPU" || { echo "$0: NGPU=$NGPU is not a positive integer" >&2; exit 2; }
    PROCS=$NGPU
  else
    PROCS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "$PROCS" -lt 1 ]; then
      echo "$0: no GPU visible. For CPU processes set NPROC, e.g." >&2
      echo "  NPROC=2 $0 $CONFIG train.device=cpu [key.sub=value ...]" >&2
      echo "or run one process with launch/debug.sh $CONFIG" >&2
      exit 2
    fi
  fi
  MODE="gpu"
fi

if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( CORES / PROCS ))
  [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

# shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of words on purpose
TR_ARGS=(${TORCHRUN_ARGS:-})
# stdout, so that stderr holds only problems: a user error (bad config, layout, path, a rank that
# stopped answering) ends the job with its one line, printed once, and exit code 2 -- every rank
# leaves the line in a temporary folder and bigtrain.cli.torchrun_main prints the lowest rank's,
# instead of one line per rank and torchrun's ChildFailedError traceback. Other failures keep
# torchrun's report and exit code 1.
echo "launch/train.sh: $PROCS $MODE process(es), OMP_NUM_THREADS=$OMP_NUM_THREADS, config $CONFIG"
echo "+ torchrun --standalone --nproc_per_node $PROCS ${TR_ARGS[*]} -m bigtrain.cli train --config $CONFIG ${EXTRA[*]} $*"
exec "$PY" -c 'import sys; from bigtrain.cli import torchrun_main; sys.exit(torchrun_main(sys.argv[1:]))' \
  --standalone --nproc_per_node "$PROCS" "${TR_ARGS[@]}" \
  -m bigtrain.cli train --config "$CONFIG" "${EXTRA[@]}" "$@"
