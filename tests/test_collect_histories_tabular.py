"""Tests of collect_histories_tabular.py: the learners with one learner per stream (noise, explorer, and dynaq = single-env
Dyna-Q), their histories, their flags. The env and the history writer are collect_histories.py's, tested there."""
import glob
import os
import sys

import numpy as np
import pytest
import tyro

from test_collect_histories import (COMMON_BAD_INPUT, ROOT, check_dynamics, check_one_line_error, check_the_one_gate, interrupt, load,
                                    run_in_process, toymeta_env)

sys.path.insert(0, ROOT)
import collect_histories as ch  # noqa: E402
import collect_histories_tabular as tab  # noqa: E402

SCRIPT = os.path.join(ROOT, "collect_histories_tabular.py")


def run(cwd, *args):
    return run_in_process(cwd, *args, script=SCRIPT)


BAD_INPUT = [
    *COMMON_BAD_INPUT,
    (["--source", "noise", "--noise-episodes", "0"], "--noise-episodes must be positive"),
    (["--source", "noise", "--noise-floor", "-0.1"], "--noise-floor must be in [0, 1]"),
    (["--source", "explorer", "--explorer-eps", "1.5"], "--explorer-eps must be in [0, 1]"),
    (["--source", "explorer", "--explorer-eps", "nan"], "--explorer-eps must be in [0, 1]"),
    (["--source", "dynaq", "--dynaq-q0", "nan"], "--dynaq-q0 must be in"),
    (["--source", "dynaq", "--dynaq-q0", "inf"], "--dynaq-q0 must be in"),
    (["--source", "dynaq", "--dynaq-q0", "1e300"], "--dynaq-q0 must be in"),
    (["--source", "dynaq", "--dynaq-gamma", "1.01"], "--dynaq-gamma must be in [0, 1]"),
    (["--source", "dynaq", "--dynaq-gamma", "nan"], "--dynaq-gamma must be in [0, 1]"),
    (["--source", "dynaq", "--dynaq-sweeps", "0"], "--dynaq-sweeps must be positive"),
    (["--source", "dynaq", "--dynaq-eps", "-0.1"], "--dynaq-eps must be in [0, 1]"),
    (["--source", "dynaq", "--dynaq-eps", "nan"], "--dynaq-eps must be in [0, 1]"),
    # a flag of another source would be ignored without a word
    (["--source", "explorer", "--dynaq-q0", "1"], "--dynaq-q0 is a flag of --source dynaq, not of --source explorer: leave it out"),
    (["--source", "noise", "--explorer-eps", "0.2"], "--explorer-eps is a flag of --source explorer, not of --source noise"),
    (["--noise-floor", "0.1"], "--noise-floor is a flag of --source noise, not of --source dynaq"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_check_args_is_the_one_gate(args, message):
    check_the_one_gate(tab, args, message)


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_errors(tmp_path, capsys, args, message):
    check_one_line_error(tmp_path, capsys, SCRIPT, args, message)


def test_interrupted_run_exits_130_saying_what_was_written(tmp_path):
    """Ctrl-C in the collection loop: the line comes from collect_histories.py's handler, which the recorder keeps up to date."""
    out = tmp_path / "h"
    code, lines = interrupt([SCRIPT, "--histories-dir", out, "--tasks", "all", "--num-envs", "50", "--history-len", str(50 * 5000)],
                            tmp_path,
                            wait_for="dynaq x80")
    assert code == 130 and len(lines) == 1, lines
    assert lines[0].startswith(f"interrupted: 0 of 80 histories written to {out}/ (rerun the same command") and "runs/" in lines[0]
    assert glob.glob(str(out / "**" / "*.*"), recursive=True) == []


def test_same_defaults_as_the_recorder_needs():
    """The recorder's fixed fields: one learner per stream, and whole chunks covering the history."""
    args = tyro.cli(tab.Args, args=[])
    tab.check_args(args)
    assert (args.agents_per_goal, args.num_envs, args.history_len, args.histories_dir, args.source) == (1, 500, 128000, "histories", "dynaq")


@pytest.mark.parametrize("flag", [["--agents-per-goal", "2"], ["--learning-rate", "0.5"], ["--total-timesteps", "1000"],
                                  ["--num-steps", "5"]])
def test_a2c_flags_are_not_flags_of_this_script(tmp_path, capsys, flag):
    """One learner per stream: A2C's flags (collect_histories.py's) would change nothing, so they are refused."""
    assert run(tmp_path, *flag, "--tasks", "0,1") != 0
    assert flag[0] in capsys.readouterr().err
    assert os.listdir(tmp_path) == []




# ---------------------------------------------------------------------------------------------- scripted sources (issue 9)


def episodes_of(arrays, stream):
    """(length, success) of every whole episode of one stream, in order."""
    ends = np.flatnonzero(arrays["terminated"][stream] | arrays["truncated"][stream])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [(e - s + 1, bool(arrays["rewards"][stream, s:e + 1].any())) for s, e in zip(starts, ends)]


def test_noise_source_schedule_and_dynamics(tmp_path):
    out = tmp_path / "h"
    args = ["--histories-dir", str(out), "--source", "noise", "--noise-episodes", "4", "--num-envs", "40",
            "--history-len", "8000", "--tasks", "0,0", "3,4", "8,5"]
    assert run(tmp_path, *args) == 0
    paths = glob.glob(str(out / "*" / "*.npz"))
    assert len(paths) == 3
    for path in paths:
        arrays, meta = load(path)
        check_dynamics(arrays, meta)
        assert meta["source"] == "noise" and meta["algo"] == {"num_envs": 40, "noise_episodes": 4, "noise_floor": 0.0,
                                                               "history_len": 8000}
        distance = abs(meta["goal"][0] - 4) + abs(meta["goal"][1] - 4)
        first, later = [], []
        for stream in range(40):
            episodes = episodes_of(arrays, stream)
            first.append(episodes[0][1])
            # epsilon reaches the floor (0) after 4 episodes: from then on, the shortest path every time
            assert all(length == distance and success for length, success in episodes[4:])
            later += [success for _, success in episodes[1:4]]
        # episode 1 is a random walk (epsilon 1), episodes 2-4 mix: success rises with the schedule
        assert np.mean(first) < np.mean(later) < 1.0


def test_explorer_source_finds_then_exploits(tmp_path):
    out = tmp_path / "h"
    args = ["--histories-dir", str(out), "--source", "explorer", "--explorer-eps", "0", "--num-envs", "20",
            "--history-len", "4000", "--tasks", "all"]
    assert run(tmp_path, *args) == 0
    first_success = []
    paths = glob.glob(str(out / "*" / "*.npz"))
    assert len(paths) == 80
    for path in paths:
        arrays, meta = load(path)
        check_dynamics(arrays, meta)
        distance = abs(meta["goal"][0] - 4) + abs(meta["goal"][1] - 4)
        for stream in range(20):
            episodes = episodes_of(arrays, stream)
            k = next(i for i, (_, success) in enumerate(episodes) if success)
            first_success.append(k + 1)
            # once rewarded it goes straight back: every later episode is a shortest path
            assert all(length == distance and success for length, success in episodes[k + 1:])
            # before that it sweeps the room: no episode wanders without reaching a new cell
            t, seen = 0, {40}
            for length, _ in episodes[:k]:
                new = set(arrays["next_states"][stream, t:t + length].tolist()) - seen
                assert new, "an exploring episode found no unvisited cell"
                seen |= new
                t += length
    # each 20-step episode from the centre reaches at least 12 new cells (at most 8 steps to the nearest
    # unvisited one) until the 80 cells are done: the goal is found by episode 7 at the latest
    assert max(first_success) <= 7 and 1.5 < np.mean(first_success) < 4


def test_explorer_with_random_starts_finds_then_takes_shortest_paths(tmp_path):
    """Starting anywhere, the explorer still finds the goal, then goes straight to it from every start (one step, a
    rewarded noop, when it starts on the goal)."""
    out = tmp_path / "h"
    args = ["--histories-dir", str(out), "--source", "explorer", "--explorer-eps", "0", "--num-envs", "10",
            "--history-len", "2000", "--tasks", "0,0", "2,7", "6,3", "8,8", "--random-start"]
    assert run(tmp_path, *args) == 0
    for path in glob.glob(str(out / "*" / "*.npz")):
        arrays, meta = load(path)
        check_dynamics(arrays, meta)
        goal = meta["goal"]
        for stream in range(10):
            episodes, t = episodes_of(arrays, stream), 0
            k = next(i for i, (_, success) in enumerate(episodes) if success)
            assert k < 8
            for i, (length, success) in enumerate(episodes):
                row, col = divmod(int(arrays["states"][stream, t]), 9)
                if i > k:
                    assert success and length == max(abs(row - goal[0]) + abs(col - goal[1]), 1)
                t += length


@pytest.mark.parametrize("source, random_start", [("explorer", False), ("dynaq", False), ("explorer", True)])
def test_per_stream_source_is_reproducible_and_independent_of_other_tasks(tmp_path, source, random_start):
    common = ["--source", source, "--num-envs", "5", "--history-len", "500", *(["--random-start"] if random_start else [])]
    assert run(tmp_path, "--histories-dir", str(tmp_path / "a"), "--tasks", "0,0", "2,6", *common) == 0
    assert run(tmp_path, "--histories-dir", str(tmp_path / "b"), "--tasks", "2,6", *common) == 0
    a, _ = load(tmp_path / "a" / "train" / "goal_2_6.npz")
    b, _ = load(tmp_path / "b" / "train" / "goal_2_6.npz")
    for key in ch.HISTORY_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert 0 < a["actions"].std()  # random actions (explorer: 10%) and tie-breaks were drawn


# ---------------------------------------------------------------------------------------------- the dynaq source


def reference_dynaq(goal, rng, steps, q0, gamma, sweeps, eps, terminate_on_goal=True, max_episode_steps=20,
                    random_start=False, start_seed=0):
    """One Dyna-Q learner, written plainly: toymeta's DarkRoom + TimeLimit, a (state, action) model, and every
    sweep of value iteration after every step (no skipping). Returns its actions and its Q after every step."""
    S, A = 81, 5
    env = toymeta_env(9, goal, terminate_on_goal, max_episode_steps, random_start)
    known, end = np.zeros((S, A), bool), np.zeros((S, A), bool)
    model_next, model_reward = np.zeros((S, A), np.int64), np.zeros((S, A), np.float32)
    Q = np.full((S, A), q0, np.float32)
    state, _ = env.reset(seed=start_seed)
    actions, qs = [], []
    for _ in range(steps):
        u = rng.random(A + 2)
        best = Q[state] == Q[state].max()
        action = int(np.where(best, u[:A], -1.0).argmax()) if u[A] >= eps else min(int(u[A + 1] * A), A - 1)
        next_state, reward, terminated, truncated, _ = env.step(action)
        known[state, action], model_next[state, action] = True, next_state
        model_reward[state, action], end[state, action] = reward, terminated
        for _ in range(sweeps):
            backup = model_reward + np.float32(gamma) * (~end).astype(np.float32) * Q.max(1)[model_next]
            Q = np.where(known, backup, np.float32(q0)).astype(np.float32)
        actions.append(action)
        qs.append(Q.copy())
        state = env.reset()[0] if terminated or truncated else next_state
    return np.array(actions), np.stack(qs)


@pytest.mark.parametrize("q0, eps, terminate_on_goal, max_episode_steps, random_start", [
    (1.0, 0.0, True, 20, False), (0.5, 0.1, True, 12, False), (1.0, 0.05, False, 9, False), (0.5, 0.0, True, 20, True)])
def test_dynaq_batched_equals_single_env_learners(q0, eps, terminate_on_goal, max_episode_steps, random_start):
    """The batched learner (envs side by side in the numpy DarkRoom, settled streams not swept) takes the same
    actions and holds the same Q, bit for bit, as plain single-env learners run one at a time in toymeta's env
    (with random starts: toymeta's env seeded with s, ours drawing from np.random.default_rng(s))."""
    goals, steps, gamma, sweeps = [(0, 0), (3, 4), (6, 2), (8, 7)], 250, 0.9, 20
    seeds = [np.random.SeedSequence([5, i]) for i in range(len(goals))]
    start_rngs = [np.random.default_rng(100 + i) for i in range(len(goals))] if random_start else None
    envs = ch.DarkRoomVectorEnv(np.array(goals), 9, terminate_on_goal, max_episode_steps, start_rngs)
    learner = tab.DynaQLearner(len(goals), 81, [np.random.default_rng(s) for s in seeds], q0, gamma, sweeps, eps)
    envs.reset(seed=0)
    actions, qs, rewards = [], [], 0
    for _ in range(steps):
        action = learner.act(envs.state)
        _, reward, terminated, truncated, info = envs.step(action)
        learner.observe(info["final_obs"], reward, terminated, terminated | truncated)
        actions.append(action)
        rewards += reward.sum()
        qs.append(learner.Q.transpose(0, 2, 1).copy())  # (env, state, action)
    actions, qs = np.stack(actions, 1), np.stack(qs, 1)
    for i, goal in enumerate(goals):
        ref_actions, ref_qs = reference_dynaq(goal, np.random.default_rng(seeds[i]), steps, q0, gamma, sweeps, eps,
                                              terminate_on_goal, max_episode_steps, random_start, 100 + i)
        np.testing.assert_array_equal(actions[i], ref_actions)
        np.testing.assert_array_equal(qs[i], ref_qs)
    assert learner.sweeps_done < 0.5 * steps * sweeps * len(goals)  # skipping was at work
    assert rewards > 0 and (qs[:, -1] != q0).mean() > 0.15  # the goal was found and much of the room was learned


@pytest.mark.parametrize("terminate_on_goal, random_start, size", [(True, False, 9), (False, False, 9), (True, True, 9),
                                                                   (True, True, 13)])
def test_dynaq_histories_replay_in_toymeta(tmp_path, capsys, terminate_on_goal, random_start, size):
    """Every stream's actions, replayed in toymeta's DarkRoom under gymnasium's TimeLimit, give its history (with random
    starts, each episode of the replay is put on the start cell of the history's episode)."""
    out, limit = tmp_path / "h", 20 if terminate_on_goal else 7
    args = ["--histories-dir", str(out), "--source", "dynaq", "--num-envs", "4", "--history-len", "1200",
            "--max-episode-steps", str(limit), "--tasks", "0,0", "3,4", "7,2", "--size", str(size),
            *([] if terminate_on_goal else ["--no-terminate-on-goal"]), *(["--random-start"] if random_start else [])]
    assert run(tmp_path, *args) == 0
    paths = glob.glob(str(out / "*" / "*.npz"))
    assert len(paths) == 3
    rewards = 0
    for path in paths:
        arrays, meta = load(path)
        check_dynamics(arrays, meta)
        rewards += arrays["rewards"].sum()
        assert meta["source"] == "dynaq" and meta["algo"] == {"num_envs": 4, "dynaq_q0": 0.5, "dynaq_gamma": 0.9,
                                                               "dynaq_sweeps": 20, "dynaq_eps": 0.0, "history_len": 1200}
        assert meta["env"] == {"size": size, "terminate_on_goal": terminate_on_goal, "max_episode_steps": limit,
                               **({"random_start": True} if random_start else {})}
        for stream in range(4):
            env = toymeta_env(size, tuple(meta["goal"]), terminate_on_goal, limit, random_start=False)

            def reset():
                state, info = env.reset(seed=0)
                if random_start:  # the history's start cell of this episode
                    state = int(arrays["states"][stream, len(replay["states"])])
                    env.unwrapped.agent_pos = np.array(divmod(state, size), dtype=np.float32)
                return state, info

            replay = {key: [] for key in ch.HISTORY_KEYS}
            state, info = reset()
            for action in arrays["actions"][stream]:
                next_state, reward, terminated, truncated, next_info = env.step(int(action))
                for key, value in zip(ch.HISTORY_KEYS, [state, action, reward, next_state, terminated,
                                                        truncated and not terminated, info["timestep"]]):
                    replay[key].append(value)
                if len(replay["states"]) < arrays["states"].shape[1]:
                    state, info = reset() if terminated or truncated else (next_state, next_info)
            for key, dtype in ch.HISTORY_KEYS.items():
                np.testing.assert_array_equal(arrays[key][stream], np.array(replay[key]).astype(dtype), err_msg=key)
    assert rewards > (20 if size == 9 else 5)  # goals were reached, so rewards and terminations were replayed too
    # a rerun into the same directory with another dynaq flag is refused
    capsys.readouterr()
    assert run(tmp_path, *args, "--dynaq-sweeps", "5") == 1
    assert "was made with another config (algo:" in capsys.readouterr().err


def test_dynaq_learns(tmp_path):
    """From scratch, success is rare in the first episodes and certain after about 25 (measured on these goals, a
    far corner among them, with the default q0 0.5: 0.17 in episode 1, 0.72 in episode 10, 0.74-0.80 in episodes
    11-14, >= 0.94 from episode 22, 1.0 from 27). Optimism draws a stream to the pairs it has not tried until it
    finds the goal; then it goes to the goal every time."""
    out = tmp_path / "h"
    args = ["--histories-dir", str(out), "--source", "dynaq", "--num-envs", "50", "--history-len", "40000",
            "--tasks", "0,0", "3,4", "6,2", "2,7"]
    assert run(tmp_path, *args) == 0
    success = []  # (stream, episode)
    for path in glob.glob(str(out / "*" / "*.npz")):
        arrays, _ = load(path)
        success += [[s for _, s in episodes_of(arrays, stream)[:40]] for stream in range(50)]
    success = np.array(success)
    assert success.shape == (200, 40)
    assert success[:, :3].mean() < 0.3
    assert 0.5 < success[:, 10:13].mean() < 0.9
    assert (success[:, 30:40].mean(0) >= 0.95).all()


def test_dynaq_planning_propagates_the_reward():
    """Without optimism (q0 0) and without random actions, a stream random-walks until it finds the goal; the
    sweeps then carry the reward back along the known path, so the very next episode walks straight to the goal
    by the shortest path it knows. With a single sweep per step the reward has not spread that far."""
    goals = [(2, 1), (1, 6), (6, 1), (7, 7), (2, 3)] * 10  # 3 to 6 steps away: a random walk finds them
    arrived = {}
    for sweeps in (20, 1):
        envs = ch.DarkRoomVectorEnv(np.array(goals), 9, True, 20)
        learner = tab.DynaQLearner(len(goals), 81, [np.random.default_rng(i) for i in range(len(goals))], 0.0, 0.9,
                                  sweeps, 0.0)
        found = np.zeros(len(goals), bool)  # the episode after the first success is under way
        first_length = np.zeros(len(goals), np.int64)
        arrived[sweeps] = np.full(len(goals), -1)  # that episode's length if it reached the goal, 0 if not, -1 not yet
        envs.reset(seed=0)
        for _ in range(20000):
            learner.act(envs.state)
            timestep = envs.timestep
            _, reward, terminated, truncated, info = envs.step(learner.actions)
            learner.observe(info["final_obs"], reward, terminated, terminated | truncated)
            ended = terminated | truncated
            done = found & ended & (arrived[sweeps] < 0)
            arrived[sweeps][done] = np.where(terminated[done], timestep[done] + 1, 0)
            first_length = np.where(~found & terminated, timestep + 1, first_length)
            found |= terminated
            if (arrived[sweeps] >= 0).all():
                break
        assert (arrived[sweeps] >= 0).all()
        if sweeps == 20:
            distance = np.array([abs(r - 4) + abs(c - 4) for r, c in goals])
            assert (arrived[20] >= distance).all() and (arrived[20] <= first_length).all()
            assert (first_length > distance).mean() > 0.5  # the random walks were not the shortest paths
            assert (arrived[20] == distance).mean() > 0.5  # (measured: 0.78) the shortest known is often the shortest
    # the same random walks (Q is 0 everywhere until the goal is found), but the reward spreads one step per step:
    # (measured: 42 of 50) the next episode misses the goal or takes longer
    assert ((arrived[1] == 0) | (arrived[1] > arrived[20])).mean() > 0.6
