#!/bin/bash
# The default reproduction on a GPU, in one call, ending in a short table: seeds 42, 137, 2024, 7
# and 314 at the default setting with --val-size 5000 --control lr-matched, every arm at once,
# then the summary. OUT_DIR becomes a published folder: results files, figures, the summary, the
# run's log (log.txt) and the machine (machine.txt); the table gives its README's figures.
# Usage, from the project root:
#   [RUN_LIMIT_S=S] bash tools/gpu_reproduce.sh DATA_DIR OUT_DIR [run flags: --resume, other --seeds, ...]
# DATA_DIR holds cifar-10-batches-py/. Later flags win over the defaults above. RUN_LIMIT_S stops
# the run after S seconds as Ctrl-C would (every arm keeps its last epoch's checkpoint, for
# --resume), so that the table still comes within a call's time limit.
set -uo pipefail
data=$1 out=$2
shift 2
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, numpy, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__)"
  echo "$(nproc) CPU cores, $(date -u +%Y-%m-%d)"; } > "$out/machine.txt"
start=$(date +%s.%N)
timeout --signal=INT --kill-after=60 "${RUN_LIMIT_S:-0}" python3 phase_controller.py --data-dir "$data" --seeds 42,137,2024,7,314 --val-size 5000 --control lr-matched \
    --output-dir "$out" "$@" >> "$out/log.txt" 2>&1
code=$?
wall=$(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')")
echo "exit code $code, $wall s" >> "$out/log.txt"
resumed=no
for flag in "$@"; do [ "$flag" = --resume ] && resumed=yes; done
python3 - "$out" "$code" "$wall" "$resumed" <<'PYTHON'
import statistics, sys
from pathlib import Path

from phase_cifar10.evidence import build_summary, load_seed_results, summary_table
from phase_cifar10.records import ARMS

out, code, wall, resumed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "yes"
print(open(out / "machine.txt").read().strip())
stopped = " (stopped at RUN_LIMIT_S: rerun with --resume to continue)" if code == "124" else ""
print(f"run: exit code {code}{stopped}, {wall} s from start to summary")
# The seeds that finished, in the table their summary writes (the one a README shows).
seeds = load_seed_results(out) if any(out.glob("results_seed_*.json")) else {}
table = summary_table(build_summary(seeds)) if seeds else ""
print("\n".join(line for line in table.splitlines() if line.startswith("|")) or "no seed finished")
seconds = {"train": [], "eval": []}
for r in seeds.values():
    for arm in (r[name] for name in ARMS if name in r):
        for kind in seconds:
            seconds[kind] += arm["per_epoch"].get(f"{kind}_seconds", [])
if n := len(seconds["train"]):
    print(f"seconds per arm-epoch, median over {n}: training {statistics.median(seconds['train']):.2f}, "
          f"evaluation {statistics.median(seconds['eval']):.2f}"
          + ("" if resumed else f"; wall time per arm-epoch {float(wall) / n:.2f}"))
_, heading, summary = (out / "log.txt").read_text().rpartition("\nsummary over seeds ")
print((heading + summary).strip() if heading else "no summary in the log")
print(f"{len(seeds)} results files; summary file {'written' if (out / 'multi_seed_summary.json').exists() else 'MISSING'}")
PYTHON
