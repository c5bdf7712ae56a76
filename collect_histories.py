# Train A2C agents on DarkRoom tasks (the original design's source), all at once, and write their learning histories for AD.
# The learners with one learner per stream (Dyna-Q, explorer, noise) are collect_histories_tabular.py, which imports this file.
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
import glob
import importlib.metadata
import json
import math
import platform
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Tuple

import gymnasium as gym
import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter
from tqdm import trange

FORMAT_VERSION = 1
MOVES = ((0, 0), (-1, 0), (0, 1), (1, 0), (0, -1))  # the actions: noop, up, right, down, left (row, col steps)
NUM_ACTIONS = len(MOVES)
# the arrays of a history file and their dtypes (see README.md#history-format)
HISTORY_KEYS = {"states": np.uint8, "actions": np.uint8, "rewards": np.uint8, "next_states": np.uint8,
                "terminated": np.bool_, "truncated": np.bool_, "timesteps": np.uint8}


@dataclass
class CollectArgs:
    """The flags of every collector: this file's A2C, and the learners per stream of collect_histories_tabular.py."""
    seed: int = 1
    """seed of the experiment: with the goal it seeds each agent (weights and action sampling)"""

    # Environment
    size: int = 9
    """side of the square grid"""
    terminate_on_goal: bool = True
    """end the episode when the goal is reached (the original design's choice); False = the AD paper's variant"""
    max_episode_steps: int = 20
    """time limit of an episode (truncation)"""
    random_start: bool = False
    """if toggled, every episode starts in a uniformly random cell (toymeta's `random_start=True`), else at the centre"""

    # Tasks and histories
    split_seed: int = 0
    """seed of the train/test split of the goals"""
    num_train_tasks: int = 57
    """number of training goals; the other goals are held out for testing"""
    tasks: Tuple[str, ...] = ("all",)
    """which tasks to collect: `train`, `test`, `all`, or goals as row,col (e.g. `--tasks 0,1 8,8`)"""
    overwrite: bool = False
    """if toggled, collect again the tasks whose history already exists (otherwise they are skipped)"""
    log_every: int = 100
    """log charts every this many rollouts (success rate = over the episodes that ended since the last log)"""

    # filled in at runtime
    num_updates: tyro.conf.Suppress[int] = 0
    """number of rollouts per agent"""
    steps_per_stream: tyro.conf.Suppress[int] = 0
    """transitions kept per env stream (history_len // num_envs)"""


