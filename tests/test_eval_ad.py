"""Tests of eval_ad.py: the baselines against exact references, the diagnostics, its copies of ad_dt.py's code, and a tiny end-to-end run."""
import inspect
import json
import runpy
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ad_dt  # noqa: E402
import eval_ad  # noqa: E402
from test_ad_dt import collect_history  # noqa: E402  (a tiny collection: a shortest-path policy whose noise decays)

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation

ENV = {"size": 9, "terminate_on_goal": True, "max_episode_steps": 20}
TRAIN_GOALS = [[1, 2], [6, 7], [3, 3], [8, 0]]
TEST_GOALS = [[4, 5], [2, 6], [7, 1]]
ALL_GOALS = [[row, col] for row in range(9) for col in range(9) if (row, col) != (4, 4)]
CENTRE = 40
MOVES = np.array([[0, 0], [-1, 0], [0, 1], [1, 0], [0, -1]])  # row, col change of noop, up, right, down, left


def write_collection(root, num_streams=2, steps=300):
    root = Path(root)
    tasks = {"format_version": 1, "split_seed": 0, "train": TRAIN_GOALS, "test": TEST_GOALS, "env": ENV, "source": "noise", "algo": {}}
    for split, goals in (("train", TRAIN_GOALS), ("test", TEST_GOALS)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, goal in enumerate(goals):
            arrays = collect_history(goal, num_streams, steps, seed=100 * i + (7 if split == "test" else 0))
            meta = {"format_version": 1, "goal": goal, "split": split, "source": "noise", "env": ENV, "algo": {}, "seed": i,
                    "num_streams": num_streams, "steps_per_stream": steps, "versions": {}}
            np.savez_compressed(root / split / f"goal_{goal[0]}_{goal[1]}.npz", metadata=np.array(json.dumps(meta)), **arrays)
    (root / "tasks.json").write_text(json.dumps(tasks))
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint trained by ad_dt.py for 3 updates, and the same with large random weights (whose actions depend
    strongly on the context, so that a difference in the evaluation code shows)."""
    root = tmp_path_factory.mktemp("eval_ad")
    histories = write_collection(root / "histories")
    tiny = [
        "--histories-dir", str(histories), "--seq-len", "16", "--embedding-dim", "16", "--num-layers", "1", "--num-heads", "2",
        "--feed-forward-dim", "32", "--batch-size", "4", "--warmup-steps", "1", "--num-updates", "3", "--eval-every", "100",
        "--eval-episodes", "1", "--eval-seeds", "1", "--checkpoint-every", "100", "--keep-every", "1", "--num-threads", "1",
    ]
    proc = subprocess.run([sys.executable, str(ROOT / "ad_dt.py"), *tiny], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trained,) = (root / "runs").glob("ad_dt__1__*/ad_dt_000003.pt")
    checkpoint = torch.load(trained, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    checkpoint["model"] = {k: torch.randn(v.shape, generator=generator) * 0.3 if v.dim() > 1 else v for k, v in checkpoint["model"].items()}
    checkpoint["args"]["eval_temperature"] = 0.9  # as if trained with --eval-temperature 0.9: eval_ad.py's default temperature
    strong = trained.with_name("strong.pt")
    torch.save(checkpoint, strong)
    return {"root": root, "histories": histories, "trained": trained, "strong": strong}


def run_eval(cwd, *flags):
    proc = subprocess.run([sys.executable, str(ROOT / "eval_ad.py"), *map(str, flags)], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


EPISODES, SEEDS, VIDEO_EPISODES = 6, 2, 3


@pytest.fixture(scope="module")
def evaluated(checkpoints):
    """One end-to-end run; the histories dir is the one saved in the checkpoint."""
    out = checkpoints["root"] / "out"
    proc = run_eval(checkpoints["root"], "--checkpoint", checkpoints["strong"], "--episodes", EPISODES, "--seeds", SEEDS, "--train-tasks",
                    "--loss-windows", 8, "--video-episodes", VIDEO_EPISODES, "--out-dir", out)
    return out, proc


# eval_ad.py evaluates with ad_dt.py's own code (imported): the same actions as ad_dt.py's periodic evaluation
def test_eval_ad_takes_the_same_actions_as_ad_dt(checkpoints, evaluated):
    out, _ = evaluated
    saved = np.load(out / "trajectories.npz")
    model, checkpoint = ad_dt.load_checkpoint(checkpoints["strong"])
    tasks = checkpoint["tasks"]
    temperature = checkpoint["args"]["eval_temperature"]  # eval_ad's default: the run's own
    assert temperature == 0.9 and json.loads((out / "results.json").read_text())["args"]["temperature"] == 0.9
    expected = ad_dt.evaluate_in_context(model, tasks["test"], tasks["env"], SEEDS, EPISODES, False, seed=1, temperature=temperature)  # eval_ad's default --seed
    assert len(np.unique(expected["actions"])) == 5 and expected["states"].shape[1] > model.config.seq_len  # varied, past the window
    np.testing.assert_array_equal(saved["held_out_actions"], expected["actions"])
    np.testing.assert_array_equal(saved["held_out_states"], expected["states"])
    np.testing.assert_array_equal(saved["held_out_returns"], expected["returns"])
    results = json.loads((out / "results.json").read_text())
    np.testing.assert_allclose(results["methods"]["ad"]["return_by_episode"]["mean"], expected["returns"].mean(0))
    assert eval_ad.evaluate_in_context is ad_dt.evaluate_in_context and eval_ad.load_checkpoint is ad_dt.load_checkpoint  # one copy


def test_eval_ad_context_flag_cuts_the_context_as_ad_dt_does(checkpoints, evaluated):
    # --context N: the context drops to the run's first N // 4 and its recent half when full, which changes the actions once
    # the run is past N
    model, checkpoint = ad_dt.load_checkpoint(checkpoints["strong"])
    tasks, seq_len = checkpoint["tasks"], model.config.seq_len
    out = checkpoints["root"] / "out_cut"
    run_eval(checkpoints["root"], "--checkpoint", checkpoints["strong"], "--episodes", EPISODES, "--seeds", SEEDS, "--context", seq_len,
             "--loss-windows", 0, "--video-episodes", 0, "--out-dir", out)
    saved = np.load(out / "trajectories.npz")
    temperature = checkpoint["args"]["eval_temperature"]
    expected = ad_dt.evaluate_in_context(model, tasks["test"], tasks["env"], SEEDS, EPISODES, False, seed=1, context=seq_len, temperature=temperature)
    np.testing.assert_array_equal(saved["held_out_actions"], expected["actions"])
    whole_run = np.load(evaluated[0] / "trajectories.npz")["held_out_actions"]
    np.testing.assert_array_equal(saved["held_out_actions"][:, :seq_len], whole_run[:, :seq_len])
    assert not np.array_equal(saved["held_out_actions"], whole_run)
    assert json.loads((out / "results.json").read_text())["args"]["context"] == seq_len
    # --keep-first K: the cut keeps the run's first K transitions (by default a quarter of the context), as ad_dt.py's does
    run_eval(checkpoints["root"], "--checkpoint", checkpoints["strong"], "--episodes", EPISODES, "--seeds", SEEDS, "--context", seq_len,
             "--keep-first", 0, "--loss-windows", 0, "--video-episodes", 0, "--out-dir", out / "first")
    first = np.load(out / "first" / "trajectories.npz")["held_out_actions"]
    expected = ad_dt.evaluate_in_context(model, tasks["test"], tasks["env"], SEEDS, EPISODES, False, seed=1, context=seq_len, keep_first=0,
                                         temperature=temperature)
    np.testing.assert_array_equal(first, expected["actions"])
    assert not np.array_equal(first, saved["held_out_actions"])


# outputs
def test_results_json_has_the_documented_keys_and_shapes(evaluated, checkpoints):
    out, proc = evaluated
    results = json.loads((out / "results.json").read_text())
    assert {"args", "checkpoint", "methods", "diagnostics"} <= set(results)
    assert results["args"]["episodes"] == EPISODES and results["args"]["histories_dir"] == str(checkpoints["histories"])
    assert results["checkpoint"]["update"] == 3 and results["checkpoint"]["path"] == str(checkpoints["strong"])
    # the source of the histories names the from-scratch baseline
    assert set(results["methods"]) == {"ad", "random", "optimal", "oracle", "noise"} and results["source"] == "noise"
    for name, method in results["methods"].items():
        for key in ("return_by_episode", "success_by_episode"):
            assert len(method[key]["mean"]) == len(method[key]["ci95"]) == EPISODES, (name, key)
            assert all(0 <= s <= 1 for s in method["success_by_episode"]["mean"])
        assert method["per_task"]["goals"] == TEST_GOALS
        assert np.array(method["per_task"]["return_by_episode"]).shape == (len(TEST_GOALS), EPISODES)
        assert method["runs"] == len(TEST_GOALS) * SEEDS  # the tiny histories have 2 streams per task, like 2 seeds
        assert np.allclose(np.mean(method["per_task"]["return_by_episode"], axis=0), method["return_by_episode"]["mean"])
    assert results["methods"]["optimal"]["return_by_episode"]["mean"] == [1.0] * EPISODES
    diagnostics = results["diagnostics"]
    keys = {"success_after_success", "success_after_success_pairs", "first_success_episode", "never_succeeded", "success_rate",
            "success_episode_1", "success_episodes_11_20"}
    assert set(diagnostics["held_out"]) == set(results["methods"]) and all(set(d) == keys for d in diagnostics["held_out"].values())
    assert diagnostics["held_out"]["optimal"]["success_after_success"] == 1.0 and diagnostics["held_out"]["optimal"]["first_success_episode"] == 1.0
    train = diagnostics["train_goals"]
    assert set(train["methods"]) == set(train["diagnostics"]) == set(results["methods"])
    assert train["methods"]["ad"]["per_task"]["goals"] == TRAIN_GOALS
    loss = diagnostics["teacher_forced_loss"]
    assert loss["held_out"] > 0 and loss["train"] > 0 and loss["windows"] == 8 and loss["keep_every"] == 1
    assert diagnostics["episode_reaching_90pct_of_optimal"]["optimal"] == 1
    by_context = diagnostics["ad_success_by_context"]  # (its arithmetic: test_success_by_context_splits_at_the_first_cut)
    assert set(by_context) == {"held_out", "train_goals"} and by_context["held_out"]["seq_len"] == results["checkpoint"]["model_config"]["seq_len"]
    assert by_context["held_out"]["first_context_episodes"] + by_context["held_out"]["after_cut_episodes"] > 0
    # fidelity: AD's success minus its source's from scratch, per episode, for whatever the source is (here noise)
    ad, source = (np.array(results["methods"][name]["success_by_episode"]["mean"]) for name in ("ad", "noise"))
    np.testing.assert_allclose(diagnostics["fidelity_to_source"], ad - source)
    assert np.abs(ad - source).max() > 0  # the two curves differ: a fidelity that ignored one of them would fail
    assert len(train["fidelity_to_source"]) == EPISODES
    # the terminal table: episodes 1, 2, 5 and the last, and the 90%-of-optimal row
    table = proc.stdout[proc.stdout.index("| episode |"):].splitlines()
    assert [line.split("|")[1].strip() for line in table[2:7]] == ["1", "2", "5", "6", "90% of optimal"]
    assert table[0].split("|")[-2].strip() == "AD - noise success"


def test_plot_and_video_exist_and_read_back(evaluated):
    out, _ = evaluated
    assert imageio.imread(out / "return_by_episode.png").ndim == 3
    frames = [frame for frame in imageio.get_reader(out / "video.mp4")]  # (list() would trust its infinite len)
    saved = np.load(out / "trajectories.npz")
    timesteps = saved["held_out_timesteps"][0]  # the video shows held-out goal 0, seed 0
    steps = int(np.flatnonzero(timesteps == 0)[VIDEO_EPISODES]) if (timesteps == 0).sum() > VIDEO_EPISODES else len(timesteps)
    assert len(frames) == steps + 3 * VIDEO_EPISODES  # a frame per step, and each episode's end held for 3 frames
    assert frames[0].shape == (10 * 32, 9 * 32, 3)  # the room, upscaled, and the episode bar below it
    row, col = TEST_GOALS[0]
    assert np.abs(frames[0][row * 32 + 16, col * 32 + 16].astype(int) - (220, 40, 40)).max() < 40  # the goal is shown
    assert not list(out.glob("*.tmp*"))


def test_render_frame_is_a2c_darkroom_s_copy():  # a small helper copied on purpose: eval_ad.py needs no a2c_darkroom.py
    import a2c_darkroom
    assert inspect.getsource(eval_ad.render_frame) == inspect.getsource(a2c_darkroom.render_frame)


# baselines against exact references
def manhattan(goals):
    return np.abs(np.asarray(goals) - 4).sum(1)


@pytest.mark.parametrize("terminate", [True, False])
def test_optimal_baseline_returns_the_shortest_path_bound_for_every_goal(terminate):
    env = {**ENV, "terminate_on_goal": terminate}
    result = eval_ad.run_policy(eval_ad.OptimalPolicy, ALL_GOALS, env, 1, 3)
    distance = manhattan(ALL_GOALS)[:, None]
    if terminate:  # reward 1 at the goal, reached in exactly the distance
        np.testing.assert_array_equal(result["returns"], np.ones((80, 3)))
        np.testing.assert_array_equal(result["lengths"], np.broadcast_to(distance, (80, 3)))
    else:  # reward 1 on arrival and on every step it stays there
        np.testing.assert_array_equal(result["returns"], np.broadcast_to(20 - distance + 1, (80, 3)))


def goal_free_sweep(num_envs, num_episodes, seed):
    """The oracle in a room with no reward (goal outside the grid): the episode (1-based) in which each cell is first visited."""
    oracle = eval_ad.ExplorationOracle(num_envs, 9, None, np.random.default_rng(seed))
    room = eval_ad.DarkRoomVectorEnv(np.full((num_envs, 2), -1), 9, True, 20)
    first_visit = np.zeros((num_envs, 81), dtype=np.int64)  # 0: not yet
    envs, episode, state = np.arange(num_envs), np.zeros(num_envs, dtype=np.int64), room.reset()[0]
    while episode.min() < num_episodes:
        action = oracle.act(state)
        reached = np.clip(np.divmod(state, 9) + MOVES[action].T, 0, 8).T @ [9, 1]
        state, reward, terminated, truncated, _ = room.step(action)
        oracle.observe(reached, reward, terminated, terminated | truncated)
        first_visit[envs, reached] = np.where(first_visit[envs, reached] == 0, episode + 1, first_visit[envs, reached])
        episode += terminated | truncated
    return first_visit


@pytest.mark.parametrize("terminate", [True, False])
def test_oracle_finds_every_goal_within_its_worst_case_and_is_optimal_after(terminate):
    seeds, episodes = 8, 8
    # Until it is rewarded the oracle acts the same whatever the goal (its random draws too), so a goal-free sweep
    # with the same seed gives the episode in which it finds each goal; its worst case is the sweep's last new cell.
    sweep = goal_free_sweep(80 * seeds, episodes, seed=3)
    sweep[:, CENTRE] = -1
    assert (sweep[:, np.arange(81) != CENTRE] > 0).all()  # it covers the room
    worst = sweep.max(1)
    # every env sweeps the same tour, turned or mirrored: 5 episodes at worst. No explorer can do better than 4
    # (80 cells, at most 20 new ones per 20-step episode); the oracle visits 20 new cells in its first episode.
    assert (worst == 5).all() and ((sweep == 1).sum(1) == 20).all()
    env = {**ENV, "terminate_on_goal": terminate}
    result = eval_ad.run_policy(eval_ad.ExplorationOracle, ALL_GOALS, env, seeds, episodes, np.random.default_rng(3))
    goal_cells = np.repeat(np.asarray(ALL_GOALS) @ [9, 1], seeds)
    first_success = result["successes"].argmax(1) + 1
    assert result["successes"].any(1).all()
    np.testing.assert_array_equal(first_success, sweep[np.arange(len(goal_cells)), goal_cells])
    assert first_success.max() <= 5 and len(set(first_success)) == 5
    optimal = eval_ad.run_policy(eval_ad.OptimalPolicy, ALL_GOALS, env, seeds, episodes)["returns"]
    after = np.arange(episodes)[None] >= first_success[:, None]  # the episodes after the first success (0-based index)
    np.testing.assert_array_equal(result["returns"][after], optimal[after])
    assert (result["returns"] <= optimal).all() and (result["returns"][~after] < optimal[~after]).any()


def test_oracle_with_random_starts_finds_every_goal_then_goes_straight_to_it():
    """Starting anywhere, the oracle still covers the room within a few episodes and, once rewarded, takes a shortest path
    from each episode's start (one step when it starts on the goal: a noop there is rewarded)."""
    seeds, episodes = 4, 10
    env = {**ENV, "random_start": True}
    result = eval_ad.run_policy(eval_ad.ExplorationOracle, ALL_GOALS, env, seeds, episodes, np.random.default_rng(3), seed=5)
    first_success = result["successes"].argmax(1)
    assert result["successes"].any(1).all() and first_success.max() <= 6
    after = np.arange(episodes)[None] > first_success[:, None]
    assert result["successes"][after].all()
    # the shortest paths: the same starts, drawn again by the same seeded rooms, give each episode's lower bound
    optimal = eval_ad.run_policy(eval_ad.OptimalPolicy, ALL_GOALS, env, seeds, episodes, seed=5)
    assert result["lengths"][after].mean() < optimal["lengths"].mean() + 1


def random_walk_reference(goal, steps=20, size=9):
    """Exact, by dynamic programming over the position distribution of one episode of uniformly random actions:
    P(reaching the goal) and the expected number of steps that end on the goal if the episode does not end there."""
    def step(p):
        q = np.zeros_like(p)
        for cell in np.flatnonzero(p):
            row, col = divmod(cell, size)
            for d_row, d_col in MOVES:
                q[min(max(row + d_row, 0), size - 1) * size + min(max(col + d_col, 0), size - 1)] += p[cell] / 5
        return q

    goal_cell = goal[0] * size + goal[1]
    absorbed, free = np.zeros(size * size), np.zeros(size * size)
    absorbed[CENTRE] = free[CENTRE] = 1.0
    hit, steps_on_goal = 0.0, 0.0
    for _ in range(steps):
        absorbed, free = step(absorbed), step(free)
        hit += absorbed[goal_cell]
        absorbed[goal_cell] = 0.0  # the walks that reached the goal stop counting
        steps_on_goal += free[goal_cell]
    return hit, steps_on_goal


@pytest.mark.parametrize("terminate", [True, False])
def test_random_policy_matches_the_exact_random_walk(terminate):
    seeds, episodes = 10, 40
    env = {**ENV, "terminate_on_goal": terminate}
    result = eval_ad.run_policy(eval_ad.RandomPolicy, ALL_GOALS, env, seeds, episodes, np.random.default_rng(0))
    successes = result["successes"].reshape(80, seeds * episodes)  # 400 episodes per goal
    hit, steps_on_goal = np.array([random_walk_reference(goal) for goal in ALL_GOALS]).T
    assert hit.max() > 2 * hit.min()  # near goals and far ones differ: a per-goal check can fail
    error = np.abs(successes.mean(1) - hit) / np.sqrt(hit * (1 - hit) / successes.shape[1])
    assert error.max() < 4.5, (error.max(), hit[error.argmax()])
    # the return, over all goals (its per-goal distribution is too skewed for 400 samples in no-terminate mode)
    returns, expected = result["returns"], hit if terminate else steps_on_goal
    assert abs(returns.mean() - expected.mean()) < 4 * returns.std() / np.sqrt(returns.size), (returns.mean(), expected.mean())
    if not terminate:
        assert steps_on_goal.mean() > 1.5 * hit.mean()  # the two references differ: the walk lingers on the goal


# diagnostics
def test_diagnose_counts_exploitation_and_first_success():
    returns = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=np.float32)
    d = eval_ad.diagnose(returns)
    # successes followed by an episode: (0,1)->1, (0,2)->0, (2,0)->0, (2,2)->1
    assert d["success_after_success"] == 0.5 and d["success_after_success_pairs"] == 4
    assert d["first_success_episode"] == 1.5 and d["never_succeeded"] == pytest.approx(1 / 3)
    assert d["success_episode_1"] == pytest.approx(1 / 3) and d["success_episodes_11_20"] is None and d["success_rate"] == pytest.approx(5 / 12)
    # what JSON cannot hold as a number is None, not 0 or nan
    never = eval_ad.diagnose(np.zeros((2, 20)))
    assert never["success_after_success"] is None and never["first_success_episode"] is None and never["success_episodes_11_20"] == 0.0
    # the same numbers as ad_dt.py's periodic evaluation logs
    returns = (np.random.default_rng(0).random((50, 30)) < 0.3).astype(np.float32)
    theirs = ad_dt.summarize_evaluation({"returns": returns, "successes": returns > 0})
    mine = eval_ad.diagnose(returns)
    for key in ("success_after_success", "first_success_episode", "never_succeeded", "success_rate"):
        assert mine[key] == theirs[key], key


