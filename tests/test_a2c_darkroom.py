"""Tests of a2c_darkroom.py: n-step returns, learning, outputs and bad input."""
import glob
import os
import subprocess
import sys

import imageio
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toymeta.dark_room import DarkRoom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import a2c_darkroom  # noqa: E402

SCRIPT = os.path.join(ROOT, "a2c_darkroom.py")


def run_script(cwd, *args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_nstep_returns_hand_worked():
    gamma = 0.5
    # env 0: goal reached at t=1 (termination cuts the return), rollout ends mid-episode at t=3 (bootstrap V(s_4)).
    # env 1: time limit at t=1 (bootstrap from V(final obs) = next_values[1], not from the next episode's return),
    #        goal reached on the last step t=3 (termination beats the end-of-rollout bootstrap).
    rewards = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    terminated = torch.tensor([[False, False], [True, False], [False, False], [False, True]])
    truncated = torch.tensor([[False, False], [False, True], [False, False], [False, False]])
    next_values = torch.tensor([[10.0, 1.0], [20.0, 2.0], [30.0, 3.0], [40.0, 4.0]])
    returns = a2c_darkroom.nstep_returns(rewards, terminated, truncated, next_values, gamma)
    expected = torch.tensor([[0.5, 0.5], [1.0, 1.0], [10.0, 0.5], [20.0, 1.0]])
    torch.testing.assert_close(returns, expected)


def test_nstep_returns_gamma_one_counts_rewards_to_episode_end():
    rewards = torch.tensor([[0.0], [0.0], [1.0]])
    false = torch.zeros((3, 1), dtype=torch.bool)
    terminated = torch.tensor([[False], [False], [True]])
    returns = a2c_darkroom.nstep_returns(rewards, terminated, false, torch.full((3, 1), 7.0), 1.0)
    torch.testing.assert_close(returns, torch.ones((3, 1)))


def test_env_matches_toymeta_and_reports_timestep():
    env = a2c_darkroom.make_env(9, (4, 6), True, 5)()
    ref = DarkRoom(size=9, goal=(4, 6), random_start=False, terminate_on_goal=True)
    obs, info = env.reset(seed=0)
    ref_obs, _ = ref.reset(seed=0)
    assert obs == ref_obs == 40 and info["timestep"] == 0
    for t, action in enumerate([1, 0, 2, 2, 4], start=1):
        obs, reward, terminated, truncated, info = env.step(action)
        ref_obs, ref_reward, ref_terminated, _, _ = ref.step(action)
        assert (obs, reward, terminated) == (ref_obs, ref_reward, ref_terminated)
        assert info["timestep"] == t
        assert truncated == (t == 5)


def test_agent_learns_shortest_path(tmp_path):
    goal = (4, 6)  # two cells right of the start
    result = run_script(tmp_path, "--goal", *map(str, goal), "--total-timesteps", "20000", "--learning-rate", "1e-3")
    assert result.returncode == 0, result.stderr
    (model_path,) = glob.glob(str(tmp_path / "runs" / "*" / "a2c_darkroom.pt"))
    checkpoint = torch.load(model_path)
    agent = a2c_darkroom.Agent(checkpoint["num_states"], 5, checkpoint["args"]["hidden_size"])
    agent.load_state_dict(checkpoint["model"])
    # a fresh toymeta env, not the script's own log
    env = DarkRoom(size=9, goal=goal, random_start=False, terminate_on_goal=True)
    states, episode_return = a2c_darkroom.greedy_rollout(agent, env, torch.device("cpu"))
    assert episode_return == 1.0
    assert len(states) - 1 == 2, f"greedy path {states} is not the shortest"


def test_outputs_tensorboard_model_video(tmp_path):
    result = run_script(tmp_path, "--total-timesteps", "2000", "--log-every", "5", "--capture-video")
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/success_rate", "losses/policy_loss",
                "losses/value_loss", "losses/entropy", "charts/SPS"]:
        assert tag in tags, tag
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]
    returns = [e.value for e in events.Scalars("charts/episodic_return")]
    assert set(returns) <= {0.0, 1.0}
    assert os.path.exists(os.path.join(run_dir, "a2c_darkroom.pt"))
    (video,) = glob.glob(str(tmp_path / "videos" / "*" / "*.mp4"))
    frames = imageio.mimread(video)
    assert len(frames) >= 3 and frames[0].shape[0] >= 9 * 16  # upscaled, not 9x9


def test_render_frame_marks_goal_and_agent():
    frame = a2c_darkroom.render_frame(9, (1, 2), 40, scale=4)
    assert frame.shape == (36, 36, 3)
    assert tuple(frame[1 * 4 + 2, 2 * 4 + 2]) == (220, 40, 40)  # goal red
    assert tuple(frame[4 * 4 + 2, 4 * 4 + 2]) == (40, 220, 40)  # agent green


@pytest.mark.parametrize(
    "bad_args, message",
    [
        (["--goal", "9", "0"], "outside"),
        (["--goal", "4", "4"], "start cell"),
        (["--num-envs", "0"], "--num-envs must be positive"),
        (["--size", "-3"], "--size must be positive"),
        (["--total-timesteps", "5"], "--total-timesteps"),
    ],
)
def test_bad_input_fails_cleanly(tmp_path, bad_args, message):
    result = run_script(tmp_path, *bad_args)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error:") and message in last_line
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "videos")
