"""Tests of a2c_darkroom.py: n-step returns, learning, outputs and bad input."""
import glob
import os
import re
import subprocess
import sys

import imageio
import pytest
import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toymeta.dark_room import DarkRoom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import a2c_darkroom  # noqa: E402
from test_collect_histories import A2C_BAD_INPUT, interrupt, run_in_process  # noqa: E402

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


def test_env_matches_toymeta_and_truncates_at_the_time_limit():
    env = a2c_darkroom.make_env(9, (4, 6), True, 5)()
    ref = DarkRoom(size=9, goal=(4, 6), random_start=False, terminate_on_goal=True)
    obs, info = env.reset(seed=0)
    ref_obs, _ = ref.reset(seed=0)
    assert obs == ref_obs == 40
    for t, action in enumerate([1, 0, 2, 2, 4], start=1):
        obs, reward, terminated, truncated, info = env.step(action)
        ref_obs, ref_reward, ref_terminated, _, _ = ref.step(action)
        assert (obs, reward, terminated) == (ref_obs, ref_reward, ref_terminated)
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


# one case through a real interpreter (the stderr a user sees); test_check_args_is_the_one_gate covers every flag in-process
@pytest.mark.parametrize("bad_args, message", [(["--goal", "9", "0"], "outside")])
def test_bad_input_fails_cleanly(tmp_path, bad_args, message):
    result = run_script(tmp_path, *bad_args)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error:") and message in last_line
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "videos")


@pytest.mark.parametrize(
    "bad_args, message",
    [
        *A2C_BAD_INPUT,
        (["--goal", "4", "4"], "start cell"),
        (["--num-envs", "0"], "--num-envs must be positive"),
        (["--size", "-3"], "--size must be positive"),
        (["--total-timesteps", "5"], "--total-timesteps"),
        (["--size", "1", "--goal", "0", "0"], "is the start cell"),
        (["--hidden-size", str(10**9)], "--hidden-size 1000000000 and --size 9 need about"),
        (["--num-envs", str(10**9), "--total-timesteps", str(10**11)], "GiB more than the"),
    ],
)
def test_check_args_is_the_one_gate(bad_args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        a2c_darkroom.check_args(tyro.cli(a2c_darkroom.Args, args=bad_args))
    a2c_darkroom.check_args(tyro.cli(a2c_darkroom.Args, args=["--capture-video"]))  # and good flags pass


@pytest.mark.parametrize("blocked, flags", [("runs", []), ("videos", ["--capture-video"])])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, blocked, flags):
    (tmp_path / blocked).write_text("in the way")  # as root, a read-only directory would not stop the writes
    assert run_in_process(tmp_path, "--total-timesteps", "100", *flags, script=SCRIPT) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {blocked}/"), err
    assert not glob.glob(str(tmp_path / "**" / "*.*"), recursive=True)  # no log, model or video


def test_ctrl_c_exits_130_with_one_line_saying_what_was_kept(tmp_path):
    # during the imports (they take seconds): nothing was written
    code, lines = interrupt([SCRIPT], tmp_path, after=0.5)
    assert (code, lines) == (130, ["interrupted: nothing was written"])
    assert os.listdir(tmp_path) == []
    # during training: the logs are kept (the writer is closed on the way out), no model, no temp file
    code, lines = interrupt([SCRIPT, "--log-every", "1"], tmp_path, wait_for="a2c", after=0.5)
    assert code == 130 and len(lines) == 1 and re.fullmatch(r"interrupted: the TensorBoard logs in runs/DarkRoom-9x9__"
                                                             r"a2c_darkroom__1__\d+/ \(no model: it is saved after training\)",
                                                             lines[0]), lines
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert [os.path.basename(p)[:19] for p in glob.glob(os.path.join(run_dir, "*"))] == ["events.out.tfevents"]
    events = EventAccumulator(run_dir)
    events.Reload()
    assert len(events.Scalars("charts/success_rate")) >= 1
