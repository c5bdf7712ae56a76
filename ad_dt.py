# Algorithm Distillation (Laskin et al. 2022): a small GPT learns to act in context from learning histories. Docs: README.md#ad_dtpy
import json
import math
import os
import pickle
import random
import time
import zipfile
from dataclasses import asdict, dataclass
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

    # Data: the histories written by collect_histories.py, and their pace
    histories_dir: str = "histories"
    """directory written by `collect_histories.py` (`tasks.json`, `train/goal_R_C.npz`)"""
    history_len: Optional[int] = 200_000
    """keep the first `history_len` transitions of each agent, counted over all its streams as
    collect_histories.py counts them (`history_len // num_streams` per stream); None keeps all.
    Default: the seed's A2C agents pass 0.9 success by ~170k steps, after that a history only repeats itself"""
    keep_every: int = 50
    """keep every k-th episode of each stream (episodes 0, k, 2k, ...): a history k times faster.
    Default: 50 puts an A2C agent's whole learning arc (~1000 episodes per stream) into a few windows"""
    stream_start_frac: float = 0.0
    """fraction of training windows that start at the beginning of a stream (evaluation starts from an empty
    context, which uniform sampling shows in about 1 window in (stream length - seq_len))"""

    # Model
    layout: Literal["one", "three"] = "one"
    """tokens per transition: "one" = emb(state) + emb(previous action) + emb(previous reward);
    "three" = the seed's interleaved stream ... a_{t-1}, r_{t-1}, s_t ..., the action read from the state token"""
    state_embedding: Literal["cell", "rowcol"] = "cell"
    """"cell" = one learnt vector per cell; "rowcol" = emb(row) + emb(column), which tells the model which cells are neighbours"""
    prev_next_state: bool = False
    """if toggled, every transition also shows where the previous action led (s'_{t-1}): in terminate mode the
    goal cell is never a state, only where the rewarded action led, so this puts the goal itself in the context"""
    seq_len: int = 128
    """context length in transitions (tokens = seq_len x tokens per transition)"""
    embedding_dim: int = 64
    """width of the transformer"""
    num_layers: int = 4
    """number of transformer blocks"""
    num_heads: int = 4
    """number of attention heads"""
    feed_forward_dim: int = 256
    """hidden width of each block's MLP (the seed used 2048)"""
    attention_dropout: float = 0.0
    """dropout on attention weights (the seed used 0.5; any value > 0 makes SDPA leave its fused CPU kernel: 5-12x slower)"""
    residual_dropout: float = 0.1
    """dropout on the attention and MLP outputs"""
    embedding_dropout: float = 0.0
    """dropout on the token embeddings"""

    # Training
    batch_size: int = 32
    """windows per update, over all processes (under torchrun each rank takes batch_size / world_size of them)"""
    num_updates: int = 5000
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
    eval_every: int = 500
    """evaluate every this many updates (and after the last one)"""
    eval_episodes: int = 30
    """whole episodes per env, from an empty context"""
    eval_seeds: int = 4
    """envs per held-out goal (all goals x seeds run as one batch)"""
    eval_greedy: bool = False
    """if toggled, act greedily instead of sampling from the policy (greedy decoding cannot explore)"""
    eval_train_goals: bool = True
    """also evaluate on the training goals (one env each; `eval_train/` tags): held-out far below training = memorised goals"""
    diagnostic_windows: int = 64
    """windows of training and of held-out (histories/test, if collected) histories for the teacher-forced `diagnostics/` losses"""

    # Checkpoints
    checkpoint_every: int = 500
    """save `runs/{run_name}/ad_dt_{update:06d}.pt` every this many updates (and after the last one)"""
    resume: Optional[str] = None
    """continue the run saved in this checkpoint; its arguments are reused unless given again on the command line"""


FORMAT_VERSION = 1  # of the history files (see README.md, "History format")
NUM_ACTIONS = 5  # 0 noop, 1 up, 2 right, 3 down, 4 left
NO_ACTION = NUM_ACTIONS  # "no previous transition": start of a stream, or an empty context
NO_REWARD = 2  # rewards are 0/1; index 2 = no previous transition
NO_STATE = 255  # no previous transition, in prev_next_states (uint8); the model maps it to its own embedding row
HISTORY_KEYS = ("states", "actions", "rewards", "next_states", "terminated", "truncated", "timesteps")
INPUT_KEYS = ("states", "prev_actions", "prev_rewards", "timesteps", "prev_next_states")  # model inputs, in forward's order


