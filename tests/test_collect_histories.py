"""Tests of collect_histories.py: env parity with toymeta, batched A2C = independent A2C, history files, resume, errors
(the per-stream sources of collect_histories_tabular.py, which shares its env and history writer: test_collect_histories_tabular.py)."""
import glob
import inspect
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time

from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro
from toymeta.dark_room import DarkRoom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import a2c_darkroom  # noqa: E402
import collect_histories as ch  # noqa: E402

SCRIPT = os.path.join(ROOT, "collect_histories.py")
TINY = ["--num-envs", "2", "--num-steps", "5", "--total-timesteps", "400", "--history-len", "300", "--log-every", "10"]
ALL_GOALS = [(r, c) for r in range(9) for c in range(9) if (r, c) != (4, 4)]


def run_in_process(cwd, *args, script=SCRIPT):
    """Run the script as __main__ in this process (fast: no imports); returns the exit code (0 if none)."""
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [script, *args]
    os.chdir(cwd)
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        torch.set_num_threads(1)


def interrupt(args, cwd, wait_for=None, after=0.0):
    """Run a script and send it Ctrl-C `after` seconds after `wait_for` appears on its stderr (or after its start).

    Returns the exit code and the lines of stderr without the progress bars (the line on_interrupt prints follows
    the bar it interrupts).
    """
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 60
        while wait_for and wait_for not in "".join(stderr) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:  # a test that failed above leaves no script running
            proc.kill()
            proc.wait()
    lines = "".join(stderr).replace("\r", "\n").split("\n")  # progress bars redraw with \r
    lines = [line[line.index("interrupted: "):] if "interrupted: " in line else line.strip() for line in lines]
    return proc.returncode, [line for line in lines if line and "%|" not in line]


def files_under(path):
    return sorted(os.path.relpath(p, path) for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))


def load(path):
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, json.loads(arrays.pop("metadata").item())


# ---------------------------------------------------------------------------------------------- the vectorized env


class EpisodeTimestep(gym.Wrapper):
    """Puts the within-episode time step (steps taken so far, 0 at reset) in `info["timestep"]`."""

    def reset(self, **kwargs):
        self.timestep = 0
        obs, info = self.env.reset(**kwargs)
        return obs, {**info, "timestep": 0}

    def step(self, action):
        self.timestep += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "timestep": self.timestep}


def toymeta_env(size, goal, terminate_on_goal, max_episode_steps, random_start):
    """a2c_darkroom.make_env's env (toymeta DarkRoom + TimeLimit) with the episode's timestep, with or without random starts."""
    env = DarkRoom(size=size, goal=goal, random_start=random_start, terminate_on_goal=terminate_on_goal)
    return EpisodeTimestep(gym.wrappers.TimeLimit(env, max_episode_steps=max_episode_steps))


@pytest.mark.parametrize("terminate_on_goal, max_episode_steps, random_start",
                         [(t, n, False) for t in (True, False) for n in (1, 3, 20)] + [(True, 1, True), (False, 20, True)])
