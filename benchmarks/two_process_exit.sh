#!/usr/bin/env bash
# Runs the two-process CPU training (torchrun, gloo, 2 steps of the default run) N times and counts
# the runs that exit non-zero: the check for #25 item 12 (a rank aborting at exit after the run
# finished). Each failing run's log is kept in OUT, with a core file of the aborted rank (inspect it
# with `gdb python OUT/core -ex "thread apply all bt"`).
#   usage: benchmarks/two_process_exit.sh N OUT [python]
# Measured on 2 CPU cores: 1 abort in 17 runs before exit_process, 0 in 50 after.
set -u
N=$1; OUT=$(realpath -m "$2"); PYTHON=${3:-python}
case $PYTHON in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac  # absolute, not resolved: a venv python is a link
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"; cd "$OUT"
ulimit -c unlimited
failures=0
for i in $(seq 1 "$N"); do
  rm -rf "$OUT/run"
  if OMP_NUM_THREADS=1 PYTHONFAULTHANDLER=1 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 --master-port 29531 \
      -m torchspec.trainer.cli train --config "$REPO/configs/default_llama.yaml" data.max_seq_length=256 \
      metrics.progress_bar=false metrics.log_interval=1000 metrics.eval_interval=0 metrics.speculative_eval_prompts=0 \
      training.max_steps=2 "training.output_dir=$OUT/run" > "$OUT/log.$i" 2>&1; then
    rm "$OUT/log.$i"
  else
    failures=$((failures + 1))
  fi
  echo "$i runs, $failures exited non-zero"
done
[ "$failures" -eq 0 ]
