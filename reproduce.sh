#!/usr/bin/env bash
# The whole Algorithm Distillation pipeline with the CPU defaults, for the sources side by side:
#   Dyna-Q (the learning source AD distils best; the defaults)             : histories/     -> runs/ad_dynaq__*/    -> results/ad_dynaq/
#   A2C, one env per agent and 256 agents per goal (the design's learner) : histories_a2c/ -> runs/ad_a2c__*/      -> results/ad_a2c/
#   explorer (a scripted source; WITH_EXPLORER=1 only)                     : histories_explorer/ -> runs/ad_explorer__*/ -> results/ad_explorer/
# `bash reproduce.sh` runs the first two (about 30 minutes on 2 CPU cores); `WITH_EXPLORER=1 bash reproduce.sh` adds
# the explorer (about 14 minutes more, which a slow run would push past the 45-minute budget: so it is opt-in). Afterwards `python ad_dt.py --seq-len 256` trains on histories/ as stage 2 did.
# Rerunning resumes: finished histories are skipped, an interrupted AD run continues from its last checkpoint,
# and an evaluation newer than its checkpoint is kept. A run in runs/ad_*__*/ resumes with the flags it was started
# with: after changing a stage's flags here, delete its runs/ and results/ directories to train it again.
# `SPLIT_SEED=1 bash reproduce.sh` runs the same stages on another train/test split (--split-seed 1 to every collection),
# in directories of their own: histories_split1/, runs/ad_dynaq_split1__*/, results/ad_dynaq_split1/, and so on.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
SECONDS=0
SPLIT_SEED=${SPLIT_SEED:-0}
S=$([ "$SPLIT_SEED" = 0 ] || echo "_split$SPLIT_SEED")  # the suffix of every directory; none on the default split
collect() { local script=$1; shift; "$PYTHON" "$script" --split-seed "$SPLIT_SEED" "$@"; }  # a collector on this split
stage() { echo; echo "== $1 ($(date +%H:%M:%S), ${SECONDS}s so far)"; }

# train AD (or resume it) under runs/$1__*/ with the remaining arguments, then evaluate it into results/$1/
# (with the eval_ad.py flags in EVAL_FLAGS, if any)
ad_and_eval() {
  local exp=$1 histories=$2 eval_flags=${EVAL_FLAGS:-}; shift 2
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
    # shellcheck disable=SC2086  # eval_flags: words
    "$PYTHON" eval_ad.py --checkpoint "$checkpoint" --histories-dir "$histories" --out-dir "results/$exp" --train-tasks $eval_flags
  fi
  echo "$exp: checkpoint $checkpoint, results in results/$exp/"
}

WITH_EXPLORER=${WITH_EXPLORER:-0}
N=$([ "$WITH_EXPLORER" = 1 ] && echo 6 || echo 4)  # stages
stage "1/$N Dyna-Q learning histories: 500 learners from scratch per task, 256 steps each -> histories/"
collect collect_histories_tabular.py --histories-dir "histories$S"  # the defaults: --source dynaq --num-envs 500 --history-len 128000 --tasks all
stage "2/$N AD on the Dyna-Q histories (ad_dt.py's defaults: a window = a whole stream, each token shows the pair tried) + evaluation"
ad_and_eval "ad_dynaq$S" "histories$S" --seq-len 256
stage "3/$N A2C learning histories: 256 agents per task, one env each, 2200 steps (~110 episodes) each -> histories_a2c/"
# the original design's A2C (10 envs per agent, lr 1e-4) needs ~1000 episodes per stream; this one learns in ~50
# (a zero critic at the start, 4 updates per 40-step rollout, lr 3e-3, entropy 0.05: experiments/README.md); 256 agents
# per goal rather than 128 keep AD up with its source late in the run ("More agents per goal" there)
collect collect_histories.py --histories-dir "histories_a2c$S" --num-envs 1 --agents-per-goal 256 --num-steps 40 \
  --update-epochs 4 --learning-rate 3e-3 --ent-coef 0.05 --critic-init-std 0 --history-len 2200 --total-timesteps 2200
stage "4/$N AD on the A2C histories (every 8th episode: a window = a whole stream, as for Dyna-Q) + evaluation"
# every 8th episode of a 2200-step stream is about 275 transitions, so a 256-transition window shows one agent's whole
# arc from scratch; 2 heads and 3 layers make an update 1.4x cheaper, which buys 5600 updates (experiments/README.md,
# "Fast per-stream A2C"); A2C samples its actions, so its AD samples at temperature 1 (Dyna-Q's and the explorer's at
# ad_dt.py's default 0.7: they act by a rule)
ad_and_eval "ad_a2c$S" "histories_a2c$S" --seq-len 256 --keep-every 8 --num-heads 2 --num-layers 3 \
  --num-updates 5600 --eval-every 2800 --eval-temperature 1
if [ "$WITH_EXPLORER" = 1 ]; then
  stage "5/$N explorer histories: 1000 short learners per task -> histories_explorer/"
  collect collect_histories_tabular.py --source explorer --num-envs 1000 --history-len 128000 --histories-dir "histories_explorer$S"
  stage "6/$N AD on the explorer histories (the pair-tried token only) + evaluation"
  # 2 heads and 3 layers make an update cheaper, which buys 6000 updates (the explorer's AD needs the tokens, not the
  # depth; Dyna-Q's needs its 4 layers: experiments/README.md, "Training budget")
  ad_and_eval "ad_explorer$S" "histories_explorer$S" --seq-len 128 --no-prev-next-state --state-embedding cell --num-heads 2 \
    --num-layers 3 --num-updates 6000 --eval-every 3000
fi
echo; echo "== done in ${SECONDS}s"
echo "plots, tables (results.json) and videos: results/ad_dynaq$S/, results/ad_a2c$S/ (and results/ad_explorer$S/); curves: tensorboard --logdir runs"