def test_vector_env_matches_toymeta_with_time_limit(terminate_on_goal, max_episode_steps, random_start):
    """All 80 goals side by side: toymeta DarkRoom + TimeLimit (a2c_darkroom.make_env) in a SAME_STEP SyncVectorEnv.
    With random starts, env i of the reference is seeded with i (SyncVectorEnv's reset(seed=0)), and ours draws the
    starts of env i from np.random.default_rng(i): the same cells, episode after episode."""
    ref = gym.vector.SyncVectorEnv(
        [partial(toymeta_env, 9, goal, terminate_on_goal, max_episode_steps, random_start) for goal in ALL_GOALS],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    start_rngs = [np.random.default_rng(i) for i in range(len(ALL_GOALS))] if random_start else None
    ours = ch.DarkRoomVectorEnv(np.array(ALL_GOALS), 9, terminate_on_goal, max_episode_steps, start_rngs)
    obs_ref, info_ref = ref.reset(seed=0)
    obs, info = ours.reset(seed=0)
    np.testing.assert_array_equal(obs, obs_ref)
    np.testing.assert_array_equal(info["timestep"], info_ref["timestep"])
    rng = np.random.default_rng(max_episode_steps)
    favourite = rng.integers(0, 5, len(ALL_GOALS))  # a drift per env, so walls and far goals are reached too
    counts, starts = {"ended": 0, "rewards": 0, "both": 0, "wall": 0}, obs.tolist()
    for _ in range(300):
        actions = np.where(rng.random(len(ALL_GOALS)) < 0.5, favourite, rng.integers(0, 5, len(ALL_GOALS)))
        before = obs.copy()
        obs_ref, r_ref, term_ref, trunc_ref, info_ref = ref.step(actions)
        obs, r, term, trunc, info = ours.step(actions)
        np.testing.assert_array_equal(obs, obs_ref)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_array_equal(term, term_ref)
        np.testing.assert_array_equal(trunc, trunc_ref)  # raw TimeLimit flags: both True on a last step at the goal
        np.testing.assert_array_equal(info["timestep"], info_ref["timestep"])
        ended = term_ref | trunc_ref
        if ended.any():
            np.testing.assert_array_equal(info["final_obs"][ended], info_ref["final_obs"][ended].astype(np.int64))
        np.testing.assert_array_equal(info["final_obs"][~ended], obs[~ended])
        counts["ended"] += ended.sum()
        starts += obs[ended].tolist()
        counts["rewards"] += r.sum()
        counts["both"] += (term & trunc).sum()
        counts["wall"] += ((info["final_obs"] == before) & (actions != 0)).sum()
    assert counts["ended"] > 100 and counts["rewards"] > 20
    if max_episode_steps >= 20:
        assert counts["wall"] > 100  # moves into a wall leave the agent where it was
    if terminate_on_goal and max_episode_steps <= 3:
        assert counts["both"] > 0  # the case where toymeta's TimeLimit reports terminated and truncated
    starts = np.array(starts)
    if random_start:
        assert len(set(starts.tolist())) == 81  # every cell was a start, the goals included
    else:
        assert (starts == 40).all()


def test_random_starts_of_a_block_depend_on_that_block_only():
    """Envs that share a start generator draw their starts in env order; another block's resets change nothing."""
    goals = np.array([(0, 0)] * 6)
    a = ch.DarkRoomVectorEnv(goals, 9, True, 5, [np.random.default_rng(7), np.random.default_rng(8)])
    b = ch.DarkRoomVectorEnv(goals[:3], 9, True, 5, [np.random.default_rng(7)])
    rng = np.random.default_rng(0)
    obs_a, _ = a.reset()
    obs_b, _ = b.reset()
    for _ in range(40):
        actions = rng.integers(0, 5, 6)
        actions[3:] = 0 if rng.random() < 0.5 else actions[3:]  # the second block resets on its own schedule
        np.testing.assert_array_equal(obs_a[:3], obs_b)
        obs_a = a.step(actions)[0]
        obs_b = b.step(actions[:3])[0]
    with pytest.raises(ValueError, match="equal division"):  # the envs must split into equal blocks
        ch.DarkRoomVectorEnv(goals, 9, True, 5, [np.random.default_rng(0)] * 4)


# ---------------------------------------------------------------------------------------------- batched A2C


def test_helpers_are_identical_copies_of_a2c_darkroom():
    for name in ["layer_init", "nstep_returns", "on_interrupt", "available_memory", "check_writable", "write_atomic"]:
        assert inspect.getsource(getattr(ch, name)) == inspect.getsource(getattr(a2c_darkroom, name)), name


def test_env_is_ad_dt_s_copy():
    """ad_dt.py runs alone with its own copy of the env, the same code: the parity tests above hold for both."""
    import ad_dt

    assert inspect.getsource(ch.DarkRoomVectorEnv) == inspect.getsource(ad_dt.DarkRoomVectorEnv)
    for name in ["check_writable", "write_atomic", "available_memory"]:  # one way of writing outputs, of sizing memory
        assert inspect.getsource(getattr(ch, name)) == inspect.getsource(getattr(ad_dt, name)), name
    assert (ch.MOVES, ch.NUM_ACTIONS, ch.FORMAT_VERSION) == (ad_dt.MOVES, ad_dt.NUM_ACTIONS, ad_dt.FORMAT_VERSION)


def test_ctrl_c_handler_is_the_same_in_every_script():
    def block(name):
        text = open(os.path.join(ROOT, name)).read()
        return text[text.index("import os\nimport signal\n"):text.index("signal.signal(signal.SIGINT, on_interrupt)\n")]

    blocks = [block(name) for name in ["collect_histories.py", "collect_histories_tabular.py", "a2c_darkroom.py", "ad_dt.py", "eval_ad.py"]]
    assert all(b == blocks[0] for b in blocks) and "sys.exit(130)" in blocks[0]


def test_init_matches_a2c_darkroom_agent():
    agent = ch.BatchedAgent([7, 11], 81, 5, 16)
    for i, seed in enumerate([7, 11]):
        torch.manual_seed(seed)
        ref = a2c_darkroom.Agent(81, 5, 16)
        assert torch.equal(agent.embedding[i], ref.embedding.weight.T)
        assert torch.equal(agent.actor_weight[i], ref.actor.weight) and torch.equal(agent.actor_bias[i], ref.actor.bias)
        assert torch.equal(agent.critic_weight[i], ref.critic.weight) and torch.equal(agent.critic_bias[i], ref.critic.bias)
    assert not torch.equal(agent.embedding[0], agent.embedding[1])


def random_rollout(rng, T=8, E=3, S=81):
    return (
        torch.from_numpy(rng.integers(0, S, (T, E))),  # obs
        torch.from_numpy(rng.integers(0, 5, (T, E))),  # actions
        torch.from_numpy((rng.random((T, E)) < 0.3).astype(np.float32)),  # rewards
        torch.from_numpy(rng.random((T, E)) < 0.15),  # terminated
        torch.from_numpy(rng.random((T, E)) < 0.15),  # truncated (before & ~terminated)
        torch.from_numpy(rng.integers(0, S, (T, E))),  # true next obs
    )


def test_batched_update_matches_a2c_darkroom_update():
    """Three agents in one batch, each against its own a2c_darkroom Agent + nstep_returns + a2c_loss + clip + Adam."""
    seeds, lr, gamma, ent_coef, vf_coef, max_grad_norm = [3, 4, 5], 1e-2, 0.9, 0.01, 0.99, 0.5
    batched = ch.BatchedAgent(seeds, 81, 5, 32)
    opt = torch.optim.Adam(batched.parameters(), lr=lr, eps=1e-6, fused=True)
    refs, ref_opts = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        refs.append(a2c_darkroom.Agent(81, 5, 32))
        ref_opts.append(torch.optim.Adam(refs[-1].parameters(), lr=lr, eps=1e-6))
    rng = np.random.default_rng(0)
    clipped = 0
    for _ in range(3):
        rollouts = [random_rollout(rng) for _ in seeds]
        batch_obs, batch_actions, batch_returns, ref_norms = [], [], [], []
        for ref, ref_opt, (obs, actions, rewards, terminated, truncated, next_obs) in zip(refs, ref_opts, rollouts):
            with torch.no_grad():
                returns = a2c_darkroom.nstep_returns(rewards, terminated, truncated & ~terminated, ref.get_value(next_obs), gamma)
            loss, *_ = a2c_darkroom.a2c_loss(ref, obs.reshape(-1), actions.reshape(-1), returns.reshape(-1), ent_coef, vf_coef)
            ref_opt.zero_grad()
            loss.backward()
            ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)))
            ref_opt.step()
            batch_obs.append(obs.reshape(-1))
            batch_actions.append(actions.reshape(-1))
            batch_returns.append(returns.reshape(-1))
        logits, values = batched.tables()
        *_, norms = ch.a2c_update(batched, opt, logits, values, torch.stack(batch_obs), torch.stack(batch_actions),
                                  torch.stack(batch_returns), ent_coef, vf_coef, max_grad_norm)
        np.testing.assert_allclose(norms.numpy(), ref_norms, rtol=1e-5)
        clipped += sum(n > max_grad_norm for n in ref_norms)
    assert clipped >= 3  # clipping was active, so per-agent clipping is what is compared
    for i, ref in enumerate(refs):
        torch.testing.assert_close(batched.embedding[i], ref.embedding.weight.T, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.actor_weight[i], ref.actor.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.actor_bias[i], ref.actor.bias, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.critic_weight[i], ref.critic.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.critic_bias[i], ref.critic.bias, atol=1e-6, rtol=0)
    # and the parameters did move (lr 1e-2, three steps), so the comparison above means something
    torch.manual_seed(seeds[0])
    assert (batched.actor_weight[0] - a2c_darkroom.Agent(81, 5, 32).actor.weight).abs().max() > 1e-3


