# Sweeps of the whole pipeline: the lever sweep for in-context learning and the pace study. Docs: experiments/README.md
# Each config = a source of histories (collected once) + ad_dt.py flags; it is trained, evaluated by eval_ad.py on
# the held-out (and training) goals for many episodes, and tabulated. Rerunning skips configs already evaluated.
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Tuple

import numpy as np
import tyro
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ad_dt  # noqa: E402


@dataclass
class Args:
    study: Literal["pace", "levers", "data"] = "pace"
    """"pace": AD on A2C, fast-A2C and explorer histories at different paces (keep every k-th episode, history
    length), plotted against how many context windows the source's learning arc spans; "levers": the lever sweep;
    "data": AD on Dyna-Q histories against streams per goal, the number of training goals, random starts and the room's
    size, at equal training tokens"""
    only: Tuple[str, ...] = ()
    """run only these configs of the study (names as in the table); default all"""
    jobs: int = 1
    """configs trained at once: 1 on a 2-core CPU; on a GPU machine with 16 cores, 8 or more"""
    cuda: bool = False
    """train and evaluate on CUDA (`--cuda` of ad_dt.py and eval_ad.py)"""
    num_threads: int = 1
    """torch CPU threads of each job"""
    eval_episodes: int = 200
    """episodes of eval_ad.py per env: a slow source's in-context curve needs hundreds to be seen"""
    eval_seeds: int = 4
    """envs per held-out goal in eval_ad.py"""
    out_dir: str = "results/sweeps"
    """`{out_dir}/{config}/` gets eval_ad.py's outputs and the job's log; `{out_dir}/{study}.md|json|png` the summary"""
    summarize_only: bool = False
    """if toggled, only rebuild the table and plot from the results already there"""
    extra_flags: str = ""
    """ad_dt.py flags appended to every config's (e.g. `--extra-flags="--num-updates 50"` for a quick smoke run)"""


# The sweeps ran when both scripts' defaults were the original design's A2C ones; these flags (a later flag wins)
# keep every config as it ran: collect_histories.py's A2C with 10 envs per agent, ad_dt.py's context of 128 transitions
FORMER_COLLECT = ["--num-envs", "10", "--history-len", "800000"]
FORMER_AD = ["--seq-len", "128", "--keep-every", "50", "--history-len", "200000", "--state-embedding", "cell", "--no-prev-state",
             "--no-prev-next-state", "--residual-dropout", "0.1", "--num-updates", "5000"]

# sources: histories directory -> the collector's flags (train and held-out tasks): collect_histories_tabular.py's where
# they name a --source, else collect_histories.py's (A2C)
SOURCES = {
    # the original design's A2C: 10 envs per agent, lr 1e-4 (reproduce.sh's); trained only as far as the 800k steps kept
    "histories_a2c_design": ["--tasks", "all", "--total-timesteps", "800000"],
    # fast A2C: one env per agent, so one stream holds everything the agent learned from; lr 3e-3
    "histories_a2c_fast": ["--num-envs", "1", "--learning-rate", "3e-3", "--total-timesteps", "20000", "--history-len", "20000", "--tasks", "all"],
    # the AD paper's no-terminate mode: the episode goes on at the goal, and every step there is rewarded
    "histories_a2c_noterm": ["--no-terminate-on-goal", "--total-timesteps", "400000", "--history-len", "400000", "--tasks", "all"],
    "histories_explorer": ["--source", "explorer", "--num-envs", "1000", "--history-len", "128000", "--tasks", "all"],
    # Dyna-Q, one learner per stream (= one agent per stream), 256 steps each: 500 per goal (reproduce.sh's), 20 per
    # goal, and 500 per goal on only 15 training goals (the first 15 of the same split: the other 65 are held out)
    "histories_dynaq": ["--source", "dynaq", "--dynaq-q0", "0.5", "--num-envs", "500", "--history-len", "128000", "--tasks", "all"],
    "histories_dynaq_s20": ["--source", "dynaq", "--dynaq-q0", "0.5", "--num-envs", "20", "--history-len", "5120", "--tasks", "all"],
    "histories_dynaq_g15": ["--source", "dynaq", "--dynaq-q0", "0.5", "--num-envs", "500", "--history-len", "128000", "--tasks", "all",
                            "--num-train-tasks", "15"],
    # the same 500 streams per goal, each episode starting in a random cell: (start, goal) pairs instead of 57 goals.
    # q0 0.1: from a far start a known path is worth 0.9^16 = 0.19, so with 0.5 the learner keeps exploring instead (its
    # own success at episode 12, on five goals: 0.43; with 0.1: 0.62, near the centre start's 0.67 with 0.5)
    "histories_dynaq_rs": ["--source", "dynaq", "--dynaq-q0", "0.1", "--num-envs", "500", "--history-len", "128000", "--tasks", "all",
                           "--random-start"],
    # a 13x13 room: 168 goals, 126 for training (42 held out, 25%), 500 streams per goal
    "histories_dynaq_13": ["--source", "dynaq", "--dynaq-q0", "0.5", "--num-envs", "500", "--history-len", "128000", "--tasks", "all",
                           "--size", "13", "--num-train-tasks", "126"],
}

