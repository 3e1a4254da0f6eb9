#!/bin/bash
# The fast path's checks on a GPU, in one call, ending in a short table:
#   1. the benchmark with --check: the fast path, a second run and a run without NaN fills equal
#      the eager run bit for bit, every concurrency equals one at a time; and its figures;
#   2. the program twice with the same command, and once with --eager: the three runs' results
#      files must be equal but for their timings.
# Usage: bash tools/gpu_check.sh DATA_DIR OUT_DIR [run flags, e.g. --dataset synthetic --width 4]
# DATA_DIR holds cifar-10-batches-py/. Everything it writes goes under OUT_DIR.
set -uo pipefail
data=$1 out=$2
shift 2
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"; } > "$out/machine.txt"
python3 -m phase_cifar10.benchmark --data-dir "$data" --val-size 5000 --epochs 3 --check --json "$out/benchmark.json" \
    "$@" > "$out/benchmark.log" 2>&1
echo "benchmark exit code $?" >> "$out/benchmark.log"
for run in fast-1 fast-2 eager; do
    flags=()
    [ "$run" = eager ] && flags=(--eager)
    python3 phase_controller.py --data-dir "$data" --seeds 1,2 --epochs 3 --val-size 5000 --control lr-matched \
        --output-dir "$out/$run" "${flags[@]}" "$@" > "$out/$run.log" 2>&1
    echo "exit code $?" >> "$out/$run.log"
done
python3 - "$out" <<'PYTHON'
import json, sys
from pathlib import Path

from phase_cifar10.records import without_timings

out = Path(sys.argv[1])

def results(run):
    return {p.name: without_timings(json.loads(p.read_text())) for p in sorted((out / run).glob("*.json"))}

print(open(out / "machine.txt").read().strip())
log = (out / "benchmark.log").read_text().splitlines()
print("\n".join(line for line in log if line.startswith(("one arm", "aten ops", "check:", "benchmark exit")) or "at once" in line))
first = results("fast-1")
print(f"program, {len(first)} results files; same command twice equal: {'yes' if first and results('fast-2') == first else 'NO'}")
print(f"program, --eager equal to the fast path: {'yes' if first and results('eager') == first else 'NO'}")
PYTHON