def test_one_agents_update_ignores_the_other_agents_data():
    rng = np.random.default_rng(1)
    obs = torch.from_numpy(rng.integers(0, 81, (2, 40)))
    actions = torch.from_numpy(rng.integers(0, 5, (2, 40)))
    returns = torch.from_numpy(rng.random((2, 40)).astype(np.float32))
    results = []
    for scale in [1.0, 1000.0]:  # agent 1's returns blown up: a global clip or a shared mean would leak into agent 0
        agent = ch.BatchedAgent([0, 1], 81, 5, 32)
        opt = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-6, fused=True)
        perturbed_obs = obs.clone()
        if scale != 1.0:
            perturbed_obs[1] = torch.from_numpy(rng.integers(0, 81, 40))
        for _ in range(2):
            logits, values = agent.tables()
            ch.a2c_update(agent, opt, logits, values, perturbed_obs, actions,
                          returns * torch.tensor([[1.0], [scale]]), 0.01, 0.99, 0.5)
        results.append([p.detach().clone() for p in agent.parameters()])
    for p_clean, p_perturbed in zip(*results):
        assert torch.equal(p_clean[0], p_perturbed[0])
    assert not torch.equal(results[0][0][1], results[1][0][1])


def test_gradient_clipping_is_per_agent():
    grads = [torch.zeros(3, 4, 5), torch.zeros(3, 2)]
    grads[0][0, 0, 0], grads[1][0, 0] = 0.06, 0.08  # agent 0: norm 0.1, under the limit
    grads[0][1].fill_(1.0)  # agent 1: norm sqrt(20), clipped to 0.5
    grads[1][2, 1] = 7.0  # agent 2: norm 7, clipped to 0.5
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norms = ch.clip_grad_norm_per_agent_(params, 0.5)
    np.testing.assert_allclose(norms.numpy(), [0.1, 20**0.5, 7.0], rtol=1e-6)
    after = torch.stack([torch.cat([p.grad[i].flatten() for p in params]).norm() for i in range(3)])
    np.testing.assert_allclose(after.numpy(), [0.1, 0.5, 0.5], rtol=1e-5)
    torch.testing.assert_close(params[0].grad[0], grads[0][0])  # agent 0 untouched


# ---------------------------------------------------------------------------------------------- the script


