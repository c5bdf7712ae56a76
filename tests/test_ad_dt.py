"""Tests of ad_dt.py: data checks and pace, the window sampler, the KV cache, the eval env, and a tiny end-to-end run."""
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from toymeta.dark_room import DarkRoom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ad_dt  # noqa: E402

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (and CI machines are shared)

ENV = {"size": 9, "terminate_on_goal": True, "max_episode_steps": 20}
TRAIN_GOALS = [[1, 2], [6, 7], [3, 3], [8, 0]]
TEST_GOALS = [[4, 5], [2, 6], [7, 1]]
MOVES = np.array([[0, 0], [-1, 0], [0, 1], [1, 0], [0, -1]])  # row, col change of noop, up, right, down, left


# a tiny collection: a shortest-path policy whose action noise decays over the episodes, so it learns
def shortest_path_action(pos, goal):
    if pos[0] > goal[0]:
        return 1  # up
    if pos[0] < goal[0]:
        return 3  # down
    if pos[1] < goal[1]:
        return 2  # right
    if pos[1] > goal[1]:
        return 4  # left
    return 0


def collect_history(goal, num_streams, steps, seed, env_config=ENV):
    rng = np.random.default_rng(seed)
    keys = ("states", "actions", "rewards", "next_states", "terminated", "truncated", "timesteps")
    out = {key: np.zeros((num_streams, steps), dtype=bool if key in ("terminated", "truncated") else np.uint8) for key in keys}
    for s in range(num_streams):
        env = gym.wrappers.TimeLimit(
            DarkRoom(size=env_config["size"], goal=goal, random_start=False, terminate_on_goal=env_config["terminate_on_goal"]),
            max_episode_steps=env_config["max_episode_steps"],
        )
        state, _ = env.reset(seed=seed + s)
        episode, timestep = 0, 0
        for t in range(steps):
            epsilon = max(0.05, 1.0 - episode / 10)
            pos = divmod(state, env_config["size"])
            action = int(rng.integers(5)) if rng.random() < epsilon else shortest_path_action(pos, goal)
            next_state, reward, terminated, truncated, _ = env.step(action)
            truncated = truncated and not terminated
            for key, value in zip(keys, (state, action, reward, next_state, terminated, truncated, timestep)):
                out[key][s, t] = value
            state, timestep = next_state, timestep + 1
            if terminated or truncated:
                state, _ = env.reset()
                episode, timestep = episode + 1, 0
    return out


def write_collection(root, train_goals=TRAIN_GOALS, test_goals=TEST_GOALS, num_streams=2, steps=300, env_config=ENV, with_test=True):
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    tasks = {"format_version": 1, "split_seed": 0, "train": train_goals, "test": test_goals, "env": env_config, "source": "test", "algo": {}}
    (root / "tasks.json").write_text(json.dumps(tasks))
    for i, goal in enumerate(train_goals):
        write_history(root / "train" / f"goal_{goal[0]}_{goal[1]}.npz", goal, "train", num_streams, steps, seed=100 * i, env_config=env_config)
    if with_test:  # the held-out tasks' histories: only for the teacher-forced diagnostic loss
        (root / "test").mkdir(exist_ok=True)
        for i, goal in enumerate(test_goals):
            write_history(root / "test" / f"goal_{goal[0]}_{goal[1]}.npz", goal, "test", num_streams, steps, seed=100 * i + 7, env_config=env_config)
    return root


def write_history(path, goal, split, num_streams, steps, seed, format_version=1, env_config=ENV):
    arrays = collect_history(goal, num_streams, steps, seed, env_config)
    meta = {
        "format_version": format_version, "goal": goal, "split": split, "source": "test", "env": env_config, "algo": {},
        "seed": seed, "num_streams": num_streams, "steps_per_stream": steps, "versions": {},
    }
    np.savez_compressed(path, metadata=np.array(json.dumps(meta)), **arrays)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("histories"))


