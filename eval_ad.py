# Evaluate a trained AD model in context on held-out DarkRoom goals, next to four baselines: random, optimal, an
# exploration oracle and the source algorithm learning from scratch. Docs: README.md#eval_adpy
import json
import math
import os
import pickle
import random
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from matplotlib.figure import Figure


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment; the default output is `results/{checkpoint's run name}__{update}__{exp_name}__{seed}__{unix time}`"""
    seed: int = 1
    """seed of the evaluation: the model's sampled actions (the same actions as ad_dt.py's periodic evaluation with this
    --seed and the same --episodes/--seeds), the random baseline, the windows of the teacher-forced loss"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True` so GPU runs are reproducible (CPU runs are)"""
    cuda: bool = False
    """if toggled, evaluate on CUDA when it is available"""
    num_threads: int = 1
    """CPU threads for torch: a step feeds one token per env, too little work for two threads (next to another job on
    the 2 cores, 2 threads made the evaluation up to 60x slower here)"""

    checkpoint: str = tyro.MISSING
    """an `ad_dt_UPDATE.pt` written by ad_dt.py (required); it holds the model and the task split"""
    histories_dir: Optional[str] = None
    """directory written by collect_histories.py (`tasks.json`, `train/`, `test/`): the source-from-scratch baseline
    and the teacher-forced losses come from it; default: the checkpoint's own --histories-dir"""
    episodes: int = 100
    """whole episodes per env, from an empty context (cheap with the KV cache: a slow source needs hundreds)"""
    seeds: int = 4
    """envs per goal (all goals x seeds run as one batch)"""
    train_tasks: bool = False
    """if toggled, also evaluate every method on the training goals (memorised goals vs held-out ones)"""
    greedy: bool = False
    """if toggled, the model acts greedily instead of sampling from its policy (greedy decoding cannot explore)"""
    loss_windows: int = 256
    """windows (sampled as in training) of the held-out and of the training histories for the teacher-forced loss; 0 skips it"""
    video_episodes: int = 10
    """episodes of the model on one held-out goal in `video.mp4`; 0 writes no video"""
    video_task: int = 0
    """which held-out goal the video shows (index into the checkpoint's test split; its first seed)"""
    out_dir: Optional[str] = None
    """where results.json, return_by_episode.png, video.mp4 and trajectories.npz go; default `results/{run_name}`"""


# duplicated verbatim from ad_dt.py (self-contained scripts; tests/test_eval_ad.py checks that the copies agree)
FORMAT_VERSION = 1  # of the history files (see README.md, "History format")
NUM_ACTIONS = 5  # 0 noop, 1 up, 2 right, 3 down, 4 left
NO_ACTION = NUM_ACTIONS  # "no previous transition": start of a stream, or an empty context
NO_REWARD = 2  # rewards are 0/1; index 2 = no previous transition
NO_STATE = 255  # no previous transition, in prev_next_states (uint8); the model maps it to its own embedding row
HISTORY_KEYS = ("states", "actions", "rewards", "next_states", "terminated", "truncated", "timesteps")
INPUT_KEYS = ("states", "prev_actions", "prev_rewards", "timesteps", "prev_next_states")  # model inputs, in forward's order