def check_dynamics(arrays, meta):
    """Every transition follows DarkRoom + TimeLimit, episodes start at the centre (anywhere with random starts),
    timesteps restart after every end."""
    size, goal = meta["env"]["size"], meta["goal"]
    limit, terminate = meta["env"]["max_episode_steps"], meta["env"]["terminate_on_goal"]
    s, a = arrays["states"].astype(np.int64), arrays["actions"].astype(np.int64)
    row, col = np.divmod(s, size)
    drow = np.array([0, -1, 0, 1, 0])[a]
    dcol = np.array([0, 0, 1, 0, -1])[a]
    expected_next = np.clip(row + drow, 0, size - 1) * size + np.clip(col + dcol, 0, size - 1)
    np.testing.assert_array_equal(arrays["next_states"], expected_next)
    at_goal = arrays["next_states"] == goal[0] * size + goal[1]
    np.testing.assert_array_equal(arrays["rewards"], at_goal)  # rewards only on the goal, always on the goal
    np.testing.assert_array_equal(arrays["terminated"], at_goal & terminate)
    np.testing.assert_array_equal(arrays["truncated"], (arrays["timesteps"] == limit - 1) & ~arrays["terminated"])
    ended = arrays["terminated"] | arrays["truncated"]
    t = arrays["timesteps"].astype(np.int64)
    assert (t[:, 0] == 0).all()
    np.testing.assert_array_equal(t[:, 1:], np.where(ended[:, :-1], 0, t[:, :-1] + 1))
    after_reset = np.concatenate([np.ones_like(ended[:, :1]), ended[:, :-1]], axis=1)
    np.testing.assert_array_equal(arrays["states"][:, 1:][~after_reset[:, 1:]], arrays["next_states"][:, :-1][~ended[:, :-1]])
    starts = arrays["states"][after_reset]
    if meta["env"].get("random_start", False):
        assert len(np.unique(starts)) > min(10, len(starts) // 4)  # starts vary
    else:
        assert (starts == (size // 2) * size + size // 2).all()


def test_history_files_on_a_small_collection(tmp_path):
    out = tmp_path / "h"
    assert run_in_process(tmp_path, "--histories-dir", str(out), "--tasks", "all", *TINY) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks["format_version"] == 1 and tasks["split_seed"] == 0
    assert tasks["env"] == {"size": 9, "terminate_on_goal": True, "max_episode_steps": 20}
    train, test = {tuple(g) for g in tasks["train"]}, {tuple(g) for g in tasks["test"]}
    assert len(train) == 57 and len(test) == 23 and train | test == set(ALL_GOALS)
    expected = sorted([f"train/goal_{r}_{c}.npz" for r, c in train] + [f"test/goal_{r}_{c}.npz" for r, c in test]
                      + ["tasks.json", "learning_curves_all.png", "learning_curves_all.json"])
    assert files_under(out) == expected  # test tasks only in test/, nothing left behind
    successes = 0
    for part in ("train", "test"):
        for path in glob.glob(str(out / part / "*.npz")):
            arrays, meta = load(path)
            r, c = meta["goal"]
            assert os.path.basename(path) == f"goal_{r}_{c}.npz" and meta["split"] == part
            assert meta["source"] == "a2c" and meta["format_version"] == 1 and meta["seed"] == 1
            assert meta["num_streams"] == 2 and meta["steps_per_stream"] == 150
            assert meta["algo"]["learning_rate"] == 1e-4 and meta["algo"]["history_len"] == 300
            assert set(meta["versions"]) >= {"numpy", "torch", "toymeta"}
            assert set(arrays) == set(ch.HISTORY_KEYS)
            for key, dtype in ch.HISTORY_KEYS.items():
                assert arrays[key].dtype == dtype and arrays[key].shape == (2, 150), key
            check_dynamics(arrays, meta)
            successes += arrays["rewards"].sum()
    assert successes > 50  # random-ish early policies reach some goals: the goal checks above were exercised
    curves = json.loads((out / "learning_curves_all.json").read_text())
    assert curves["env_steps_per_agent"] == [100, 200, 300, 400] and len(curves["success_rate"][0]) == 80


def test_no_terminate_mode_history(tmp_path):
    out = tmp_path / "h"
    args = ["--histories-dir", str(out), "--tasks", "3,4", "4,3", "--no-terminate-on-goal", "--max-episode-steps", "7"]
    assert run_in_process(tmp_path, *args, *TINY) == 0
    paths = glob.glob(str(out / "*" / "*.npz"))
    assert len(paths) == 2
    for path in paths:
        arrays, meta = load(path)
        assert meta["env"]["terminate_on_goal"] is False
        check_dynamics(arrays, meta)
        assert not arrays["terminated"].any() and arrays["truncated"].sum() > 10
        assert (arrays["rewards"][:, 1:] & arrays["rewards"][:, :-1]).any()  # staying on the goal pays again


@pytest.mark.parametrize("size, random_start", [(9, False), (13, True)])
def test_histories_replay_through_a2c_darkroom(tmp_path, size, random_start):
    """End to end: replaying a history's rollouts through a2c_darkroom.py's update gives the collector's final agent
    (the batched agents learn as independent ones), in a larger room with random starts too."""
    out = tmp_path / "h"
    args = ["--histories-dir", str(out), "--tasks", "3,5", "5,3", "--num-envs", "3", "--num-steps", "4",
            "--total-timesteps", "240", "--history-len", "240", "--learning-rate", "0.01", "--gamma", "0.8",
            "--size", str(size), *(["--random-start"] if random_start else [])]
    assert run_in_process(tmp_path, *args) == 0
    saved = torch.load(glob.glob(str(tmp_path / "runs" / "*" / "agents.pt"))[0])
    assert [tuple(g) for g in saved["goals"]] == [(3, 5), (5, 3)]
    for i, goal in enumerate(saved["goals"]):
        arrays, meta = load(glob.glob(str(out / "*" / f"goal_{goal[0]}_{goal[1]}.npz"))[0])
        check_dynamics(arrays, meta)
        torch.manual_seed(ch.agent_seeds(1, tuple(goal), size)[0])
        ref = a2c_darkroom.Agent(size * size, 5, 128)
        opt = torch.optim.Adam(ref.parameters(), lr=0.01, eps=1e-6)
        clipped = 0
        for u in range(80 // 4):
            part = {k: torch.from_numpy(v[:, u * 4:(u + 1) * 4].T.astype(np.int64 if v.dtype == np.uint8 else bool))
                    for k, v in arrays.items()}
            with torch.no_grad():
                returns = a2c_darkroom.nstep_returns(part["rewards"].float(), part["terminated"], part["truncated"],
                                                     ref.get_value(part["next_states"]), 0.8)
            loss, *_ = a2c_darkroom.a2c_loss(ref, part["states"].reshape(-1), part["actions"].reshape(-1),
                                             returns.reshape(-1), 0.01, 0.99)
            opt.zero_grad()
            loss.backward()
            clipped += float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)) > 0.5
            opt.step()
        assert clipped > 0
        # 20 Adam steps of size ~lr = 1e-2 moved the weights by ~1e-1; rounding differences stay below 1e-4
        state = saved["agent"]
        torch.manual_seed(ch.agent_seeds(1, tuple(goal), size)[0])
        assert (a2c_darkroom.Agent(size * size, 5, 128).actor.weight - ref.actor.weight).abs().max() > 5e-2
        torch.testing.assert_close(state["embedding"][i], ref.embedding.weight.T, atol=1e-4, rtol=0)
        torch.testing.assert_close(state["actor_weight"][i], ref.actor.weight, atol=1e-4, rtol=0)
        torch.testing.assert_close(state["actor_bias"][i], ref.actor.bias, atol=1e-4, rtol=0)
        torch.testing.assert_close(state["critic_weight"][i], ref.critic.weight, atol=1e-4, rtol=0)
        torch.testing.assert_close(state["critic_bias"][i], ref.critic.bias, atol=1e-4, rtol=0)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "sgd"])
