# README's headline figures: AD on Dyna-Q histories and Dyna-Q from scratch on the held-out goals of three train/test
# splits (reproduce.sh with SPLIT_SEED unset, 1 and 2), per episode: the mean over the splits and the range.
# "temperature_0.7" is the headline (one 3600-update checkpoint per split, evaluated at ad_dt.py's default temperature
# 0.7); "temperature_1" the same checkpoints at temperature 1; "whole_run" and "cut_256" are the former headline's
# checkpoints (temperature 1) with the whole run in context and with the context cut at 256 (eval_ad.py --context 256).
# Docs: experiments/README.md ("Three splits", "Sampling temperature")
#   .venv/bin/python experiments/three_splits.py [--save experiments/three_splits.json]
# It reads the rows experiments/curves.py saved (in SUMMARIES) for each results.json below.
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARIES = ["experiments/whole_run_runs.json", "experiments/temperature_runs.json"]
RUNS = {"temperature_0.7": ["results/ad_dynaq_T0.7/results.json", "results/ad_dynaq_t_split1_T0.7/results.json",
                            "results/ad_dynaq_split2_T0.7/results.json"],
        "temperature_1": ["results/ad_dynaq_T1.0/results.json", "results/ad_dynaq_t_split1_T1.0/results.json",
                          "results/ad_dynaq_split2_T1.0/results.json"],
        "whole_run": ["results/ad_dynaq/results.json", "results/ad_dynaq_split1/results.json", "results/ad_dynaq_split2/results.json"],
        "cut_256": ["results/ad_dynaq_cut256/results.json", "results/ad_dynaq_split1_cut256/results.json",
                    "results/ad_dynaq_split2_cut256/results.json"]}
EPISODES = (1, 2, 5, 10, 20, 50, 100)


def spans(curve):
    """The README's columns of one success-by-episode curve: single episodes, then the means over 11-20 and 41-50."""
    return {**{f"ep. {e}": curve[e - 1] for e in EPISODES}, "11-20": sum(curve[10:20]) / 10, "41-50": sum(curve[40:50]) / 10}


def combine(rows):
    """Mean, min and max over the splits' rows (curves.py's summaries) of every column, for AD and its source, and the
    mean gap AD - source at every episode."""
    curves = {who: [r["success_by_episode"]["ad" if who == "ad" else r["source"]] for r in rows] for who in ("ad", "source")}
    table = {}
    for who, per_split in curves.items():
        columns = [spans(c) for c in per_split]
        table[who] = {key: {"mean": round(sum(c[key] for c in columns) / len(columns), 3), "min": round(min(c[key] for c in columns), 3),
                            "max": round(max(c[key] for c in columns), 3)} for key in columns[0]}
    exploit = [r["exploit_rate"] for r in rows]
    table["ad"]["exploit rate"] = {"mean": round(sum(exploit) / len(exploit), 3), "min": round(min(exploit), 3), "max": round(max(exploit), 3)}
    mean = {who: [sum(c[e] for c in per_split) / len(per_split) for e in range(len(per_split[0]))] for who, per_split in curves.items()}
    gap = [round(a - s, 3) for a, s in zip(mean["ad"], mean["source"])]
    return {"splits": [r["file"] for r in rows], "table": table, "mean_gap_by_episode": gap,
            "worst_mean_gap": min(gap), "episodes_more_than_0.05_below": sum(g < -0.05 for g in gap)}


if __name__ == "__main__":
    saved = [row for summaries in SUMMARIES for row in json.loads((ROOT / summaries).read_text())]
    out = {}
    for context, files in RUNS.items():
        rows = []
        for results in files:
            found = [r for r in saved if r["file"] == results]
            if not found:
                raise SystemExit(f"error: no row of {results} in {' or '.join(SUMMARIES)}: run experiments/curves.py {results} --save {SUMMARIES[0]}")
            rows.append(found[-1])
        out[context] = combine(rows)
        print(f"\n{context}:\n| held-out goals | " + " | ".join(out[context]["table"]["ad"]) + " |")
        for who in ("ad", "source"):
            cells = [f"{v['mean']:.2f} ({v['min']:.2f}-{v['max']:.2f})" for v in out[context]["table"][who].values()]
            print(f"| {who} | " + " | ".join(cells) + " |")
        print(f"worst mean gap AD - source {out[context]['worst_mean_gap']:+.3f}; "
              f"{out[context]['episodes_more_than_0.05_below']} episodes more than 0.05 below")
    if "--save" in sys.argv:
        path = Path(sys.argv[sys.argv.index("--save") + 1])
        path.write_text(json.dumps(out, indent=1))
        print(f"saved {path}")
