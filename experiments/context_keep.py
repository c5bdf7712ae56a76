# How much of its context should AD keep when the context is full, and can it use a longer one? Docs: experiments/README.md
#   .venv/bin/python experiments/context_keep.py runs/ad_dynaq__*/ad_dt_003600.pt 64,96,128,192,240 [--context N] [--keep-first F] [--save experiments/context_keep.json]
# --context N evaluates with a context of N transitions (default: the seq_len it trained with; eval_ad.py's default is
# the whole run, eval_ad.py --context N the same cut as here with KEEP = N // 2 and F = N // 4).
# --keep-first F: a cut also keeps the run's first F transitions (default 0: only the most recent KEEP).
# (each value: the held-out and the training goals, 4 seeds per goal, 100 episodes, sampled actions; 1-2 min on one core)
# evaluate_in_context drops a full context to its most recent KEEP transitions. Every training window of
# reproduce.sh's stages is a whole stream from its empty start, so any context after the first cut is one the model
# never trained on, however much of it is kept. This evaluates one checkpoint with other amounts kept, as eval_ad.py
# would (the same seed, so the first seq_len steps are the same in every row), and prints success over episodes
# 11-20, 41-50 and all of them, and the success after the first success before and after step seq_len (the first cut
# of the trained context).
# --save adds the rows to the JSON file, replacing older rows of the same checkpoint and amount, keeping the rest.
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ad_dt  # noqa: E402
import eval_ad  # noqa: E402

SEEDS, EPISODES, SEED = 4, 100, 1  # eval_ad.py's defaults

if __name__ == "__main__":
    usage = "usage: experiments/context_keep.py CHECKPOINT KEEP[,KEEP...] [--context N] [--keep-first F] [--save FILE.json]"
    saved, given, first = (sys.argv.index(f) + 1 if f in sys.argv else None for f in ("--save", "--context", "--keep-first"))
    args = [a for i, a in enumerate(sys.argv[1:], 1) if a not in ("--save", "--context", "--keep-first") and i not in (saved, given, first)]
    if len(args) != 2 or len(sys.argv) in (saved, given, first) or any(i and not sys.argv[i].isdigit() for i in (given, first)):
        raise SystemExit(usage)
    checkpoint_path = args[0]
    try:
        keeps = [int(k) for k in args[1].split(",")]
    except ValueError:
        raise SystemExit(f"error: KEEP must be whole numbers of transitions separated by commas, got {args[1]}")
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model, checkpoint = ad_dt.load_checkpoint(checkpoint_path, torch.device("cpu"))
    tasks, seq_len = checkpoint["tasks"], model.config.seq_len
    context, keep_first = int(sys.argv[given]) if given else seq_len, int(sys.argv[first]) if first else 0
    if not all(1 <= k < context - keep_first for k in keeps):  # before minutes of evaluation
        raise SystemExit(f"error: every KEEP must be in 1..{context - 1 - keep_first} (the context - 1 - F), got {args[1]}")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731 (None: no such episode)
    rows = []
    for keep in keeps:
        row = {"checkpoint": checkpoint_path, "seq_len": seq_len, "context": context, "keep": keep, "keep_first": keep_first}
        for part, goals in (("held_out", tasks["test"]), ("train_goals", tasks["train"])):
            result = ad_dt.evaluate_in_context(model, goals, tasks["env"], SEEDS, EPISODES, seed=SEED, context=context, keep=keep,
                                               keep_first=keep_first)
            success = result["successes"].mean(0)
            row[part] = {"success_11_20": float(success[10:20].mean()), "success_41_50": float(success[40:50].mean()),
                         "success_all": float(success.mean()),
                         "by_context": eval_ad.success_by_context(result["returns"], result["timesteps"], seq_len)}
            c = row[part]["by_context"]
            print(f"keep {keep} (and the first {keep_first}) of {context}, {part}: success 11-20 {success[10:20].mean():.3f}, 41-50 {success[40:50].mean():.3f}, "
                  f"all {success.mean():.3f}; after the first success {fmt(c['first_context'])} before step {seq_len}, "
                  f"{fmt(c['after_cut'])} after it", flush=True)
        rows.append(row)
    if saved:
        out = Path(sys.argv[saved])
        kept = [r for r in (json.loads(out.read_text()) if out.exists() else [])
                if (r["checkpoint"], r.get("context", r["seq_len"]), r["keep"], r.get("keep_first", 0))
                not in {(checkpoint_path, context, k, keep_first) for k in keeps}]
        out.write_text(json.dumps(kept + rows, indent=1))
        print(f"saved {out}")