def test_fast_per_stream_a2c_replays_through_a2c_darkroom(tmp_path, optimizer):
    """The per-stream settings (several agents per goal, one env each, several updates per rollout, a zero critic,
    each optimizer): every agent of the batch is the a2c_darkroom agent its own stream's rollouts train."""
    out = tmp_path / "h"
    K, T, epochs, lr = 3, 6, 3, {"adam": 0.01, "rmsprop": 0.001, "sgd": 0.5}[optimizer]
    args = ["--histories-dir", str(out), "--tasks", "3,5", "5,3", "--num-envs", "1", "--agents-per-goal", str(K),
            "--num-steps", str(T), "--update-epochs", str(epochs), "--optimizer", optimizer, "--critic-init-std", "0",
            "--total-timesteps", "60", "--history-len", "60", "--learning-rate", str(lr), "--ent-coef", "0.05"]
    assert run_in_process(tmp_path, *args) == 0
    saved = torch.load(glob.glob(str(tmp_path / "runs" / "*" / "agents.pt"))[0])
    assert [tuple(g) for g in saved["goals"]] == [(3, 5)] * K + [(5, 3)] * K
    state = saved["agent"]
    assert not torch.equal(state["embedding"][0], state["embedding"][1])  # each agent of a goal has its own seed
    make_opt = {"adam": lambda p: torch.optim.Adam(p, lr=lr, eps=1e-6), "sgd": lambda p: torch.optim.SGD(p, lr=lr),
                "rmsprop": lambda p: torch.optim.RMSprop(p, lr=lr, eps=1e-6)}[optimizer]
    learned = 0
    for i, goal in enumerate(saved["goals"]):
        arrays, meta = load(glob.glob(str(out / "*" / f"goal_{goal[0]}_{goal[1]}.npz"))[0])
        assert meta["num_streams"] == K and meta["algo"]["update_epochs"] == epochs
        check_dynamics(arrays, meta)
        torch.manual_seed(ch.agent_seeds(1, tuple(goal), 9, i % K)[0])
        ref = a2c_darkroom.Agent(81, 5, 128)
        with torch.no_grad():
            ref.critic.weight.zero_()  # --critic-init-std 0
        opt = make_opt(ref.parameters())
        stream = {k: torch.from_numpy(v[i % K].astype(np.int64 if v.dtype == np.uint8 else bool)) for k, v in arrays.items()}
        rewarded = stream["rewards"].sum() > 0
        for u in range(60 // T):
            part = {k: v[u * T:(u + 1) * T, None] for k, v in stream.items()}  # (T, 1 env)
            for _ in range(epochs):
                with torch.no_grad():
                    returns = a2c_darkroom.nstep_returns(part["rewards"].float(), part["terminated"], part["truncated"],
                                                         ref.get_value(part["next_states"]), 0.9)
                loss, *_ = a2c_darkroom.a2c_loss(ref, part["states"].reshape(-1), part["actions"].reshape(-1),
                                                 returns.reshape(-1), 0.05, 0.99)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
                opt.step()
        for name, ref_param in [("embedding", ref.embedding.weight.T), ("actor_weight", ref.actor.weight),
                                ("actor_bias", ref.actor.bias), ("critic_weight", ref.critic.weight),
                                ("critic_bias", ref.critic.bias)]:
            # Adam scales a near-zero gradient up to a step of ~lr, so float rounding can reach ~1e-4 in 30 steps
            torch.testing.assert_close(state[name][i], ref_param, atol=1e-3, rtol=0)
        if rewarded:  # a reward moved the critic off its zero start, and the policy: the comparison means something
            torch.manual_seed(ch.agent_seeds(1, tuple(goal), 9, i % K)[0])
            assert (a2c_darkroom.Agent(81, 5, 128).actor.weight - ref.actor.weight).abs().max() > 1e-3
            assert ref.critic.weight.abs().max() > 1e-3
            learned += 1
    assert learned >= 2


@pytest.mark.parametrize("random_start", [False, True])
def test_history_does_not_depend_on_the_other_tasks(tmp_path, random_start):
    flags = [*TINY, *(["--random-start"] if random_start else [])]
    assert run_in_process(tmp_path, "--histories-dir", str(tmp_path / "a"), "--tasks", "0,1", *flags) == 0
    assert run_in_process(tmp_path, "--histories-dir", str(tmp_path / "b"), "--tasks", "0,1", "8,8", "2,2", *flags) == 0
    (a, meta_a), (b, meta_b) = [load(glob.glob(str(tmp_path / d / "*" / "goal_0_1.npz"))[0]) for d in "ab"]
    assert meta_a == meta_b
    for key in ch.HISTORY_KEYS:
        np.testing.assert_array_equal(a[key], b[key])


def test_training_past_the_history_does_not_change_it(tmp_path):
    """reproduce.sh trains A2C only as long as its histories keep (--total-timesteps = --history-len): the
    steps after the history only extend the learning-curve plot, so the kept transitions are the same."""
    short = [a if a != "400" else "300" for a in TINY]  # --total-timesteps 300 = --history-len
    assert run_in_process(tmp_path, "--histories-dir", str(tmp_path / "a"), "--tasks", "0,1", *TINY) == 0
    assert run_in_process(tmp_path, "--histories-dir", str(tmp_path / "b"), "--tasks", "0,1", *short) == 0
    (a, meta_a), (b, meta_b) = [load(glob.glob(str(tmp_path / d / "*" / "goal_0_1.npz"))[0]) for d in "ab"]
    assert (meta_a["total_timesteps"], meta_b["total_timesteps"]) == (400, 300)
    for key in ch.HISTORY_KEYS:
        np.testing.assert_array_equal(a[key], b[key])


def test_resume_skips_done_tasks_and_overwrite_redoes_them(tmp_path, capsys):
    out = tmp_path / "h"
    base = ["--histories-dir", str(out), *TINY]
    assert run_in_process(tmp_path, *base, "--tasks", "0,1") == 0
    first = out / "train" / "goal_0_1.npz"
    if not first.exists():
        first = out / "test" / "goal_0_1.npz"
    mtime = first.stat().st_mtime_ns
    content = first.read_bytes()
    time.sleep(0.01)
    capsys.readouterr()
    assert run_in_process(tmp_path, *base, "--tasks", "0,1", "0,2") == 0
    assert "collecting 1 of 2 histories (1 already done)" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == mtime
    assert len(glob.glob(str(out / "*" / "goal_0_2.npz"))) == 1
    assert run_in_process(tmp_path, *base, "--tasks", "0,1", "0,2") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert run_in_process(tmp_path, *base, "--tasks", "0,1", "--overwrite") == 0
    assert first.stat().st_mtime_ns != mtime and first.read_bytes() == content  # redone, deterministically


def test_interrupted_run_leaves_no_partial_file_and_resumes(tmp_path):
    out = tmp_path / "h"
    flags = ["--histories-dir", out, "--num-envs", "2", "--num-steps", "50", "--history-len", "20000"]
    # 80 agents: about a second (or more) before their histories are complete; Ctrl-C once the training loop has started
    code, lines = interrupt([SCRIPT, *flags, "--tasks", "all", "--total-timesteps", "10000000"], tmp_path, wait_for="a2c x80")
    assert code == 130 and len(lines) == 1, lines
    assert lines[0].startswith(f"interrupted: 0 of 80 histories written to {out}/ (rerun the same command") and "runs/" in lines[0]
    assert files_under(out) == []  # no history, no temp file, no tasks.json
    assert len(glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*"))) == 1  # the logs are kept
    # a rerun with the same flags (here: for one of the tasks) does the job
    assert run_in_process(tmp_path, *map(str, flags), "--tasks", "0,1", "--total-timesteps", "20000") == 0
    assert len(glob.glob(str(out / "*" / "goal_0_1.npz"))) == 1


def test_ctrl_c_during_imports_exits_130_with_one_line(tmp_path):
    """Imports take seconds: Ctrl-C 0.5 s after the start lands among them, and still gives one line, no traceback."""
    code, lines = interrupt([SCRIPT, "--histories-dir", tmp_path / "h", "--tasks", "0,1"], tmp_path, after=0.5)
    assert (code, lines) == (130, ["interrupted: nothing was written"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])  # SystemExit(130): what on_interrupt raises
def test_write_interrupted_midway_leaves_no_file(tmp_path, interruption):
    path = str(tmp_path / "x.npz")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise interruption(130)

    with pytest.raises(interruption):
        ch.write_atomic(path, write)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_subprocess_one_line_error_nothing_written(tmp_path):
    out = tmp_path / "h"
    result = subprocess.run([sys.executable, SCRIPT, "--histories-dir", str(out), "--tasks", "4,4"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown task '4,4'"), result.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()


# the flags a2c_darkroom.py shares: numpy's seeding refused the seeds with a traceback, the others crashed or
# misbehaved later
A2C_BAD_INPUT = [
    (["--seed", "-1"], "--seed must be in 0..2**32-1"),
    (["--seed", str(2**32)], "--seed must be in 0..2**32-1"),
    (["--learning-rate", "-1"], "--learning-rate must be in (0, 1]"),
    (["--learning-rate", "0"], "--learning-rate must be in (0, 1]"),
    (["--learning-rate", "nan"], "--learning-rate must be in (0, 1]"),
    (["--learning-rate", "inf"], "--learning-rate must be in (0, 1]"),
    (["--learning-rate", "1e30"], "--learning-rate must be in (0, 1]"),  # exited 0 with histories frozen on noop
    (["--learning-rate", "1.5"], "--learning-rate must be in (0, 1]"),
    (["--adam-eps", "0"], "--adam-eps must be positive"),
    (["--adam-eps", "-1e-6"], "--adam-eps must be positive"),
    (["--num-steps", "0"], "--num-steps must be positive"),
    (["--max-episode-steps", "0"], "--max-episode-steps must be positive"),
    (["--hidden-size", "0"], "--hidden-size must be positive"),
    (["--log-every", "0"], "--log-every must be positive"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--gamma", "nan"], "--gamma must be in [0, 1]"),
    (["--ent-coef", "-0.01"], "--ent-coef must be at least 0"),
    (["--vf-coef", "inf"], "--vf-coef must be at least 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be positive"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be positive"),
    (["--exp-name", "a/b"], "--exp-name must be a non-empty file name"),
    (["--exp-name", ""], "--exp-name must be a non-empty file name"),
]
# the flags of both collectors (collect_histories_tabular.py's tests run these too)
COMMON_BAD_INPUT = [
    (["--tasks", "9,0"], "unknown task '9,0'"),
    (["--tasks", "train", "north"], "unknown task 'north'"),
    (["--tasks", "1,2,3"], "unknown task '1,2,3'"),
    (["--tasks", "4,4"], "unknown task '4,4'"),
    (["--num-train-tasks", "0"], "--num-train-tasks must be in 1..79"),
    (["--num-train-tasks", "80"], "--num-train-tasks must be in 1..79"),
    (["--num-envs", "0"], "--num-envs must be positive"),
    (["--history-len", "-5"], "--history-len must be positive"),
    (["--history-len", "0"], "--history-len must be positive"),
    (["--size", "0"], "--size must be positive"),
    (["--size", "17"], "need --size <= 16"),
    (["--size", "1"], "--size must be at least 2"),
    (["--max-episode-steps", "257"], "need --size <= 16 and --max-episode-steps <= 256"),
    (["--split-seed", "-1"], "--split-seed must be at least 0"),
    (["--log-every", "0"], "--log-every must be positive"),
    (["--seed", "-1"], "--seed must be in 0..2**32-1"),
    (["--exp-name", "a/b"], "--exp-name must be a non-empty file name"),
]
BAD_INPUT = [
    *COMMON_BAD_INPUT,
    (["--total-timesteps", "0"], "--total-timesteps must be positive"),
    (["--num-envs", "10", "--history-len", "3000000"], "--history-len 3000000 is more than the 2500000 env steps"),
    (["--num-envs", "10", "--history-len", "1050", "--total-timesteps", "1099"], "--history-len 1050 is more than the 1000 env steps"),
    (["--num-threads", "0"], "--num-threads must be in 1..1024"),
    (["--num-threads", "100000"], "--num-threads must be in 1..1024"),  # crashed torch
    (["--agents-per-goal", "0"], "--agents-per-goal must be positive"),
    *[case for case in A2C_BAD_INPUT if case not in COMMON_BAD_INPUT],
]


def check_the_one_gate(module, args, message):
    """Every bad flag is refused by the collector's check_args itself, before the script reads or writes anything."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        module.check_args(tyro.cli(module.Args, args=args))
    module.check_args(tyro.cli(module.Args, args=["--tasks", "all", "0,1", "test"]))  # and good flags pass


def check_one_line_error(tmp_path, capsys, script, args, message):
    """The script run on bad flags: one `error:` line naming them, and nothing written."""
    out = tmp_path / "h"
    assert run_in_process(tmp_path, "--histories-dir", str(out), *args, script=script) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_check_args_is_the_one_gate(args, message):
    check_the_one_gate(ch, args, message)


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_errors(tmp_path, capsys, args, message):
    check_one_line_error(tmp_path, capsys, SCRIPT, args, message)


@pytest.mark.parametrize("script", [ch, a2c_darkroom])
def test_cuda_without_a_gpu_is_an_error(monkeypatch, script):
    """It used to run on the CPU without a word."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=re.escape("error: --cuda must be left out on a machine without a CUDA GPU")):
        script.check_args(tyro.cli(script.Args, args=["--cuda"]))
    script.check_args(tyro.cli(script.Args, args=[]))


def test_histories_dir_that_is_a_file_is_an_error(tmp_path, capsys):
    (tmp_path / "h").write_text("mine")
    assert run_in_process(tmp_path, "--histories-dir", str(tmp_path / "h"), "--tasks", "0,1", *TINY) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --histories-dir must be a directory, not a file, got {tmp_path / 'h'}"]
    assert (tmp_path / "h").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["h"]


@pytest.mark.parametrize("blocked", ["runs", "parent", "h/train"])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, blocked):
    """A directory the outputs cannot be written to: one line up front (a file in the way works as root too)."""
    out = tmp_path / "parent" / "h" if blocked == "parent" else tmp_path / "h"
    (tmp_path / blocked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocked).write_text("in the way")
    assert run_in_process(tmp_path, "--histories-dir", str(out), "--tasks", "0,1", *TINY) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and ("--histories-dir" in err[0] or "runs/" in err[0]), err
    assert not glob.glob(str(tmp_path / "**" / "*.*"), recursive=True)  # no tasks.json, history or log


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_runs_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs").chmod(0o555)
    try:
        assert run_in_process(tmp_path, "--histories-dir", str(tmp_path / "h"), "--tasks", "0,1", *TINY) == 1
    finally:
        (tmp_path / "runs").chmod(0o755)
    assert "error: cannot write runs/" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "**" / "*.*"), recursive=True)


def test_too_large_for_memory_is_an_error(tmp_path, capsys, monkeypatch):
    big = ["--num-envs", "10", "--history-len", str(10**14), "--total-timesteps", str(10**14), "--tasks", "0,1"]  # 7 bytes a step: 637 TiB
    assert run_in_process(tmp_path, "--histories-dir", str(tmp_path / "h"), *big) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: collecting 1 task\(s\) needs about 6519\d\d\.\d GiB, [\d.]+ GiB more than the "
                                      r"[\d.]+ GiB available: lower --history-len, --num-envs, --agents-per-goal or --hidden-size, "
                                      r"or collect fewer --tasks at once$", err[0]), err
    assert os.listdir(tmp_path) == []
    # refused only when over what is available
    args = tyro.cli(ch.Args, args=["--num-envs", "10", "--history-len", "100000"])
    monkeypatch.setattr(ch, "available_memory", lambda: 2**29)
    ch.check_memory(args, 80, 0)  # 80 agents x 10 streams x 10000 steps x 7 bytes = 56 MB, + 0.3 GiB for the rest
    with pytest.raises(SystemExit, match=r"collecting 80 task\(s\) needs about 0\.8 GiB, 0\.3 GiB more than the 0\.5 GiB "
                                         r"available"):
        ch.check_memory(tyro.cli(ch.Args, args=["--num-envs", "10", "--history-len", "1000000", "--total-timesteps", "1000000"]),
                        80, 0)
    with pytest.raises(SystemExit, match=r"needs about 1\.6 GiB"):  # and each source's learners count: here 10 MB a goal
        ch.check_memory(tyro.cli(ch.Args, args=["--num-envs", "10", "--history-len", "1000000", "--total-timesteps", "1000000"]),
                        80, 10**7)


def test_failed_run_leaves_nothing_that_blocks_another_config(tmp_path, capsys, monkeypatch):
    out = tmp_path / "h"
    # the command: refused before anything is written
    assert run_in_process(tmp_path, "--tasks", "0,0", "--learning-rate", "-1", "--histories-dir", str(out)) == 1
    assert not out.exists()

    # a run that fails while writing its first history (a full disk, say) leaves only tasks.json ...
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez_compressed", full_disk)
        with pytest.raises(OSError, match="No space left"):
            run_in_process(tmp_path, "--histories-dir", str(out), "--tasks", "0,1", *TINY)
    assert files_under(out) == ["tasks.json"]
    # ... which does not block the corrected rerun, with another config: its tasks.json replaces the old one
    assert run_in_process(tmp_path, "--histories-dir", str(out), "--tasks", "0,1", *TINY, "--learning-rate", "0.001") == 0
    assert json.loads((out / "tasks.json").read_text())["algo"]["learning_rate"] == 0.001
    assert len(glob.glob(str(out / "*" / "goal_0_1.npz"))) == 1
    # once a history is there, another config is refused again
    capsys.readouterr()
    assert run_in_process(tmp_path, "--histories-dir", str(out), "--tasks", "0,2", *TINY) == 1
    assert "was made with another config (algo:" in capsys.readouterr().err


def test_lost_tasks_json_is_rebuilt_by_the_same_command(tmp_path, capsys):
    out = tmp_path / "h"
    base = ["--histories-dir", str(out), *TINY]
    assert run_in_process(tmp_path, *base, "--tasks", "0,1", "0,2") == 0
    original = (out / "tasks.json").read_text()
    histories = {p: os.stat(out / p).st_mtime_ns for p in files_under(out) if p.endswith(".npz")}
    # another config is refused (its histories' metadata say so), and writes no tasks.json
    (out / "tasks.json").unlink()
    capsys.readouterr()
    assert run_in_process(tmp_path, *base, "--tasks", "0,1", "0,2", "--seed", "2") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made with another config (seed: 1 != 2)" in err[0], err
    assert not (out / "tasks.json").exists()
    # the same flags rebuild it, with nothing else to do; naming fewer tasks still checks every history there
    for tasks in (["0,1", "0,2"], ["0,1"]):
        (out / "tasks.json").unlink(missing_ok=True)
        assert run_in_process(tmp_path, *base, "--tasks", *tasks) == 0
        assert "nothing to do but rebuild the lost" in capsys.readouterr().out
        assert (out / "tasks.json").read_text() == original
    # and with more to do, it is written with the next history
    (out / "tasks.json").unlink()
    assert run_in_process(tmp_path, *base, "--tasks", "0,1", "0,2", "0,3") == 0
    assert (out / "tasks.json").read_text() == original
    assert {p: os.stat(out / p).st_mtime_ns for p in histories} == histories


@pytest.mark.parametrize("content", ["[1, 2]", '{"format_version": 1}', "not json", "directory"])
def test_tasks_json_that_is_not_ours_is_an_error(tmp_path, capsys, content):
    out = tmp_path / "h"
    out.mkdir()
    if content == "directory":
        (out / "tasks.json").mkdir()
    else:
        (out / "tasks.json").write_text(content)
    assert run_in_process(tmp_path, "--histories-dir", str(out), "--tasks", "0,1", *TINY) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out / 'tasks.json'} is ") and "rebuilt" in err[0], err
    assert files_under(out) == ([] if content == "directory" else ["tasks.json"])


def test_byte_flipped_history_is_an_error(tmp_path, capsys):
    out = tmp_path / "h"
    base = ["--histories-dir", str(out), "--tasks", "0,1", *TINY]
    assert run_in_process(tmp_path, *base) == 0
    (path,) = glob.glob(str(out / "*" / "goal_0_1.npz"))
    data = open(path, "rb").read()
    for where in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        flipped = bytearray(data)
        flipped[where] ^= 0xFF
        with open(path, "wb") as f:
            f.write(flipped)
        capsys.readouterr()
        assert run_in_process(tmp_path, *base) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is corrupt or incomplete" in err[0] and "--overwrite" in err[0], err


def test_corrupt_existing_history_is_an_error(tmp_path, capsys):
    out = tmp_path / "h"
    base = ["--histories-dir", str(out), "--tasks", "0,1", "0,2", *TINY]
    assert run_in_process(tmp_path, *base) == 0
    path = glob.glob(str(out / "*" / "goal_0_1.npz"))[0]
    data = open(path, "rb").read()
    for broken in [data[: len(data) // 2], b"not a zip file"]:
        with open(path, "wb") as f:
            f.write(broken)
        before = files_under(out), [os.stat(out / p).st_mtime_ns for p in files_under(out)]
        capsys.readouterr()
        assert run_in_process(tmp_path, *base) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is corrupt or incomplete" in err[0] and "--overwrite" in err[0], err
        assert (files_under(out), [os.stat(out / p).st_mtime_ns for p in files_under(out)]) == before
    # a history of the right format but the wrong shape (e.g. written by hand) is refused too
    arrays, meta = load(glob.glob(str(out / "*" / "goal_0_2.npz"))[0])
    arrays["states"] = arrays["states"][:, :-1]
    np.savez_compressed(path, metadata=np.array(json.dumps(meta)), **arrays)
    assert run_in_process(tmp_path, *base) != 0
    assert "was made with another config (goal: [0, 2] != [0, 1])" in capsys.readouterr().err  # its metadata speaks first
    np.savez_compressed(path, metadata=np.array(json.dumps({**meta, "goal": [0, 1]})), **arrays)
    assert run_in_process(tmp_path, *base) != 0
    assert "is corrupt: states is uint8(2, 149)" in capsys.readouterr().err
    assert run_in_process(tmp_path, *base, "--overwrite") == 0
    check_dynamics(*load(path))


@pytest.mark.parametrize("change", [["--split-seed", "1"], ["--learning-rate", "0.001"], ["--num-envs", "3"],
                                    ["--no-terminate-on-goal"], ["--seed", "2"]])
def test_dir_made_with_another_config_is_an_error(tmp_path, capsys, change):
    out = tmp_path / "h"
    assert run_in_process(tmp_path, "--histories-dir", str(out), "--tasks", "0,1", *TINY) == 0
    before = [(p, os.stat(out / p).st_mtime_ns) for p in files_under(out)]
    capsys.readouterr()
    assert run_in_process(tmp_path, "--histories-dir", str(out), "--tasks", "0,2", *TINY, *change) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made with another config" in err[0], err
    assert [(p, os.stat(out / p).st_mtime_ns) for p in files_under(out)] == before


def test_select_tasks_and_split():
    split = ch.make_split(9, 57, 0)
    assert split == ch.make_split(9, 57, 0) and split != ch.make_split(9, 57, 1)
    assert ch.select_tasks(("test",), split, 9) == [(g, "test") for g in split["test"]]
    assert len(ch.select_tasks(("all",), split, 9)) == 80
    goal = split["test"][0]
    chosen = dict(ch.select_tasks((f"{goal[0]},{goal[1]}", "train"), split, 9))
    assert chosen[goal] == "test" and len(chosen) == 58
