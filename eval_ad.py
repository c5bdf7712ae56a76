# Evaluate a trained AD model in context on held-out DarkRoom goals, next to four baselines: random, optimal, an
# exploration oracle and the source algorithm learning from scratch. Docs: README.md#eval_adpy
import os
import signal
import sys


def on_interrupt(signum, frame):
    """Ctrl-C anywhere, the imports below included: one line saying what was kept, exit 130, no traceback."""
    print(f"\ninterrupted: {KEPT}", file=sys.stderr, flush=True)  # on a line of its own, below any progress bar
    while frame is not None and "importlib" not in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is not None:  # inside an import, where an exception can land in C++ code and abort: exit at once
        os._exit(130)
    sys.exit(130)


KEPT = "nothing was written"  # what on_interrupt reports; main updates it as outputs appear
if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_interrupt)

import json
import math
import random
import time
from collections import namedtuple
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Tuple

import imageio
import numpy as np
import torch
import tyro
from matplotlib.figure import Figure

# what this script evaluates comes from the script that trains it (as CleanRL's evals import the training script's network),
# and the sources it compares with from the script that wrote the histories
import collect_histories_tabular
from ad_dt import (NUM_ACTIONS, DarkRoomVectorEnv, check, check_memory, check_writable, evaluate_in_context, load_checkpoint, load_histories,
                   make_dataset, make_envs, sample_windows, summarize_evaluation, teacher_forced_loss, write_atomic)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment; the default output is `results/{checkpoint's run name}__{update}__{exp_name}__{seed}__{unix time}`"""
    seed: int = 1
    """seed of the model's sampled actions (as ad_dt.py's evaluation with this --seed), the baselines, the loss windows"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True` so GPU runs are reproducible (CPU runs are)"""
    cuda: bool = False
    """if toggled, evaluate on CUDA when it is available"""
    num_threads: int = 1
    """CPU threads for torch: a step feeds one token per env, too little work to share between threads"""

    checkpoint: str = tyro.MISSING
    """an `ad_dt_UPDATE.pt` written by ad_dt.py (required); it holds the model and the task split"""
    histories_dir: Optional[str] = None
    """the histories the checkpoint trained on, for the source-from-scratch baseline and the teacher-forced losses;
    default: the checkpoint's own --histories-dir"""
    episodes: int = 100
    """whole episodes per env, from an empty context (cheap with the KV cache: a slow source needs hundreds)"""
    seeds: int = 4
    """envs per goal (all goals x seeds run as one batch)"""
    train_tasks: bool = False
    """if toggled, also evaluate every method on the training goals (memorised goals vs held-out ones)"""
    greedy: bool = False
    """if toggled, the model acts greedily instead of sampling from its policy (greedy decoding cannot explore)"""
    temperature: Optional[float] = None
    """sampling temperature of the model's actions (below 1: closer to greedy); default: the checkpoint's --eval-temperature"""
    context: Optional[int] = None
    """the most transitions the model's context holds (a full one drops to its recent half and the run's start); None: the whole run"""
    keep_first: Optional[int] = None
    """the run's first transitions a full context keeps besides its recent half (every training window starts at a run's start); None: a quarter of it"""
    loss_windows: int = 256
    """windows (sampled as in training) of the held-out and of the training histories for the teacher-forced loss; 0 skips it"""
    video_episodes: int = 10
    """episodes of the model on one held-out goal in `video.mp4`; 0 writes no video"""
    video_task: int = 0
    """which held-out goal the video shows (index into the checkpoint's test split; its first seed)"""
    out_dir: Optional[str] = None
    """where results.json, return_by_episode.png, video.mp4 and trajectories.npz go; default `results/{run_name}`"""