def make_model(layout, seq_len, seed=0, std=0.3, **config_kwargs):
    """A random model with weights large enough that logits depend strongly on the context."""
    torch.manual_seed(seed)
    config = ad_dt.GPTConfig(seq_len=seq_len, layout=layout, embedding_dim=32, num_layers=2, num_heads=4, feed_forward_dim=64, **config_kwargs)
    model = ad_dt.ADTransformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model.eval()


def stream_inputs(result, rows, columns):
    """Model inputs for transitions `columns` of the envs `rows`, from an evaluation trajectory, built from scratch."""
    prev_actions = np.concatenate([np.full((len(result["actions"]), 1), ad_dt.NO_ACTION), result["actions"][:, :-1]], axis=1)
    prev_rewards = np.concatenate([np.full((len(result["rewards"]), 1), ad_dt.NO_REWARD), result["rewards"][:, :-1]], axis=1)
    # where each action led (before the env's reset), from the room's rules: the cell moved to, clipped at the walls
    rows_cols = np.stack([result["states"] // 9, result["states"] % 9], -1) + MOVES[result["actions"]]
    reached = np.clip(rows_cols, 0, 8) @ np.array([9, 1])
    prev_next_states = np.concatenate([np.full((len(reached), 1), ad_dt.NO_STATE), reached[:, :-1]], axis=1)
    prev_states = np.concatenate([np.full((len(reached), 1), ad_dt.NO_STATE), result["states"][:, :-1]], axis=1)
    arrays = (result["states"], prev_actions, prev_rewards.astype(np.int64), result["timesteps"], prev_next_states, prev_states)
    return [torch.as_tensor(a[rows][:, columns].astype(np.int64)) for a in arrays]


# data
def test_missing_histories_dir_says_run_collect_first(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ad_dt.py"), "--histories-dir", str(tmp_path / "nope")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "collect_histories.py" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()  # wrote nothing


def test_empty_train_dir_is_an_error(tmp_path):
    write_collection(tmp_path, train_goals=[])
    with pytest.raises(SystemExit, match="collect_histories.py"):
        ad_dt.load_histories(tmp_path)


def test_test_task_history_among_training_files_is_refused(tmp_path):
    root = write_collection(tmp_path, steps=40)
    bad = root / "train" / "goal_2_6.npz"
    write_history(bad, [2, 6], "test", 1, 40, seed=1)
    with pytest.raises(SystemExit, match=r"goal_2_6\.npz.*test task"):
        ad_dt.load_histories(root)
    # a file that lies about its split is caught by its goal
    write_history(bad, [2, 6], "train", 1, 40, seed=1)
    with pytest.raises(SystemExit, match=r"goal_2_6\.npz.*test task"):
        ad_dt.load_histories(root)


def test_wrong_format_version_and_env_are_refused(tmp_path):
    root = write_collection(tmp_path, steps=40)
    ad_dt.load_histories(root)  # the good collection loads
    write_history(root / "train" / "goal_1_2.npz", [1, 2], "train", 1, 40, seed=1, format_version=2)
    with pytest.raises(SystemExit, match=r"goal_1_2\.npz has format_version 2"):
        ad_dt.load_histories(root)
    write_history(root / "train" / "goal_1_2.npz", [1, 2], "train", 1, 40, seed=1, env_config={**ENV, "max_episode_steps": 30})
    with pytest.raises(SystemExit, match=r"goal_1_2\.npz was collected with env"):
        ad_dt.load_histories(root)


def test_previous_action_and_reward_cross_episode_boundaries(collection):
    _, histories = ad_dt.load_histories(collection)
    data = ad_dt.make_dataset(histories)
    h = histories[0]
    n = h["states"].shape[1]
    # stream 0 of agent 0 is rows 0..n of the table
    assert data["prev_actions"][0] == ad_dt.NO_ACTION and data["prev_rewards"][0] == ad_dt.NO_REWARD
    np.testing.assert_array_equal(data["prev_actions"][1:n], h["actions"][0, :-1])
    np.testing.assert_array_equal(data["prev_rewards"][1:n], h["rewards"][0, :-1])
    # the reward 1 that ended an episode is shown by the first transition of the next one
    ends = np.flatnonzero(h["terminated"][0, :-1])
    assert len(ends) > 0 and (data["prev_rewards"][ends + 1] == 1).all() and (data["timesteps"][ends + 1] == 0).all()
    # ... and shows the goal cell as where the previous action led; inside an episode that is just the state
    goal = 9 * TRAIN_GOALS[0][0] + TRAIN_GOALS[0][1]
    assert (data["prev_next_states"][ends + 1] == goal).all() and (data["states"][ends + 1] == 4 * 9 + 4).all()
    inside = np.flatnonzero(data["timesteps"][1:n] > 0) + 1
    np.testing.assert_array_equal(data["prev_next_states"][inside], data["states"][inside])
    # the next stream starts with no previous transition
    assert data["prev_actions"][n] == ad_dt.NO_ACTION and data["prev_rewards"][n] == ad_dt.NO_REWARD
    assert data["prev_next_states"][0] == data["prev_next_states"][n] == ad_dt.NO_STATE
    # the state each previous action was taken in, across episode boundaries
    np.testing.assert_array_equal(data["prev_states"][1:n], h["states"][0, :-1])
    assert data["prev_states"][0] == data["prev_states"][n] == ad_dt.NO_STATE


def test_pace_keeps_every_kth_episode_and_cuts_history(collection):
    _, histories = ad_dt.load_histories(collection)
    h = histories[0]
    data = ad_dt.make_dataset(histories[:1], history_len=2 * 200, keep_every=3)
    done = (h["terminated"] | h["truncated"])[0, :200]
    episodes = np.split(np.arange(200), np.flatnonzero(done) + 1)
    kept = np.concatenate([e for i, e in enumerate(episodes) if i % 3 == 0])
    stream0 = slice(data["offsets"][0], data["offsets"][1])
    np.testing.assert_array_equal(data["states"][stream0], h["states"][0, kept])
    np.testing.assert_array_equal(data["actions"][stream0], h["actions"][0, kept])
    # the previous action of a kept episode's first step is the last action of the kept episode before it
    np.testing.assert_array_equal(data["prev_actions"][stream0][1:], h["actions"][0, kept][:-1])
    assert len(data["offsets"]) == 3  # two streams


def test_sampler_stays_inside_one_stream_and_positions_are_env_timesteps():
    # streams of different lengths, each made of a single state value: a window that crossed a boundary would mix values
    rng = np.random.default_rng(0)
    lengths = [5, 40, 9, 23, 70]
    histories = []
    for i, length in enumerate(lengths):
        done = rng.random((1, length)) < 0.2
        timesteps = np.zeros((1, length), np.uint8)
        for t in range(1, length):
            timesteps[0, t] = 0 if done[0, t - 1] else timesteps[0, t - 1] + 1
        histories.append({
            "states": np.full((1, length), i, np.uint8), "actions": rng.integers(0, 5, (1, length)).astype(np.uint8),
            "rewards": np.zeros((1, length), np.uint8), "next_states": np.full((1, length), i, np.uint8), "terminated": done, "truncated": np.zeros_like(done), "timesteps": timesteps,
        })
    data = ad_dt.make_dataset(histories)
    seq_len, seen = 9, set()
    for _ in range(50):
        batch, starts = ad_dt.sample_windows(data, 64, seq_len, rng)
        for b, start in enumerate(starts):
            stream = int(batch["states"][b, 0])
            assert (batch["states"][b] == stream).all()
            assert data["offsets"][stream] <= start and start + seq_len <= data["offsets"][stream + 1]
            h, offset = histories[stream], start - data["offsets"][stream]
            np.testing.assert_array_equal(batch["timesteps"][b].numpy(), h["timesteps"][0, offset : offset + seq_len])
            np.testing.assert_array_equal(batch["actions"][b].numpy(), h["actions"][0, offset : offset + seq_len])
            expected_prev = h["actions"][0, offset - 1] if offset > 0 else ad_dt.NO_ACTION  # mid-stream: the real previous action
            assert batch["prev_actions"][b, 0] == expected_prev
            seen.add((stream, int(offset)))
    # every window of every long-enough stream is reachable, and nothing else
    assert seen == {(i, o) for i, n in enumerate(lengths) for o in range(n - seq_len + 1)}


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    args = ad_dt.Args(learning_rate=1e-3, min_lr=1e-5, warmup_steps=10, num_updates=110)
    lrs = [args.learning_rate * ad_dt.lr_factor(u, args) for u in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:110], lrs[10:110]))
    assert lrs[60] == pytest.approx((1e-3 + 1e-5) / 2) and lrs[115] == pytest.approx(1e-5)


# evaluation
@pytest.mark.parametrize("layout, state_embedding, prev_next_state, prev_state, keep, keep_first", [
    ("one", "cell", False, False, None, None), ("three", "cell", False, True, 3, 0), ("one", "rowcol", True, True, None, 0),
    ("three", "rowcol", True, False, 7, 0), ("one", "rowcol", True, True, 2, 5), ("three", "cell", True, True, None, 1)])
def test_kv_cache_logits_equal_a_plain_forward_over_the_same_window(layout, state_embedding, prev_next_state, prev_state, keep,
                                                                    keep_first):
    seq_len = 8
    model = make_model(layout, seq_len, state_embedding=state_embedding, prev_next_state=prev_next_state, prev_state=prev_state)
    # goals next to the start: the random policy ends episodes early, at different steps in different envs
    goals = [[3, 4], [4, 5], [5, 4], [4, 3], [0, 0]]
    result = ad_dt.evaluate_in_context(model, goals, ENV, num_seeds=2, num_episodes=4, seed=3, context=seq_len, keep=keep,
                                       keep_first=keep_first)
    steps = result["states"].shape[1]
    assert steps > 2 * seq_len  # several re-prefills
    ends = [set(np.flatnonzero(result["timesteps"][i, 1:] == 0)) for i in range(len(result["states"]))]
    assert len({frozenset(e) for e in ends}) > 3 and result["successes"].any()

    # the documented context rule, computed here from scratch: it grows to seq_len, then drops to the run's first
    # `keep_first` transitions (default seq_len // 4) and the last `keep` (default seq_len // 2)
    first = seq_len // 4 if keep_first is None else keep_first
    context, max_abs_error = [], 0.0
    rows = np.arange(len(result["states"]))
    for t in range(steps):
        if len(context) == seq_len:
            context = context[:first] + context[seq_len - ((keep or seq_len // 2) - 1):]
        context.append(t)
        with torch.no_grad():
            expected = model(*stream_inputs(result, rows, np.array(context)))[:, -1]
        torch.testing.assert_close(torch.as_tensor(result["logits"][:, t]), expected, atol=1e-5, rtol=0)
        # a context that ignored the drop (sliding window) would give other logits: the check can fail
        if t >= seq_len and len(context) < seq_len:
            with torch.no_grad():
                sliding = model(*stream_inputs(result, rows, np.arange(t - seq_len + 1, t + 1)))[:, -1]
            max_abs_error = max(max_abs_error, float((sliding - expected).abs().max()))
    assert max_abs_error > 1e-2

    # recomputing the window every step (the benchmark's baseline) takes the same actions
    recomputed = ad_dt.evaluate_in_context(model, goals, ENV, num_seeds=2, num_episodes=4, seed=3, use_cache=False,
                                           context=seq_len, keep=keep, keep_first=keep_first)
    np.testing.assert_array_equal(recomputed["actions"], result["actions"])
    np.testing.assert_allclose(recomputed["logits"], result["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["one", "three"])
def test_the_default_context_holds_the_whole_run_past_seq_len(layout):
    # by default nothing is ever dropped: every action's logits are a plain forward pass over the run so far,
    # also after seq_len transitions (the model's weights do not depend on it)
    seq_len = 8
    model = make_model(layout, seq_len, prev_next_state=True, prev_state=True)
    goals = [[3, 4], [0, 8], [8, 0]]
    result = ad_dt.evaluate_in_context(model, goals, ENV, num_seeds=2, num_episodes=3, seed=5)
    steps = result["states"].shape[1]
    assert steps > 4 * seq_len
    rows = np.arange(len(result["states"]))
    for t in list(range(0, steps, 7)) + [steps - 1]:
        with torch.no_grad():
            expected = model(*stream_inputs(result, rows, np.arange(t + 1)))[:, -1]
        torch.testing.assert_close(torch.as_tensor(result["logits"][:, t]), expected, atol=1e-5, rtol=0)
    # and it is not the cut context: that one gives other actions' logits once the run is past seq_len
    cut = ad_dt.evaluate_in_context(model, goals, ENV, num_seeds=2, num_episodes=3, seed=5, context=seq_len)
    np.testing.assert_allclose(cut["logits"][:, :seq_len], result["logits"][:, :seq_len], atol=1e-5, rtol=0)
    assert not np.allclose(cut["logits"][:, seq_len:2 * seq_len], result["logits"][:, seq_len:2 * seq_len], atol=1e-3)


def test_evaluation_rejects_a_context_that_keeps_all_or_nothing():
    # keeping all of a full context would never make room for the next transition; keeping none, not even that one
    model = make_model("one", 8)
    for keep, keep_first in ((0, 0), (8, 0), (4, 4), (7, 1), (3, -1)):
        with pytest.raises(ValueError, match=f"keep_first \\+ keep at most 7 \\(context - 1\\), got {keep_first} \\+ {keep}"):
            ad_dt.evaluate_in_context(model, [[3, 4]], ENV, num_seeds=1, num_episodes=1, context=8, keep=keep, keep_first=keep_first)
    ad_dt.evaluate_in_context(model, [[3, 4]], ENV, num_seeds=1, num_episodes=1, context=8, keep=3, keep_first=4)  # 7: fine
    ad_dt.evaluate_in_context(model, [[3, 4]], ENV, num_seeds=1, num_episodes=1, keep_first=10**6)  # the whole run: never cut


def test_evaluation_follows_the_env_and_counts_whole_episodes():
    model = make_model("one", 8)
    goals = [[3, 4], [4, 5], [0, 8]]
    result = ad_dt.evaluate_in_context(model, goals, ENV, num_seeds=2, num_episodes=3, seed=0)
    assert result["returns"].shape == result["successes"].shape == (6, 3)
    for i, goal in enumerate(np.repeat(goals, 2, axis=0)):
        env = gym.wrappers.TimeLimit(DarkRoom(9, goal=goal, random_start=False, terminate_on_goal=True), 20)
        state, _ = env.reset()
        returns, episode_return, timestep = [], 0.0, 0
        for t in range(result["states"].shape[1]):
            assert (result["states"][i, t], result["timesteps"][i, t]) == (state, timestep)
            state, reward, term, trunc, _ = env.step(int(result["actions"][i, t]))
            assert result["rewards"][i, t] == reward
            episode_return, timestep = episode_return + reward, timestep + 1
            if term or trunc:
                returns.append(episode_return)
                state, _ = env.reset()
                episode_return, timestep = 0.0, 0
        np.testing.assert_array_equal(result["returns"][i], returns[:3])
        assert len(returns) >= 3
    assert result["lengths"].min() >= 1 and result["lengths"].max() <= 20
    # the run stops as soon as the slowest env has finished its episodes
    assert (result["lengths"].sum(1) == result["states"].shape[1]).any()


def test_random_start_evaluation_follows_toymeta_and_is_reproducible(tmp_path):
    """Histories with random starts (tasks.json's env.random_start) are evaluated with random starts: every episode
    starts where the evaluation's seeded generator puts it, and the rest follows toymeta's room."""
    model, env = make_model("one", 8), {**ENV, "random_start": True}
    goals = [[3, 4], [0, 8]]
    result = ad_dt.evaluate_in_context(model, goals, env, num_seeds=3, num_episodes=6, seed=2)
    again = ad_dt.evaluate_in_context(model, goals, env, num_seeds=3, num_episodes=6, seed=2)
    for key in ("states", "actions", "returns"):
        np.testing.assert_array_equal(result[key], again[key])
    starts = result["states"][result["timesteps"] == 0]
    assert len(np.unique(starts)) > 10  # not the centre every time
    for i, goal in enumerate(np.repeat(goals, 3, axis=0)):
        room = gym.wrappers.TimeLimit(DarkRoom(9, goal=goal, random_start=False, terminate_on_goal=True), 20)
        for t in range(result["states"].shape[1]):
            if result["timesteps"][i, t] == 0:  # a new episode: put the agent on its start
                room.reset()
                room.unwrapped.agent_pos = np.array(divmod(int(result["states"][i, t]), 9), dtype=np.float32)
            next_state, reward, *_ = room.step(int(result["actions"][i, t]))
            assert (result["next_states"][i, t], result["rewards"][i, t]) == (next_state, reward)
    # tasks.json may say random_start, but only as a boolean
    root = write_collection(tmp_path, steps=40)
    tasks = json.loads((root / "tasks.json").read_text())
    (root / "tasks.json").write_text(json.dumps({**tasks, "env": env}))
    assert ad_dt.read_tasks(root)["env"]["random_start"] is True
    (root / "tasks.json").write_text(json.dumps({**tasks, "env": {**env, "random_start": "yes"}}))
    with pytest.raises(SystemExit, match="out of range"):
        ad_dt.read_tasks(root)


# end to end
def run_script(cwd, *flags):
    proc = subprocess.run([sys.executable, str(ROOT / "ad_dt.py"), *flags], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tiny_run_trains_evaluates_checkpoints_resumes_and_reloads(collection, tmp_path):
    tiny = [
        "--histories-dir", str(collection), "--seq-len", "16", "--embedding-dim", "16", "--num-layers", "1", "--num-heads", "2",
        "--feed-forward-dim", "32", "--batch-size", "4", "--warmup-steps", "2", "--eval-every", "3", "--eval-episodes", "3",
        "--eval-seeds", "2", "--checkpoint-every", "3", "--attention-dropout", "0.1", "--layout", "three", "--num-threads", "1",
    ]
    run_script(tmp_path, *tiny, "--num-updates", "6")
    (run_dir,) = (tmp_path / "runs").glob("ad_dt__1__*")
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["ad_dt_000003.pt", "ad_dt_000006.pt"]
    straight = torch.load(run_dir / "ad_dt_000006.pt", weights_only=True)
    first_half = torch.load(run_dir / "ad_dt_000003.pt", weights_only=True)
    assert first_half["update"] == 3 and straight["update"] == 6 and straight["args"]["layout"] == "three"

    # resume from the middle: only --num-threads is given again, every other argument comes from the checkpoint
    (run_dir / "ad_dt_000006.pt").unlink()
    run_script(tmp_path, "--resume", str(run_dir / "ad_dt_000003.pt"), "--num-threads", "1")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]
    resumed = torch.load(run_dir / "ad_dt_000006.pt", weights_only=True)
    assert resumed["update"] == 6 and resumed["args"]["layout"] == "three"
    for key, value in straight["model"].items():  # 3 + 3 updates == 6 updates, bit for bit
        torch.testing.assert_close(resumed["model"][key], value, atol=0, rtol=0)
    assert any((first_half["model"][k] != v).any() for k, v in resumed["model"].items())  # and it did train

    # a resume that would change the model is refused, in one line
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ad_dt.py"), "--resume", str(run_dir / "ad_dt_000003.pt"), "--layout", "one"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [f"error: the model flags differ from those saved in {run_dir / 'ad_dt_000003.pt'}; leave them out to resume"]

    # another script rebuilds the model from the checkpoint alone and evaluates it
    model, checkpoint = ad_dt.load_checkpoint(run_dir / "ad_dt_000006.pt")
    assert model.config.layout == "three" and model.config.seq_len == 16
    result = ad_dt.evaluate_in_context(model, checkpoint["tasks"]["test"], checkpoint["tasks"]["env"], 2, 3, seed=1)
    assert result["returns"].shape == (2 * len(TEST_GOALS), 3)

    # TensorBoard: the documented tags, with the update number as step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # (the resumed run wrote its events into the same run, replacing what came after its checkpoint)
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"losses/action_loss", "charts/learning_rate", "charts/tokens_per_sec"} <= scalars
    for tag in ("eval/first_episode_return", "eval/last_episode_return", "eval/last10_return", "eval/success_rate"):
        assert [e.step for e in events.Scalars(tag)] == [3, 6]
    assert [e.step for e in events.Scalars("losses/action_loss")] == list(range(1, 7))
    assert [e.value for e in events.Scalars("charts/learning_rate")][:2] == pytest.approx([5e-4, 1e-3])
    assert "eval/return_by_episode" in events.Tags()["images"]
    # the diagnostics: exploitation, first success, training goals, teacher-forced loss on both splits
    for tag in ("eval/success_after_success", "eval/first_success_episode", "eval/never_succeeded",
                "eval_train/success_rate", "eval_train/success_after_success",
                "diagnostics/train_action_loss", "diagnostics/heldout_action_loss"):
        assert [e.step for e in events.Scalars(tag)] == [3, 6], tag
    assert 0 < events.Scalars("diagnostics/heldout_action_loss")[0].value < 3


def test_ad_dt_runs_alone_without_the_collectors_beside_it(collection, tmp_path):
    """ad_dt.py carries its own copy of the env: copied alone into a directory, it trains and checkpoints."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "ad_dt.py", alone / "ad_dt.py")
    flags = ["--histories-dir", str(collection), "--seq-len", "16", "--embedding-dim", "16", "--num-layers", "1", "--num-heads", "2",
             "--feed-forward-dim", "32", "--batch-size", "4", "--warmup-steps", "1", "--num-updates", "2", "--eval-episodes", "1",
             "--eval-seeds", "1", "--no-eval-train-goals", "--num-threads", "1"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # nothing but the copy on the path
    proc = subprocess.run([sys.executable, str(alone / "ad_dt.py"), *flags], cwd=alone, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in alone.iterdir()) == ["ad_dt.py", "runs"]
    (checkpoint,) = (alone / "runs").glob("ad_dt__1__*/ad_dt_000002.pt")
    assert torch.load(checkpoint, weights_only=True)["update"] == 2


def run_main_in_process(cwd, monkeypatch, *flags):
    """ad_dt.py's main in this process (no interpreter start-up); returns the SystemExit it raised."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["ad_dt.py", *map(str, flags)])
    with pytest.raises(SystemExit) as error:
        runpy.run_path(str(ROOT / "ad_dt.py"), run_name="__main__")
    return error.value


def test_resume_from_a_missing_checkpoint_is_one_line(tmp_path, monkeypatch):
    error = run_main_in_process(tmp_path, monkeypatch, "--resume", tmp_path / "x.pt")
    assert isinstance(error.code, str) and error.code.startswith("error: ") and "\n" not in error.code and "x.pt" in error.code
    assert list(tmp_path.iterdir()) == []


def test_summary_diagnostics_on_a_hand_made_result():
    successes = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=bool)
    summary = ad_dt.summarize_evaluation({"returns": successes.astype(np.float32), "successes": successes})
    assert summary["success_rate"] == pytest.approx(5 / 12)
    # episodes that follow a success: env 0 (1->1, 1->0), env 2 (1->0, 1->1): 2 of 4 succeed
    assert summary["success_after_success"] == pytest.approx(0.5)
    assert summary["first_success_episode"] == pytest.approx((2 + 1) / 2)  # env 1 never succeeds: left out
    assert summary["never_succeeded"] == pytest.approx(1 / 3)
    assert summary["first_episode_return"] == pytest.approx(1 / 3) and summary["last_episode_return"] == pytest.approx(1 / 3)


def test_test_split_loader_takes_only_held_out_histories(tmp_path):
    root = write_collection(tmp_path / "h", num_streams=1, steps=40)
    _, test_histories = ad_dt.load_histories(root, "test")
    assert len(test_histories) == len(TEST_GOALS)
    goal = TRAIN_GOALS[0]
    write_history(root / "test" / f"goal_{goal[0]}_{goal[1]}.npz", goal, "train", 1, 40, seed=3)
    with pytest.raises(SystemExit, match="not a history of a held-out test task"):
        ad_dt.load_histories(root, "test")
    assert ad_dt.load_histories(write_collection(tmp_path / "g", num_streams=1, steps=40, with_test=False), "test")[1] == []


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(collection, tmp_path):
    # no dropout: then two ranks with 2 windows each see exactly the one process's 4 windows and average the same gradients
    tiny = [
        "--histories-dir", str(collection), "--seq-len", "16", "--embedding-dim", "16", "--num-layers", "1", "--num-heads", "2",
        "--feed-forward-dim", "32", "--batch-size", "4", "--warmup-steps", "2", "--num-updates", "4", "--eval-episodes", "1",
        "--eval-seeds", "1", "--no-eval-train-goals", "--residual-dropout", "0", "--num-threads", "1",
    ]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    run_script(tmp_path / "one", *tiny)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "ad_dt.py"), *tiny],
        cwd=tmp_path / "two", capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and proc.stdout.count("checkpoint: ") == 1  # rank 0 alone reports
    (one,), (two,) = [list((tmp_path / name / "runs").glob("*/ad_dt_000004.pt")) for name in ("one", "two")]
    assert len(list((tmp_path / "two" / "runs").iterdir())) == 1  # one run directory, written by rank 0
    one, two = torch.load(one, weights_only=True)["model"], torch.load(two, weights_only=True)["model"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    # a single process that saw only rank 0's 2 windows lands elsewhere: both ranks' gradients count
    (tmp_path / "half").mkdir()
    half_flags = [f if f != "4" or tiny[i - 1] != "--batch-size" else "2" for i, f in enumerate(tiny)]
    run_script(tmp_path / "half", *half_flags)
    (half,) = (tmp_path / "half" / "runs").glob("*/ad_dt_000004.pt")
    half = torch.load(half, weights_only=True)["model"]
    assert max(float((half[k] - one[k]).abs().max()) for k in one) > 1e-3


def test_batch_not_divisible_by_the_torchrun_processes_is_one_line(collection, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before any process group is made
    monkeypatch.setenv("RANK", "0")
    error = run_main_in_process(tmp_path, monkeypatch, "--histories-dir", collection, "--batch-size", "5")
    assert error.code == "error: --batch-size must be divisible by the 2 torchrun processes, got 5"


def test_stream_start_windows_begin_with_an_empty_context(collection):
    _, histories = ad_dt.load_histories(collection)
    data = ad_dt.make_dataset(histories)
    first_rows = set(data["offsets"][:-1].tolist())
    # all of them at a stream's first transition, where the previous action is "none" as in an empty context
    batch, starts = ad_dt.sample_windows(data, 200, 16, np.random.default_rng(0), stream_start_frac=1.0)
    assert set(starts.tolist()) <= first_rows and (batch["prev_actions"][:, 0] == ad_dt.NO_ACTION).all()
    assert len(set(starts.tolist())) > len(first_rows) // 2  # spread over the streams
    # about half of them, the rest uniform (which almost never hits a stream's start)
    _, starts = ad_dt.sample_windows(data, 2000, 16, np.random.default_rng(0), stream_start_frac=0.5)
    assert 0.45 < np.isin(starts, list(first_rows)).mean() < 0.55
    # 0 (the default) draws exactly what the sampler drew before the option existed
    a = ad_dt.sample_windows(data, 64, 16, np.random.default_rng(3))[1]
    b = ad_dt.sample_windows(data, 64, 16, np.random.default_rng(3), stream_start_frac=0.0)[1]
    np.testing.assert_array_equal(a, b)