# data: change the pace of histories and sample windows, as ad_dt.py trains on them
def make_dataset(histories, history_len=None, keep_every=1):
    """Cut each agent's history, keep every k-th episode, and flatten all streams into one table.

    Returns flat uint8 arrays (states, actions, prev_actions, prev_rewards, timesteps, prev_next_states) and
    `offsets` (stream i is rows offsets[i]:offsets[i+1]). prev_actions/prev_rewards/prev_next_states hold the
    previous transition *of the same (paced) stream*, across episode boundaries, and NO_ACTION/NO_REWARD/
    NO_STATE at its first row.
    """
    columns = {key: [] for key in ("actions", *INPUT_KEYS)}
    lengths = []
    for h in histories:
        num_streams, steps = h["states"].shape
        if history_len is not None:
            steps = min(steps, history_len // num_streams)
        for s in range(num_streams):
            done = h["terminated"][s, :steps] | h["truncated"][s, :steps]
            episode = np.concatenate([[0], np.cumsum(done[:-1])])  # episode index of every transition
            keep = episode % keep_every == 0
            actions, rewards = h["actions"][s, :steps][keep], h["rewards"][s, :steps][keep]
            columns["states"].append(h["states"][s, :steps][keep])
            columns["actions"].append(actions)
            columns["prev_actions"].append(np.concatenate([[NO_ACTION], actions])[:-1].astype(np.uint8))
            columns["prev_rewards"].append(np.concatenate([[NO_REWARD], rewards])[:-1].astype(np.uint8))
            columns["timesteps"].append(h["timesteps"][s, :steps][keep])
            next_states = h["next_states"][s, :steps][keep]
            columns["prev_next_states"].append(np.concatenate([[NO_STATE], next_states])[:-1].astype(np.uint8))
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


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, written in place at the token positions given."""

    def __init__(self, batch_size, num_heads, max_len, head_dim, dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch_size, num_heads, max_len, head_dim)
        # not persistent: a cache is not part of the model's state_dict
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: [T], k, v: [B, nh, T, hs]
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.embedding_dim % config.num_heads == 0
        self.num_heads = config.num_heads
        self.c_attn = nn.Linear(config.embedding_dim, 3 * config.embedding_dim)  # q, k, v in one projection
        self.c_proj = nn.Linear(config.embedding_dim, config.embedding_dim)
        self.attention_dropout = config.attention_dropout
        self.resid_dropout = nn.Dropout(config.residual_dropout)
        self.kv_cache = None

    def forward(self, x, mask=None, input_pos=None):
        B, T, C = x.size()  # batch, new tokens, embedding_dim
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
        if self.kv_cache is not None:
            # the new tokens attend to the cached ones too; the mask (rows = the new tokens' positions,
            # columns = the cache up to the last of them) is explicit because is_causal would align
            # T queries with the first T keys, not the last
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, : mask.size(-1)], v[:, :, : mask.size(-1)]  # (B, nh, kv_len, hs)
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

    def setup_caches(self, batch_size):
        """Give every layer a KV cache for `batch_size` sequences of up to seq_len transitions."""
        c, p = self.config, self.action_head.weight
        max_len = c.seq_len * c.tokens_per_transition
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, c.num_heads, max_len, c.embedding_dim // c.num_heads, p.dtype, p.device)
        self.register_buffer("causal_mask", torch.ones(max_len, max_len, dtype=torch.bool, device=p.device).tril(), persistent=False)

    def clear_caches(self):
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(self, states, prev_actions, prev_rewards, timesteps, prev_next_states=None, input_pos=None):
        """Inputs: LongTensors [B, T] of T consecutive transitions (prev_next_states is read only with
        config.prev_next_state). Returns action logits [B, T, NUM_ACTIONS]. input_pos: None for a plain causal
        pass, or (with caches set up) the token positions [T * tokens_per_transition] of these transitions in the
        cached context."""
        tr = self.transformer
        if self.config.state_embedding == "rowcol":
            s = tr.state_emb["row"](states // self.room_size) + tr.state_emb["col"](states % self.room_size)
        else:
            s = tr.state_emb(states)
        a, r = tr.action_emb(prev_actions), tr.reward_emb(prev_rewards)  # [B, T, d] each
        if self.config.prev_next_state:  # where the rewarded (or any) previous action led; NO_STATE -> the last row
            r = r + tr.next_state_emb(prev_next_states.clamp(max=self.config.num_states))
        time = tr.timestep_emb(timesteps)  # [B, T, d]
        if self.config.layout == "three":
            x = (torch.stack([a, r, s], dim=2) + time[:, :, None]).flatten(1, 2)  # [B, 3T, d]: ..., a_{t-1}, r_{t-1}, s_t, ...
        else:
            x = s + a + r + time  # [B, T, d]
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
class BatchDarkRoom:
    """toymeta's DarkRoom(random_start=False) under gymnasium's TimeLimit, one env per goal, in numpy.
    An env that ends an episode is reset at once (back to the centre, timestep 0)."""

    MOVES = np.array([[0, 0], [-1, 0], [0, 1], [1, 0], [0, -1]])  # noop, up, right, down, left

    def __init__(self, goals, size=9, terminate_on_goal=True, max_episode_steps=20):
        self.goals = np.asarray(goals, dtype=np.int64).reshape(-1, 2)  # [N, 2]
        self.size, self.terminate_on_goal, self.max_episode_steps = size, terminate_on_goal, max_episode_steps

    def reset(self):
        self.pos = np.full((len(self.goals), 2), self.size // 2)  # [N, 2] row, col
        self.timestep = np.zeros(len(self.goals), dtype=np.int64)  # step within the episode of the next action
        return self.pos[:, 0] * self.size + self.pos[:, 1]

    def step(self, actions):
        """Returns (next states, after a reset where the episode ended), rewards, terminated, truncated.
        `self.reached` keeps the cells that the actions led to, before any reset (the histories' next_states)."""
        self.pos = np.clip(self.pos + self.MOVES[actions], 0, self.size - 1)
        self.reached = self.pos[:, 0] * self.size + self.pos[:, 1]
        self.timestep += 1
        rewards = (self.pos == self.goals).all(axis=1).astype(np.float32)
        terminated = (rewards > 0) & self.terminate_on_goal
        truncated = (self.timestep >= self.max_episode_steps) & ~terminated
        done = terminated | truncated
        self.pos[done] = self.size // 2
        self.timestep[done] = 0
        return self.pos[:, 0] * self.size + self.pos[:, 1], rewards, terminated, truncated


@torch.no_grad()
def evaluate_in_context(model, goals, env, num_seeds, num_episodes, greedy=False, seed=0, use_cache=True):
    """Run len(goals) x num_seeds envs in lockstep for num_episodes whole episodes each, from an empty context.

    Per step only the new transition's tokens go through the model (use_cache=False recomputes the whole
    window instead: same logits, for benchmarks and tests). When the context holds seq_len transitions,
    it drops to its most recent seq_len // 2 (the new one included) and those are re-prefilled, so every
    action's logits are those of a plain forward pass over exactly the transitions in the context.
    env: dict(size, terminate_on_goal, max_episode_steps). Env i has goal goals[i // num_seeds].
    Returns numpy arrays: returns, successes, lengths [envs, num_episodes]; the trajectory states, actions,
    rewards, timesteps [envs, steps] and logits [envs, steps, NUM_ACTIONS]; goals [envs, 2].
    """
    was_training = model.training
    model.eval()
    device, L = model.action_head.weight.device, model.config.seq_len
    k = model.config.tokens_per_transition
    goals = np.repeat(np.asarray(goals, dtype=np.int64).reshape(-1, 2), num_seeds, axis=0)
    N = len(goals)
    room = BatchDarkRoom(goals, env["size"], env["terminate_on_goal"], env["max_episode_steps"])
    generator = torch.Generator(device=device).manual_seed(seed)
    returns, lengths = np.zeros((N, num_episodes), np.float32), np.zeros((N, num_episodes), np.int64)
    episode = np.zeros(N, dtype=np.int64)  # episodes finished by each env
    trajectory = {key: [] for key in ("states", "actions", "rewards", "timesteps", "logits")}
    context = torch.zeros(len(INPUT_KEYS), N, L, dtype=torch.long, device=device)  # the INPUT_KEYS of each transition
    n = 0  # transitions in the context
    state = room.reset()
    prev_action, prev_reward, prev_next_state = np.full(N, NO_ACTION), np.full(N, NO_REWARD), np.full(N, NO_STATE)
    if use_cache:
        model.setup_caches(N)
    try:
        while episode.min() < num_episodes:
            new = n  # first context slot that the model has not seen
            if n == L:  # full: keep the most recent half, the new transition included, and re-prefill it
                context[:, :, : L // 2 - 1] = context[:, :, n - (L // 2 - 1) : n].clone()
                n, new = L // 2 - 1, 0
            transition = np.stack([state, prev_action, prev_reward, room.timestep, prev_next_state])  # [5, N]
            context[:, :, n] = torch.as_tensor(transition, device=device)
            n += 1
            if use_cache:
                input_pos = torch.arange(new * k, n * k, device=device)
                logits = model(*context[:, :, new:n], input_pos=input_pos)[:, -1]  # [N, NUM_ACTIONS]
            else:
                logits = model(*context[:, :, :n])[:, -1]
            if greedy:
                action = logits.argmax(-1)
            else:
                action = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
            action = action.cpu().numpy()
            trajectory["states"].append(state)
            trajectory["timesteps"].append(room.timestep.copy())
            trajectory["actions"].append(action)
            trajectory["logits"].append(logits.cpu().numpy())
            state, reward, terminated, truncated = room.step(action)
            trajectory["rewards"].append(reward)
            active = np.flatnonzero(episode < num_episodes)
            returns[active, episode[active]] += reward[active]
            lengths[active, episode[active]] += 1
            episode += terminated | truncated
            prev_action, prev_reward, prev_next_state = action, reward.astype(np.int64), room.reached  # carried across the episode boundary
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
    logits = model(*(batch[key] for key in INPUT_KEYS))
    model.train(was_training)
    return F.cross_entropy(logits.reshape(-1, NUM_ACTIONS), batch["actions"].reshape(-1)).item()


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by ad_dt.py; returns (model rebuilt from it, in eval mode, and the checkpoint dict)."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        model = ADTransformer(GPTConfig(**checkpoint["model_config"])).to(device)
        model.load_state_dict(checkpoint["model"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: cannot load an ad_dt.py checkpoint from {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    return model.eval(), checkpoint


# baselines: policies that act in the same batched rooms as the model
def step_towards(states, targets, size):
    """The action that takes each cell one step closer to its target cell (rows first, then columns; noop on it)."""
    (row, col), (target_row, target_col) = np.divmod(states, size), np.divmod(targets, size)
    return np.select([target_row < row, target_row > row, target_col > col, target_col < col], [1, 3, 2, 4], default=0)


class RandomPolicy:
    """Uniformly random actions."""

    def __init__(self, num_envs, size, goal_states, rng):
        self.rng = rng

    def act(self, states):
        return self.rng.integers(0, NUM_ACTIONS, len(states))

    def observe(self, reached, rewards):
        pass


class OptimalPolicy:
    """Knows the goal: the shortest path to it in every episode, and stays on it when the episode does not end there."""

    def __init__(self, num_envs, size, goal_states, rng=None):
        self.size, self.goal_states = size, goal_states

    def act(self, states):
        return step_towards(states, self.goal_states, self.size)

    def observe(self, reached, rewards):
        pass


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
        to_room = np.zeros((len(views), NUM_ACTIONS), dtype=np.int64)
        for k, view in enumerate(views):
            for action, move in enumerate(BatchDarkRoom.MOVES):
                seen_move = np.array(divmod(int(view[centre + move[0] * size + move[1]]), size)) - size // 2
                to_room[k, (BatchDarkRoom.MOVES == seen_move).all(1).argmax()] = action
        symmetry = rng.integers(0, len(views), num_envs)
        self.view, self.to_room, self.size = views[symmetry], to_room[symmetry], size  # [envs, cells], [envs, actions]
        self.distance = np.abs(row[:, None] - row[None]) + np.abs(col[:, None] - col[None])  # [cells, cells] steps apart
        self.visited = np.zeros((num_envs, size * size), dtype=bool)  # as seen
        self.visited[:, centre] = True  # every episode starts in the centre
        self.known_goal = np.full(num_envs, -1)  # the rewarded cell as seen, -1 while unknown

    def act(self, states):
        envs = np.arange(len(states))
        seen = self.view[envs, states]
        distance = np.where(self.visited, np.inf, self.distance[seen])  # [envs, cells]
        targets = np.where(self.known_goal >= 0, self.known_goal, distance.argmin(1))  # argmin: the first of the nearest
        return self.to_room[envs, step_towards(seen, targets, self.size)]

    def observe(self, reached, rewards):
        """Learn from one step: the cell the action led to (before any reset) and its reward."""
        seen = self.view[np.arange(len(reached)), reached]
        self.visited[np.arange(len(reached)), seen] = True
        self.known_goal = np.where(rewards > 0, seen, self.known_goal)


def run_policy(policy_class, goals, env, num_seeds, num_episodes, rng=None):
    """Run a baseline as evaluate_in_context runs the model: len(goals) x num_seeds envs (env i has goal
    goals[i // num_seeds]) in lockstep for num_episodes whole episodes each. Returns returns, successes, lengths
    [envs, episodes] and goals [envs, 2]."""
    goals = np.repeat(np.asarray(goals, dtype=np.int64).reshape(-1, 2), num_seeds, axis=0)
    N, size = len(goals), env["size"]
    room = BatchDarkRoom(goals, size, env["terminate_on_goal"], env["max_episode_steps"])
    policy = policy_class(N, size, goals[:, 0] * size + goals[:, 1], rng)
    returns, lengths = np.zeros((N, num_episodes), np.float32), np.zeros((N, num_episodes), np.int64)
    episode = np.zeros(N, dtype=np.int64)
    state = room.reset()
    while episode.min() < num_episodes:
        action = policy.act(state)
        reached = np.clip(room.pos + room.MOVES[action], 0, size - 1)  # the cell the action leads to, before any reset
        state, reward, terminated, truncated = room.step(action)
        policy.observe(reached[:, 0] * size + reached[:, 1], reward)
        active = np.flatnonzero(episode < num_episodes)
        returns[active, episode[active]] += reward[active]
        lengths[active, episode[active]] += 1
        episode += terminated | truncated
    return {"returns": returns, "successes": returns > 0, "lengths": lengths, "goals": goals}


def read_histories(root, split, goals, env):
    """The histories `root/split/goal_R_C.npz` of these goals that exist: (goals found, their arrays, their metadata).
    A file that cannot be read, or was made for another goal, env or format, exits with one line."""
    found, histories, metas = [], [], []
    for goal in goals:
        path = Path(root) / split / f"goal_{goal[0]}_{goal[1]}.npz"
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as h:
                meta = json.loads(h["metadata"].item())
                arrays = {key: h[key] for key in HISTORY_KEYS}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise SystemExit(f"error: cannot read {path} as a history file ({type(e).__name__}: {e})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise SystemExit(f"error: {path} has format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        if list(meta.get("goal", [])) != list(goal) or meta.get("env") != env:
            raise SystemExit(f"error: {path} was collected for goal {meta.get('goal')} and env {meta.get('env')}, expected {list(goal)} and {env}")
        found.append(list(goal))
        histories.append(arrays)
        metas.append(meta)
    return found, histories, metas


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


# results: curves with 95% intervals, diagnostics, table, plot, video
def by_episode(values):
    """Mean and 95% interval (normal approximation over runs) per episode index of values [runs, episodes]."""
    values = values.astype(np.float64)
    return {"mean": values.mean(0).tolist(), "ci95": (1.96 * values.std(0) / math.sqrt(len(values))).tolist()}


def summarize(returns, task_of_run, goals):
    """A method's entry of results.json: curves over all runs, and per task (mean over its runs)."""
    successes = returns > 0
    per_task = [np.flatnonzero(task_of_run == t) for t in range(len(goals))]
    return {
        "return_by_episode": by_episode(returns),
        "success_by_episode": by_episode(successes),
        "runs": len(returns),
        "per_task": {
            "goals": [list(map(int, g)) for g in goals],
            "return_by_episode": [returns[rows].mean(0).tolist() for rows in per_task],
            "success_by_episode": [successes[rows].mean(0).tolist() for rows in per_task],
        },
    }


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


def first_reaching(mean, target):
    """1-based index of the first entry of `mean` >= target, or None."""
    hits = np.flatnonzero(np.asarray(mean) >= target - 1e-9)
    return int(hits[0]) + 1 if len(hits) else None


def table_episodes(num_episodes):
    """1, 2, 5, 10, 20, 50, ... up to num_episodes, and num_episodes itself."""
    marks = [m * 10**e for e in range(7) for m in (1, 2, 5) if m * 10**e <= num_episodes]
    return marks if marks[-1] == num_episodes else marks + [num_episodes]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def write_atomic(path, write):
    """write(temp path), then rename: an interrupted run leaves no partial file. The temp name keeps the extension,
    from which matplotlib and imageio pick the format."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_results(path, methods, train_methods, labels, title):
    """Return and success rate by episode, mean over runs with a 95% band; training goals dashed."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, ylabel in zip(axes, ("return_by_episode", "success_by_episode"), ("return per episode", "success rate")):
        for curves, style, suffix in ((methods, "-", ""), (train_methods, "--", ", training goals")):
            for i, (name, result) in enumerate(curves.items()):
                mean, ci = np.array(result[key]["mean"]), np.array(result[key]["ci95"])
                episodes = np.arange(1, len(mean) + 1)
                ax.plot(episodes, mean, style, color=f"C{list(labels).index(name)}", label=labels[name] + suffix)
                ax.fill_between(episodes, mean - ci, mean + ci, color=f"C{list(labels).index(name)}", alpha=0.15)
        if max(len(r[key]["mean"]) for r in methods.values()) > 20:
            ax.set_xscale("log")
        ax.set(xlabel="episode (from an empty context / from scratch)", ylabel=ylabel)
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


def video_frames(states, actions, timesteps, returns, goal, size, num_episodes, max_episode_steps, scale=32):
    """Frames of one env's first num_episodes episodes: the room (goal shown to the viewer, not the agent), this
    episode's path in dark green, cells seen in earlier episodes lighter, and a bar below with one segment per
    episode (green: reached the goal, red: did not, grey: the current one, filling with its steps)."""
    episode_of_step = np.cumsum(timesteps == 0) - 1
    steps = np.flatnonzero(episode_of_step < num_episodes)
    num_episodes = min(num_episodes, int(episode_of_step[-1]) + 1)
    seen, path = set(), []

    def frame(cell, episode, progress):
        image = render_frame(size, goal, cell, scale)
        for painted, color in ((seen, (70, 70, 80)), (path, (30, 110, 30))):
            for c in painted:
                r, k = divmod(int(c), size)
                if c != cell and (r, k) != tuple(goal):
                    image[r * scale + 1 : (r + 1) * scale, k * scale + 1 : (k + 1) * scale] = color
        bar = np.zeros((scale, size * scale, 3), np.uint8)
        for e in range(num_episodes):
            x0, x1 = e * bar.shape[1] // num_episodes, (e + 1) * bar.shape[1] // num_episodes - 1
            if e < episode:
                bar[4:-4, x0:x1] = (40, 200, 40) if returns[e] > 0 else (200, 40, 40)
            elif e == episode:
                bar[4:-4, x0:x1] = (60, 60, 60)
                bar[4:-4, x0 : x0 + max(1, int(progress * (x1 - x0)))] = (200, 200, 200)
            else:
                bar[4:-4, x0:x1] = (30, 30, 30)
        return np.concatenate([image, bar])

    frames = []
    for t in steps:
        episode = int(episode_of_step[t])
        frames.append(frame(int(states[t]), episode, timesteps[t] / max_episode_steps))
        path.append(int(states[t]))
        if t + 1 == len(states) or timesteps[t + 1] == 0:  # the episode ends: show where its last action led
            row, col = np.clip(np.divmod(int(states[t]), size) + BatchDarkRoom.MOVES[actions[t]], 0, size - 1)
            path.append(row * size + col)
            frames += [frame(row * size + col, episode, 1.0)] * 3
            seen.update(path)
            path = []
    return frames


if __name__ == "__main__":
    args = tyro.cli(Args)
    for name in ("episodes", "seeds", "num_threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("loss_windows", "video_episodes"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # the model, its task split, and the histories next to it; bad input exits before anything is written
    model, checkpoint = load_checkpoint(args.checkpoint, device)
    tasks = checkpoint.get("tasks")
    if not isinstance(tasks, dict) or not {"train", "test", "env"} <= set(tasks):
        raise SystemExit(f"error: {args.checkpoint} holds no task split (train, test, env): not a checkpoint of ad_dt.py")
    env = tasks["env"]
    if (model.config.num_states, model.config.max_episode_steps) != (env["size"] ** 2, env["max_episode_steps"]):
        raise SystemExit(f"error: the model in {args.checkpoint} does not fit its env {env}")
    if not 0 <= args.video_task < len(tasks["test"]):
        raise SystemExit(f"error: --video-task must be in 0..{len(tasks['test']) - 1}, got {args.video_task}")
    histories_dir = Path(args.histories_dir or checkpoint.get("args", {}).get("histories_dir", "histories"))
    try:
        on_disk = json.loads((histories_dir / "tasks.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {histories_dir}/tasks.json ({type(e).__name__}): run `python collect_histories.py` or pass --histories-dir")
    if any(on_disk.get(key) != tasks[key] for key in ("train", "test", "env")):
        raise SystemExit(f"error: {histories_dir}/tasks.json has another task split or env than {args.checkpoint}")
    test_found, test_histories, test_metas = read_histories(histories_dir, "test", tasks["test"], env)
    need_train = args.loss_windows > 0 or args.train_tasks
    train_found, train_histories, train_metas = read_histories(histories_dir, "train", tasks["train"], env) if need_train else ([], [], [])
    source = (test_metas + train_metas)[0].get("source", "a2c") if test_metas + train_metas else None  # names the from-scratch baseline
    update = checkpoint.get("update", 0)
    run_name = f"{checkpoint.get('run_name', Path(args.checkpoint).parent.name)}__{update}__{args.exp_name}__{args.seed}__{int(time.time())}"
    out_dir = Path(args.out_dir or f"results/{run_name}")
    notes = []
    if not test_histories:
        notes.append(f"no held-out histories in {histories_dir}/test: the source-from-scratch baseline is left out; run `python collect_histories.py --tasks test`")
    elif len(test_found) < len(tasks["test"]):
        notes.append(f"the source-from-scratch baseline covers the {len(test_found)} of {len(tasks['test'])} held-out goals with a history in {histories_dir}/test")
    num_envs = (test_metas or train_metas or [{}])[0].get("algo", {}).get("num_envs", 1)
    if source == "a2c" and num_envs > 1:
        notes.append(f"each A2C stream is 1 of {num_envs} parallel envs of one agent: its episode k comes after about {num_envs}k episodes of the agent's experience")
    for note in notes:
        print(f"note: {note}")
    print(f"{args.checkpoint}: update {update}, {sum(p.numel() for p in model.parameters())} parameters; "
          f"{len(tasks['test'])} held-out goals x {args.seeds} seeds x {args.episodes} episodes")

    # ALGO LOGIC: every method on the same goals, episodes and env settings
    goal_sets = {"held_out": tasks["test"], **({"train_goals": tasks["train"]} if args.train_tasks else {})}
    methods, trajectories, timings = {name: {} for name in goal_sets}, {}, {}
    for part, goals in goal_sets.items():
        start_time = time.perf_counter()
        result = evaluate_in_context(model, goals, env, args.seeds, args.episodes, args.greedy, args.seed)
        timings[f"ad_{part}_s"] = time.perf_counter() - start_time
        trajectories[part] = result
        task_of_run = np.arange(len(result["returns"])) // args.seeds
        methods[part]["ad"] = (result["returns"], task_of_run, goals)
        for name, policy in (("random", RandomPolicy), ("optimal", OptimalPolicy), ("oracle", ExplorationOracle)):
            baseline = run_policy(policy, goals, env, args.seeds, args.episodes, np.random.default_rng(args.seed))
            methods[part][name] = (baseline["returns"], task_of_run, goals)
        found, histories = (test_found, test_histories) if part == "held_out" else (train_found, train_histories)
        if histories:
            returns, task_of_row = source_episodes(histories, args.episodes)
            methods[part][source] = (returns, task_of_row, found)
            if returns.shape[1] < args.episodes:
                notes.append(f"{part}: some {source} stream holds only {returns.shape[1]} whole episodes, its curve stops there")
                print(f"note: {notes[-1]}")
        print(f"{part}: model {timings[f'ad_{part}_s']:.1f} s for {result['actions'].size} actions ({result['actions'].shape[1]} steps of {len(result['actions'])} envs)")

    # DIAGNOSTICS: in-context learning or copying? (see README.md#eval_adpy)
    loss = None
    if args.loss_windows > 0:
        start_time = time.perf_counter()
        train_args = checkpoint.get("args", {})
        pace = (train_args.get("history_len"), train_args.get("keep_every", 1))
        rng = np.random.default_rng(args.seed)
        loss = {
            "held_out": history_action_loss(model, test_histories, *pace, args.loss_windows, rng) if test_histories else None,
            "train": history_action_loss(model, train_histories, *pace, args.loss_windows, rng) if train_histories else None,
            "windows": args.loss_windows, "seq_len": model.config.seq_len, "history_len": pace[0], "keep_every": pace[1],
            "source": source,
        }
        timings["teacher_forced_loss_s"] = time.perf_counter() - start_time
    results = {
        "args": {**asdict(args), "histories_dir": str(histories_dir), "out_dir": str(out_dir)},
        "checkpoint": {"path": str(args.checkpoint), "run_name": checkpoint.get("run_name"), "update": update,
                       "model_config": checkpoint["model_config"], "train_args": checkpoint.get("args")},
        "env": env,
        "tasks": {"held_out": tasks["test"], "train": tasks["train"]},
        "source": source,
        "methods": {name: summarize(*value) for name, value in methods["held_out"].items()},
        "diagnostics": {
            "held_out": {name: diagnose(value[0]) for name, value in methods["held_out"].items()},
            "train_goals": None,
            "teacher_forced_loss": loss,
            "episode_reaching_90pct_of_optimal": {},
        },
        "notes": notes,
        "timings": timings,
    }
    if args.train_tasks:
        results["diagnostics"]["train_goals"] = {
            "methods": {name: summarize(*value) for name, value in methods["train_goals"].items()},
            "diagnostics": {name: diagnose(value[0]) for name, value in methods["train_goals"].items()},
        }
    optimal_return = float(np.mean(results["methods"]["optimal"]["return_by_episode"]["mean"]))
    for name, result in results["methods"].items():
        results["diagnostics"]["episode_reaching_90pct_of_optimal"][name] = first_reaching(result["return_by_episode"]["mean"], 0.9 * optimal_return)

    # outputs, each written atomically
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    labels = {"ad": "AD (in context)", "random": "random", "optimal": "optimal (knows the goal)", "oracle": "exploration oracle",
              **({source: f"{source} from scratch (one stream)"} if source else {})}
    train_curves = {"ad": results["diagnostics"]["train_goals"]["methods"]["ad"]} if args.train_tasks else {}
    title = (f"{results['checkpoint']['run_name']} update {update}: {len(tasks['test'])} held-out goals x {args.seeds} seeds"
             f" ({'terminate' if env['terminate_on_goal'] else 'no-terminate'} mode, {'greedy' if args.greedy else 'sampled'} actions)")
    plot_results(out_dir / "return_by_episode.png", results["methods"], train_curves, labels, title)
    arrays = {f"{part}_{key}": result[key] for part, result in trajectories.items() for key in ("states", "actions", "rewards", "timesteps", "returns", "goals")}
    write_atomic(out_dir / "trajectories.npz", lambda tmp: np.savez_compressed(tmp, **arrays))
    if args.video_episodes > 0:
        held_out, env_index = trajectories["held_out"], args.video_task * args.seeds
        frames = video_frames(held_out["states"][env_index], held_out["actions"][env_index], held_out["timesteps"][env_index],
                              held_out["returns"][env_index], tasks["test"][args.video_task], env["size"], args.video_episodes, env["max_episode_steps"])
        write_atomic(out_dir / "video.mp4", lambda tmp: imageio.mimwrite(tmp, frames, fps=8, macro_block_size=1))

    # the table: return by episode (success rate in brackets where it differs), then the diagnostics
    names = list(results["methods"])
    rows = []
    for e in table_episodes(args.episodes):
        row = [e]
        for name in names:
            curve = results["methods"][name]
            if e > len(curve["return_by_episode"]["mean"]):
                row.append("")
                continue
            cell = f"{curve['return_by_episode']['mean'][e - 1]:.2f} ± {curve['return_by_episode']['ci95'][e - 1]:.2f}"
            if not env["terminate_on_goal"]:
                cell += f" ({curve['success_by_episode']['mean'][e - 1]:.2f})"
            row.append(cell)
        rows.append(row)
    reach = results["diagnostics"]["episode_reaching_90pct_of_optimal"]
    rows.append(["90% of optimal"] + [reach[name] or "never" for name in names])
    runs = ", ".join(f"{name} {results['methods'][name]['runs']}" for name in names)
    print(f"\nheld-out goals, return by episode (mean ± 95% interval; runs: {runs}):\n")
    print(markdown_table(["episode"] + names, rows))

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    diagnostic_rows = []
    for part, diagnostics in (("held-out", results["diagnostics"]["held_out"]),
                              ("train", (results["diagnostics"]["train_goals"] or {}).get("diagnostics", {}))):
        for name, d in diagnostics.items():
            diagnostic_rows.append([f"{name} ({part})", fmt(d["success_episode_1"]), fmt(d["success_episodes_11_20"]), fmt(d["success_after_success"]),
                                    fmt(d["first_success_episode"]), fmt(d["never_succeeded"])])
    header = ["method (goals)", "success ep. 1", "success ep. 11-20", "success after success", "first success (mean ep.)", "never succeeded"]
    print(f"\nover {args.episodes} episodes:\n\n" + markdown_table(header, diagnostic_rows))
    if loss is not None:
        print(f"\nteacher-forced action loss (nats, {args.loss_windows} windows of {model.config.seq_len}): held-out histories {fmt(loss['held_out'])}, training histories {fmt(loss['train'])}")
    print(f"\nresults in {out_dir}/: results.json, return_by_episode.png, trajectories.npz" + (", video.mp4" if args.video_episodes > 0 else ""))