def check_args(args):
    """Reject every bad flag with a one-line message naming it, before any work."""
    def need(ok, flag, rule):
        check(ok, f"--{flag} must be {rule}, got {getattr(args, flag.replace('-', '_'))}")

    for name, low in (("episodes", 1), ("seeds", 1), ("loss_windows", 0), ("video_episodes", 0), ("video_task", 0)):
        need(getattr(args, name) >= low, name.replace("_", "-"), f"at least {low}")
    need(0 <= args.seed < 2**32, "seed", "in 0..2**32-1 (numpy's seeds)")
    need(1 <= args.num_threads <= 1024, "num-threads", "in 1..1024 (more threads than cores only slow torch down)")
    need(0 < len(args.exp_name.encode()) <= 200 and "/" not in args.exp_name, "exp-name", "a non-empty file name without '/'")
    need(args.context is None or args.context >= 2, "context", "at least 2 transitions, or left out for the whole run")
    need(args.keep_first is None or args.keep_first >= 0 and (args.context is None or args.keep_first < args.context - args.context // 2),
         "keep-first", "at least 0 and less than the half of --context that a cut drops")
    need(args.temperature is None or math.isfinite(args.temperature) and args.temperature > 0, "temperature", "positive (use --greedy for argmax actions)")
    need(not args.cuda or torch.cuda.is_available(), "cuda", "left out on a machine without a CUDA GPU (torch sees none)")
    need(args.out_dir is None or not Path(args.out_dir).exists() or Path(args.out_dir).is_dir(), "out-dir", "a directory, not a file")


# baselines: policies that act in the same batched rooms as the model, with act(states) and observe(one step)
def step_towards(states, targets, size):
    """The action that takes each cell one step closer to its target cell (rows first, then columns; noop on it).
    Deterministic, unlike the scripted explorer's random axis in collect_histories_tabular.py: every shortest path is as
    short, and a fixed one gives the oracle no sampling noise of its own."""
    (row, col), (target_row, target_col) = np.divmod(states, size), np.divmod(targets, size)
    return np.select([target_row < row, target_row > row, target_col > col, target_col < col], [1, 3, 2, 4], default=0)


class RandomPolicy:
    """Uniformly random actions; learns nothing."""
    def __init__(self, num_envs, size, goal_states, rng):
        self.act, self.observe = lambda states: rng.integers(0, NUM_ACTIONS, len(states)), lambda *step: None


class OptimalPolicy:
    """Knows the goal: the shortest path to it in every episode, and stays on it when the episode does not end there."""
    def __init__(self, num_envs, size, goal_states, rng=None):
        self.act, self.observe = lambda states: step_towards(states, goal_states, size), lambda *step: None


class ExplorationOracle:
    """Knows the room, not the goal. It remembers every cell it has been on, across episodes, and walks to the nearest
    cell it has not been on until it is rewarded; from then on it goes straight to the goal (and stays on it when the
    episode does not end there). Ties go to the first cell in reading order and paths take rows first, which sweeps
    the room row by row; each env sees the room turned or mirrored by one of the square's 8 symmetries (drawn from
    rng), so that the sweep order favours no goal. Until rewarded it acts the same whatever the goal."""

    def __init__(self, num_envs, size, goal_states, rng):
        row, col = np.divmod(np.arange(size * size), size)
        n, centre = size - 1, (size // 2) * size + size // 2
        views = [(row, col), (col, n - row), (n - row, n - col), (n - col, row), (row, n - col), (n - row, col), (col, row), (n - col, n - row)]
        views = np.array([r * size + c for r, c in views])  # [8, cells]: each cell as seen through each symmetry
        # the room's action whose move is, as seen, the move of action a: follow each move from the centre
        moved_to = DarkRoomVectorEnv(np.zeros((1, 2)), size).transitions[centre]  # [actions]: the cell each action leads to
        to_room = np.zeros((len(views), NUM_ACTIONS), dtype=np.int64)
        for k, view in enumerate(views):
            for action in range(NUM_ACTIONS):
                to_room[k, (moved_to == view[moved_to[action]]).argmax()] = action
        symmetry = rng.integers(0, len(views), num_envs)
        self.view, self.to_room, self.size = views[symmetry], to_room[symmetry], size  # [envs, cells], [envs, actions]
        self.distance = np.abs(row[:, None] - row[None]) + np.abs(col[:, None] - col[None])  # [cells, cells] steps apart
        # as seen: the cells stepped onto (a random start cell is not: only a step onto the goal is rewarded); the
        # centre is never a goal
        self.visited = np.zeros((num_envs, size * size), dtype=bool)
        self.visited[:, centre] = True
        self.known_goal = np.full(num_envs, -1)  # the rewarded cell as seen, -1 while unknown

    def act(self, states):
        envs = np.arange(len(states))
        seen = self.view[envs, states]
        distance = np.where(self.visited, np.inf, self.distance[seen])  # [envs, cells]
        targets = np.where(self.known_goal >= 0, self.known_goal, distance.argmin(1))  # argmin: the first of the nearest
        return self.to_room[envs, step_towards(seen, targets, self.size)]

    def observe(self, reached, rewards, terminated, ended):
        """Learn from one step: the cell the action led to (before any reset) and its reward."""
        seen = self.view[np.arange(len(reached)), reached]
        self.visited[np.arange(len(reached)), seen] = True
        self.known_goal = np.where(rewards > 0, seen, self.known_goal)


LEARNER_PER_STREAM = ("noise", "explorer", "dynaq")  # sources whose every stream is one learner from scratch


class SourceLearner:
    """The source of a learner-per-stream histories directory (explorer, noise, dynaq), from scratch in every env, with
    the histories' own config: the source's curve over as many episodes as the model's, however short its streams."""

    def __init__(self, num_envs, size, goal_states, rng, meta):
        config = collect_histories_tabular.Args(source=meta["source"], size=size, **meta["algo"])
        rngs = [np.random.default_rng(s) for s in rng.integers(0, 2**63, num_envs)]  # one generator per env
        learner = collect_histories_tabular.make_learner(config, goal_states, rngs)
        self.act, self.observe = learner.act, learner.observe


def run_policy(policy_class, goals, env, num_seeds, num_episodes, rng=None, seed=0):
    """Run a baseline as evaluate_in_context runs the model: len(goals) x num_seeds envs (env i has goal
    goals[i // num_seeds]) in lockstep for num_episodes whole episodes each (random starts, if any, drawn from
    `seed`). Returns returns, successes, lengths [envs, episodes] and goals [envs, 2]."""
    goals = np.repeat(np.asarray(goals, dtype=np.int64).reshape(-1, 2), num_seeds, axis=0)
    N, size = len(goals), env["size"]
    envs = make_envs(goals, env, seed)
    policy = policy_class(N, size, goals[:, 0] * size + goals[:, 1], rng)
    returns, lengths = np.zeros((N, num_episodes), np.float32), np.zeros((N, num_episodes), np.int64)
    episode = np.zeros(N, dtype=np.int64)
    state, _ = envs.reset()
    while episode.min() < num_episodes:
        state, reward, terminated, truncated, info = envs.step(policy.act(state))
        policy.observe(info["final_obs"], reward, terminated, terminated | truncated)  # final_obs: where the action led
        active = np.flatnonzero(episode < num_episodes)
        returns[active, episode[active]] += reward[active]
        lengths[active, episode[active]] += 1
        episode += terminated | truncated
    return {"returns": returns, "successes": returns > 0, "lengths": lengths, "goals": goals}


def source_episodes(histories, num_episodes):
    """Return of the first num_episodes whole episodes of every stream of every history: [tasks x streams, episodes]
    (fewer episodes if some stream holds fewer), and the task index of each row."""
    rows, task_of_row = [], []
    for task, h in enumerate(histories):
        for s in range(len(h["rewards"])):
            ends = np.flatnonzero(h["terminated"][s] | h["truncated"][s])[:num_episodes]  # last step of each episode
            cumulative = np.concatenate([[0.0], np.cumsum(h["rewards"][s], dtype=np.float64)])
            starts = np.concatenate([[0], ends[:-1] + 1])
            rows.append(cumulative[ends + 1] - cumulative[starts])
            task_of_row.append(task)
    num = min(len(r) for r in rows)
    return np.stack([r[:num] for r in rows]).astype(np.float32), np.array(task_of_row)


def history_action_loss(model, histories, history_len, keep_every, num_windows, rng, batch_size=64):
    """teacher_forced_loss over num_windows windows of these histories, paced and sampled as ad_dt.py samples its
    training windows; None if no stream holds a whole window."""
    data = make_dataset(histories, history_len, keep_every)
    if np.diff(data["offsets"]).max() < model.config.seq_len:
        return None
    device, total, count = model.action_head.weight.device, 0.0, 0
    while count < num_windows:
        size = min(batch_size, num_windows - count)
        batch, _ = sample_windows(data, size, model.config.seq_len, rng)
        total += teacher_forced_loss(model, {key: value.to(device) for key, value in batch.items()}) * size
        count += size
    return total / num_windows


# results: curves with 95% intervals and the signs of in-context learning, per method
Runs = namedtuple("Runs", "returns task_of_run goals")  # one method's episodes: [runs, episodes], [runs] index into goals


def by_episode(values):
    """Mean and 95% interval (normal approximation over runs) per episode index of values [runs, episodes]."""
    values = values.astype(np.float64)
    return {"mean": values.mean(0).tolist(), "ci95": (1.96 * values.std(0) / math.sqrt(len(values))).tolist()}


def summarize(runs):
    """A method's entry of results.json: curves over all runs, and per task (mean over its runs)."""
    successes = runs.returns > 0
    per_task = [np.flatnonzero(runs.task_of_run == t) for t in range(len(runs.goals))]
    return {"return_by_episode": by_episode(runs.returns), "success_by_episode": by_episode(successes), "runs": len(runs.returns),
            "per_task": {"goals": [list(map(int, g)) for g in runs.goals],
                         "return_by_episode": [runs.returns[rows].mean(0).tolist() for rows in per_task],
                         "success_by_episode": [successes[rows].mean(0).tolist() for rows in per_task]}}


def diagnose(returns):
    """summarize_evaluation's signs of learning vs copying, for any method's returns [runs, episodes] (success:
    return > 0), as JSON (None where undefined), with success in episode 1 and over episodes 11-20."""
    successes = returns > 0
    summary = summarize_evaluation({"returns": returns, "successes": successes})
    pairs = int(successes[:, :-1].sum())  # successful episodes that have a next one
    return {
        "success_after_success": summary["success_after_success"] if pairs else None,  # the exploit rate
        "success_after_success_pairs": pairs,
        "first_success_episode": None if math.isnan(summary["first_success_episode"]) else summary["first_success_episode"],
        "never_succeeded": summary["never_succeeded"],
        "success_rate": summary["success_rate"],
        "success_episode_1": float(successes[:, 0].mean()),
        "success_episodes_11_20": float(successes[:, 10:20].mean()) if successes.shape[1] >= 20 else None,
    }


def success_by_context(returns, timesteps, seq_len):
    """Success after the first success, split at the trained window's length: the success of the episodes after
    an env's first success that start within its first seq_len steps (the context holds the run from its empty
    start and is no longer than a training window; the episode that spans step seq_len counts here) and of those
    that start later (a context longer than any the model trained on or, with --context seq_len, one cut to its
    recent transitions, which start mid-run). returns [envs, episodes]; timesteps [envs, steps]."""
    counts = {"first_context": [0, 0], "after_cut": [0, 0]}  # [episodes, successes]
    for env_successes, env_timesteps in zip(returns > 0, timesteps):
        starts = np.flatnonzero(env_timesteps == 0)[: len(env_successes)]  # the step each episode starts at
        after_success = np.cumsum(env_successes) - env_successes > 0  # an earlier episode succeeded
        for part, where in (("first_context", starts < seq_len), ("after_cut", starts >= seq_len)):
            counts[part][0] += int((after_success & where).sum())
            counts[part][1] += int((env_successes & after_success & where).sum())
    return {"seq_len": seq_len, **{part: (wins / n if n else None) for part, (n, wins) in counts.items()},
            **{f"{part}_episodes": n for part, (n, _) in counts.items()}}


def fidelity(methods, source):
    """AD's success minus its source's (from scratch), per episode where both have one: how closely AD imitates."""
    if source not in methods:
        return None
    return [a - s for a, s in zip(methods["ad"]["success_by_episode"]["mean"], methods[source]["success_by_episode"]["mean"])]


def evaluate_methods(model, goals, env, histories, source, meta, args):
    """AD in context, the random, optimal and oracle baselines, and the source from scratch, all on these goals with the
    same episodes and env settings. Returns ({method: Runs}, AD's trajectories, AD's seconds, notes)."""
    start_time = time.perf_counter()
    result = evaluate_in_context(model, goals, env, args.seeds, args.episodes, args.greedy, args.seed, temperature=args.temperature,
                                 context=args.context, keep_first=args.keep_first)
    seconds = time.perf_counter() - start_time
    task_of_run = np.arange(len(result["returns"])) // args.seeds
    methods, notes = {"ad": Runs(result["returns"], task_of_run, goals)}, []
    policies = {"random": RandomPolicy, "optimal": OptimalPolicy, "oracle": ExplorationOracle}
    if source in LEARNER_PER_STREAM:  # run the source itself from scratch, as long as the model
        policies[source] = partial(SourceLearner, meta=meta)
    for name, policy in policies.items():
        runs = run_policy(policy, goals, env, args.seeds, args.episodes, np.random.default_rng(args.seed), args.seed)
        methods[name] = Runs(runs["returns"], task_of_run, goals)
    if source not in LEARNER_PER_STREAM and histories:  # a trained source (A2C): episode k of every stream of its histories
        returns, task_of_row = source_episodes(histories, args.episodes)
        methods[source] = Runs(returns, task_of_row, [h["meta"]["goal"] for h in histories])
        if returns.shape[1] < args.episodes:
            notes.append(f"some {source} stream holds only {returns.shape[1]} whole episodes, its curve stops there")
    return methods, result, seconds, notes


# plumbing: the inputs checked before any work, outputs written atomically, the terminal report
def load_run(args, device):
    """The model, its task split and the histories beside it, each checked against the others, and the output directory,
    made writable; bad input exits here, before the evaluation. Returns a dict of them, with notes on the baselines."""
    model, checkpoint = load_checkpoint(args.checkpoint, device)
    tasks = checkpoint.get("tasks")
    check(isinstance(tasks, dict) and {"train", "test", "env"} <= set(tasks),
          f"{args.checkpoint} holds no task split (train, test, env): not a checkpoint of ad_dt.py")
    env = tasks["env"]
    check((model.config.num_states, model.config.max_episode_steps) == (env["size"] ** 2, env["max_episode_steps"]),
          f"the model in {args.checkpoint} does not fit its env {env}")
    check(args.video_task < len(tasks["test"]), f"--video-task must be in 0..{len(tasks['test']) - 1}, got {args.video_task}")
    check_memory(model.config, 0, max(len(tasks["test"]), len(tasks["train"]) * args.train_tasks) * args.seeds, args.episodes
                 * env["max_episode_steps"], args.context, flags=("", "", "--seeds, --episodes or --context"))
    histories_dir = Path(args.histories_dir or checkpoint.get("args", {}).get("histories_dir", "histories"))
    on_disk, test_histories = load_histories(histories_dir, "test")  # validated; held-out goals only
    check(all(on_disk.get(key) == tasks.get(key) for key in ("train", "test", "env", "source", "algo")),
          f"{histories_dir}/tasks.json has another task split, env or source than {args.checkpoint}: use the --histories-dir it was trained on")
    train_histories = load_histories(histories_dir, "train")[1] if args.loss_windows > 0 or args.train_tasks else []
    for part, histories in (("test", test_histories), ("train", train_histories)):  # in the split's order, as the other methods
        histories.sort(key=lambda h: tasks[part].index(h["meta"]["goal"]))
    metas = [h["meta"] for h in test_histories + train_histories]
    source = metas[0].get("source", "a2c") if metas else None  # names the from-scratch baseline
    update = checkpoint.get("update", 0)
    run_name = f"{checkpoint.get('run_name', Path(args.checkpoint).parent.name)}__{update}__{args.exp_name}__{args.seed}__{int(time.time())}"
    out_dir = Path(args.out_dir or f"results/{run_name}")
    check_writable(out_dir, "give a writable --out-dir")  # writable before the evaluation, not after it
    notes, num_envs = [], (metas or [{}])[0].get("algo", {}).get("num_envs", 1)
    if source in LEARNER_PER_STREAM:
        notes.append(f"the {source} baseline is the source run from scratch here, with the histories' config ({metas[0]['algo']})")
    elif not test_histories:
        notes.append(f"no held-out histories in {histories_dir}/test: the source-from-scratch baseline is left out; run `python collect_histories.py --tasks test`")
    elif len(test_histories) < len(tasks["test"]):
        notes.append(f"the source-from-scratch baseline covers the {len(test_histories)} of {len(tasks['test'])} held-out goals with a history in {histories_dir}/test")
    if source == "a2c" and num_envs > 1:
        notes.append(f"each A2C stream is 1 of {num_envs} parallel envs of one agent: its episode k comes after about {num_envs}k episodes of the agent's experience")
    return dict(model=model, checkpoint=checkpoint, tasks=tasks, env=env, histories_dir=histories_dir, test_histories=test_histories,
                train_histories=train_histories, meta=metas[0] if metas else None, source=source, update=update, out_dir=out_dir, notes=notes)


def plot_results(path, methods, train_methods, labels, title, source_gap=None):
    """Return and success rate by episode, mean over runs with a 95% band, training goals dashed; and where the source
    ran from scratch on the same goals, AD's success minus the source's (fidelity: 0 = AD imitates its source exactly)."""
    fig = Figure(figsize=(17 if source_gap else 12, 4.5), layout="constrained")
    axes = fig.subplots(1, 3 if source_gap else 2)
    for ax, key, ylabel in zip(axes, ("return_by_episode", "success_by_episode"), ("return per episode", "success rate")):
        for curves, style, suffix in ((methods, "-", ""), (train_methods, "--", ", training goals")):
            for name, result in curves.items():
                mean, ci, color = np.array(result[key]["mean"]), np.array(result[key]["ci95"]), f"C{list(labels).index(name)}"
                episodes = np.arange(1, len(mean) + 1)
                ax.plot(episodes, mean, style, color=color, label=labels[name] + suffix)
                ax.fill_between(episodes, mean - ci, mean + ci, color=color, alpha=0.15)
        ax.set(ylabel=ylabel)
    if source_gap:
        axes[2].plot(np.arange(1, len(source_gap) + 1), source_gap, "o-", color="C0", ms=3)
        axes[2].axhline(0, color="grey", lw=1)
        axes[2].axhspan(-0.05, 0.05, color="grey", alpha=0.15)
        axes[2].set(ylabel="AD success - source success (held-out)")
    for ax in axes:
        if max(len(r["return_by_episode"]["mean"]) for r in methods.values()) > 20:
            ax.set_xscale("log")
        ax.set(xlabel="episode (from an empty context / from scratch)")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=6, fontsize=8)
    fig.suptitle(title, fontsize=10)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))