@dataclass
class Args(CollectArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True` so GPU runs are reproducible"""
    cuda: bool = False
    """if toggled, use CUDA when it is available"""
    num_threads: int = 1
    """torch CPU threads (the tensors are small: one is fastest)"""
    histories_dir: str = "histories_a2c"
    """where `tasks.json` and the histories (`train/`, `test/`) are written"""
    history_len: int = 800_000
    """transitions kept per agent, over all its env streams (history_len // num_envs per stream)"""

    # Algorithm (defaults: the original design's hyperparameters, as in a2c_darkroom.py)
    agents_per_goal: int = 1
    """independent agents per goal, each from its own seed; a goal's history holds all their streams"""
    num_envs: int = 10
    """number of parallel envs per agent (streams per history: agents_per_goal * num_envs)"""
    num_steps: int = 10
    """rollout length per env between updates (the n of the n-step returns)"""
    update_epochs: int = 1
    """A2C updates per rollout: each recomputes the returns and the loss on the same rollout with the updated network"""
    optimizer: Literal["adam", "rmsprop", "sgd"] = "adam"
    """the optimizer of every agent (each elementwise: one over the stacked agents = one per agent)"""
    total_timesteps: int = 2_500_000
    """env steps per agent over all its envs (training goes on after the history is cut)"""
    learning_rate: float = 1e-4
    """learning rate of the optimizer"""
    adam_eps: float = 1e-6
    """epsilon of Adam and RMSprop"""
    critic_init_std: float = 1.0
    """gain of the critic's orthogonal init (the design's: 1); 0: no advantage, so no push, until a reward is found"""
    hidden_size: int = 128
    """size of the shared state embedding"""
    gamma: float = 0.9
    """discount; 0.9 (horizon ~10 steps, within a 20-step episode) makes a shorter path to the goal clearly worth more"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.99
    """coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """maximum global norm of each agent's gradient"""
    source: tyro.conf.Suppress[str] = "a2c"
    """the source's name in tasks.json and the histories' metadata"""


# the source's flags: its config in tasks.json and the histories' metadata ("algo")
ALGO_KEYS = ["agents_per_goal", "num_envs", "num_steps", "update_epochs", "optimizer", "learning_rate", "adam_eps",
             "critic_init_std", "hidden_size", "gamma", "ent_coef", "vf_coef", "max_grad_norm", "history_len"]


def need(args, ok: bool, flag: str, rule: str) -> None:
    """Unless `ok`, exit with one line naming --flag, its rule and the value given."""
    if not ok:
        raise SystemExit(f"error: --{flag} must be {rule}, got {getattr(args, flag.replace('-', '_'))}")


def check_collect_args(args: CollectArgs) -> None:
    """The checks of the flags every collector shares (`CollectArgs`, --num-envs and --history-len)."""
    for name in ["size", "max_episode_steps", "num_envs", "history_len", "log_every"]:
        need(args, getattr(args, name) >= 1, name.replace("_", "-"), "positive")
    need(args, 0 < len(args.exp_name.encode()) <= 200 and "/" not in args.exp_name, "exp-name", "a non-empty file name without '/'")
    need(args, 0 <= args.seed < 2**32, "seed", "in 0..2**32-1 (numpy's seeds)")
    need(args, args.split_seed >= 0, "split-seed", "at least 0")
    need(args, args.histories_dir != "" and not os.path.isfile(args.histories_dir), "histories-dir", "a directory, not a file")
    if args.size * args.size > 256 or args.max_episode_steps > 256:
        raise SystemExit("error: histories store states and timesteps as uint8: need --size <= 16 and --max-episode-steps <= 256")
    need(args, args.size >= 2, "size", "at least 2 (a goal besides the start cell)")
    if args.history_len < args.num_envs:
        raise SystemExit(f"error: --history-len {args.history_len} must be at least --num-envs {args.num_envs} (one step per stream)")
    goals = args.size * args.size - 1
    need(args, 1 <= args.num_train_tasks <= goals - 1, "num-train-tasks", f"in 1..{goals - 1} (there are {goals} goals)")
    select_tasks(args.tasks, make_split(args.size, args.num_train_tasks, args.split_seed), args.size)  # the names of --tasks


def check_args(args: Args) -> None:
    """Reject every bad flag with a one-line message naming it, before anything is read or written (what depends on
    the histories there is checked by `prepare_collection`)."""
    for name in ["agents_per_goal", "num_steps", "update_epochs", "total_timesteps", "hidden_size"]:
        need(args, getattr(args, name) >= 1, name.replace("_", "-"), "positive")
    check_collect_args(args)
    need(args, 1 <= args.num_threads <= 1024, "num-threads", "in 1..1024 (more threads than cores only slow torch down)")
    need(args, 0 < args.learning_rate <= 1, "learning-rate", "in (0, 1] (larger steps blow the logits up: the policy freezes on one action)")
    need(args, 0 < args.adam_eps < math.inf, "adam-eps", "positive")
    need(args, 0 <= args.critic_init_std < math.inf, "critic-init-std", "at least 0")
    need(args, 0 <= args.gamma <= 1, "gamma", "in [0, 1]")
    for name in ["ent_coef", "vf_coef"]:
        need(args, 0 <= getattr(args, name) < math.inf, name.replace("_", "-"), "at least 0")
    need(args, args.max_grad_norm > 0, "max-grad-norm", "positive (inf: no clipping)")
    need(args, not args.cuda or torch.cuda.is_available(), "cuda", "left out on a machine without a CUDA GPU (torch sees none)")
    need(args, args.total_timesteps >= args.num_envs * args.num_steps, "total-timesteps", "at least --num-envs * --num-steps (one update)")
    trained = args.total_timesteps // (args.num_envs * args.num_steps) * args.num_steps * args.num_envs  # whole updates
    if args.history_len // args.num_envs * args.num_envs > trained:
        raise SystemExit(f"error: --history-len {args.history_len} is more than the {trained} env steps that --total-timesteps "
                         f"{args.total_timesteps} trains (whole updates of --num-envs x --num-steps)")


class DarkRoomVectorEnv:
    """toymeta's `DarkRoom` + `TimeLimit`, many envs (a goal each) in numpy, as a SAME_STEP SyncVectorEnv returns them."""

    def __init__(self, goals, size=9, terminate_on_goal=True, max_episode_steps=20, start_rngs=None):
        self.goal_states = np.asarray(goals, dtype=np.int64).reshape(-1, 2) @ np.array([size, 1])
        self.num_envs, self.size, self.start_state = len(self.goal_states), size, (size // 2) * (size + 1)  # the centre
        self.terminate_on_goal, self.max_episode_steps, self.start_rngs = terminate_on_goal, max_episode_steps, start_rngs
        moved = np.clip(np.divmod(np.arange(size * size), size) + np.array(MOVES)[:, :, None], 0, size - 1)  # walls block
        self.transitions = np.ascontiguousarray((moved[:, 0] * size + moved[:, 1]).T)  # next state of (state, action)
        self.blocks = np.split(np.arange(self.num_envs), len(start_rngs)) if start_rngs else []  # one rng per block

    def starts(self, resetting):  # random starts as toymeta draws them; a block's depend on that block only
        start = np.full(self.num_envs, self.start_state, dtype=np.int64)
        for envs, rng in zip(self.blocks, self.start_rngs or ()):
            if (envs := envs[resetting[envs]]).size:
                start[envs] = rng.integers(0, self.size, size=(envs.size, 2)) @ np.array([self.size, 1])
        return start

    def reset(self, seed=None, options=None):  # the starts come from start_rngs: the seed changes nothing
        self.state, self.timestep = self.starts(np.ones(self.num_envs, bool)), np.zeros(self.num_envs, dtype=np.int64)
        return self.state, {"timestep": self.timestep}

    def step(self, actions):  # fresh arrays every step, so the arrays handed out never change afterwards
        next_state = self.transitions[self.state, actions]
        reward = (next_state == self.goal_states).astype(np.float32)
        terminated, truncated = (reward > 0) & self.terminate_on_goal, self.timestep >= self.max_episode_steps - 1
        ended = terminated | truncated
        self.state, self.timestep = np.where(ended, self.starts(ended), next_state), np.where(ended, 0, self.timestep + 1)
        return self.state, reward, terminated, truncated, {"final_obs": next_state, "timestep": self.timestep}


def layer_init(layer: nn.Linear, std: float) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, 0.0)
    return layer


class BatchedAgent(nn.Module):
    """Many independent copies of a2c_darkroom.py's `Agent`, their parameters stacked on a leading agent axis. The policy
    and value depend on the state only, so `tables()` evaluates every state of every agent in one matmul."""

    def __init__(self, seeds: List[int], num_states: int, num_actions: int = NUM_ACTIONS, hidden_size: int = 128,
                 critic_std: float = 1.0):
        super().__init__()
        params = []
        for seed in seeds:  # each agent's weights as a2c_darkroom.py's `Agent` draws them after torch.manual_seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                embedding = nn.Embedding(num_states, hidden_size)
                actor = layer_init(nn.Linear(hidden_size, num_actions), std=0.01)  # small: the first policies explore
                critic = layer_init(nn.Linear(hidden_size, 1), std=critic_std)
            params.append([embedding.weight.data.T, actor.weight.data, actor.bias.data, critic.weight.data, critic.bias.data])
        stack = lambda i: nn.Parameter(torch.stack([p[i] for p in params]).contiguous())
        self.embedding = stack(0)  # (A, H, S), transposed: the faster layout for the matmuls
        self.actor_weight, self.actor_bias = stack(1), stack(2)  # (A, K, H), (A, K)
        self.critic_weight, self.critic_bias = stack(3), stack(4)  # (A, 1, H), (A, 1)

    def tables(self):
        """Logits (A, K, S) and values (A, S) of every state."""
        weight = torch.cat([self.actor_weight, self.critic_weight], dim=1)  # (A, K + 1, H)
        bias = torch.cat([self.actor_bias, self.critic_bias], dim=1)  # (A, K + 1)
        out = torch.baddbmm(bias.unsqueeze(2), weight, self.embedding)  # (A, K + 1, S)
        return out[:, :-1], out[:, -1]


def nstep_returns(rewards, terminated, truncated, next_values, gamma: float):
    """n-step returns over a whole rollout, no GAE. All tensors are (num_steps, ...).

    `next_values[t]` is V(s_{t+1}) for the true next state (the *final* observation when the episode ended
    at t). The return is cut to 0 after a termination, bootstrapped from V(final obs) after a truncation
    (the time limit is not part of the MDP), and from V(s_T) at the end of the rollout.
    """
    returns = torch.zeros_like(rewards)
    future = next_values[-1]
    for t in reversed(range(rewards.shape[0])):
        if t < rewards.shape[0] - 1:
            future = torch.where(truncated[t], next_values[t], returns[t + 1])
        returns[t] = rewards[t] + gamma * (~terminated[t]) * future
    return returns


def clip_grad_norm_per_agent_(parameters: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`nn.utils.clip_grad_norm_` applied to each agent's own parameters (leading axis = agent); returns the norms."""
    per_tensor = torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), dim=1) for p in parameters], dim=1)  # (A, P)
    norms = torch.linalg.vector_norm(per_tensor, dim=1)  # (A,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in parameters:
        p.grad.mul_(coef.view(-1, *[1] * (p.dim() - 1)))
    return norms


def a2c_update(agent: BatchedAgent, optimizer: optim.Optimizer, logits, values, obs, actions, returns,
               ent_coef: float, vf_coef: float, max_grad_norm: float):
    """a2c_darkroom.py's `a2c_loss` and step for every agent at once, read from the agents' tables: logits (A, K, S),
    values (A, S); obs, actions, returns (A, N), each agent's rollout. The per-agent losses are summed, so each
    agent's gradient stays its own, and the optimizer is elementwise: one over the stacked agents = one per agent."""
    logp_table = torch.log_softmax(logits, dim=1)  # (A, K, S)
    logprob = logp_table.flatten(1).gather(1, actions * logits.shape[-1] + obs)  # (A, N)
    entropy_loss = (-(logp_table.exp() * logp_table).sum(1)).gather(1, obs).mean(1)
    value = values.gather(1, obs)  # (A, N)
    pg_loss = -(logprob * (returns - value).detach()).mean(1)
    v_loss = 0.5 * ((returns - value) ** 2).mean(1)
    optimizer.zero_grad()
    (pg_loss - ent_coef * entropy_loss + vf_coef * v_loss).sum().backward()
    grad_norm = clip_grad_norm_per_agent_(list(agent.parameters()), max_grad_norm)
    optimizer.step()
    return pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), grad_norm


def make_optimizer(args: Args, parameters) -> optim.Optimizer:
    """--optimizer over the stacked agents. Each is elementwise, so each agent's step is its own (fused: the same Adam, faster)."""
    if args.optimizer == "sgd":
        return optim.SGD(parameters, lr=args.learning_rate)
    if args.optimizer == "rmsprop":
        return optim.RMSprop(parameters, lr=args.learning_rate, eps=args.adam_eps)
    return optim.Adam(parameters, lr=args.learning_rate, eps=args.adam_eps, fused=True)


class HistoryRecorder:
    """What the A2C loop (in main) and the per-stream loop share: the rollout storage (step, env), the histories (the
    first `steps_per_stream` steps of every stream, written per goal as (stream, step)), the success counts between logs."""

    def __init__(self, args: CollectArgs, config: dict, todo: List[Tuple[Tuple[int, int], str]], envs: DarkRoomVectorEnv,
                 writer: SummaryWriter):
        self.args, self.config, self.todo, self.envs, self.writer = args, config, todo, envs, writer
        T, N = args.num_steps, envs.num_envs
        dtypes = {"rewards": np.float32, "terminated": bool, "truncated": bool}  # the rest int64
        self.rollout = {key: np.zeros((T, N), dtype=dtypes.get(key, np.int64)) for key in HISTORY_KEYS}
        self.history = {key: np.zeros((args.steps_per_stream, N), dtype=dtype) for key, dtype in HISTORY_KEYS.items()}
        self.written, self.curve_steps, self.curve_success = 0, [], []
        self.reached, self.episodes, self.successes = np.zeros(N, bool), np.zeros(N, np.int64), np.zeros(N, np.int64)
        self.global_step, self.start_time = 0, time.time()  # env steps per agent
        self.keep()

    def keep(self, more: str = "") -> None:
        """Tell on_interrupt what an interrupted run keeps: the histories written (each one complete), the logs, `more`."""
        global KEPT
        rest = " (rerun the same command to collect the rest)" if self.written < len(self.todo) else ""
        KEPT = (f"{self.written} of {len(self.todo)} histories written to {self.args.histories_dir}/{rest}; "
                f"TensorBoard logs in {self.writer.log_dir}/{more}")

    def step(self, t: int, action: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step every env and store the transition at step `t` of the rollout, and of the histories until they are full.
        Returns the state each action led to (before any reset), the rewards, whether each episode terminated (at the
        goal) and whether it ended."""
        state, timestep = self.envs.state, self.envs.timestep
        _, reward, terminated, truncated, info = self.envs.step(action)
        row = self.global_step // self.args.num_envs + t  # the step of every stream
        for key, value in dict(states=state, timesteps=timestep, actions=action, rewards=reward, terminated=terminated,
                               truncated=truncated & ~terminated, next_states=info["final_obs"]).items():
            self.rollout[key][t] = value
            if row < self.args.steps_per_stream:
                self.history[key][row] = value
        ended = terminated | truncated
        self.reached |= reward > 0
        self.episodes += ended
        self.successes += ended & self.reached
        self.reached &= ~ended
        return info["final_obs"], reward, terminated, ended

    def end_rollout(self, update: int, progress) -> bool:
        """Write the histories once they are full, and log the charts every --log-every updates and after the last one.
        Returns whether the charts were logged (so the caller can add its own)."""
        E, A = self.args.num_envs, len(self.todo)
        self.global_step += E * self.args.num_steps
        if self.history is not None and self.global_step // E >= self.args.steps_per_stream:
            write_tasks_json(self.args.histories_dir, self.config)  # now, not before: a run stopped earlier leaves neither
            G = self.args.agents_per_goal * E  # streams per goal: the envs of its agents, side by side
            for i, (goal, part) in enumerate(self.todo):
                arrays = {key: np.ascontiguousarray(array[:, i * G:(i + 1) * G].T) for key, array in self.history.items()}
                arrays["metadata"] = np.array(json.dumps(history_metadata(self.args, self.config, goal, part)))
                write_atomic(history_path(self.args.histories_dir, goal, part), lambda tmp: np.savez_compressed(tmp, **arrays))
                self.written += 1
                self.keep()
            self.history = None
            progress.write(f"{self.written} histories written to {self.args.histories_dir}/ at {self.global_step} env steps per agent")
        if update % self.args.log_every != 0 and update != self.args.num_updates:
            return False
        # the success rate per goal since the last log (over its agents), on TensorBoard and the progress bar
        episodes = self.episodes.reshape(A, -1).sum(1)
        success = self.successes.reshape(A, -1).sum(1) / np.maximum(episodes, 1)
        self.episodes[:], self.successes[:] = 0, 0
        self.curve_steps.append(self.global_step)
        self.curve_success.append(success)
        sps = int(self.global_step * A * self.args.agents_per_goal / (time.time() - self.start_time))
        for tag, value in dict(success_rate_mean=success.mean(), success_rate_min=success.min(), success_rate_max=success.max(),
                               episodes=episodes.mean(), SPS=sps).items():
            self.writer.add_scalar(f"charts/{tag}", value, self.global_step)
        progress.set_postfix(step=self.global_step, sps=sps, success=f"{success.mean():.2f}")
        return True


# ---------------------------------------------------------------------------------------------- tasks, histories, outputs


def make_split(size: int, num_train_tasks: int, split_seed: int) -> Dict[str, List[Tuple[int, int]]]:
    """All goals (every cell but the start, the centre), split at random by `split_seed`; each part sorted."""
    goals = [(row, col) for row in range(size) for col in range(size) if (row, col) != (size // 2, size // 2)]
    order = np.random.default_rng(split_seed).permutation(len(goals))
    return {"train": sorted(goals[i] for i in order[:num_train_tasks]), "test": sorted(goals[i] for i in order[num_train_tasks:])}


def select_tasks(names: Tuple[str, ...], split: Dict[str, List[Tuple[int, int]]], size: int) -> List[Tuple[Tuple[int, int], str]]:
    """(goal, "train"|"test") of every task named by --tasks, in grid order, without duplicates; one line on a bad name."""
    which = {goal: part for part in ("train", "test") for goal in split[part]}  # every cell but the start (the centre)
    named, chosen = {"train": split["train"], "test": split["test"], "all": list(which)}, set()
    for name in names:
        try:
            goals = named[name] if name in named else [tuple(int(x) for x in name.split(","))]
        except ValueError:
            goals = [None]
        if not set(goals) <= which.keys():
            raise SystemExit(f"error: unknown task {name!r}: use train, test, all, or a goal row,col in the {size}x{size} "
                             f"grid other than the start {size // 2},{size // 2}")
        chosen.update(goals)
    if not chosen:
        raise SystemExit("error: --tasks names no task")
    return [(goal, which[goal]) for goal in sorted(chosen)]


def agent_seeds(seed: int, goal: Tuple[int, int], size: int, index: int = 0) -> Tuple[int, np.random.Generator, np.random.Generator]:
    """The torch seed (weights) and numpy generators (actions; random starts of its envs) of agent `index` of `goal`:
    they depend on --seed, the goal and the index only, so a history does not change with the other tasks collected
    beside it (and agent 0's seeds are the ones of a run with one agent per goal)."""
    torch_seq, numpy_seq, start_seq = np.random.SeedSequence([seed, goal[0] * size + goal[1], *([index] if index else [])]).spawn(3)
    return (int(torch_seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)), np.random.default_rng(numpy_seq),
            np.random.default_rng(start_seq))


def history_path(histories_dir: str, goal: Tuple[int, int], split: str) -> str:
    return os.path.join(histories_dir, split, f"goal_{goal[0]}_{goal[1]}.npz")


def make_envs(args: CollectArgs, todo: List[Tuple[Tuple[int, int], str]]):
    """The envs of every task to collect, goal i's agents i * agents_per_goal ..., agent a's envs a * num_envs ...,
    and each agent's seeds (`agent_seeds`)."""
    goals = [goal for goal, _ in todo]
    seeds, rngs, start_rngs = zip(*[agent_seeds(args.seed, g, args.size, k) for g in goals for k in range(args.agents_per_goal)])
    envs = DarkRoomVectorEnv(np.repeat(np.array(goals), args.agents_per_goal * args.num_envs, axis=0), args.size,
                             args.terminate_on_goal, args.max_episode_steps, start_rngs if args.random_start else None)
    return envs, list(seeds), list(rngs)


def directory_config(args: CollectArgs, split: Dict[str, List[Tuple[int, int]]], algo_keys: List[str]) -> dict:
    """The contents of `tasks.json`: the split and the config that every history of the directory shares."""
    # random_start is written only when on, so the directories of the fixed start keep their tasks.json
    env = {"size": args.size, "terminate_on_goal": args.terminate_on_goal, "max_episode_steps": args.max_episode_steps,
           **({"random_start": True} if args.random_start else {})}
    return {"format_version": FORMAT_VERSION, "split_seed": args.split_seed, "train": [list(goal) for goal in split["train"]],
            "test": [list(goal) for goal in split["test"]], "env": env, "num_train_tasks": args.num_train_tasks,
            "source": args.source, "seed": args.seed, "algo": {key: getattr(args, key) for key in algo_keys}}


def history_metadata(args: CollectArgs, config: dict, goal: Tuple[int, int], part: str) -> dict:
    """The metadata stored in the history of `goal`: the directory's config, the goal, the shape, the versions."""
    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "gymnasium": gym.__version__, "toymeta": importlib.metadata.version("toymeta")}
    return {"format_version": FORMAT_VERSION, "goal": list(goal), "split": part,
            **{key: config[key] for key in ("source", "env", "algo", "seed", "split_seed")},
            "num_streams": args.agents_per_goal * args.num_envs, "steps_per_stream": args.steps_per_stream,
            "total_timesteps": args.total_timesteps, "versions": versions}


def write_tasks_json(histories_dir: str, config: dict) -> None:
    """`tasks.json`: the directory's config, one key a line."""
    text = "{\n" + ",\n".join(f' "{key}": {json.dumps(value)}' for key, value in config.items()) + "\n}\n"
    write_atomic(os.path.join(histories_dir, "tasks.json"), lambda tmp: Path(tmp).write_text(text))


def check_history(path: str, expected_meta: dict, fix: str = "delete it or rerun with --overwrite") -> None:
    """Exit with one line unless `path` is a complete history made with this config; `fix` says what to do."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["metadata"].item())
            arrays = {key: data[key] for key in HISTORY_KEYS}  # reads (and CRC-checks) everything
    except Exception as e:  # not a zip, a missing array, a corrupt stream (zlib.error, bad CRC), bad JSON ...
        raise SystemExit(f"error: {path} is corrupt or incomplete ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); {fix}")
    if not isinstance(meta, dict):
        raise SystemExit(f"error: {path} is corrupt: its metadata is not a JSON object; {fix}")
    for key, value in expected_meta.items():  # the config first: a history of another config has other shapes, and is not corrupt
        if key not in ("versions", "total_timesteps") and meta.get(key) != value:
            raise SystemExit(f"error: {path} was made with another config ({key}: {meta.get(key)} != {value}); {fix}, "
                             f"or use another --histories-dir")
    shape = (expected_meta["num_streams"], expected_meta["steps_per_stream"])
    for key, dtype in HISTORY_KEYS.items():
        if arrays[key].dtype != dtype or arrays[key].shape != shape:
            raise SystemExit(f"error: {path} is corrupt: {key} is {arrays[key].dtype}{arrays[key].shape}, "
                             f"expected {np.dtype(dtype)}{shape}; {fix}")


def prepare_collection(args: CollectArgs, algo_keys: List[str], learner_bytes: int, run_name: str):
    """The config of --histories-dir and the tasks still to collect, all checked before any work: `tasks.json` says this
    config once a history is there (so a failed run blocks no other); lost, it is rebuilt once every history there is
    found of this config. Then the memory (`learner_bytes` per goal) and the outputs. Exits 0 if nothing is left to do."""
    split = make_split(args.size, args.num_train_tasks, args.split_seed)
    tasks, config = select_tasks(args.tasks, split, args.size), directory_config(args, split, algo_keys)
    tasks_json = os.path.join(args.histories_dir, "tasks.json")
    histories = sorted(history for part in ("train", "test")
                       for history in glob.glob(os.path.join(glob.escape(args.histories_dir), part, "goal_*.npz")))
    if lost := not os.path.exists(tasks_json):  # every history there must be of this config: it is rebuilt from them
        fix = f"use the flags it was collected with (they were in the lost {tasks_json}), or delete it"
        for history in histories:
            part, match = os.path.basename(os.path.dirname(history)), re.fullmatch(r"goal_(\d+)_(\d+)\.npz", os.path.basename(history))
            if not match or [int(match[1]), int(match[2])] not in config[part]:
                raise SystemExit(f"error: {history} is not a history of a {part} goal of this split; {fix}, or use another --histories-dir")
            check_history(history, history_metadata(args, config, (int(match[1]), int(match[2])), part), fix)
    else:
        fix = "delete it and rerun the same command (it is rebuilt from the histories), or use another --histories-dir"
        try:
            existing = json.loads(Path(tasks_json).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {tasks_json} is unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); {fix}")
        if not isinstance(existing, dict) or not set(config) <= set(existing):
            raise SystemExit(f"error: {tasks_json} is not a tasks.json of this script (a JSON object with the keys "
                             f"{', '.join(config)}); {fix}")
        for key, value in config.items() if histories else []:
            if existing[key] != value:
                there, now = ("another split", "this one") if key in ("train", "test") else (existing[key], value)
                raise SystemExit(f"error: {args.histories_dir}/ was made with another config ({key}: {there} there, {now} now); "
                                 f"use the same flags as before or another --histories-dir")
    # a history there means its task is done (unless --overwrite): it must be complete and of this config
    done = [task for task in tasks if not args.overwrite and os.path.exists(history_path(args.histories_dir, *task))]
    for task in done:
        check_history(history_path(args.histories_dir, *task), history_metadata(args, config, *task))
    todo = [task for task in tasks if task not in done]
    if not todo:
        if lost:
            check_writable(args.histories_dir, "give a writable --histories-dir")
            write_tasks_json(args.histories_dir, config)
        print(f"all {len(tasks)} histories are already in {args.histories_dir}/; nothing to do"
              f"{f' but rebuild the lost {tasks_json}' if lost else ''} (--overwrite redoes them)")
        sys.exit(0)
    check_memory(args, len(todo), learner_bytes)
    for part in ("train", "test"):
        check_writable(os.path.join(args.histories_dir, part), "give a writable --histories-dir")
    check_writable(f"runs/{run_name}", "make runs/ writable, or run from another directory")
    print(f"collecting {len(todo)} of {len(tasks)} histories ({len(tasks) - len(todo)} already done) into {args.histories_dir}/")
    return config, todo


def check_memory(args: CollectArgs, num_goals: int, learner_bytes: int) -> None:
    """Refuse, in one line, a collection that would not fit in the memory available now: the interpreter and libraries,
    the histories (a byte a value), the rollout and its temporaries, and each goal's learners (`learner_bytes`)."""
    per_stream = len(HISTORY_KEYS) * (args.history_len // args.num_envs) + args.num_steps * 128
    needed = 300 * 2**20 + num_goals * (args.agents_per_goal * args.num_envs * per_stream + learner_bytes)
    if needed > (available := available_memory()):
        sizes = "--history-len, --num-envs" + (", --agents-per-goal or --hidden-size" if hasattr(args, "hidden_size") else "")
        raise SystemExit(f"error: collecting {num_goals} task(s) needs about {needed / 2**30:.1f} GiB, {(needed - available) / 2**30:.1f} "
                         f"GiB more than the {available / 2**30:.1f} GiB available: lower {sizes}, or collect fewer --tasks at once")


def available_memory() -> int:
    """Bytes of memory the machine can give without swapping: MemAvailable (Linux), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_writable(directory: str, fix: str) -> None:
    """Make `directory` and write a probe file in it: a one-line error now rather than a traceback after the work."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".writable")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write {directory}/ ({e.strerror or e}): {fix}")


def write_atomic(path, write) -> None:
    """write(temp path), then rename: an interrupted run leaves no partial file. The temp name keeps the extension,
    from which numpy, matplotlib and imageio pick the format."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def report(args: CollectArgs, recorder: HistoryRecorder, run_name: str) -> None:
    """Write the learning curves of this run's agents next to the histories (json; png: one line per goal, their mean,
    the history cut) and print a summary."""
    elapsed, goals = time.time() - recorder.start_time, [goal for goal, _ in recorder.todo]
    steps, success = np.array(recorder.curve_steps), np.stack(recorder.curve_success)  # (points,), (points, A)
    name = args.tasks[0] if len(args.tasks) == 1 and args.tasks[0] in ("train", "test", "all") else "custom"
    path = os.path.join(args.histories_dir, f"learning_curves_{name}")
    curves = {"env_steps_per_agent": steps.tolist(), "goals": [list(g) for g in goals], "success_rate": success.round(4).tolist()}
    write_atomic(path + ".json", lambda tmp: Path(tmp).write_text(json.dumps(curves)))
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    ax.set_prop_cycle(color=matplotlib.colormaps["viridis"](np.linspace(0, 1, len(goals))))
    ax.plot(steps, success, lw=0.7, alpha=0.6)
    ax.plot(steps, success.mean(1), color="black", lw=2, label=f"mean over {len(goals)} agents")
    history_len = args.steps_per_stream * args.num_envs
    ax.axvline(history_len, color="red", ls="--", lw=1, label=f"histories end ({history_len:,} steps)")
    ax.set(xlabel="env steps per agent", ylabel="success rate", ylim=(-0.02, 1.02), title=f"{args.source} on DarkRoom "
           f"{args.size}x{args.size}: {len(goals)} goals x {args.agents_per_goal} agent(s) ({name} tasks)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomic(path + ".png", lambda tmp: fig.savefig(tmp, dpi=100))
    mean, num_agents, global_step = success.mean(1), len(goals) * args.agents_per_goal, recorder.global_step
    above = np.flatnonzero(mean >= 0.9)
    print(f"{num_agents} agents x {global_step} env steps in {elapsed:.1f} s ({int(global_step * num_agents / elapsed)} "
          f"env steps/s); final success mean {mean[-1]:.3f} min {success[-1].min():.3f}; mean success >= 0.9 "
          + (f"from {steps[above[0]]} env steps per agent" if len(above) else "never reached"))
    print(f"histories in {args.histories_dir}/, learning curves in {path}.png, TensorBoard in runs/{run_name}/")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    args.steps_per_stream = args.history_len // args.num_envs
    args.num_updates = args.total_timesteps // (args.num_envs * args.num_steps)
    run_name = f"DarkRoom-{args.size}x{args.size}__{args.exp_name}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # the tasks still to collect; the memory of each goal's agents: weights, gradients, Adam's two moments (float32)
    S, K, E, T = args.size * args.size, args.agents_per_goal, args.num_envs, args.num_steps
    params_per_agent = args.hidden_size * (S + NUM_ACTIONS + 1) + NUM_ACTIONS + 1
    config, todo = prepare_collection(args, ALGO_KEYS, K * params_per_agent * 4 * 4, run_name)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))

    # env setup: goal i's agents are i * K ..., agent a's envs a * E ... (a + 1) * E - 1; the rollout runs in numpy
    envs, seeds, rngs = make_envs(args, todo)
    A = len(todo) * K
    recorder = HistoryRecorder(args, config, todo, envs, writer)  # it keeps on_interrupt's line up to date
    agent = BatchedAgent(seeds, S, NUM_ACTIONS, args.hidden_size, args.critic_init_std).to(device)
    optimizer = make_optimizer(args, agent.parameters())
    rollout = recorder.rollout
    table_row = np.repeat(np.arange(A) * S, E)  # row of each env's agent's state 0 in a flattened (A * S) table

    def per_agent(x: torch.Tensor) -> torch.Tensor:  # (T, A * E) -> (A, T * E): each agent's rollout in a2c_darkroom.py's order
        return x.reshape(T, A, E).transpose(0, 1).reshape(A, T * E).to(device)

    envs.reset(seed=args.seed)
    with contextlib.closing(writer):  # closed on Ctrl-C too: the logs so far are kept
        for update in (progress := trange(1, args.num_updates + 1, desc=f"a2c x{A}", unit="update", mininterval=1.0)):
            # the policy and value tables, once per rollout: the parameters do not change during it, so sampling every
            # action from them is exact; the graph is kept for the loss
            logits, values = agent.tables()
            with torch.no_grad():
                cdf = torch.softmax(logits.double(), dim=1).cumsum(1)[:, :-1]  # (A, K - 1, S)
                cdf = cdf.transpose(1, 2).reshape(A * S, -1).cpu().numpy()  # row a * S + s
                value_table = values.reshape(-1).cpu().numpy()
            if not (np.isfinite(cdf).all() and np.isfinite(value_table).all()):  # diverged: no history is written
                raise SystemExit(f"error: the A2C agents diverged at update {update} (non-finite logits or values): "
                                 f"lower --learning-rate {args.learning_rate} (or check --critic-init-std and --adam-eps)")
            uniforms = np.stack([rng.random((T, E)) for rng in rngs], axis=1).reshape(T, A * E)  # from each agent's generator
            for step in range(T):  # inverse-CDF sampling from each env's row of its agent's table
                recorder.step(step, (cdf[table_row + envs.state] <= uniforms[step, :, None]).sum(1))

            # ALGO LOGIC: n-step returns bootstrapped from the critic's table, and the A2C step; each epoch after the
            # first reads the tables of the network it updated, on the same rollout
            obs, actions = (per_agent(torch.from_numpy(rollout[key])) for key in ("states", "actions"))
            for epoch in range(args.update_epochs):
                if epoch > 0:
                    logits, values = agent.tables()
                    value_table = values.detach().reshape(-1).cpu().numpy()
                next_values = torch.from_numpy(value_table[table_row + rollout["next_states"]])
                returns = nstep_returns(*(torch.from_numpy(rollout[key]) for key in ("rewards", "terminated", "truncated")),
                                        next_values, args.gamma)
                losses = a2c_update(agent, optimizer, logits, values, obs, actions, per_agent(returns), args.ent_coef,
                                    args.vf_coef, args.max_grad_norm)
            if recorder.end_rollout(update, progress):
                for tag, value in zip(["policy_loss", "value_loss", "entropy", "grad_norm"], losses):
                    writer.add_scalar(f"losses/{tag}", value.mean().item(), recorder.global_step)

    agents_path = f"runs/{run_name}/agents.pt"
    goals = [goal for goal, _ in todo for _ in range(K)]
    write_atomic(agents_path, lambda tmp: torch.save({"agent": agent.state_dict(), "goals": goals, "args": vars(args)}, tmp))
    recorder.keep(f", the trained agents in {agents_path} (no learning curves)")
    report(args, recorder, run_name)
