#!/usr/bin/env bash
# The training-budget screen: reproduce.sh's two AD stages with and without dropout, with 2 heads, a wider or deeper
# model, a larger batch, and more updates, over several training seeds, as parallel --cuda jobs on one GPU machine
# (16 cores). Each job: ad_dt.py, then eval_ad.py (100 episodes x 4 seeds on the 23 held-out goals; the Dyna-Q jobs
# also on the training goals). Outputs: results/gpu/{config}/results.json, logs/gpu_{config}.log, and a summary line
# per config in results/gpu/summary.txt. Needs histories_explorer/ and histories_dynaq/ (reproduce.sh collects them).
# Usage: bash experiments/gpu_screen.sh [jobs at once, default 12]. Docs: experiments/README.md, "Training budget".
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE---cuda}  # DEVICE= runs it on the CPU (hours)
JOBS=${1:-12}
X="--histories-dir histories_explorer --keep-every 1 --history-len None --prev-state"  # reproduce.sh's explorer stage
D="--histories-dir histories_dynaq --seq-len 256 --keep-every 1 --history-len None --prev-state --prev-next-state --state-embedding rowcol"
ND="--residual-dropout 0"
CONFIGS=(  # name | updates | flags (beyond the stage's); the name's first letter is the stage: x explorer, d Dyna-Q
  "xbase_3000|3000|" "xbase_3000_s2|3000|--seed 2" "xbase_3000_s3|3000|--seed 3"
  "xnodrop_3000|3000|$ND" "xnodrop_3000_s2|3000|$ND --seed 2" "xnodrop_3000_s3|3000|$ND --seed 3" "xnodrop_3000_s4|3000|$ND --seed 4"
  "xnodrop_4000|4000|$ND" "xnodrop_4000_s2|4000|$ND --seed 2" "xnodrop_4000_s3|4000|$ND --seed 3" "xnodrop_4000_s4|4000|$ND --seed 4"
  "xnodrop_4500|4500|$ND" "xnodrop_5000|5000|$ND"
  "xnodropH2_3000|3000|$ND --num-heads 2" "xnodropH2_4500|4500|$ND --num-heads 2" "xnodropH2_6000|6000|$ND --num-heads 2"
  "xnodrop_bs48_3000|3000|$ND --batch-size 48" "xnodrop_bs48_3000_s2|3000|$ND --batch-size 48 --seed 2"
  "xnodrop_E96_3000|3000|$ND --embedding-dim 96 --feed-forward-dim 384" "xnodrop_E96_3000_s2|3000|$ND --embedding-dim 96 --feed-forward-dim 384 --seed 2"
  "xnodrop_L6_3000|3000|$ND --num-layers 6" "xnodrop_rowcol_3000|3000|$ND --state-embedding rowcol"
  "dbase|3000|" "dbase_s2|3000|--seed 2" "dH2|3000|--num-heads 2"
  "dnodrop|3000|$ND" "dnodrop_s2|3000|$ND --seed 2"
  "dnodrop_3600|3600|$ND" "dnodrop_3600_s2|3600|$ND --seed 2" "dnodrop_3600_s3|3600|$ND --seed 3" "dnodrop_3600_s4|3600|$ND --seed 4"
  "dnodrop_4200|4200|$ND" "dnodrop_4200_s2|4200|$ND --seed 2"
)
mkdir -p logs results/gpu
job() {  # train, then evaluate one config (skipped if evaluated)
  local name=$1 n=$2 flags=$3 stage hist extra=""
  [ -f results/gpu/$name/results.json ] && return
  if [ "${name:0:1}" = d ]; then stage=$D hist=histories_dynaq extra=--train-tasks; else stage=$X hist=histories_explorer; fi
  # shellcheck disable=SC2086
  "$PYTHON" ad_dt.py $DEVICE --num-threads 1 --exp-name gpu_$name --num-updates $n --eval-every $n --checkpoint-every $n $stage $flags \
    > logs/gpu_$name.log 2>&1 || { echo "$name: training failed, see logs/gpu_$name.log"; return; }
  local checkpoint
  checkpoint=$(ls -d runs/gpu_${name}__*/ad_dt_*.pt | sort | tail -n 1)
  "$PYTHON" eval_ad.py $DEVICE --checkpoint "$checkpoint" --histories-dir $hist --out-dir results/gpu/$name --video-episodes 0 $extra \
    >> logs/gpu_$name.log 2>&1 && echo "$name done at ${SECONDS}s"
}
for config in "${CONFIGS[@]}"; do
  IFS="|" read -r name n flags <<< "$config"
  while [ "$(jobs -r | wc -l)" -ge "$JOBS" ]; do sleep 1; done
  job "$name" "$n" "$flags" &
done
wait
"$PYTHON" - <<'PY' | tee results/gpu/summary.txt
import glob, json
import numpy as np
for f in sorted(glob.glob("results/gpu/*/results.json")):
    r = json.load(open(f))
    methods, loss = r["methods"], r["diagnostics"]["teacher_forced_loss"]
    ad, source = (np.array(methods[k]["success_by_episode"]["mean"]) for k in ("ad", r["source"]))
    gap = (ad - source)[4:]  # from episode 5 on
    print(f.split("/")[2], "ep1/5/10", ad[[0, 4, 9]].round(2), "mean1-10 %.3f 11-20 %.3f 41-50 %.3f" % (ad[:10].mean(), ad[10:20].mean(), ad[40:50].mean()),
          "worst gap %.3f n>0.05 %d" % (gap.min(), (gap < -0.05).sum()), "loss %.3f/%.3f" % (loss["held_out"], loss["train"]))
PY