FAST = ["--history-len", "None"]
PACE = {
    # the original design's A2C at 4 paces x 2 history lengths (ad_dt.py's former default: keep 50, 200k)
    **{f"a2c_k{k}_h{h // 1000}k": ("histories_a2c_design", ["--keep-every", str(k), "--history-len", str(h)])
       for h in (200_000, 800_000) for k in (1, 10, 50, 200)},
    **{f"a2cfast_k{k}": ("histories_a2c_fast", [*FAST, "--keep-every", str(k)]) for k in (1, 5, 20, 50)},
    "explorer_k1": ("histories_explorer", [*FAST, "--keep-every", "1", "--num-updates", "3000"]),
}
LEVERS = {
    "a2c_k50_h200k": PACE["a2c_k50_h200k"],  # ad_dt.py's former defaults: the baseline of every A2C lever
    "a2c_prevnext": ("histories_a2c_design", ["--prev-next-state"]),
    "a2c_rowcol": ("histories_a2c_design", ["--state-embedding", "rowcol"]),
    "a2c_prevnext_rowcol": ("histories_a2c_design", ["--prev-next-state", "--state-embedding", "rowcol"]),
    "a2c_stream_start": ("histories_a2c_design", ["--stream-start-frac", "0.25"]),
    "a2c_20k_updates": ("histories_a2c_design", ["--num-updates", "20000"]),
    "a2c_big": ("histories_a2c_design", ["--embedding-dim", "128", "--num-layers", "6", "--num-heads", "8", "--feed-forward-dim", "512"]),
    "a2c_noterm": ("histories_a2c_noterm", []),
    "a2cfast_k20": PACE["a2cfast_k20"],
    "a2cfast_k20_prevnext_rowcol": ("histories_a2c_fast", [*FAST, "--keep-every", "20", "--prev-next-state", "--state-embedding", "rowcol"]),
    "explorer_k1": PACE["explorer_k1"],
    "explorer_prevnext_rowcol": ("histories_explorer", [*FAST, "--keep-every", "1", "--num-updates", "3000", "--prev-next-state", "--state-embedding", "rowcol"]),
}
# reproduce.sh's Dyna-Q config on each data set: equal training tokens (2000 updates x 32 windows x 256 transitions),
# a window is one whole stream
DYNAQ = [*FAST, "--keep-every", "1", "--seq-len", "256", "--prev-state", "--prev-next-state", "--state-embedding", "rowcol",
         "--num-updates", "2000"]
DATA = {
    "dynaq_g57_s500": ("histories_dynaq", DYNAQ),
    "dynaq_g57_s20": ("histories_dynaq_s20", DYNAQ),
    "dynaq_g15_s500": ("histories_dynaq_g15", DYNAQ),
    "dynaq_g57_s500_rs": ("histories_dynaq_rs", DYNAQ),
    "dynaq_13x13_g126_s500": ("histories_dynaq_13", DYNAQ),
}
STUDIES = {"pace": PACE, "levers": LEVERS, "data": DATA}


