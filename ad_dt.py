# Algorithm Distillation (Laskin et al. 2022): a small GPT learns to act in context from learning histories. Docs: README.md#ad_dtpy
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

import atexit
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import trange


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment; the run name is `{exp_name}__{seed}__{unix time}`"""
    seed: int = 1
    """seed of the experiment (initialisation, window sampling, dropout, evaluation actions)"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True` so GPU runs are reproducible (CPU runs are)"""
    cuda: bool = False
    """if toggled, train and evaluate on CUDA when it is available (training in bf16 autocast where supported)"""
    num_threads: int = 2
    """CPU threads for torch (the reference machine has 2 cores); use 1 when another job shares the cores"""

    # Data: the histories written by collect_histories_tabular.py or collect_histories.py, and their pace
    histories_dir: str = "histories"
    """directory written by `collect_histories_tabular.py` (the default: Dyna-Q) or `collect_histories.py` (A2C) (`tasks.json`, `train/goal_R_C.npz`)"""
    history_len: Optional[int] = None
    """keep the first `history_len` transitions of each agent (`history_len // num_streams` per stream); None keeps all"""
    keep_every: int = 1
    """keep every k-th episode of each stream (episodes 0, k, 2k, ...): a source k times faster (reproduce.sh's A2C: 8)"""
    stream_start_frac: float = 0.0
    """fraction of training windows that start at a stream's start, with an empty context as in the in-context evaluation"""

    # Model
    layout: Literal["one", "three"] = "one"
    """tokens per transition: "one" = emb(s_t) + emb(a_{t-1}) + emb(r_{t-1}); "three" = the original design's a, r, s stream"""
    state_embedding: Literal["cell", "rowcol"] = "rowcol"
    """"cell" = one learnt vector per cell; "rowcol" = emb(row) + emb(column), which tells the model which cells are neighbours"""
    prev_next_state: bool = True
    """every transition also shows where the previous action led (s'_{t-1}): in terminate mode the goal cell is never a
    state, only where the rewarded action led, so this puts the goal itself in the context"""
    prev_state: bool = True
    """every transition also shows the state the previous action was taken in (s_{t-1}): "was action a tried in this
    cell?", the question a tabular learner such as Dyna-Q answers at every step, is then one attention lookup"""
    seq_len: int = 256
    """context length in transitions (tokens = seq_len x tokens per transition)"""
    embedding_dim: int = 64
    """width of the transformer"""
    num_layers: int = 4
    """number of transformer blocks"""
    num_heads: int = 4
    """number of attention heads"""
    feed_forward_dim: int = 256
    """hidden width of each block's MLP (the original design used 2048)"""
    attention_dropout: float = 0.0
    """dropout on attention weights (the original design used 0.5; any value > 0 makes SDPA leave its fused CPU kernel, which is slower)"""
    residual_dropout: float = 0.0
    """dropout on the attention and MLP outputs (the original design used 0.1; 0 is faster and did not memorise goals)"""
    embedding_dropout: float = 0.0
    """dropout on the token embeddings"""

    # Training
    batch_size: int = 32
    """windows per update, over all processes (under torchrun each rank takes batch_size / world_size of them)"""
    num_updates: int = 3600
    """number of gradient updates"""
    learning_rate: float = 1e-3
    """peak learning rate (Adam)"""
    min_lr: float = 2e-6
    """learning rate at the end of the cosine decay"""
    warmup_steps: int = 100
    """updates of linear warmup before the cosine decay"""
    betas: Tuple[float, float] = (0.9, 0.99)
    """Adam betas"""
    clip_grad: float = 1.0
    """max global norm of the gradients"""

    # In-context evaluation on the held-out tasks
    eval_every: int = 1800
    """evaluate every this many updates (and after the last one)"""
    eval_episodes: int = 30
    """whole episodes per env, from an empty context"""
    eval_seeds: int = 4
    """envs per held-out goal (all goals x seeds run as one batch)"""
    eval_greedy: bool = False
    """if toggled, act greedily instead of sampling from the policy (greedy decoding cannot explore)"""
    eval_temperature: float = 0.7
    """sampling temperature of the evaluation's actions (eval_ad.py's default is the checkpoint's). Dyna-Q and the
    explorer act by a rule, so the imitation's leftover spread is error and below 1 trims it; 1 for a source that
    samples its actions, as A2C does (experiments/README.md, "Sampling temperature")"""
    eval_context: Optional[int] = None
    """the most transitions the evaluation's context holds (a full one drops to its recent half and the run's start); None: the whole run"""
    eval_keep_first: Optional[int] = None
    """the run's first transitions a full context keeps besides its recent half (every training window starts at a run's start); None: a quarter of it"""
    eval_train_goals: bool = True
    """also evaluate on the training goals (one env each; `eval_train/` tags): held-out far below training = memorised goals"""
    diagnostic_windows: int = 64
    """windows of training and of held-out (histories/test, if collected) histories for the teacher-forced `diagnostics/` losses"""

    # Checkpoints
    checkpoint_every: int = 500
    """save `runs/{run_name}/ad_dt_{update:06d}.pt` every this many updates (and after the last one)"""
    resume: Optional[str] = None
    """continue the run saved in this checkpoint; its arguments are reused unless given again on the command line"""


