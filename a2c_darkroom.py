# A2C on one DarkRoom task: the source algorithm whose learning histories Algorithm Distillation imitates.
# Docs: README.md#a2c_darkroompy
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
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Tuple

import gymnasium as gym
import imageio
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from toymeta.dark_room import DarkRoom
from tqdm import trange


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the envs)"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True` so GPU runs are reproducible"""
    cuda: bool = False
    """if toggled, use CUDA when it is available"""
    capture_video: bool = False
    """if toggled, write an mp4 of the trained agent to `videos/{run_name}/`"""

    # Environment
    goal: Tuple[int, int] = (2, 6)
    """goal cell (row, col); any cell but the start (the centre)"""
    size: int = 9
    """side of the square grid"""
    terminate_on_goal: bool = True
    """end the episode when the goal is reached (the original design's choice); False = the AD paper's variant"""
    max_episode_steps: int = 20
    """time limit of an episode (truncation)"""

    # Algorithm (defaults: the original design's hyperparameters)
    num_envs: int = 10
    """number of parallel envs"""
    num_steps: int = 10
    """rollout length per env between updates (the n of the n-step returns)"""
    total_timesteps: int = 2_500_000
    """total env steps over all envs"""
    learning_rate: float = 1e-4
    """Adam learning rate"""
    adam_eps: float = 1e-6
    """Adam epsilon"""
    hidden_size: int = 128
    """size of the shared state embedding"""
    gamma: float = 0.9
    """discount; 0.9 (horizon ~10 steps, within a 20-step episode) makes a shorter path to the goal clearly worth more"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.99
    """coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """maximum global norm of the gradient"""
    log_every: int = 100
    """log losses and charts every this many updates"""

    # filled in at runtime
    num_updates: int = 0
    """number of updates (total_timesteps // (num_envs * num_steps))"""


def check_args(args: Args) -> None:
    """Reject every bad flag with a one-line message naming it, before anything is written."""
    def need(ok, flag, rule):
        if not ok:
            raise SystemExit(f"error: --{flag} must be {rule}, got {getattr(args, flag.replace('-', '_'))}")

    for name in ["size", "max_episode_steps", "num_envs", "num_steps", "total_timesteps", "hidden_size", "log_every"]:
        need(getattr(args, name) >= 1, name.replace("_", "-"), "positive")
    need(0 < len(args.exp_name.encode()) <= 200 and "/" not in args.exp_name, "exp-name", "a non-empty file name without '/'")
    need(0 <= args.seed < 2**32, "seed", "in 0..2**32-1 (numpy's seeds)")
    need(0 < args.learning_rate <= 1, "learning-rate", "in (0, 1] (larger steps blow the logits up: the policy freezes on one action)")
    need(math.isfinite(args.adam_eps) and args.adam_eps > 0, "adam-eps", "positive")
    need(0 <= args.gamma <= 1, "gamma", "in [0, 1]")
    for name in ["ent_coef", "vf_coef"]:
        need(math.isfinite(getattr(args, name)) and getattr(args, name) >= 0, name.replace("_", "-"), "at least 0")
    need(args.max_grad_norm > 0, "max-grad-norm", "positive (inf: no clipping)")
    need(not args.cuda or torch.cuda.is_available(), "cuda", "left out on a machine without a CUDA GPU (torch sees none)")
    if args.total_timesteps < args.num_envs * args.num_steps:
        raise SystemExit("error: --total-timesteps must be at least --num-envs * --num-steps (one update)")
    row, col = args.goal
    if not (0 <= row < args.size and 0 <= col < args.size):
        raise SystemExit(f"error: --goal {row} {col} is outside the {args.size}x{args.size} grid; use 0..{args.size - 1}")
    if (row, col) == (args.size // 2, args.size // 2):
        raise SystemExit(f"error: --goal {row} {col} is the start cell; choose any other cell")
    # the peak, roughly: libraries, the env objects, the rollout, the agent with its Adam moments, the video's frames
    frames = 3 * (args.max_episode_steps + 3) if args.capture_video else 0
    needed = (300 * 2**20 + 8192 * args.num_envs + 48 * args.num_steps * args.num_envs
              + 16 * (args.hidden_size * (args.size**2 + 6) + 6) + frames * 3 * (32 * args.size) ** 2)
    available = available_memory()
    if needed > available:
        raise SystemExit(f"error: --num-envs {args.num_envs}, --num-steps {args.num_steps}, --hidden-size {args.hidden_size} "
                         f"and --size {args.size} need about {needed / 2**30:.1f} GiB, {(needed - available) / 2**30:.1f} GiB "
                         f"more than the {available / 2**30:.1f} GiB available: make them smaller")


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


def make_env(size: int, goal: Tuple[int, int], terminate_on_goal: bool, max_episode_steps: int):
    def thunk():
        env = DarkRoom(size=size, goal=goal, random_start=False, terminate_on_goal=terminate_on_goal)
        return gym.wrappers.TimeLimit(env, max_episode_steps=max_episode_steps)

    return thunk


def layer_init(layer: nn.Linear, std: float) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, 0.0)
    return layer