def test_success_by_context_splits_at_the_first_cut():
    # env 0: episodes of 3, 2, 2, 2 steps start at steps 0, 3, 5, 7; env 1 never succeeds, so it counts nowhere
    timesteps = np.array([[0, 1, 2, 0, 1, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 0, 1, 0]])
    returns = np.array([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=np.float32)
    d = eval_ad.success_by_context(returns, timesteps, seq_len=5)
    # after env 0's first success: episode 2 starts at step 3 (< 5, fails), episodes 3 and 4 at steps 5 and 7 (succeed)
    assert d == {"seq_len": 5, "first_context": 0.0, "after_cut": 1.0, "first_context_episodes": 1, "after_cut_episodes": 2}
    # a context longer than the run was never cut: nothing to say about cut contexts (None, not 0)
    d = eval_ad.success_by_context(returns, timesteps, seq_len=100)
    assert d["first_context"] == pytest.approx(2 / 3) and d["after_cut"] is None and d["after_cut_episodes"] == 0


def test_source_episodes_cut_streams_into_whole_episodes():
    # stream 0: a 3-step success, a 2-step truncation, a 4-step success, an unfinished episode; stream 1: 1-step successes
    rewards = np.array([[0, 0, 1, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.uint8)
    terminated = rewards.astype(bool)
    truncated = np.zeros_like(terminated)
    truncated[0, 4] = True
    returns, task = eval_ad.source_episodes([{"rewards": rewards, "terminated": terminated, "truncated": truncated}], 5)
    np.testing.assert_array_equal(returns, [[1, 0, 1], [1, 1, 1]])  # whole episodes only, as many as every stream has
    np.testing.assert_array_equal(task, [0, 0])


def test_teacher_forced_loss_is_the_training_cross_entropy_on_windows_sampled_like_training(checkpoints):
    model, checkpoint = eval_ad.load_checkpoint(checkpoints["strong"])
    _, histories = eval_ad.load_histories(checkpoints["histories"], "test")
    loss = eval_ad.history_action_loss(model, histories, None, 1, 12, np.random.default_rng(4), batch_size=5)
    data = ad_dt.make_dataset(histories, None, 1)
    rng, expected = np.random.default_rng(4), []
    for size in (5, 5, 2):
        batch, _ = ad_dt.sample_windows(data, size, model.config.seq_len, rng)
        with torch.no_grad():
            logits = model(*(batch[key] for key in ad_dt.INPUT_KEYS))
        expected.append(F.cross_entropy(logits.reshape(-1, 5), batch["actions"].reshape(-1), reduction="none"))
    assert loss == pytest.approx(torch.cat(expected).mean().item(), rel=1e-5)
    assert eval_ad.history_action_loss(model, histories, 2 * 10, 1, 4, np.random.default_rng(0)) is None  # streams shorter than a window


# missing histories and bad input
def run_in_process(monkeypatch, *flags):
    """Run eval_ad.py's main in this process (no interpreter start-up); returns the SystemExit it raised, or None."""
    monkeypatch.setattr(sys, "argv", ["eval_ad.py", *map(str, flags)])
    try:
        runpy.run_path(str(ROOT / "eval_ad.py"), run_name="__main__")
    except SystemExit as e:
        return e
    return None


@pytest.mark.parametrize("source", ["a2c", "noise"])
def test_without_held_out_histories_only_a_trained_source_is_left_out_with_a_note(source, checkpoints, tmp_path, monkeypatch, capsys):
    histories = tmp_path / "histories"
    shutil.copytree(checkpoints["histories"], histories, ignore=shutil.ignore_patterns("test"))
    for path in (histories / "train").glob("*.npz"):  # the same histories, said to come from this source
        with np.load(path) as h:
            arrays = {key: h[key] for key in h.files}
        arrays["metadata"] = np.array(json.dumps({**json.loads(arrays["metadata"].item()), "source": source}))
        np.savez_compressed(path, **arrays)
    tasks = {**json.loads((histories / "tasks.json").read_text()), "source": source}
    (histories / "tasks.json").write_text(json.dumps(tasks))
    checkpoint = torch.load(checkpoints["trained"], weights_only=True)  # a model trained on them
    torch.save({**checkpoint, "tasks": tasks}, tmp_path / "model.pt")
    assert run_in_process(monkeypatch, "--checkpoint", tmp_path / "model.pt", "--histories-dir", histories, "--episodes", 3,
                          "--seeds", 1, "--video-episodes", 0, "--out-dir", tmp_path / "out") is None
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["diagnostics"]["teacher_forced_loss"]["held_out"] is None and results["diagnostics"]["teacher_forced_loss"]["train"] > 0
    assert not (tmp_path / "out" / "video.mp4").exists()
    if source == "a2c":  # a trained source's curve comes from its held-out histories only
        assert set(results["methods"]) == {"ad", "random", "optimal", "oracle"}
        assert "python collect_histories.py --tasks test" in capsys.readouterr().out
        assert any("collect_histories.py --tasks test" in note for note in results["notes"])
    else:  # a learner per stream is run from scratch on the held-out goals
        assert set(results["methods"]) == {"ad", "random", "optimal", "oracle", "noise"}
        assert results["methods"]["noise"]["runs"] == len(TEST_GOALS)


def test_a_scripted_source_run_from_scratch_matches_its_own_histories(tmp_path):
    """The source baseline of an explorer directory is collect_histories_tabular.py's explorer itself: its curve from scratch
    equals, within sampling noise, that of the streams it wrote for the same goals."""
    flags = ["--source", "explorer", "--explorer-eps", "0.1", "--tasks", "test", "--num-envs", "200", "--history-len", str(200 * 100),
             "--histories-dir", str(tmp_path / "h")]
    proc = subprocess.run([sys.executable, str(ROOT / "collect_histories_tabular.py"), *flags], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, histories = ad_dt.load_histories(tmp_path / "h", "test")
    written, _ = eval_ad.source_episodes(histories, 4)  # [23 goals x 200 streams, 4 episodes]
    goals = [h["meta"]["goal"] for h in histories]
    learner = partial(eval_ad.SourceLearner, meta=histories[0]["meta"])
    rerun = eval_ad.run_policy(learner, goals, ENV, 200, 4, np.random.default_rng(0))["returns"]
    assert written.shape == rerun.shape == (len(goals) * 200, 4)
    error = np.abs(written.mean(0) - rerun.mean(0))
    assert error.max() < 0.03, (written.mean(0), rerun.mean(0))  # 4600 runs: a 95% interval of about +-0.015
    assert written.mean(0)[0] < 0.4 < written.mean(0)[3]  # it learns: a wrong learner (random, oracle) would not match
    oracle = eval_ad.run_policy(eval_ad.ExplorationOracle, goals, ENV, 200, 4, np.random.default_rng(0))["returns"]
    assert np.abs(oracle.mean(0) - rerun.mean(0)).max() > 0.05


def test_a_missing_checkpoint_is_one_line_on_stderr(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "eval_ad.py"), "--checkpoint", str(tmp_path / "nope.pt")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "nope.pt" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []  # wrote nothing


@pytest.mark.parametrize("case", [
    "random bytes", "truncated", "other dict", "no tasks", "episodes 0", "seeds 0", "no tasks.json", "other split",
    "empty",  # torch.load raises EOFError("") on an empty file: an error message with no first line
])
def test_bad_input_is_one_error_line_and_writes_nothing(case, checkpoints, tmp_path, monkeypatch):
    good = checkpoints["trained"]
    path, flags = tmp_path / "bad.pt", []
    if case == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:3000])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "other dict":  # e.g. an a2c_darkroom.py checkpoint
        torch.save({"model": {}, "args": {}, "num_states": 81}, path)
    elif case == "no tasks":
        checkpoint = torch.load(good, weights_only=True)
        del checkpoint["tasks"]
        torch.save(checkpoint, path)
    else:
        path = good
        flags = {"episodes 0": ["--episodes", 0], "seeds 0": ["--seeds", 0], "no tasks.json": ["--histories-dir", tmp_path]}.get(case, [])
        if case == "other split":
            histories = tmp_path / "histories"
            shutil.copytree(checkpoints["histories"], histories)
            tasks = json.loads((histories / "tasks.json").read_text())
            tasks["test"], tasks["train"] = tasks["test"][:-1], tasks["train"] + tasks["test"][-1:]
            (histories / "tasks.json").write_text(json.dumps(tasks))
            flags = ["--histories-dir", histories]
    error = run_in_process(monkeypatch, "--checkpoint", path, "--out-dir", tmp_path / "out", *flags)
    assert error is not None and isinstance(error.code, str), error
    assert error.code.startswith("error: ") and "\n" not in error.code, error.code
    assert not (tmp_path / "out").exists()
