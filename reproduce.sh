#!/usr/bin/env bash
# The whole Algorithm Distillation pipeline with the CPU defaults, for the sources side by side:
#   Dyna-Q (a learning source)  : histories_dynaq/     -> runs/ad_dynaq__*/    -> results/ad_dynaq/
#   explorer (scripted source)  : histories_explorer/  -> runs/ad_explorer__*/ -> results/ad_explorer/
#   A2C (the original design's) : histories/           -> runs/ad_a2c__*/      -> results/ad_a2c/  (WITH_A2C=1 only)
# `bash reproduce.sh` runs the first two (39 minutes on 2 CPU cores); `WITH_A2C=1 bash reproduce.sh` adds A2C
# (11 minutes more), the source AD does not learn to learn from (README.md, Results).
# Rerunning resumes: finished histories are skipped, an interrupted AD run continues from its last checkpoint,
# and an evaluation newer than its checkpoint is kept. A run in runs/ad_*__*/ resumes with the flags it was started
# with: after changing a stage's flags here, delete its runs/ and results/ directories to train it again.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
SECONDS=0
stage() { echo; echo "== $1 ($(date +%H:%M:%S), ${SECONDS}s so far)"; }

# train AD (or resume it) under runs/$1__*/ with the remaining arguments, then evaluate it into results/$1/
ad_and_eval() {
  local exp=$1 histories=$2; shift 2
  latest_checkpoint() { ls -d runs/"$exp"__*/ad_dt_*.pt 2>/dev/null | sort | tail -n 1; }
  local checkpoint
  checkpoint=$(latest_checkpoint || true)
  if [ -n "$checkpoint" ]; then
    echo "resuming from $checkpoint (nothing to do if it is the last update)"
    "$PYTHON" ad_dt.py --resume "$checkpoint"
  else
    "$PYTHON" ad_dt.py --exp-name "$exp" --histories-dir "$histories" "$@"
  fi
  checkpoint=$(latest_checkpoint)
  if [ -f "results/$exp/results.json" ] && [ "results/$exp/results.json" -nt "$checkpoint" ]; then
    echo "results/$exp/results.json is newer than $checkpoint: kept (delete it to evaluate again)"
  else
    "$PYTHON" eval_ad.py --checkpoint "$checkpoint" --histories-dir "$histories" --out-dir "results/$exp" --train-tasks
  fi
  echo "$exp: checkpoint $checkpoint, results in results/$exp/"
}

WITH_A2C=${WITH_A2C:-0}
N=$([ "$WITH_A2C" = 1 ] && echo 6 || echo 4)  # stages
stage "1/$N Dyna-Q learning histories: 500 learners from scratch per task, 256 steps each -> histories_dynaq/"
"$PYTHON" collect_histories.py --source dynaq --num-envs 500 --history-len 128000 --tasks all --histories-dir histories_dynaq
stage "2/$N AD on the Dyna-Q histories (a window = a whole stream; each token shows the pair tried) + evaluation"
# no dropout: 1.17x faster per update on the CPU, and at the same time (3600 updates for 3000) held-out success rose in 4
# GPU seeds, with no sign of memorised goals (experiments/README.md, "Training budget")
ad_and_eval ad_dynaq histories_dynaq --seq-len 256 --keep-every 1 --history-len None --prev-state --prev-next-state \
  --state-embedding rowcol --residual-dropout 0 --num-updates 3600 --eval-every 1800
stage "3/$N explorer histories: 1000 short learners per task -> histories_explorer/"
"$PYTHON" collect_histories.py --source explorer --num-envs 1000 --history-len 128000 --tasks all --histories-dir histories_explorer
stage "4/$N AD on the explorer histories (each token shows the pair tried, as for Dyna-Q) + evaluation"
# no dropout, 2 heads and 3 layers: each makes an update cheaper, which buys 6000 updates (the explorer's AD needs the tokens,
# not the depth; Dyna-Q's needs its 4 layers: experiments/README.md, "Training budget")
ad_and_eval ad_explorer histories_explorer --keep-every 1 --history-len None --prev-state --residual-dropout 0 --num-heads 2 \
  --num-layers 3 --num-updates 6000 --eval-every 3000
if [ "$WITH_A2C" = 1 ]; then
  stage "5/$N A2C learning histories of all 80 tasks, trained as far as the histories keep (800k env steps) -> histories/"
  # the original design trains 2.5M steps but keeps the first 800k; the steps after them change no history (tested)
  "$PYTHON" collect_histories.py --tasks all --total-timesteps 800000
  stage "6/$N AD on the A2C histories (ad_dt.py's defaults but 2000 updates: 4x more did not help it, experiments/README.md) + evaluation"
  ad_and_eval ad_a2c histories --num-updates 2000 --eval-every 1000
fi
echo; echo "== done in ${SECONDS}s"
echo "plots, tables (results.json) and videos: results/ad_dynaq/, results/ad_explorer/ (and results/ad_a2c/); curves: tensorboard --logdir runs"