class Agent(nn.Module):
    """A shared state embedding, then a linear actor head (5 logits) and a linear critic head."""

    def __init__(self, num_states: int, num_actions: int = 5, hidden_size: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(num_states, hidden_size)
        # small actor init: the first policy is near uniform, so the first histories explore
        self.actor = layer_init(nn.Linear(hidden_size, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(hidden_size, 1), std=1.0)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.embedding(obs)).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor = None):
        hidden = self.embedding(obs)
        dist = Categorical(logits=self.actor(hidden))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.critic(hidden).squeeze(-1)


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


def a2c_loss(agent: Agent, obs, actions, returns, ent_coef: float, vf_coef: float):
    """One combined loss: policy gradient with advantage = return - value, value loss, entropy bonus."""
    _, logprob, entropy, value = agent.get_action_and_value(obs, actions)
    advantages = (returns - value).detach()
    pg_loss = -(logprob * advantages).mean()
    v_loss = 0.5 * ((returns - value) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss
    return loss, pg_loss, v_loss, entropy_loss


def render_frame(size: int, goal: Tuple[int, int], agent_state: int, scale: int = 32) -> np.ndarray:
    """An upscaled RGB frame: dark floor with grid lines, goal red, agent green (yellow on the goal)."""
    grid = np.full((size, size, 3), 40, dtype=np.uint8)
    grid[goal[0], goal[1]] = (220, 40, 40)
    row, col = divmod(int(agent_state), size)
    grid[row, col] = (240, 220, 40) if (row, col) == tuple(goal) else (40, 220, 40)
    frame = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    frame[::scale, :] = frame[:, ::scale] = 90  # grid lines so single cells are visible
    return frame


@torch.no_grad()
def greedy_rollout(agent: Agent, env: gym.Env, device: torch.device, seed: int = 0):
    """Run one episode acting greedily; returns the visited states (including the first) and the return."""
    obs, _ = env.reset(seed=seed)
    states, total, done = [obs], 0.0, False
    while not done:
        action = agent.actor(agent.embedding(torch.tensor([obs], device=device))).argmax(-1).item()
        obs, reward, terminated, truncated, _ = env.step(action)
        states.append(obs)
        total += reward
        done = terminated or truncated
    return states, total


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    args.num_updates = args.total_timesteps // (args.num_envs * args.num_steps)
    run_name = f"DarkRoom-{args.size}x{args.size}__{args.exp_name}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # the outputs' directories are writable before any work is done for them
    check_writable(f"runs/{run_name}", "make runs/ writable, or run from another directory")
    if args.capture_video:
        check_writable(f"videos/{run_name}", "make videos/ writable, or run without --capture-video")
    writer = SummaryWriter(f"runs/{run_name}")
    KEPT = f"the TensorBoard logs in runs/{run_name}/ (no model: it is saved after training)"
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))

    # env setup: SAME_STEP autoreset returns the final observation of an ended episode in `info["final_obs"]`
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.size, args.goal, args.terminate_on_goal, args.max_episode_steps) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    num_states = int(envs.single_observation_space.n)

    agent = Agent(num_states, envs.single_action_space.n, args.hidden_size).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=args.adam_eps)

    # ALGO Logic: storage setup
    shape = (args.num_steps, args.num_envs)
    obs, next_obs_true, actions = (torch.zeros(shape, dtype=torch.long, device=device) for _ in range(3))
    rewards = torch.zeros(shape, device=device)
    terminateds, truncateds = (torch.zeros(shape, dtype=torch.bool, device=device) for _ in range(2))

    global_step = 0
    start_time = time.time()
    recent_success = deque(maxlen=100)  # success (goal reached) of the last 100 episodes over all envs
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.tensor(next_obs, device=device)

    with contextlib.closing(writer):  # closed on Ctrl-C too: the logs so far are kept
        progress = trange(1, args.num_updates + 1, desc="a2c", unit="update", mininterval=1.0)
        for update in progress:
            for step in range(args.num_steps):
                global_step += args.num_envs
                obs[step] = next_obs
                with torch.no_grad():
                    action, _, _, _ = agent.get_action_and_value(next_obs)
                actions[step] = action
                next_obs_np, reward, terminated, truncated, infos = envs.step(action.cpu().numpy())
                rewards[step] = torch.tensor(reward, device=device)
                terminateds[step] = torch.tensor(terminated, device=device)
                truncateds[step] = torch.tensor(truncated & ~terminated, device=device)
                true_next = next_obs_np.copy()  # the true next state: the final observation where the episode ended
                if "final_obs" in infos:
                    true_next[infos["_final_obs"]] = infos["final_obs"][infos["_final_obs"]].astype(np.int64)
                next_obs_true[step] = torch.tensor(true_next, device=device)
                next_obs = torch.tensor(next_obs_np, device=device)
                for i in np.flatnonzero(infos.get("_episode", [])):
                    recent_success.append(float(infos["episode"]["r"][i] > 0))
                    writer.add_scalar("charts/episodic_return", float(infos["episode"]["r"][i]), global_step)
                    writer.add_scalar("charts/episodic_length", int(infos["episode"]["l"][i]), global_step)

            # ALGO LOGIC: n-step returns, bootstrapped from the critic
            with torch.no_grad():
                next_values = agent.get_value(next_obs_true)
                returns = nstep_returns(rewards, terminateds, truncateds, next_values, args.gamma)

            loss, pg_loss, v_loss, entropy_loss = a2c_loss(
                agent, obs.reshape(-1), actions.reshape(-1), returns.reshape(-1), args.ent_coef, args.vf_coef
            )
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()

            if update % args.log_every == 0 or update == args.num_updates:
                success_rate = float(np.mean(recent_success)) if recent_success else 0.0
                sps = int(global_step / (time.time() - start_time))
                scalars = {"charts/success_rate": success_rate, "charts/learning_rate": optimizer.param_groups[0]["lr"],
                           "losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(),
                           "losses/entropy": entropy_loss.item(), "charts/SPS": sps}
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, global_step)
                progress.set_postfix(step=global_step, success=f"{success_rate:.2f}", sps=sps)

    envs.close()
    model_path = f"runs/{run_name}/{args.exp_name}.pt"
    write_atomic(model_path, lambda tmp: torch.save({"model": agent.state_dict(), "args": vars(args), "num_states": num_states}, tmp))
    KEPT = f"the model {model_path} and the TensorBoard logs" + (" (no video)" if args.capture_video else "")
    print(f"model saved to {model_path}")

    if args.capture_video:
        env = make_env(args.size, args.goal, args.terminate_on_goal, args.max_episode_steps)()
        frames = []
        for episode in range(3):
            states, _ = greedy_rollout(agent, env, device, seed=args.seed + episode)
            frames += [render_frame(args.size, args.goal, s) for s in states]
            frames += [frames[-1]] * 2  # a short pause between episodes
        video_path = f"videos/{run_name}/greedy.mp4"
        write_atomic(video_path, lambda tmp: imageio.mimwrite(tmp, frames, fps=4, macro_block_size=1))
        print(f"video saved to {video_path}")