def run_logged(cmd, log):
    """Run cmd in the repo root, appending its output to log; raise with the log's tail if it fails."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); see {log}")


def run_config(name, histories, flags, args):
    """Train (or resume) AD for one config, then evaluate it; returns the path of its results.json."""
    out = Path(args.out_dir) / name
    results = out / "results.json"
    if results.is_file():
        return results
    out.mkdir(parents=True, exist_ok=True)
    log, device = out / "log.txt", ["--cuda"] if args.cuda else []
    checkpoints = lambda: sorted((ROOT / "runs").glob(f"sweep_{name}__*/ad_dt_*.pt"))  # noqa: E731
    threads = ["--num-threads", str(args.num_threads)]
    if checkpoints():  # an interrupted run continues from its last checkpoint
        run_logged([sys.executable, "ad_dt.py", "--resume", str(checkpoints()[-1]), *threads], log)
    else:
        run_logged([sys.executable, "ad_dt.py", "--exp-name", f"sweep_{name}", "--histories-dir", histories,
                    *FORMER_AD, "--eval-every", "2500", "--checkpoint-every", "2500", *threads, *device, *flags, *shlex.split(args.extra_flags)], log)
    run_logged([sys.executable, "eval_ad.py", "--checkpoint", str(checkpoints()[-1]), "--histories-dir", histories,
                "--out-dir", str(out), "--train-tasks", "--episodes", str(args.eval_episodes), "--seeds", str(args.eval_seeds),
                "--video-episodes", "0", *threads, *device], log)
    return results


def learning_arc(histories, history_len, keep_every, window=50, level=0.9):
    """Median over streams of the kept transitions (after history_len and keep_every) that come before the source
    reaches `level` success over `window` consecutive episodes: how many transitions of context its learning takes.
    A stream that never gets there counts all its kept transitions."""
    arcs = []
    for h in histories:
        num_streams, steps = h["states"].shape
        if history_len is not None:
            steps = min(steps, history_len // num_streams)
        for s in range(num_streams):
            ends = np.flatnonzero(h["terminated"][s, :steps] | h["truncated"][s, :steps])
            if len(ends) == 0:
                arcs.append(steps)
                continue
            cumulative = np.concatenate([[0.0], np.cumsum(h["rewards"][s, :steps], dtype=np.float64)])
            starts = np.concatenate([[0], ends[:-1] + 1])
            success = (cumulative[ends + 1] - cumulative[starts]) > 0
            rolling = np.convolve(success, np.ones(window), mode="valid")  # successes in episodes e..e+window-1
            reached = np.flatnonzero(rolling >= level * window - 1e-9)  # counts, not means: 9 x 0.1 < 0.9 in floats
            first = reached[0] if len(reached) else len(success)
            lengths = ends - starts + 1
            arcs.append(int(lengths[:first][np.arange(first) % keep_every == 0].sum()))
    return float(np.median(arcs))


def summarize(study, configs, args):
    """One row per evaluated config: held-out success by episode, exploitation, training goals, losses, pace."""
    rows, histories_cache = [], {}
    for name, (histories, flags) in configs.items():
        path = Path(args.out_dir) / name / "results.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        ad = r["methods"]["ad"]["success_by_episode"]["mean"]
        diag, train = r["diagnostics"]["held_out"]["ad"], r["diagnostics"]["train_goals"]["diagnostics"]["ad"]
        train_curve = r["diagnostics"]["train_goals"]["methods"]["ad"]["success_by_episode"]["mean"]
        train_args = r["checkpoint"]["train_args"]
        if histories not in histories_cache:
            histories_cache[histories] = ad_dt.load_histories(ROOT / histories)[1]
        arc = learning_arc(histories_cache[histories], train_args["history_len"], train_args["keep_every"])
        loss = r["diagnostics"]["teacher_forced_loss"] or {}
        env = ad_dt.read_tasks(ROOT / histories)["env"]
        rows.append({
            "config": name, "source": histories, "flags": " ".join(flags),
            "success_by_episode": {e: ad[e - 1] for e in (1, 5, 10, 20, 50, 100, 200) if e <= len(ad)},
            "success_11_20": diag["success_episodes_11_20"], "success_last_50": float(np.mean(ad[-50:])),
            "exploit": diag["success_after_success"], "train_success_11_20": train["success_episodes_11_20"],
            "train_exploit": train["success_after_success"],
            "loss_heldout": loss.get("held_out"), "loss_train": loss.get("train"),
            "arc_transitions": arc, "arc_windows": arc / train_args["seq_len"], "keep_every": train_args["keep_every"],
            "history_len": train_args["history_len"], "episodes": len(ad), "device": "cuda" if train_args.get("cuda") else "cpu",
            "random_11_20": r["diagnostics"]["held_out"]["random"]["success_episodes_11_20"],
            "success_41_50": float(np.mean(ad[40:50])) if len(ad) >= 50 else None,
            "train_success_41_50": float(np.mean(train_curve[40:50])) if len(train_curve) >= 50 else None,
            "train_goals": len(histories_cache[histories]), "streams_per_goal": int(histories_cache[histories][0]["states"].shape[0]),
            "held_out_goals": r["methods"]["ad"]["runs"] // args.eval_seeds,
            "room": env["size"], "random_start": env.get("random_start", False),
        })
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    episodes = (1, 5, 10, 20, 50, 100, 200)
    lines = [
        "| config | held-out success at episode " + " / ".join(map(str, episodes)) + " | 11-20 | last 50 | exploit | training goals 11-20 / exploit | loss held-out / train | arc (windows) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        by_episode = " / ".join(fmt(row["success_by_episode"].get(e)) for e in episodes)
        lines.append(
            f"| {row['config']} | {by_episode} | {fmt(row['success_11_20'])} | {fmt(row['success_last_50'])} | {fmt(row['exploit'])} | "
            f"{fmt(row['train_success_11_20'])} / {fmt(row['train_exploit'])} | {fmt(row['loss_heldout'])} / {fmt(row['loss_train'])} | {row['arc_windows']:.1f} |"
        )
    if study == "data":  # memorisation shows as training goals above held-out ones
        lines = ["| config | room, start | training goals x streams per goal | held-out goals | 11-20 held-out / training | "
                 "41-50 held-out / training | exploit held-out / training | loss held-out / train |", "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            room = f"{row['room']}x{row['room']}, {'random' if row['random_start'] else 'centre'}"
            lines.append(f"| {row['config']} | {room} | {row['train_goals']} x {row['streams_per_goal']} | {row['held_out_goals']} | "
                         f"{fmt(row['success_11_20'])} / {fmt(row['train_success_11_20'])} | {fmt(row['success_41_50'])} / "
                         f"{fmt(row['train_success_41_50'])} | {fmt(row['exploit'])} / {fmt(row['train_exploit'])} | "
                         f"{fmt(row['loss_heldout'])} / {fmt(row['loss_train'])} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study}.md").write_text("\n".join(lines) + "\n")
    (out / f"{study}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    if study == "pace" and rows:
        plot_pace(rows, out / "pace_study.png")
    if study == "data" and rows:
        plot_data(rows, out / "data_study.png")


def plot_data(rows, path):
    """One panel per config: AD's success by episode on the held-out goals (solid) and on the training goals
    (dashed). Where the dashed curve runs above the solid one, the model remembers goals instead of finding them."""
    fig = Figure(figsize=(4.6 * len(rows), 3.8))
    for i, r in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), i + 1)
        results = json.loads((path.parent / r["config"] / "results.json").read_text())
        held_out = results["methods"]["ad"]["success_by_episode"]["mean"]
        train = results["diagnostics"]["train_goals"]["methods"]["ad"]["success_by_episode"]["mean"]
        episodes = np.arange(1, len(held_out) + 1)
        ax.plot(episodes, held_out, "-", color="tab:blue", label="held-out goals")
        ax.plot(episodes, train, "--", color="tab:red", label="training goals")
        ax.axhline(r["random_11_20"], color="grey", ls=":", lw=1, label="random policy")
        room = (f"{r['room']}x{r['room']}, " if r["room"] != 9 else "") + ("random starts, " if r["random_start"] else "")
        ax.set(title=f"{room}{r['train_goals']} training goals x {r['streams_per_goal']} streams", xlabel="episode in context",
               ylabel="success rate" if i == 0 else None, ylim=(0, 1))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot_pace(rows, path):
    """Left: held-out success over episodes 11-20 (o) and over the last 50 episodes (^) against the source's learning
    arc in context windows (log x), one line per source and history length. Right: held-out success by episode
    (rolling mean over 10 episodes) of the default A2C config, its extremes and the explorer."""
    fig = Figure(figsize=(13, 4.8))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = {"histories_a2c_design": "tab:blue", "histories_a2c_fast": "tab:orange", "histories_explorer": "tab:green"}
    labels = {"histories_a2c_design": "A2C (seed: 10 envs, lr 1e-4)", "histories_a2c_fast": "fast A2C (1 env, lr 3e-3)", "histories_explorer": "explorer"}
    lines = sorted({(r["source"], r["history_len"]) for r in rows if r["source"] in colours}, key=str)
    for source, history_len in lines:
        mine = sorted((r for r in rows if (r["source"], r["history_len"]) == (source, history_len)), key=lambda r: r["arc_windows"])
        x = [r["arc_windows"] for r in mine]
        dashes = "-" if history_len in (None, 200_000) else "--"
        label = labels[source] + ("" if history_len is None else f", first {history_len // 1000}k steps")
        left.plot(x, [r["success_11_20"] for r in mine], "o" + dashes, color=colours[source], label=label)
        left.plot(x, [r["success_last_50"] for r in mine], "^" + dashes, color=colours[source], alpha=0.5)
        for r, xi in zip(mine, x):
            left.annotate(f"k{r['keep_every']}", (xi, r["success_11_20"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    random_level = np.mean([r["random_11_20"] for r in rows])
    left.axhline(random_level, color="grey", ls=":", lw=1, label="random policy")
    left.set(xscale="log", xlabel="source's learning arc in context windows (kept transitions to 0.9 success / seq_len)",
             ylabel="held-out success: o episodes 11-20, ^ last 50", title="in-context learning vs the source's pace (k = keep every k-th episode)", ylim=(0, 1))
    left.legend(fontsize=7, loc="upper right")
    left.grid(alpha=0.3)
    shown = ["explorer_k1", "a2c_k50_h200k", "a2c_k200_h800k", "a2c_k1_h200k", "a2cfast_k50", "a2cfast_k1"]
    for r in rows:
        if r["config"] not in shown:
            continue
        curve = np.array(json.loads((path.parent / r["config"] / "results.json").read_text())["methods"]["ad"]["success_by_episode"]["mean"])
        smooth = np.convolve(curve, np.ones(10) / 10, mode="valid")
        right.plot(np.arange(10, len(curve) + 1), smooth, color=colours[r["source"]], ls=":" if r["keep_every"] == 1 and r["source"] != "histories_explorer" else "-", label=r["config"])
    right.axhline(random_level, color="grey", ls=":", lw=1)
    right.set(xscale="log", xlabel="episode in context (rolling mean over the 10 episodes up to it)", ylabel="held-out success",
              title="held-out success by episode", ylim=(0, 1))
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    configs = STUDIES[args.study]
    unknown = set(args.only) - set(configs)
    if unknown:
        raise SystemExit(f"error: no config {sorted(unknown)} in study {args.study}; choose from {sorted(configs)}")
    if args.only:
        configs = {name: configs[name] for name in args.only}
    if not args.summarize_only:
        start = time.time()
        for histories in sorted({h for h, _ in configs.values()}):  # collect (or resume) each source once, in order
            flags = SOURCES[histories]
            script, former = ("collect_histories_tabular.py", []) if "--source" in flags else ("collect_histories.py", FORMER_COLLECT)
            cmd = [sys.executable, script, "--histories-dir", histories, *former, *flags]
            print(f"[{time.time() - start:6.0f}s] collecting {histories}", flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {name: pool.submit(run_config, name, h, flags, args) for name, (h, flags) in configs.items()}
            for name, future in futures.items():
                try:
                    future.result()
                    print(f"[{time.time() - start:6.0f}s] {name}: done", flush=True)
                except RuntimeError as e:
                    print(f"[{time.time() - start:6.0f}s] {name}: {e}", flush=True)
    summarize(args.study, configs, args)
