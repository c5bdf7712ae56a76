#!/usr/bin/env bash
# Both sweeps of experiments/sweep.py at once on a GPU machine (16 cores, one GPU): the lever study and the pace study
# configs it does not share, as parallel jobs, then their tables and the pace plot. Usage: bash experiments/gpu_sweeps.sh [seconds]
# (a time limit: what is unfinished then resumes on the next call). On a 2-core CPU run `python experiments/sweep.py` instead.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT=${1:-100000}
SECONDS=0
# collect every source once, before the parallel jobs (the original design's no-terminate A2C stops at 400k steps, twice what ad_dt.py keeps by default)
"$PYTHON" collect_histories_tabular.py --tasks all --histories-dir histories > /dev/null
"$PYTHON" collect_histories.py --tasks all --histories-dir histories_a2c_fast --num-envs 1 --learning-rate 3e-3 --total-timesteps 20000 --history-len 20000 > /dev/null
"$PYTHON" collect_histories.py --tasks all --histories-dir histories_a2c_noterm --no-terminate-on-goal --total-timesteps 400000 --history-len 400000 > /dev/null
"$PYTHON" collect_histories_tabular.py --tasks all --histories-dir histories_explorer --source explorer --num-envs 1000 --history-len 128000 > /dev/null
echo "sources collected in ${SECONDS}s"
PACE_ONLY="a2c_k1_h200k a2c_k10_h200k a2c_k200_h200k a2c_k1_h800k a2c_k10_h800k a2c_k50_h800k a2c_k200_h800k a2cfast_k1 a2cfast_k5 a2cfast_k50"
timeout $((LIMIT - SECONDS)) "$PYTHON" experiments/sweep.py --study levers --cuda --jobs 12 &
timeout $((LIMIT - SECONDS)) "$PYTHON" experiments/sweep.py --study pace --cuda --jobs 11 --only $PACE_ONLY &
wait
"$PYTHON" experiments/sweep.py --study levers --summarize-only > /dev/null
"$PYTHON" experiments/sweep.py --study pace --summarize-only > /dev/null
echo "sweeps done in ${SECONDS}s: results/sweeps/{levers,pace}.md, results/sweeps/pace_study.png"