FORMAT_VERSION = 1  # of tasks.json and the history files (README.md, "History format")
MOVES = ((0, 0), (-1, 0), (0, 1), (1, 0), (0, -1))  # the actions: noop, up, right, down, left (row, col steps)
NUM_ACTIONS = len(MOVES)
NO_ACTION = NUM_ACTIONS  # "no previous transition": start of a stream, or an empty context
NO_REWARD = 2  # rewards are 0/1; index 2 = no previous transition
NO_STATE = 256  # no previous transition, in prev_next_states and prev_states (uint16: above every cell of a 16x16 room); the model maps it to its own embedding row
# the arrays of a history file, each [streams, steps]: dtype and the bound its values stay below ("cells": size**2 of
# tasks.json's env, "steps": its max_episode_steps)
HISTORY_FORMAT = {"states": (np.uint8, "cells"), "actions": (np.uint8, NUM_ACTIONS), "rewards": (np.uint8, 2),
                  "next_states": (np.uint8, "cells"), "terminated": (np.bool_, 2), "truncated": (np.bool_, 2),
                  "timesteps": (np.uint8, "steps")}
HISTORY_KEYS = tuple(HISTORY_FORMAT)
INPUT_KEYS = ("states", "prev_actions", "prev_rewards", "timesteps", "prev_next_states", "prev_states")  # ADTransformer.forward's, passed by name
# the prev_* columns of the training table: (the column they shift by one row, their value at a stream's first row, dtype)
PREVIOUS = {"prev_actions": ("actions", NO_ACTION, np.uint8), "prev_rewards": ("rewards", NO_REWARD, np.uint8),
            "prev_next_states": ("next_states", NO_STATE, np.uint16), "prev_states": ("states", NO_STATE, np.uint16)}


def check(ok, problem):
    """Unless `ok`, exit with one line: `error: {problem}` (what is wrong, where, and the fix)."""
    if not ok:
        raise SystemExit(f"error: {problem}")


