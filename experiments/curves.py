# Compare eval_ad.py results side by side: AD's held-out success by episode against its source's from scratch (the
# fidelity of the imitation), on the held-out and the training goals. Docs: experiments/README.md
#   .venv/bin/python experiments/curves.py results/*/results.json [--save experiments/fidelity_runs.json]
# --save adds these files' rows to the JSON file, replacing older rows of the same files and keeping the rest
import json
import sys
from pathlib import Path

EPISODES = (1, 2, 5, 10, 20, 50, 100)


def summary(path):
    """The numbers of one results.json that the tables in experiments/README.md quote."""
    results = json.loads(Path(path).read_text())
    methods, source = results["methods"], results["source"]
    ad = methods["ad"]["success_by_episode"]["mean"]
    curve = {name: [round(x, 4) for x in m["success_by_episode"]["mean"]] for name, m in methods.items() if name in ("ad", source)}
    returns = {name: [round(x, 4) for x in m["return_by_episode"]["mean"]] for name, m in methods.items()
               if name in ("ad", source) and "return_by_episode" in m}
    source_curve = methods.get(source, {}).get("success_by_episode", {}).get("mean", [])
    gap = [a - s for a, s in zip(ad, source_curve)]  # results.json's fidelity_to_source (recomputed: older files lack it)
    train = (results["diagnostics"].get("train_goals") or {}).get("methods", {}).get("ad")
    loss = results["diagnostics"]["teacher_forced_loss"] or {}
    return {
        "file": str(path), "source": source, "train_args": results["checkpoint"]["train_args"], "temperature": results["args"].get("temperature", 1.0),
        "success_by_episode": curve,
        "return_by_episode": returns,  # = success in terminate mode; the paper's measure with --no-terminate-on-goal
        "mean_1_10": round(sum(ad[:10]) / len(ad[:10]), 3),
        "mean_41_50": round(sum(ad[40:50]) / 10, 3) if len(ad) >= 50 else None,
        "train_mean_41_50": round(sum(train["success_by_episode"]["mean"][40:50]) / 10, 3) if train and len(ad) >= 50 else None,
        "worst_gap_from_episode_5": round(min(gap[4:]), 3) if len(gap) > 4 else None,
        "exploit_rate": results["diagnostics"]["held_out"]["ad"]["success_after_success"],
        "train_goals_success": [round(x, 4) for x in train["success_by_episode"]["mean"]] if train else None,
        "loss_held_out_train": [loss.get("held_out"), loss.get("train")],
        "success_by_context": results["diagnostics"].get("ad_success_by_context"),  # None in files older than it
    }


if __name__ == "__main__":
    saved = sys.argv.index("--save") + 1 if "--save" in sys.argv else None
    paths = [p for i, p in enumerate(sys.argv[1:], 1) if p != "--save" and i != saved]
    rows = [summary(p) for p in paths]
    print("| results | source | AD success at ep. " + " / ".join(map(str, EPISODES)) + " | source | mean 1-10 | worst gap from ep. 5 | exploit |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ad, src = r["success_by_episode"]["ad"], r["success_by_episode"].get(r["source"], [])
        fmt = lambda c: " / ".join(f"{c[e - 1]:.2f}" if e <= len(c) else "-" for e in EPISODES)  # noqa: E731
        print(f"| {r['file']} | {r['source']} | {fmt(ad)} | {fmt(src)} | {r['mean_1_10']:.2f} | {r['worst_gap_from_episode_5']} | {r['exploit_rate']:.2f} |")
    if "--save" in sys.argv:
        out = Path(sys.argv[saved])
        kept = [r for r in (json.loads(out.read_text()) if out.exists() else []) if r["file"] not in paths]
        out.write_text(json.dumps(kept + rows, indent=1))
        print(f"saved {out}")