# data: load and validate the histories, change their pace, sample windows
def load_histories(histories_dir, split="train"):
    """Return (tasks.json contents, list of per-agent arrays) of the histories of one split; bad input exits with one line.

    split "train": the training data. split "test": the held-out tasks' histories, read only to measure the
    teacher-forced loss on them (a diagnostic of copying vs learning); an absent `test/` gives an empty list.
    """
    root = Path(histories_dir)
    files = sorted((root / split).glob("*.npz"))
    if not (root / "tasks.json").is_file() or (not files and split == "train"):
        raise SystemExit(f"error: no training histories in {root}/train: run `python collect_histories.py` first")
    try:
        tasks = json.loads((root / "tasks.json").read_text())
    except ValueError as e:
        raise SystemExit(f"error: {root}/tasks.json is not valid JSON ({e})")
    if tasks.get("format_version") != FORMAT_VERSION:
        raise SystemExit(f"error: {root}/tasks.json has format_version {tasks.get('format_version')}, expected {FORMAT_VERSION}")
    train_goals = [tuple(g) for g in tasks["train"]]
    test_goals = [tuple(g) for g in tasks["test"]]
    histories = []
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as h:
                meta = json.loads(h["metadata"].item())
                arrays = {key: h[key] for key in HISTORY_KEYS}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise SystemExit(f"error: cannot read {path} as a history file ({type(e).__name__}: {e})")
        goal = tuple(meta.get("goal", ()))
        if meta.get("format_version") != FORMAT_VERSION:
            raise SystemExit(f"error: {path} has format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        if split == "test":
            if meta.get("split") != "test" or goal not in test_goals:
                raise SystemExit(f"error: {path} is not a history of a held-out test task in {root}/tasks.json")
        elif meta.get("split") != "train" or goal in test_goals:
            raise SystemExit(f"error: {path} is a history of the held-out test task {list(goal)}: test tasks are never training data")
        elif goal not in train_goals:
            raise SystemExit(f"error: {path} has goal {list(goal)}, which is not a training task in {root}/tasks.json")
        if meta.get("env") != tasks["env"]:
            raise SystemExit(f"error: {path} was collected with env {meta.get('env')}, but {root}/tasks.json says {tasks['env']}")
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1 or len(shapes.pop()) != 2:
            raise SystemExit(f"error: {path} has arrays of different or non-(streams, steps) shapes")
        env = tasks["env"]
        limits = {"states": env["size"] ** 2, "next_states": env["size"] ** 2, "actions": NUM_ACTIONS, "rewards": 2, "timesteps": env["max_episode_steps"]}
        for key, limit in limits.items():
            if arrays[key].size and arrays[key].max() >= limit:
                raise SystemExit(f"error: {path} has {key} up to {arrays[key].max()}, outside 0..{limit - 1}")
        histories.append(arrays)
    return tasks, histories


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


def lr_factor(update, args):
    """Multiplier of args.learning_rate at this update (for LambdaLR): linear warmup, then cosine decay to min_lr."""
    # 1) linear warmup
    if update < args.warmup_steps:
        return (update + 1) / args.warmup_steps
    # 2) past the end of the schedule, stay at min_lr
    if update >= args.num_updates:
        return args.min_lr / args.learning_rate
    # 3) in between, cosine decay from learning_rate down to min_lr
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


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by ad_dt.py; returns (model rebuilt from it, in eval mode, and the checkpoint dict)."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        model = ADTransformer(GPTConfig(**checkpoint["model_config"])).to(device)
        model.load_state_dict(checkpoint["model"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: cannot load an ad_dt.py checkpoint from {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    return model.eval(), checkpoint


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = None
    if args.resume:
        _, checkpoint = load_checkpoint(args.resume)
        # the saved arguments become the defaults: only what is given again on the command line changes
        args = tyro.cli(Args, default=Args(**{**checkpoint["args"], "resume": args.resume}))
    if args.seq_len < 2 or args.keep_every < 1 or args.eval_episodes < 1 or args.embedding_dim % args.num_heads or not 0 <= args.stream_start_frac <= 1:
        raise SystemExit("error: need --seq-len >= 2, --keep-every >= 1, --eval-episodes >= 1, --embedding-dim divisible by --num-heads, 0 <= --stream-start-frac <= 1")
    # under `torchrun --nproc-per-node N` every process trains on its share of each batch (DistributedDataParallel
    # averages the gradients); rank 0 alone logs, evaluates and checkpoints
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.batch_size % world_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world_size} torchrun processes")
    use_cuda = args.cuda and torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    use_bf16 = use_cuda and torch.cuda.is_bf16_supported()  # training only: evaluation stays in float32
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    tasks, histories = load_histories(args.histories_dir)
    _, test_histories = load_histories(args.histories_dir, "test")
    data = make_dataset(histories, args.history_len, args.keep_every)
    del histories
    if np.diff(data["offsets"]).max() < args.seq_len:
        raise SystemExit(f"error: no stream holds --seq-len {args.seq_len} transitions after --history-len/--keep-every")
    env = tasks["env"]

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    rng = np.random.default_rng(args.seed)  # window sampling: the same global batch on every rank

    # fixed windows for the teacher-forced diagnostics: training tasks, and held-out tasks where collected
    # (`collect_histories.py --tasks test`); their own generator leaves the training stream of windows as it was
    diagnostic_rng = np.random.default_rng(args.seed + 1)
    diagnostic_data = {"train": data}
    if test_histories:
        diagnostic_data["heldout"] = make_dataset(test_histories, args.history_len, args.keep_every)
    del test_histories
    diagnostic_batches = {}
    for name, d in diagnostic_data.items():
        if np.diff(d["offsets"]).max() >= args.seq_len:
            batch, _ = sample_windows(d, args.diagnostic_windows, args.seq_len, diagnostic_rng)
            diagnostic_batches[name] = {key: value.to(device) for key, value in batch.items()}

    # model and optimizer
    config = GPTConfig(
        num_states=env["size"] ** 2,
        max_episode_steps=env["max_episode_steps"],
        seq_len=args.seq_len,
        layout=args.layout,
        state_embedding=args.state_embedding,
        prev_next_state=args.prev_next_state,
        embedding_dim=args.embedding_dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        feed_forward_dim=args.feed_forward_dim,
        attention_dropout=args.attention_dropout,
        residual_dropout=args.residual_dropout,
        embedding_dropout=args.embedding_dropout,
    )
    model = raw_model = ADTransformer(config).to(device)  # the same initial weights on every rank
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if use_cuda else None, broadcast_buffers=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=args.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, args=args))
    start = 0
    if checkpoint is not None:
        if asdict(config) != checkpoint["model_config"]:
            raise SystemExit(f"error: the model flags differ from those saved in {args.resume}; leave them out to resume")
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start = checkpoint["update"]
        rng.bit_generator.state = checkpoint["rng"]["numpy"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        run_name, run_dir = checkpoint["run_name"], Path(args.resume).parent
    else:
        run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
        if world_size > 1:  # rank 0's clock names the run for all
            names = [run_name]
            dist.broadcast_object_list(names, src=0)
            run_name = names[0]
        run_dir = Path("runs") / run_name
    if rank > 0:  # other dropout masks than rank 0's (which keeps the single-process stream)
        torch.manual_seed(args.seed + 1000 * rank + start)

    # purge_step: a resumed run overwrites what the old one logged after its checkpoint
    if rank == 0:
        writer = SummaryWriter(str(run_dir), purge_step=start + 1 if checkpoint is not None else None)
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
        )
        num_streams = len(data["offsets"]) - 1
        num_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{run_name}: {num_streams} streams, {len(data['states'])} transitions, {num_params} parameters, {world_size} process(es) on {device}")

    def save_checkpoint(update):
        path = run_dir / f"ad_dt_{update:06d}.pt"
        torch.save(
            {
                "model": raw_model.state_dict(),
                "model_config": asdict(config),
                "args": asdict(args),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "update": update,
                "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
                "tasks": tasks,
                "run_name": run_name,
            },
            path.with_suffix(".tmp"),
        )
        os.replace(path.with_suffix(".tmp"), path)  # never a half-written checkpoint
        return path

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
            logits = model(*(batch[key] for key in INPUT_KEYS))
        loss = F.cross_entropy(logits.float().reshape(-1, NUM_ACTIONS), batch["actions"].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over the ranks here
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
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
            result = evaluate_in_context(raw_model, tasks["test"], env, args.eval_seeds, args.eval_episodes, args.eval_greedy, args.seed)
            summary = summarize_evaluation(result)
            for key, value in summary.items():
                writer.add_scalar(f"eval/{key}", value, step)
            writer.add_figure("eval/return_by_episode", plot_by_episode(result, f"held-out goals, update {step}"), step)
            for name, batch in diagnostic_batches.items():
                writer.add_scalar(f"diagnostics/{name}_action_loss", teacher_forced_loss(raw_model, batch), step)
            line = f"update {step}: held-out " + ", ".join(f"{key} {value:.3f}" for key, value in summary.items())
            if args.eval_train_goals:
                train_result = evaluate_in_context(raw_model, tasks["train"], env, 1, args.eval_episodes, args.eval_greedy, args.seed)
                train_summary = summarize_evaluation(train_result)
                for key, value in train_summary.items():
                    writer.add_scalar(f"eval_train/{key}", value, step)
                line += f"; training goals success_rate {train_summary['success_rate']:.3f}"
            progress.write(line)
        if step % args.checkpoint_every == 0 or step == args.num_updates:
            path = save_checkpoint(step)
    if world_size > 1:
        dist.destroy_process_group()
    if rank == 0:
        writer.close()
        if start < args.num_updates:
            print(f"checkpoint: {path}")