def check_args(args, world_size=1):
    """Reject every bad flag with a one-line message naming it, before any work."""
    def need(ok, flag, rule):
        check(ok, f"--{flag} must be {rule}, got {getattr(args, flag.replace('-', '_'))}")

    need(1 <= args.num_threads <= 1024, "num-threads", "in 1..1024 (more threads than cores only slow torch down)")
    for name in ("keep_every", "embedding_dim", "num_layers", "num_heads", "feed_forward_dim", "batch_size",
                 "num_updates", "eval_every", "eval_episodes", "eval_seeds", "checkpoint_every"):
        need(getattr(args, name) >= 1, name.replace("_", "-"), "at least 1")
    need(0 <= args.seed < 2**32, "seed", "in 0..2**32-1 (numpy's seeds)")
    need(0 < len(args.exp_name.encode()) <= 200 and "/" not in args.exp_name, "exp-name", "a non-empty file name without '/'")
    need(args.seq_len >= 2, "seq-len", "at least 2 (a window holds the transitions before the action predicted)")
    need(args.history_len is None or args.history_len >= 1, "history-len", "at least 1, or None to keep whole histories")
    need(args.eval_context is None or args.eval_context >= 2, "eval-context", "at least 2, or None for the whole run")
    need(args.eval_keep_first is None or args.eval_keep_first >= 0 and (args.eval_context is None or args.eval_keep_first
         < args.eval_context - args.eval_context // 2), "eval-keep-first", "at least 0 and less than the half of --eval-context that a cut drops")
    need(args.warmup_steps >= 0, "warmup-steps", "at least 0")
    need(args.diagnostic_windows >= 0, "diagnostic-windows", "at least 0")
    need(0 <= args.stream_start_frac <= 1, "stream-start-frac", "in [0, 1]")
    for name in ("attention_dropout", "residual_dropout", "embedding_dropout"):
        need(0 <= getattr(args, name) < 1, name.replace("_", "-"), "in [0, 1)")
    need(0 < args.learning_rate <= 1, "learning-rate", "in (0, 1] (larger steps blow the weights up)")
    need(0 <= args.min_lr <= args.learning_rate, "min-lr", "in [0, --learning-rate]")
    need(all(0 <= b < 1 for b in args.betas), "betas", "two numbers in [0, 1)")
    need(args.clip_grad > 0, "clip-grad", "positive")
    need(math.isfinite(args.eval_temperature) and args.eval_temperature > 0, "eval-temperature", "positive (--eval-greedy for argmax)")
    need(args.embedding_dim % args.num_heads == 0, "embedding-dim", f"divisible by --num-heads {args.num_heads}")
    need(args.batch_size % world_size == 0, "batch-size", f"divisible by the {world_size} torchrun processes")
    need(not args.cuda or torch.cuda.is_available(), "cuda", "left out on a machine without a CUDA GPU (torch sees none)")


# the env the histories were collected in, a copy of the collectors' (so that this script runs alone)
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


def make_envs(goals, env, seed=0):
    """The batched rooms of `env` (tasks.json's: size, terminate_on_goal, max_episode_steps, and random_start where the
    histories have random starts, drawn here from `seed`); env i has goal goals[i]."""
    start_rngs = [np.random.default_rng(seed)] if env.get("random_start", False) else None
    return DarkRoomVectorEnv(goals, env["size"], env["terminate_on_goal"], env["max_episode_steps"], start_rngs)


# the data: the histories flattened into one table of transitions, and windows sampled from it
def make_dataset(histories, history_len=None, keep_every=1):
    """Cut each agent's history, keep every k-th episode, and flatten all streams into one table.

    Returns flat uint8 arrays (states, actions, prev_actions, prev_rewards, timesteps; prev_next_states and
    prev_states uint16) and `offsets` (stream i is rows offsets[i]:offsets[i+1]). The prev_* columns (PREVIOUS) hold
    the previous transition *of the same (paced) stream*, across episode boundaries, and NO_ACTION/NO_REWARD/NO_STATE
    at its first row.
    """
    columns = {key: [] for key in ("actions", *INPUT_KEYS)}
    lengths = []
    for h in histories:
        num_streams, steps = h["states"].shape
        if history_len is not None:
            steps = min(steps, history_len // num_streams)
            check(steps >= 1, f"--history-len {history_len} keeps no step of a history's {num_streams} streams: give at least {num_streams}")
        for s in range(num_streams):
            done = h["terminated"][s, :steps] | h["truncated"][s, :steps]
            episode = np.concatenate([[0], np.cumsum(done[:-1])])  # episode index of every transition
            keep = episode % keep_every == 0
            kept = {key: h[key][s, :steps][keep] for key in ("states", "actions", "rewards", "next_states", "timesteps")}
            for key in ("states", "actions", "timesteps"):
                columns[key].append(kept[key])
            for key, (source, first, dtype) in PREVIOUS.items():
                columns[key].append(np.concatenate([[first], kept[source]])[:-1].astype(dtype))
            lengths.append(int(keep.sum()))
    data = {key: np.concatenate(parts) for key, parts in columns.items()}
    data["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return data


def sample_windows(data, batch_size, seq_len, rng, stream_start_frac=0.0):
    """Sample windows of seq_len consecutive transitions, uniformly over all windows inside one stream; with
    stream_start_frac > 0, about that fraction of them instead start at the first transition of a stream (uniform
    over the streams that hold a window), where the context starts empty as in the in-context evaluation.

    Returns a dict of LongTensors [batch, seq_len] (actions and the INPUT_KEYS) and the windows' first rows
    in the flat table.
    """
    lengths = np.diff(data["offsets"])
    num_windows = np.maximum(lengths - seq_len + 1, 0)  # per stream
    cum = np.cumsum(num_windows)
    u = rng.integers(0, cum[-1], size=batch_size)
    stream = np.searchsorted(cum, u, side="right")
    starts = data["offsets"][stream] + u - (cum[stream] - num_windows[stream])
    if stream_start_frac > 0:  # (no extra draws otherwise: the default stream of windows stays as it was)
        at_start = rng.random(batch_size) < stream_start_frac
        starts[at_start] = data["offsets"][rng.choice(np.flatnonzero(num_windows > 0), at_start.sum())]
    rows = starts[:, None] + np.arange(seq_len)  # [batch, seq_len]
    return {key: torch.from_numpy(data[key][rows].astype(np.int64)) for key in ("actions", *INPUT_KEYS)}, starts


def lr_factor(update, args):
    """Multiplier of args.learning_rate at this update (for LambdaLR): linear warmup, then cosine decay to min_lr."""
    if update < args.warmup_steps:
        return (update + 1) / args.warmup_steps
    if update >= args.num_updates:  # past the end of the schedule, stay at min_lr
        return args.min_lr / args.learning_rate
    ratio = (update - args.warmup_steps) / max(1, args.num_updates - args.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return (args.min_lr + coeff * (args.learning_rate - args.min_lr)) / args.learning_rate


# the model: a small GPT over transitions, with a KV cache for acting in context
@dataclass
class GPTConfig:
    num_states: int = 81
    """size x size cells of the room"""
    max_episode_steps: int = 20
    """time limit of an episode: the timestep (position) embedding has one row per step"""
    seq_len: int = 128
    """context in transitions"""
    layout: str = "one"
    """tokens per transition, "one" or "three"; this field and the ones below are the Args flags of the same names"""
    state_embedding: str = "cell"
    prev_next_state: bool = False
    prev_state: bool = False
    embedding_dim: int = 64
    num_layers: int = 4
    num_heads: int = 4
    feed_forward_dim: int = 256
    attention_dropout: float = 0.0
    residual_dropout: float = 0.1
    embedding_dropout: float = 0.0

    @property
    def tokens_per_transition(self):
        return 3 if self.layout == "three" else 1


def model_config(args, env):
    """The GPTConfig of these Args (the flags of the same names) for this env."""
    return GPTConfig(num_states=env["size"] ** 2, max_episode_steps=env["max_episode_steps"],
                     **{f.name: getattr(args, f.name) for f in fields(GPTConfig) if hasattr(args, f.name)})


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.embedding_dim % config.num_heads == 0
        self.num_heads = config.num_heads
        self.c_attn = nn.Linear(config.embedding_dim, 3 * config.embedding_dim)  # q, k, v in one projection
        self.c_proj = nn.Linear(config.embedding_dim, config.embedding_dim)
        self.attention_dropout = config.attention_dropout
        self.resid_dropout = nn.Dropout(config.residual_dropout)
        self.kv_cache = None  # (keys, values) [B, nh, max_len, hs], preallocated by ADTransformer.setup_caches

    def forward(self, x, mask=None, input_pos=None):
        B, T, C = x.size()  # batch, new tokens, embedding_dim
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))  # (B, nh, T, hs)
        if self.kv_cache is not None:
            # the new tokens attend to the cached ones too; the mask (rows = the new tokens' positions,
            # columns = the cache up to the last of them) is explicit because is_causal would align
            # T queries with the first T keys, not the last
            k_cache, v_cache = self.kv_cache
            k_cache[:, :, input_pos], v_cache[:, :, input_pos] = k, v  # written in place at the new tokens' positions
            k, v = k_cache[:, :, : mask.size(-1)], v_cache[:, :, : mask.size(-1)]  # (B, nh, kv_len, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            dropout_p = self.attention_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.embedding_dim, config.feed_forward_dim)
        self.c_proj = nn.Linear(config.feed_forward_dim, config.embedding_dim)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embedding_dim)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.embedding_dim)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, input_pos=None):
        x = x + self.attn(self.ln_1(x), mask, input_pos)
        return x + self.mlp(self.ln_2(x))