def render_frame(size: int, goal: Tuple[int, int], agent_state: int, scale: int = 32) -> np.ndarray:
    """An upscaled RGB frame: dark floor with grid lines, goal red, agent green (yellow on the goal)."""
    grid = np.full((size, size, 3), 40, dtype=np.uint8)
    grid[goal[0], goal[1]] = (220, 40, 40)
    row, col = divmod(int(agent_state), size)
    grid[row, col] = (240, 220, 40) if (row, col) == tuple(goal) else (40, 220, 40)
    frame = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    frame[::scale, :] = frame[:, ::scale] = 90  # grid lines so single cells are visible
    return frame


def video_frames(states, next_states, timesteps, returns, goal, size, num_episodes, max_episode_steps, scale=32):
    """Frames of one env's first num_episodes episodes: the room (goal shown to the viewer, not the agent), this
    episode's path in dark green, cells seen in earlier episodes lighter, and a bar below with one segment per
    episode (green: reached the goal, red: did not, grey: the current one, filling with its steps)."""
    episode_of_step = np.cumsum(timesteps == 0) - 1
    num_episodes = min(num_episodes, int(episode_of_step[-1]) + 1)
    seen, path, frames = set(), [], []

    def frame(cell, episode, progress):
        image = render_frame(size, goal, cell, scale)
        for painted, color in ((seen, (70, 70, 80)), (path, (30, 110, 30))):
            for r, k in (divmod(int(c), size) for c in painted if c != cell):
                if (r, k) != tuple(goal):
                    image[r * scale + 1 : (r + 1) * scale, k * scale + 1 : (k + 1) * scale] = color
        bar = np.zeros((scale, size * scale, 3), np.uint8)
        for e in range(num_episodes):
            x0, x1 = e * bar.shape[1] // num_episodes, (e + 1) * bar.shape[1] // num_episodes - 1
            bar[4:-4, x0:x1] = (30, 30, 30) if e > episode else (60, 60, 60) if e == episode else (40, 200, 40) if returns[e] > 0 else (200, 40, 40)
            if e == episode:  # the current one fills with its steps
                bar[4:-4, x0 : x0 + max(1, int(progress * (x1 - x0)))] = (200, 200, 200)
        return np.concatenate([image, bar])

    for t in np.flatnonzero(episode_of_step < num_episodes):
        episode = int(episode_of_step[t])
        frames.append(frame(int(states[t]), episode, timesteps[t] / max_episode_steps))
        path.append(int(states[t]))
        if t + 1 == len(states) or timesteps[t + 1] == 0:  # the episode ends: show where its last action led
            path.append(int(next_states[t]))
            frames += [frame(int(next_states[t]), episode, 1.0)] * 3
            seen.update(path)
            path = []
    return frames


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def report(results, args, out_dir):
    """The terminal summary: return by episode (success in brackets where it differs) at episodes 1, 2, 5, 10, 20, 50, ...
    and the last, fidelity to the source, then the diagnostics and the teacher-forced losses."""
    names, source, episodes = list(results["methods"]), results["source"], results["args"]["episodes"]
    gap, fmt = results["diagnostics"]["fidelity_to_source"], lambda x: "-" if x is None else f"{x:.2f}"
    marks = [m * 10**e for e in range(7) for m in (1, 2, 5) if m * 10**e < episodes] + [episodes]
    rows = []
    for e in marks:
        row = [e]
        for curve in (results["methods"][name] for name in names):
            returns, successes = curve["return_by_episode"], curve["success_by_episode"]["mean"]
            row.append("" if e > len(returns["mean"]) else f"{returns['mean'][e - 1]:.2f} ± {returns['ci95'][e - 1]:.2f}"
                       + ("" if results["env"]["terminate_on_goal"] else f" ({successes[e - 1]:.2f})"))
        rows.append(row + ([f"{gap[e - 1]:+.2f}" if e <= len(gap) else ""] if gap is not None else []))
    reach = results["diagnostics"]["episode_reaching_90pct_of_optimal"]
    rows.append(["90% of optimal"] + [reach[name] or "never" for name in names] + ([""] if gap is not None else []))
    runs = ", ".join(f"{name} {results['methods'][name]['runs']}" for name in names)
    print(f"\nheld-out goals, return by episode (mean ± 95% interval; runs: {runs}):\n")
    print(markdown_table(["episode"] + names + ([f"AD - {source} success"] if gap is not None else []), rows))
    rows = [[f"{name} ({part})"] + [fmt(d[key]) for key in ("success_episode_1", "success_episodes_11_20", "success_after_success",
                                                             "first_success_episode", "never_succeeded")]
            for part, diagnostics in (("held-out", results["diagnostics"]["held_out"]),
                                      ("train", (results["diagnostics"]["train_goals"] or {}).get("diagnostics", {})))
            for name, d in diagnostics.items()]
    header = ["method (goals)", "success ep. 1", "success ep. 11-20", "success after success", "first success (mean ep.)", "never succeeded"]
    print(f"\nover {episodes} episodes:\n\n" + markdown_table(header, rows) + "\n")
    first = args.keep_first if args.keep_first is not None else (args.context or 0) // 4
    cut = f"cut to the run's first {first} transitions and its recent half" if args.context else "longer"
    for part, d in results["diagnostics"]["ad_success_by_context"].items():
        print(f"AD's success after its first success, {part.replace('_', ' ')}: {fmt(d['first_context'])} in the episodes that "
              f"start in its first {d['seq_len']} steps (a context no longer than it trained with), {fmt(d['after_cut'])} in "
              f"later ones ({cut}); {d['first_context_episodes']} / "
              f"{d['after_cut_episodes']} episodes")
    loss = results["diagnostics"]["teacher_forced_loss"]
    if loss is not None:
        print(f"\nteacher-forced action loss (nats, {loss['windows']} windows of {loss['seq_len']}): held-out histories "
              f"{fmt(loss['held_out'])}, training histories {fmt(loss['train'])}")
    print(f"\nresults in {out_dir}/: results.json, return_by_episode.png, trajectories.npz" + (", video.mp4" if args.video_episodes > 0 else ""))


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if args.cuda else "cpu")

    # the model, its task split and the histories beside it; bad input exits before anything is written
    run = load_run(args, device)
    model, checkpoint, tasks, env, source, out_dir = (run[key] for key in ("model", "checkpoint", "tasks", "env", "source", "out_dir"))
    KEPT, notes = f"nothing: {out_dir}/ gets its files only once the evaluation is done", run["notes"]
    if args.temperature is None:  # the temperature the run was trained to be evaluated at (before the flag: its policy as is)
        args.temperature = checkpoint.get("args", {}).get("eval_temperature", 1.0)
    for note in notes:
        print(f"note: {note}")
    print(f"{args.checkpoint}: update {run['update']}, {sum(p.numel() for p in model.parameters())} parameters; "
          f"{len(tasks['test'])} held-out goals x {args.seeds} seeds x {args.episodes} episodes")

    # ALGO LOGIC: every method on the same goals, episodes and env settings: held-out goals, and training goals if asked
    goal_sets = {"held_out": (tasks["test"], run["test_histories"])}
    if args.train_tasks:
        goal_sets["train_goals"] = (tasks["train"], run["train_histories"])
    methods, trajectories, timings = {}, {}, {}
    for part, (goals, histories) in goal_sets.items():
        methods[part], trajectories[part], timings[f"ad_{part}_s"], part_notes = evaluate_methods(
            model, goals, env, histories, source, run["meta"], args)
        for note in part_notes:
            notes.append(f"{part}: {note}")
            print(f"note: {notes[-1]}")
        actions = trajectories[part]["actions"]
        print(f"{part}: model {timings[f'ad_{part}_s']:.1f} s for {actions.size} actions ({actions.shape[1]} steps of {len(actions)} envs)")

    # DIAGNOSTICS: in-context learning or copying? (see README.md#eval_adpy)
    loss = None
    if args.loss_windows > 0:  # how well AD predicts its source's actions, on held-out and on training histories
        start_time = time.perf_counter()
        train_args = checkpoint.get("args", {})
        pace = (train_args.get("history_len"), train_args.get("keep_every", 1))
        rng = np.random.default_rng(args.seed)
        loss = {part: history_action_loss(model, run[f"{split}_histories"], *pace, args.loss_windows, rng) if run[f"{split}_histories"] else None
                for part, split in (("held_out", "test"), ("train", "train"))}
        loss.update(windows=args.loss_windows, seq_len=model.config.seq_len, history_len=pace[0], keep_every=pace[1], source=source)
        timings["teacher_forced_loss_s"] = time.perf_counter() - start_time
    summaries = {part: {name: summarize(runs) for name, runs in part_methods.items()} for part, part_methods in methods.items()}
    diagnostics = {part: {name: diagnose(runs.returns) for name, runs in part_methods.items()} for part, part_methods in methods.items()}
    optimal_return = float(np.mean(summaries["held_out"]["optimal"]["return_by_episode"]["mean"]))
    results = {
        "args": {**asdict(args), "histories_dir": str(run["histories_dir"]), "out_dir": str(out_dir)},
        "checkpoint": {"path": str(args.checkpoint), "run_name": checkpoint.get("run_name"), "update": run["update"],
                       "model_config": checkpoint["model_config"], "train_args": checkpoint.get("args")},
        "env": env,
        "tasks": {"held_out": tasks["test"], "train": tasks["train"]},
        "source": source,
        "methods": summaries["held_out"],
        "diagnostics": {
            "held_out": diagnostics["held_out"],
            "train_goals": {"methods": summaries["train_goals"], "diagnostics": diagnostics["train_goals"],
                            "fidelity_to_source": fidelity(summaries["train_goals"], source)} if args.train_tasks else None,
            "teacher_forced_loss": loss,
            "fidelity_to_source": fidelity(summaries["held_out"], source),
            "episode_reaching_90pct_of_optimal": {name: next((e + 1 for e, mean in enumerate(result["return_by_episode"]["mean"])
                                                              if mean >= 0.9 * optimal_return - 1e-9), None)
                                                  for name, result in summaries["held_out"].items()},
            "ad_success_by_context": {part: success_by_context(result["returns"], result["timesteps"], model.config.seq_len)
                                      for part, result in trajectories.items()},
        },
        "notes": notes,
        "timings": timings,
    }

    # outputs, each written atomically
    write_atomic(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    KEPT = f"{out_dir}/results.json (the plot, trajectories or video may be missing: rerun to write them)"
    labels = {"ad": "AD (in context)", "random": "random", "optimal": "optimal (knows the goal)", "oracle": "exploration oracle",
              **({source: f"{source} from scratch (one stream)"} if source else {})}
    title = (f"{results['checkpoint']['run_name']} update {run['update']}: {len(tasks['test'])} held-out goals x {args.seeds} seeds"
             f" ({'terminate' if env['terminate_on_goal'] else 'no-terminate'} mode, {'greedy' if args.greedy else f'sampled at temperature {args.temperature:g}'} actions)")
    plot_results(out_dir / "return_by_episode.png", results["methods"], {"ad": summaries["train_goals"]["ad"]} if args.train_tasks else {},
                 labels, title, results["diagnostics"]["fidelity_to_source"])
    arrays = {f"{part}_{key}": result[key] for part, result in trajectories.items() for key in ("states", "actions", "rewards", "timesteps", "returns", "goals")}
    write_atomic(out_dir / "trajectories.npz", lambda tmp: np.savez_compressed(tmp, **arrays))
    if args.video_episodes > 0:
        held_out, env_index = trajectories["held_out"], args.video_task * args.seeds
        frames = video_frames(held_out["states"][env_index], held_out["next_states"][env_index], held_out["timesteps"][env_index],
                              held_out["returns"][env_index], tasks["test"][args.video_task], env["size"], args.video_episodes, env["max_episode_steps"])
        write_atomic(out_dir / "video.mp4", lambda tmp: imageio.mimwrite(tmp, frames, fps=8, macro_block_size=1))
    report(results, args, out_dir)
