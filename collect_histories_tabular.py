# Learning histories of learners with one learner per env stream, each from scratch, all tasks at once: tabular Dyna-Q
# (the learning source AD distils best here, and the pipeline's default), the scripted explorer and noise.
# The history format, the env and the recorder are collect_histories.py's (the A2C collection), imported.
# Docs: README.md#collect_histories_tabularpy-and-collect_historiespy
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

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import trange

import collect_histories
from collect_histories import (NUM_ACTIONS, CollectArgs, HistoryRecorder, check_collect_args, make_envs, need, prepare_collection,
                               report)


@dataclass
class Args(CollectArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    histories_dir: str = "histories"
    """where `tasks.json` and the histories (`train/`, `test/`) are written"""
    source: Literal["dynaq", "explorer", "noise"] = "dynaq"
    """`dynaq`: tabular Dyna-Q with optimistic initial values, which learns the room and the reward from its own steps
    (the learning source AD distils best here: README.md, Results); `explorer`: remembers visited cells, walks to
    the nearest unvisited one, goes straight to the goal once rewarded; `noise`: shortest-path policy with action
    noise decaying over episodes (AD-epsilon)"""
    num_envs: int = 500
    """learners per goal: each env stream is one learner from scratch"""
    history_len: Optional[int] = None
    """transitions kept per goal, over all its streams (history_len // num_envs per stream); default: 256 per stream"""
    dynaq_q0: float = 0.5
    """`dynaq`: initial value of every (state, action) pair and value of the pairs never tried (optimism). Below 1,
    the largest return in terminate mode, a learner that knows the goal goes there unless an untried pair is a few
    steps nearer, so it stops exploring soon after its first reward and its learning arc fits in a few hundred
    steps; 1 makes it try every pair nearer than the goal first"""
    dynaq_gamma: float = 0.9
    """`dynaq`: discount of the planning backups"""
    dynaq_sweeps: int = 20
    """`dynaq`: value-iteration sweeps over the learned model after every step (a reward found spreads one step
    back per sweep: 20 covers any path of a 20-step episode)"""
    dynaq_eps: float = 0.0
    """`dynaq`: probability of a random action at each step (optimism alone drives the exploration)"""
    explorer_eps: float = 0.1
    """`explorer`: probability of a random action at each step"""
    noise_episodes: int = 20
    """`noise`: the episodes (per stream) over which the random-action probability falls linearly from 1 to --noise-floor"""
    noise_floor: float = 0.0
    """`noise`: the random-action probability after --noise-episodes"""

    # fixed: what the histories' recorder (collect_histories.py's) reads
    agents_per_goal: tyro.conf.Suppress[int] = 1
    """one learner per stream: a goal's streams are its --num-envs learners"""
    num_steps: tyro.conf.Suppress[int] = 10
    """steps between two chunks of the histories (the recorder's rollout, and the unit of --log-every): a learner acts the same whatever it is"""
    total_timesteps: tyro.conf.Suppress[int] = 0
    """env steps each stream runs (set at runtime: whole chunks covering its history)"""


# each source's flags: its config in tasks.json and the histories' metadata ("algo"); a flag of another source is refused
ALGO_KEYS = {
    "dynaq": ["num_envs", "dynaq_q0", "dynaq_gamma", "dynaq_sweeps", "dynaq_eps", "history_len"],
    "explorer": ["num_envs", "explorer_eps", "history_len"],
    "noise": ["num_envs", "noise_episodes", "noise_floor", "history_len"],
}


def check_args(args: Args) -> None:
    """Reject every bad flag with a one-line message naming it, before anything is read or written."""
    if args.history_len is None:
        args.history_len = 256 * args.num_envs
    check_collect_args(args)
    for name in ["noise_episodes", "dynaq_sweeps"]:
        need(args, getattr(args, name) >= 1, name.replace("_", "-"), "positive")
    need(args, 0 <= args.dynaq_gamma <= 1, "dynaq-gamma", "in [0, 1]")
    need(args, abs(args.dynaq_q0) <= 1e6, "dynaq-q0", "in [-1e6, 1e6] (Q is float32)")
    for name in ["noise_floor", "explorer_eps", "dynaq_eps"]:
        need(args, 0 <= getattr(args, name) <= 1, name.replace("_", "-"), "in [0, 1]")
    owner = {key: source for source, keys in ALGO_KEYS.items() for key in keys if key not in ALGO_KEYS[args.source]}
    for name, source in owner.items():  # given on the command line (not its default), it would be ignored without a word
        if getattr(args, name) != getattr(Args, name):
            raise SystemExit(f"error: --{name.replace('_', '-')} is a flag of --source {source}, not of --source {args.source}: leave it out")


class ScriptedLearner:
    """The `noise` and `explorer` sources for many env streams at once; each stream is one learner from scratch.

    `noise` (AD-epsilon): the shortest path to the goal, with a random action instead at probability epsilon,
    which falls linearly from 1 to `noise_floor` over the stream's first `noise_episodes` episodes.
    `explorer`: knows the room, not the goal. It remembers the cells it has visited (across episodes), walks
    to the nearest unvisited cell (random tie-breaks) until rewarded, then goes straight to the goal (and stays
    there when the episode does not end on it); a random action at probability `explorer_eps`.
    Randomness comes from one generator per agent, so a history does not depend on the tasks beside it.
    """

    def __init__(self, source: str, goal_states: np.ndarray, rngs, size: int, noise_episodes: int = 20,
                 noise_floor: float = 0.0, explorer_eps: float = 0.1):
        self.source, self.goal_states, self.rngs, self.size = source, goal_states, rngs, size
        self.noise_episodes, self.noise_floor, self.explorer_eps = noise_episodes, noise_floor, explorer_eps
        num_envs, num_states = len(goal_states), size * size
        self.envs_per_rng = num_envs // len(rngs)
        row, col = np.divmod(np.arange(num_states), size)
        self.rowcol = np.stack([row, col], axis=1)  # (S, 2)
        self.distance = np.abs(row[:, None] - row[None]) + np.abs(col[:, None] - col[None])  # (S, S) steps apart
        # the cells stepped onto (a start cell is not: only a step onto the goal is rewarded); the centre is never a goal
        self.visited = np.zeros((num_envs, num_states), dtype=bool)
        self.visited[:, (size // 2) * size + size // 2] = True
        self.known_goal = np.full(num_envs, -1)  # the cell where reward was found, -1 while unknown
        self.episode = np.zeros(num_envs, dtype=np.int64)

    def step_towards(self, states: np.ndarray, targets: np.ndarray, coin: np.ndarray) -> np.ndarray:
        """An action that brings each state one step closer to its target (noop on it); `coin` picks the axis."""
        d_row, d_col = np.sign(self.rowcol[targets] - self.rowcol[states]).T
        vertical = np.where(d_row < 0, 1, 3)  # up, down
        horizontal = np.where(d_col > 0, 2, 4)  # right, left
        use_row = (d_row != 0) & ((d_col == 0) | (coin < 0.5))
        return np.where(use_row, vertical, np.where(d_col != 0, horizontal, 0))

    def act(self, states: np.ndarray) -> np.ndarray:
        num_envs, num_states = self.visited.shape
        # per env: 81 tie-break numbers, a noise draw, an axis coin, a random action
        u = np.concatenate([rng.random((self.envs_per_rng, num_states + 3)) for rng in self.rngs])
        if self.source == "noise":
            targets = self.goal_states
            eps = np.maximum(self.noise_floor, 1.0 - self.episode / self.noise_episodes)
        else:
            distance = self.distance[states] + 0.5 * u[:, :num_states]  # ties broken at random
            distance[self.visited] = np.inf
            nearest_unvisited = distance.argmin(1)
            targets = np.where(self.known_goal >= 0, self.known_goal, nearest_unvisited)
            eps = self.explorer_eps
        actions = self.step_towards(states, targets, u[:, num_states + 1])
        random_actions = np.minimum((u[:, num_states + 2] * NUM_ACTIONS).astype(np.int64), NUM_ACTIONS - 1)
        return np.where(u[:, num_states] < eps, random_actions, actions)

    def observe(self, next_states: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, ended: np.ndarray) -> None:
        """Learn from one step: the cell reached (before any reset), its reward, whether the episode ended (at the
        goal: `terminated`, or at either the goal or the time limit: `ended`)."""
        self.visited[np.arange(len(next_states)), next_states] = True
        self.known_goal = np.where(rewards > 0, next_states, self.known_goal)
        self.episode += ended


class DynaQLearner:
    """The `dynaq` source: tabular Dyna-Q (Sutton 1990) with optimistic initial values, one learner per env stream.

    It is told neither the room nor the goal. Each stream learns a deterministic model of the pairs (state, action)
    it has tried: the state reached, the reward, whether the episode terminated there (a time-limit truncation is
    not a terminal). After every real step it plans: `sweeps` synchronous value-iteration sweeps over the model,
    Q[s, a] = r + gamma * (1 - end) * max_a' Q[next, a'] for the pairs tried, while the others keep the optimistic
    `q0` (R-max-like: with q0 = 1 an untried pair looks as good as stepping onto the goal, so a stream goes to a
    goal it knows only once no untried pair is nearer). It acts greedily on Q, ties broken at random, with a
    random action at probability `eps`. Randomness comes from one generator per agent, so a history does not depend on the
    tasks beside it.

    Arrays are (env, action, state), so the max over actions and the backups run over contiguous rows (faster than
    (env, state, action)). Planning is skipped on a stream whose Q is a fixed point of the sweep
    (its last sweep changed nothing and its model has not changed since): a sweep would leave it as it is, so the
    result is the same as sweeping every stream every step (tested), in a fraction of the time.
    """

    def __init__(self, num_envs: int, num_states: int, rngs, q0: float = 0.5, gamma: float = 0.9, sweeps: int = 20,
                 eps: float = 0.0):
        self.rngs, self.envs_per_rng = rngs, num_envs // len(rngs)
        self.q0, self.gamma, self.sweeps, self.eps = np.float32(q0), np.float32(gamma), sweeps, eps
        shape = (num_envs, NUM_ACTIONS, num_states)
        self.known = np.zeros(shape, dtype=bool)  # the pair was tried at least once
        self.model_next = np.zeros(shape, dtype=np.int64)
        self.model_reward = np.zeros(shape, dtype=np.float32)
        self.model_end = np.zeros(shape, dtype=bool)  # the episode terminated there
        self.Q = np.full(shape, self.q0, dtype=np.float32)
        self.settled = np.ones(num_envs, dtype=bool)  # Q is a fixed point of the sweep: planning would not change it
        self.sweeps_done = 0  # (env, sweep) pairs computed, for the tests and the speed notes
        self.states = self.actions = None

    def act(self, states: np.ndarray) -> np.ndarray:
        num_envs = len(states)
        # per env: a tie-break number per action, an epsilon draw, a random action
        u = np.concatenate([rng.random((self.envs_per_rng, NUM_ACTIONS + 2)) for rng in self.rngs])
        q = self.Q[np.arange(num_envs), :, states]  # (N, A)
        best = q == q.max(1, keepdims=True)
        greedy = np.where(best, u[:, :NUM_ACTIONS], -1.0).argmax(1)  # a uniformly random one of the best
        random_actions = np.minimum((u[:, NUM_ACTIONS + 1] * NUM_ACTIONS).astype(np.int64), NUM_ACTIONS - 1)
        self.states, self.actions = states, np.where(u[:, NUM_ACTIONS] < self.eps, random_actions, greedy)
        return self.actions

    def observe(self, next_states: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, ended: np.ndarray) -> None:
        """Learn from one step (the state reached before any reset, its reward, whether the episode terminated at
        the goal), then plan. `ended` (the time limit too) is not used: a truncation says nothing about the room."""
        pair = (np.arange(len(next_states)), self.actions, self.states)
        changed = (~self.known[pair] | (self.model_next[pair] != next_states) | (self.model_reward[pair] != rewards)
                   | (self.model_end[pair] != terminated))
        self.known[pair], self.model_next[pair], self.model_reward[pair], self.model_end[pair] = (
            True, next_states, rewards, terminated)
        self.settled &= ~changed
        self.plan()

    def plan(self) -> None:
        """`sweeps` synchronous value-iteration sweeps of Q over each stream's model, skipping the settled streams."""
        active = np.flatnonzero(~self.settled)
        if not active.size:
            return
        known = self.known[active]
        reward = np.where(known, self.model_reward[active], self.q0)  # an untried pair backs up to q0 ...
        discount = self.gamma * (known & ~self.model_end[active])  # ... with nothing after it
        num_states = self.Q.shape[2]
        # rows of the active streams' V = max_a Q, flattened: one gather (faster than np.take_along_axis)
        rows = self.model_next[active] + num_states * np.arange(len(active))[:, None, None]
        q = self.Q[active]
        for _ in range(self.sweeps):
            self.sweeps_done += len(active)
            new_q = reward + discount * q.max(1).ravel()[rows]
            moved = (new_q != q).any((1, 2))
            q = new_q
            if moved.mean() < 0.5:
                # most reached a fixed point: keep them and sweep on without them (a sweep leaves a fixed point as
                # it is, so those kept in until then are harmless: copying them out each sweep costs more)
                self.Q[active[~moved]] = q[~moved]
                self.settled[active[~moved]] = True
                active, q, reward, discount, moved = active[moved], q[moved], reward[moved], discount[moved], moved[moved]
                if not active.size:
                    return
                rows = self.model_next[active] + num_states * np.arange(len(active))[:, None, None]
        self.Q[active] = q
        self.settled[active[~moved]] = True  # the others still changed in the last sweep: planned again next step


def make_learner(args: Args, goal_states: np.ndarray, rngs):
    """The learner of a per-stream source for envs with these goals: all of its streams learn from scratch."""
    if args.source == "dynaq":
        return DynaQLearner(len(goal_states), args.size * args.size, rngs, args.dynaq_q0, args.dynaq_gamma,
                            args.dynaq_sweeps, args.dynaq_eps)
    return ScriptedLearner(args.source, goal_states, rngs, args.size, args.noise_episodes, args.noise_floor,
                           args.explorer_eps)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    args.steps_per_stream = args.history_len // args.num_envs
    args.num_updates = -(-args.steps_per_stream // args.num_steps)  # one learner per stream, from scratch: just long enough for the history
    args.total_timesteps = args.num_updates * args.num_steps
    run_name = f"DarkRoom-{args.size}x{args.size}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)

    # the tasks still to collect, and the config every history of this directory shares
    S = args.size * args.size
    # dynaq: the model and Q of every (env, action, state), and the planning's copies; scripted: visited cells and three
    # float64 arrays of (env, state) per step, and the distance table
    learner_bytes = args.num_envs * S * NUM_ACTIONS * 40 if args.source == "dynaq" else args.num_envs * S * 25 + S * S * 8
    config, todo = prepare_collection(args, ALGO_KEYS[args.source], learner_bytes, run_name)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))
    envs, _, rngs = make_envs(args, todo)  # goal i's learners are the envs i * num_envs ... (i + 1) * num_envs - 1
    recorder = HistoryRecorder(args, config, todo, envs, writer)
    signal.signal(signal.SIGINT, collect_histories.on_interrupt)  # its KEPT is the one the recorder keeps up to date

    # every env stream is one learner from scratch: it acts, sees the step and learns from it (dynaq plans), at once
    learner = make_learner(args, envs.goal_states, rngs)
    envs.reset(seed=args.seed)
    with contextlib.closing(writer):  # closed on Ctrl-C too: the logs so far are kept
        progress = trange(1, args.num_updates + 1, desc=f"{args.source} x{len(rngs)}", unit="chunk", mininterval=1.0)
        for update in progress:
            for step in range(args.num_steps):
                action = learner.act(envs.state)
                learner.observe(*recorder.step(step, action))
            recorder.end_rollout(update, progress)
    report(args, recorder, run_name)
