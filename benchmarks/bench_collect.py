# Env steps/s of collect_histories.py (all agents batched) vs a2c_darkroom.py's one-agent-at-a-time loop. Docs: benchmarks/README.md
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import a2c_darkroom  # noqa: E402


@dataclass
class Args:
    baseline_goals: Tuple[Tuple[int, int], ...] = ((2, 6), (7, 1))
    """goals trained one after the other by the baseline (one agent at a time)"""
    baseline_steps: int = 20_000
    """env steps per baseline agent (a2c_darkroom.py's defaults otherwise: 10 envs x 10 steps per update)"""
    batched_steps: Tuple[int, int] = (20_000, 220_000)
    """collect_histories.py runs twice, with these --total-timesteps (per agent); the difference in wall time is
    the cost of the extra steps, without start-up, file writing and plotting"""
    num_threads: int = 1
    """torch CPU threads of the baseline (collect_histories.py uses its own default, 1); 1 is the faster here"""


def baseline(goal, steps: int, seed: int = 1) -> float:
    """a2c_darkroom.py's training loop (its helpers, its defaults) without its TensorBoard writes; returns seconds."""
    a = a2c_darkroom.Args(goal=goal, total_timesteps=steps, seed=seed)
    num_updates = a.total_timesteps // (a.num_envs * a.num_steps)
    torch.manual_seed(seed)
    envs = gym.vector.SyncVectorEnv(
        [a2c_darkroom.make_env(a.size, a.goal, a.terminate_on_goal, a.max_episode_steps) for _ in range(a.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    agent = a2c_darkroom.Agent(envs.single_observation_space.n, envs.single_action_space.n, a.hidden_size)
    optimizer = optim.Adam(agent.parameters(), lr=a.learning_rate, eps=a.adam_eps)
    obs = torch.zeros((a.num_steps, a.num_envs), dtype=torch.long)
    next_obs_true = torch.zeros((a.num_steps, a.num_envs), dtype=torch.long)
    actions = torch.zeros((a.num_steps, a.num_envs), dtype=torch.long)
    rewards = torch.zeros((a.num_steps, a.num_envs))
    terminateds = torch.zeros((a.num_steps, a.num_envs), dtype=torch.bool)
    truncateds = torch.zeros((a.num_steps, a.num_envs), dtype=torch.bool)
    recent_success = deque(maxlen=100)
    start = time.perf_counter()
    next_obs, _ = envs.reset(seed=seed)
    next_obs = torch.tensor(next_obs)
    for _ in range(num_updates):
        for step in range(a.num_steps):
            obs[step] = next_obs
            with torch.no_grad():
                action, _, _, _ = agent.get_action_and_value(next_obs)
            actions[step] = action
            next_obs_np, reward, terminated, truncated, infos = envs.step(action.numpy())
            rewards[step] = torch.tensor(reward)
            terminateds[step] = torch.tensor(terminated)
            truncateds[step] = torch.tensor(truncated & ~terminated)
            true_next = next_obs_np.copy()
            if "final_obs" in infos:
                ended = infos["_final_obs"]
                true_next[ended] = infos["final_obs"][ended].astype(np.int64)
            next_obs_true[step] = torch.tensor(true_next)
            next_obs = torch.tensor(next_obs_np)
            if "episode" in infos:
                for i in np.flatnonzero(infos["_episode"]):
                    recent_success.append(float(infos["episode"]["r"][i] > 0))
        with torch.no_grad():
            returns = a2c_darkroom.nstep_returns(rewards, terminateds, truncateds, agent.get_value(next_obs_true), a.gamma)
        loss, _, _, _ = a2c_darkroom.a2c_loss(agent, obs.reshape(-1), actions.reshape(-1), returns.reshape(-1),
                                              a.ent_coef, a.vf_coef)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), a.max_grad_norm)
        optimizer.step()
    envs.close()
    return time.perf_counter() - start


def batched(steps: int, workdir: str) -> float:
    """Wall time of `collect_histories.py` (the original design's A2C on the 57 training tasks) with --total-timesteps steps."""
    out = os.path.join(workdir, f"histories_{steps}")
    command = [sys.executable, os.path.join(ROOT, "collect_histories.py"), "--histories-dir", out,
               "--num-envs", "10", "--tasks", "train", "--total-timesteps", str(steps), "--history-len", "1000"]
    start = time.perf_counter()
    subprocess.run(command, cwd=workdir, check=True, capture_output=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, load average before: {os.getloadavg()[0]:.2f}")

    baseline(args.baseline_goals[0], 1000)  # warm-up
    seconds = sum(baseline(goal, args.baseline_steps) for goal in args.baseline_goals)
    base_sps = len(args.baseline_goals) * args.baseline_steps / seconds
    print(f"a2c_darkroom.py, one agent at a time ({len(args.baseline_goals)} agents x {args.baseline_steps} env steps, "
          f"{args.num_threads} torch thread): {seconds:.1f} s, {base_sps:,.0f} env steps/s")

    with tempfile.TemporaryDirectory() as workdir:
        short, long = (batched(steps, workdir) for steps in args.batched_steps)
    num_agents = 57
    extra_steps = num_agents * (args.batched_steps[1] - args.batched_steps[0])
    batched_sps = extra_steps / (long - short)
    print(f"collect_histories.py, batched ({num_agents} agents; runs of {args.batched_steps[0]} and "
          f"{args.batched_steps[1]} env steps per agent: {short:.1f} s and {long:.1f} s): "
          f"{extra_steps:,} extra env steps in {long - short:.1f} s, {batched_sps:,.0f} env steps/s")
    full = num_agents * 2_500_000
    print(f"the full default collection ({num_agents} x 2.5M env steps) at these rates: "
          f"{full / base_sps / 3600:.1f} h one agent at a time, {full / batched_sps / 60:.1f} min batched")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"speedup: {batched_sps / base_sps:.1f}x")