class ADTransformer(nn.Module):
    """Predicts a_t from the transitions so far. Every transition t brings (s_t, a_{t-1}, r_{t-1}, timestep_t):
    the previous action and reward cross episode boundaries (with terminate_on_goal the only reward 1 is an
    episode's last), and nothing shows the reward of the action being predicted."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.room_size = size = math.isqrt(config.num_states)  # rows = columns
        if config.state_embedding == "rowcol":
            state_emb = nn.ModuleDict(dict(row=nn.Embedding(size, d), col=nn.Embedding(size, d)))
        else:
            state_emb = nn.Embedding(config.num_states, d)
        self.transformer = nn.ModuleDict(
            dict(
                state_emb=state_emb,
                next_state_emb=nn.Embedding(config.num_states + 1, d) if config.prev_next_state else nn.Identity(),  # + NO_STATE
                prev_state_emb=nn.Embedding(config.num_states + 1, d) if config.prev_state else nn.Identity(),  # + NO_STATE
                action_emb=nn.Embedding(NUM_ACTIONS + 1, d),  # + NO_ACTION
                reward_emb=nn.Embedding(3, d),  # 0, 1, NO_REWARD
                timestep_emb=nn.Embedding(config.max_episode_steps, d),  # position = the env's step in the episode
                drop=nn.Dropout(config.embedding_dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.num_layers)]),
                ln_f=nn.LayerNorm(d),
            )
        )
        self.action_head = nn.Linear(d, NUM_ACTIONS)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def setup_caches(self, batch_size, max_transitions=None):
        """Give every layer a KV cache for `batch_size` sequences of up to `max_transitions` (default seq_len) transitions
        (not in the state_dict). Longer than seq_len works: no weight depends on it, a token's position is its episode step."""
        c, p = self.config, self.action_head.weight
        max_len = (max_transitions or c.seq_len) * c.tokens_per_transition
        shape = (batch_size, c.num_heads, max_len, c.embedding_dim // c.num_heads)
        for block in self.transformer.h:
            block.attn.kv_cache = tuple(torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in "kv")
        self.register_buffer("causal_mask", torch.ones(max_len, max_len, dtype=torch.bool, device=p.device).tril(), persistent=False)

    def clear_caches(self):
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(self, states, prev_actions, prev_rewards, timesteps, prev_next_states=None, prev_states=None,
                input_pos=None):
        """Inputs (INPUT_KEYS): LongTensors [B, T] of T consecutive transitions (prev_next_states and prev_states are
        read only with config.prev_next_state and config.prev_state). Returns action logits [B, T, NUM_ACTIONS].
        input_pos: None for a plain causal pass, or (with caches set up) the token positions
        [T * tokens_per_transition] of these transitions in the cached context."""
        tr = self.transformer
        if self.config.state_embedding == "rowcol":
            s = tr.state_emb["row"](states // self.room_size) + tr.state_emb["col"](states % self.room_size)
        else:
            s = tr.state_emb(states)
        a, r = tr.action_emb(prev_actions), tr.reward_emb(prev_rewards)  # [B, T, d] each
        if self.config.prev_next_state:  # where the rewarded (or any) previous action led; NO_STATE -> the last row
            r = r + tr.next_state_emb(prev_next_states.clamp(max=self.config.num_states))
        if self.config.prev_state:  # the tried pair (s_{t-1}, a_{t-1}) in one token
            a = a + tr.prev_state_emb(prev_states.clamp(max=self.config.num_states))
        t = tr.timestep_emb(timesteps)  # [B, T, d]: position = the env's step within the episode
        if self.config.layout == "three":
            x = (torch.stack([a, r, s], dim=2) + t[:, :, None]).flatten(1, 2)  # [B, 3T, d]: ..., a_{t-1}, r_{t-1}, s_t, ...
        else:
            x = s + a + r + t  # [B, T, d]
        x = tr.drop(x)
        mask = None
        if input_pos is not None:
            mask = self.causal_mask[None, None, input_pos, : int(input_pos[-1]) + 1]  # [1, 1, T_new, kv_len]
        for block in tr.h:
            x = block(x, mask, input_pos)
        x = tr.ln_f(x)
        k = self.config.tokens_per_transition
        return self.action_head(x[:, k - 1 :: k])  # from each transition's last token (the state's)


# in-context evaluation: many goals at once, from an empty context, with the KV cache
@torch.no_grad()
def evaluate_in_context(model, goals, env, num_seeds, num_episodes, greedy=False, seed=0, use_cache=True, temperature=1.0,
                        context=None, keep=None, keep_first=None):
    """Run len(goals) x num_seeds envs in lockstep for num_episodes whole episodes each, from an empty context.

    Per step only the new transition's tokens go through the model (use_cache=False recomputes the whole
    window instead: same logits, for benchmarks and tests). The context holds up to `context` transitions, by default
    the whole run (num_episodes x the time limit): like its source's Q-table, AD's memory then never forgets. A
    context that fills up keeps the run's first `keep_first` transitions (default context // 4: every training window
    starts at a run's start) and its most recent `keep` (default context // 2; the new one included), re-prefilled, so
    every action's logits are those of a plain forward pass over exactly the transitions in the context.
    env: tasks.json's env (see make_envs). Env i has goal goals[i // num_seeds]. Actions are sampled
    from softmax(logits / temperature), or the argmax with greedy.
    Returns numpy arrays: returns, successes, lengths [envs, num_episodes]; the trajectory states, actions,
    rewards, next_states (where each action led, before any reset), timesteps [envs, steps] and logits
    [envs, steps, NUM_ACTIONS]; goals [envs, 2].
    """
    device = model.action_head.weight.device
    L = num_episodes * env["max_episode_steps"] if context is None else context  # the whole run cannot fill it
    keep = L // 2 if keep is None else keep
    keep_first = L // 4 if keep_first is None or context is None else keep_first  # (the whole run is never cut)
    if not (keep >= 1 and keep_first >= 0 and keep_first + keep < L):
        raise ValueError(f"keep must be at least 1 and keep_first + keep at most {L - 1} (context - 1), got {keep_first} + {keep}")
    was_training = model.training
    model.eval()
    k = model.config.tokens_per_transition
    goals = np.repeat(np.asarray(goals, dtype=np.int64).reshape(-1, 2), num_seeds, axis=0)
    N = len(goals)
    envs = make_envs(goals, env, seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    returns, lengths = np.zeros((N, num_episodes), np.float32), np.zeros((N, num_episodes), np.int64)
    episode = np.zeros(N, dtype=np.int64)  # episodes finished by each env
    trajectory = {key: [] for key in ("states", "actions", "rewards", "next_states", "timesteps", "logits")}
    context = torch.zeros(len(INPUT_KEYS), N, L, dtype=torch.long, device=device)  # the INPUT_KEYS of each transition
    n = 0  # transitions in the context
    state, info = envs.reset()
    prev_action, prev_reward, prev_next_state, prev_state = (
        np.full(N, NO_ACTION), np.full(N, NO_REWARD), np.full(N, NO_STATE), np.full(N, NO_STATE))
    if use_cache:
        model.setup_caches(N, L)
    try:
        while episode.min() < num_episodes:
            new = n  # first context slot that the model has not seen
            if n == L:  # full: keep the first `keep_first` (their cache stays valid) and the most recent `keep`, the new
                # transition included, and re-prefill the recent ones
                context[:, :, keep_first : keep_first + keep - 1] = context[:, :, n - (keep - 1) : n].clone()
                n, new = keep_first + keep - 1, keep_first
            transition = np.stack([state, prev_action, prev_reward, info["timestep"], prev_next_state, prev_state])  # INPUT_KEYS [6, N]
            context[:, :, n] = torch.as_tensor(transition, device=device)
            n += 1
            window = slice(new if use_cache else 0, n)  # with the cache, only the transitions it has not seen
            input_pos = torch.arange(new * k, n * k, device=device) if use_cache else None
            logits = model(**dict(zip(INPUT_KEYS, context[:, :, window])), input_pos=input_pos)[:, -1]  # [N, NUM_ACTIONS]
            if greedy:
                action = logits.argmax(-1).cpu().numpy()
            else:
                action = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(-1).cpu().numpy()
            seen = dict(states=state, timesteps=info["timestep"], actions=action, logits=logits.cpu().numpy())
            prev_state = state
            state, reward, terminated, truncated, info = envs.step(action)
            for key, value in dict(seen, rewards=reward, next_states=info["final_obs"]).items():
                trajectory[key].append(value)
            active = np.flatnonzero(episode < num_episodes)
            returns[active, episode[active]] += reward[active]
            lengths[active, episode[active]] += 1
            episode += terminated | truncated
            prev_action, prev_reward, prev_next_state = action, reward.astype(np.int64), info["final_obs"]  # carried across the episode boundary
    finally:
        if use_cache:
            model.clear_caches()
        model.train(was_training)
    result = {key: np.stack(value, axis=1) for key, value in trajectory.items()}
    result.update(returns=returns, successes=returns > 0, lengths=lengths, goals=goals)
    return result


def summarize_evaluation(result):
    """Scalars of one evaluation, averaged over envs (the TensorBoard `eval/` tags).

    Besides returns and success, three signs of learning vs copying: `success_after_success` (success rate
    in the episode right after a successful one: does the model go back to a goal it found?),
    `first_success_episode` (1-based, mean over the envs that ever succeed) and `never_succeeded` (fraction of envs).
    """
    returns, successes = result["returns"], result["successes"]  # [envs, episodes]
    after = successes[:, 1:][successes[:, :-1]]
    ever = successes.any(1)
    return {
        "first_episode_return": float(returns[:, 0].mean()),
        "last_episode_return": float(returns[:, -1].mean()),
        "last10_return": float(returns[:, -10:].mean()),
        "success_rate": float(successes.mean()),
        "success_after_success": float(after.mean()) if after.size else 0.0,
        "first_success_episode": float(successes[ever].argmax(1).mean() + 1) if ever.any() else float("nan"),
        "never_succeeded": float(1 - ever.mean()),
    }


@torch.no_grad()
def teacher_forced_loss(model, batch):
    """Mean cross-entropy of the actions of fixed windows, in eval mode: compare it on training and held-out
    tasks' histories (a model that learned the algorithm, not the goals, has about the same loss on both)."""
    was_training = model.training
    model.eval()
    logits = model(**{key: batch[key] for key in INPUT_KEYS})
    model.train(was_training)
    return F.cross_entropy(logits.reshape(-1, NUM_ACTIONS), batch["actions"].reshape(-1)).item()


def plot_by_episode(result, title):
    """Mean return and success rate by episode index, with a 95% interval over envs."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    episodes = np.arange(1, result["returns"].shape[1] + 1)
    for key in ("returns", "successes"):
        values = result[key].astype(np.float64)
        mean, ci = values.mean(0), 1.96 * values.std(0) / math.sqrt(len(values))
        ax.plot(episodes, mean, label=key[:-1])
        ax.fill_between(episodes, mean - ci, mean + ci, alpha=0.2)
    ax.set(xlabel="episode in context", ylabel="mean over envs", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


# the plumbing: the histories validated completely as they are read, the memory a run needs, checkpoints and logs
COLLECT_FIRST = "run `python collect_histories_tabular.py` (Dyna-Q) or `python collect_histories.py` (A2C) first"


def read_tasks(root):
    """tasks.json of a histories directory, validated: the format version, the env and the split."""
    path = Path(root) / "tasks.json"
    lost = "rerun the collect_histories_tabular.py or collect_histories.py command that wrote it (it rebuilds tasks.json from the histories' metadata)"
    check(path.is_file(), f"no {path}: {lost if any(Path(root).glob('*/*.npz')) else COLLECT_FIRST}")
    try:
        tasks = json.loads(path.read_text())
        env, cells = tasks["env"], [tuple(goal) for part in ("train", "test") for goal in tasks[part]]
        size, steps = env["size"], env["max_episode_steps"]
        valid = (isinstance(size, int) and 3 <= size <= 16 and isinstance(steps, int) and 1 <= steps <= 256
                 and isinstance(env["terminate_on_goal"], bool) and isinstance(env.get("random_start", False), bool)
                 and len(set(cells)) == len(cells)
                 and all(len(cell) == 2 and all(isinstance(x, int) and 0 <= x < size for x in cell) for cell in cells))
    except Exception as e:  # not JSON, not an object, a key missing, a value of the wrong type
        raise SystemExit(f"error: {path} is not a valid tasks.json ({type(e).__name__}: {e}): collect again, or restore it")
    check(valid, f"{path} has an env or goals out of range, or a goal twice: collect again, or restore it")
    check(tasks.get("format_version") == FORMAT_VERSION, f"{path} has format_version {tasks.get('format_version')}, expected {FORMAT_VERSION}")
    return tasks


def read_history(path, env):
    """One history file, validated completely against HISTORY_FORMAT: (metadata, arrays). Anything wrong exits with
    one line naming the file."""
    try:
        with np.load(path, allow_pickle=False) as h:
            meta = json.loads(h["metadata"].item())
            arrays = {key: h[key] for key in HISTORY_KEYS}  # reads, decompresses and CRC-checks every array
    except Exception as e:  # not a zip, a missing key, a corrupt stream (zlib.error), bad JSON ...
        raise SystemExit(f"error: cannot read {path} as a history file ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    check(isinstance(meta, dict), f"{path} has metadata that is not a JSON object")
    check(meta.get("format_version") == FORMAT_VERSION, f"{path} has format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    check(meta.get("env") == env, f"{path} was collected with env {meta.get('env')}, but tasks.json says {env}")
    goal, shape = meta.get("goal"), arrays["states"].shape
    check(isinstance(goal, list) and len(goal) == 2 and all(isinstance(x, int) and 0 <= x < env["size"] for x in goal),
          f"{path} has goal {goal}, not a cell of the {env['size']}x{env['size']} room")
    check(len(shape) == 2 and min(shape) >= 1 and all(a.shape == shape for a in arrays.values()),
          f"{path} needs arrays of one shape (streams >= 1, steps >= 1), got {[a.shape for a in arrays.values()]}")
    bounds = {"cells": env["size"] ** 2, "steps": env["max_episode_steps"]}
    for key, (dtype, bound) in HISTORY_FORMAT.items():
        bound, values = bounds.get(bound, bound), arrays[key]
        check(values.dtype == dtype, f"{path} has {key} of dtype {values.dtype}, expected {np.dtype(dtype)}")
        check(values.max() < bound, f"{path} has {key} up to {values.max()}, outside 0..{bound - 1}")  # unsigned: never below 0
    check(np.array_equal(arrays["rewards"] == 1, arrays["next_states"] == goal[0] * env["size"] + goal[1]),
          f"{path} has rewards that do not match its goal {goal}")
    return meta, arrays


def load_histories(histories_dir, split="train"):
    """Return (tasks.json contents, list of per-agent arrays, each with its "meta") of one split, validated.

    split "train": the training data. split "test": the held-out tasks' histories, read only to measure the
    teacher-forced loss on them (a diagnostic of copying vs learning) and, in eval_ad.py, the source from
    scratch; an absent `test/` gives an empty list. A held-out goal never passes as training data.
    """
    root = Path(histories_dir)
    check(root.is_dir(), f"--histories-dir {root} is not a directory: {COLLECT_FIRST}")
    tasks = read_tasks(root)
    files = sorted((root / split).glob("*.npz"))
    check(files or split != "train", f"no training histories in {root}/train: {COLLECT_FIRST}")
    source = (tasks.get("source", "a2c"), tasks.get("algo"))
    histories = []
    for path in files:
        meta, arrays = read_history(path, tasks["env"])
        goal = meta["goal"]
        check(path.name == "goal_{}_{}.npz".format(*goal),  # also: two files of one goal cannot both pass
              f"{path} holds goal {goal}, not the goal its name says: restore the file, or collect again")
        check((meta.get("source", "a2c"), meta.get("algo")) == source, f"{path} is a history of {meta.get('source', 'a2c')} "
              f"{meta.get('algo')}, but {root}/tasks.json says {source[0]} {source[1]}: move it to its own --histories-dir")
        check(split == "train" or meta.get("split") == "test" and goal in tasks["test"],
              f"{path} is not a history of a held-out test task in {root}/tasks.json")
        check(split == "test" or meta.get("split") == "train" and goal not in tasks["test"],
              f"{path} is a history of the held-out test task {goal}: test tasks are never training data")
        check(split == "test" or goal in tasks["train"], f"{path} has goal {goal}, which is not a training task in {root}/tasks.json")
        histories.append({"meta": meta, **arrays})
    return tasks, histories


def available_memory() -> int:
    """Bytes of memory the machine can give without swapping: MemAvailable (Linux), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(config, tokens, eval_envs, eval_steps, eval_context=None, flags=(
        "--embedding-dim, --feed-forward-dim or --num-layers", "--batch-size, --seq-len, --diagnostic-windows or the model's size",
        "--eval-seeds, --eval-episodes or --eval-context")):
    """Refuse, in one line, work that would not fit in the memory available now, by rough float32 sizes: the weights
    with their gradients and Adam's moments, the activations of `tokens` training transitions, and an in-context
    evaluation of eval_envs envs for eval_steps steps (eval_context in context; None: all). flags: what sizes each."""
    d, ff, layers, k = config.embedding_dim, config.feed_forward_dim, config.num_layers, config.tokens_per_transition
    eval_context = eval_context or eval_steps
    sizes = [16 * layers * (4 * d * d + 2 * d * ff), 4 * tokens * k * layers * (16 * d + 2 * ff),
             eval_envs * (150 * eval_steps + eval_context * (8 * k * layers * d + 48)) + (k * eval_context) ** 2]
    needed, available = 300 * 2**20 + sum(sizes), available_memory()  # + the interpreter and libraries
    check(needed <= available, f"this needs about {needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available: "
          f"lower {flags[sizes.index(max(sizes))]}")


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


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by ad_dt.py; returns (model rebuilt from it, in eval mode, and the checkpoint dict)."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        model = ADTransformer(GPTConfig(**checkpoint["model_config"])).to(device)
        model.load_state_dict(checkpoint["model"])
    except Exception as e:  # missing, truncated, not a torch file, or not one of ours: all the same to the user
        raise SystemExit(f"error: {path} is not a readable ad_dt.py checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    return model.eval(), checkpoint


def parse_args():
    """Args from the command line; with --resume, the checkpoint's saved arguments are the defaults. Returns (args, checkpoint or None)."""
    args = tyro.cli(Args)
    if not args.resume:
        return args, None
    _, checkpoint = load_checkpoint(args.resume)
    # only what is given again on the command line changes
    return tyro.cli(Args, default=Args(**{**checkpoint["args"], "resume": args.resume})), checkpoint


def check_resume(checkpoint, args, tasks, config):
    """A resumed run must see the same task split, env and model: otherwise held-out goals could become training data."""
    for key in ("train", "test", "env", "source", "algo"):  # another source's histories would continue the run on other data
        check(checkpoint["tasks"].get(key) == tasks.get(key), f"{args.histories_dir}/tasks.json has another {key} ({tasks.get(key)}) "
              f"than {args.resume} ({checkpoint['tasks'].get(key)}): resume with the checkpoint's --histories-dir "
              f"{checkpoint['args']['histories_dir']}, or start a new run")
    check(asdict(config) == asdict(GPTConfig(**checkpoint["model_config"])),  # a field newer than the checkpoint: its default
          f"the model flags differ from those saved in {args.resume}; leave them out to resume")


def check_writable(directory: str, fix: str) -> None:
    """Make `directory` and write a probe file in it: a one-line error now rather than a traceback after the work."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".writable")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write {directory}/ ({e.strerror or e}): {fix}")


def diagnostic_batches(datasets, args, device):
    """Fixed windows of each dataset (training, held-out) for the teacher-forced `diagnostics/` losses; their own
    generator leaves the training stream of windows as it was."""
    rng, batches = np.random.default_rng(args.seed + 1), {}
    for name, data in datasets.items():
        if args.diagnostic_windows > 0 and np.diff(data["offsets"]).max() >= args.seq_len:
            batch, _ = sample_windows(data, args.diagnostic_windows, args.seq_len, rng)
            batches[name] = {key: value.to(device) for key, value in batch.items()}
    return batches


def log_evaluation(writer, model, tasks, args, step, batches):
    """In-context evaluation on the held-out goals (and the training goals) plus the teacher-forced losses, to
    TensorBoard; returns a one-line summary."""
    def evaluate(goals, num_seeds, tag):
        result = evaluate_in_context(model, goals, tasks["env"], num_seeds, args.eval_episodes, args.eval_greedy, args.seed,
                                     temperature=args.eval_temperature, context=args.eval_context, keep_first=args.eval_keep_first)
        summary = summarize_evaluation(result)
        for key, value in summary.items():
            writer.add_scalar(f"{tag}/{key}", value, step)
        return result, summary

    result, summary = evaluate(tasks["test"], args.eval_seeds, "eval")
    writer.add_figure("eval/return_by_episode", plot_by_episode(result, f"held-out goals, update {step}"), step)
    for name, batch in batches.items():
        writer.add_scalar(f"diagnostics/{name}_action_loss", teacher_forced_loss(model, batch), step)
    line = f"update {step}: held-out " + ", ".join(f"{key} {value:.3f}" for key, value in summary.items())
    if args.eval_train_goals:
        line += f"; training goals success_rate {evaluate(tasks['train'], 1, 'eval_train')[1]['success_rate']:.3f}"
    return line


if __name__ == "__main__":
    args, checkpoint = parse_args()
    # under `torchrun --nproc-per-node N` every process trains on its share of each batch (DistributedDataParallel
    # averages the gradients); rank 0 alone logs, evaluates and checkpoints
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    check_args(args, world_size)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.cuda else "cpu")
    use_bf16 = args.cuda and torch.cuda.is_bf16_supported()  # training only: evaluation stays in float32
    tasks, histories = load_histories(args.histories_dir)
    _, test_histories = load_histories(args.histories_dir, "test")
    data = make_dataset(histories, args.history_len, args.keep_every)
    del histories
    check(np.diff(data["offsets"]).max() >= args.seq_len, f"no stream holds --seq-len {args.seq_len} transitions after --history-len/--keep-every")
    config = model_config(args, tasks["env"])
    check_memory(config, (args.batch_size + args.diagnostic_windows) * args.seq_len, max(len(tasks["test"]) * args.eval_seeds,
                 len(tasks["train"])), args.eval_episodes * tasks["env"]["max_episode_steps"], args.eval_context)
    if checkpoint is not None:
        check_resume(checkpoint, args, tasks, config)
        run_name, run_dir = checkpoint["run_name"], Path(args.resume).parent
    else:
        run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path("runs") / run_name
    if rank == 0:
        check_writable(run_dir, "make runs/ writable, or run from another directory")
    if world_size > 1:
        if args.cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if args.cuda else "gloo")

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    rng = np.random.default_rng(args.seed)  # window sampling: the same global batch on every rank
    # fixed windows for the teacher-forced diagnostics: training tasks, and held-out tasks where collected
    datasets = {"train": data, **({"heldout": make_dataset(test_histories, args.history_len, args.keep_every)} if test_histories else {})}
    batches = diagnostic_batches(datasets, args, device)
    del test_histories, datasets

    # model and optimizer
    model = raw_model = ADTransformer(config).to(device)  # the same initial weights on every rank
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if args.cuda else None, broadcast_buffers=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=args.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, args=args))
    start = 0
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start = checkpoint["update"]
        rng.bit_generator.state = checkpoint["rng"]["numpy"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
    elif world_size > 1:  # rank 0's clock names the run for all
        names = [run_name]
        dist.broadcast_object_list(names, src=0)
        run_name, run_dir = names[0], Path("runs") / names[0]
    if rank > 0:  # other dropout masks than rank 0's (which keeps the single-process stream)
        torch.manual_seed(args.seed + 1000 * rank + start)

    if rank == 0:  # purge_step: a resumed run overwrites what the old one logged after its checkpoint
        writer = SummaryWriter(str(run_dir), purge_step=start + 1 if checkpoint is not None else None)
        atexit.register(writer.close)  # also on Ctrl-C: the events written so far are flushed
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
        num_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{run_name}: {len(data['offsets']) - 1} streams, {len(data['states'])} transitions, {num_params} parameters, {world_size} process(es) on {device}")
        KEPT = f"the TensorBoard logs in {run_dir}/ (no checkpoint yet)"

    # ALGO LOGIC: imitate the actions of the learning histories, one window at a time
    tokens_per_update = args.batch_size * args.seq_len * config.tokens_per_transition
    share = slice(rank * args.batch_size // world_size, (rank + 1) * args.batch_size // world_size)  # this rank's windows
    model.train()
    progress = trange(start, args.num_updates, initial=start, total=args.num_updates, desc="updates", disable=rank > 0)
    for update in progress:
        step = update + 1  # updates done: the x axis of every TensorBoard curve
        start_time = time.perf_counter()
        batch, _ = sample_windows(data, args.batch_size, args.seq_len, rng, args.stream_start_frac)
        batch = {key: value[share].to(device) for key, value in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(**{key: batch[key] for key in INPUT_KEYS})
        loss = F.cross_entropy(logits.float().reshape(-1, NUM_ACTIONS), batch["actions"].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over the ranks here
        try:  # a non-finite gradient means the run has diverged: stop before it reaches the weights or a checkpoint
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad, error_if_nonfinite=True)
        except RuntimeError:
            raise SystemExit(f"error: the gradient is not finite at update {step}: lower --learning-rate {args.learning_rate}") from None
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        loss = loss.detach()
        if world_size > 1:  # log the loss of the global batch
            dist.all_reduce(loss)
            loss /= world_size
        if rank > 0:
            continue
        # from here on rank 0 only: the other ranks go on to the next update and wait for it in its gradient all-reduce
        loss = loss.item()
        writer.add_scalar("losses/action_loss", loss, step)
        writer.add_scalar("charts/learning_rate", learning_rate, step)
        writer.add_scalar("charts/tokens_per_sec", tokens_per_update / (time.perf_counter() - start_time), step)
        progress.set_postfix(loss=f"{loss:.3f}")
        if step % args.eval_every == 0 or step == args.num_updates:
            progress.write(log_evaluation(writer, raw_model, tasks, args, step, batches))
        if step % args.checkpoint_every == 0 or step == args.num_updates:
            path = run_dir / f"ad_dt_{step:06d}.pt"
            state = dict(model=raw_model.state_dict(), model_config=asdict(config), args=asdict(args), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), update=step, rng={"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
                         tasks=tasks, run_name=run_name)
            write_atomic(path, partial(torch.save, state))
            KEPT = f"checkpoints up to {path}: continue with `python ad_dt.py --resume {path}`"
    if world_size > 1:
        dist.destroy_process_group()
    if rank == 0:  # (the writer is closed at exit)
        print(f"checkpoint: {path}" if start < args.num_updates else
              f"{args.resume} is the run's last update ({start} of --num-updates {args.num_updates}): nothing to do")
