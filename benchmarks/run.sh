#!/usr/bin/env bash
# One PPO iteration: rlhf-lightning beside the bare-PyTorch floor (and TRL 1.12 when
# .venv-trl exists: python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 trl==1.12.0).
# Each line: the implementation's JSON, then its peak RSS. Usage: VOCAB=50257 benchmarks/run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-../shared/bench}
run() {  # name, python, script
  local log json
  log=$(mktemp)
  json=$(/usr/bin/time -v -o "$log" "$2" "$3" 2>/dev/null | grep median_iter_s)
  echo "$1 $json peak_rss_kb=$(grep 'Maximum resident' "$log" | grep -o '[0-9]*$')"
  rm -f "$log"
}
run floor .venv/bin/python "$BENCH/floor_ppo.py"
run rlhf-lightning .venv/bin/python benchmarks/ppo_iteration.py
if [ -x .venv-trl/bin/python ]; then run trl .venv-trl/bin/python "$BENCH/trl_ppo.py"; fi
