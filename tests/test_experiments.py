"""Tests of experiments/: the learning-arc measure of the pace study, that every config names a known source, the data study, the entropy floor, the three-split summary."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import sweep  # noqa: E402


def history_of_episodes(lengths, successes):
    """One stream made of whole episodes of the given lengths; a successful episode's last step is rewarded."""
    steps = sum(lengths)
    h = {key: np.zeros((1, steps), np.uint8) for key in ("states", "rewards")}
    h["terminated"], h["truncated"] = np.zeros((1, steps), bool), np.zeros((1, steps), bool)
    end = -1
    for length, success in zip(lengths, successes):
        end += length
        h["rewards"][0, end] = success
        (h["terminated"] if success else h["truncated"])[0, end] = True
    return h


def test_learning_arc_counts_kept_transitions_before_the_source_is_competent():
    # 30 failed episodes of 20 steps, then 100 successful ones of 5 steps: a 10-episode window first reaches 0.9
    # success at episode 29 (1 failure in 10), so the arc is the 29 episodes before it
    lengths, successes = [20] * 30 + [5] * 100, [0] * 30 + [1] * 100
    h = history_of_episodes(lengths, successes)
    assert sweep.learning_arc([h], None, 1, window=10) == 29 * 20
    # keeping every 3rd episode keeps episodes 0, 3, ..., 27 of those 29: 10 of them
    assert sweep.learning_arc([h], None, 3, window=10) == 10 * 20
    # a history cut before competence counts everything it keeps
    assert sweep.learning_arc([h], 200, 1, window=10) == 200


def test_learning_arc_is_the_median_over_streams():
    fast = history_of_episodes([5] * 40, [1] * 40)
    slow = history_of_episodes([20] * 20 + [5] * 40, [0] * 20 + [1] * 40)
    slower = history_of_episodes([20] * 30 + [5] * 40, [0] * 30 + [1] * 40)
    assert sweep.learning_arc([fast, slow, slower], None, 1, window=10) == 19 * 20


@pytest.mark.parametrize("study", sorted(sweep.STUDIES))
def test_every_config_names_a_known_source(study):
    for name, (histories, flags) in sweep.STUDIES[study].items():
        assert histories in sweep.SOURCES, name
        assert all(isinstance(f, str) for f in flags), name


def test_curves_summary_reports_the_fidelity_gap_and_the_early_mean(tmp_path):
    import json

    import curves

    ad = [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0]
    source = [0.3, 0.5, 0.7, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # shorter: the gap covers the shared episodes
    results = {"source": "explorer", "args": {"temperature": 1.0}, "checkpoint": {"train_args": {"seq_len": 8}},
               "methods": {"ad": {"success_by_episode": {"mean": ad}}, "explorer": {"success_by_episode": {"mean": source}},
                           "random": {"success_by_episode": {"mean": [0.1] * 12}}},
               "diagnostics": {"held_out": {"ad": {"success_after_success": 0.9}}, "teacher_forced_loss": None, "train_goals": None}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    row = curves.summary(path)
    assert row["mean_1_10"] == pytest.approx(np.mean(ad[:10]))
    assert row["worst_gap_from_episode_5"] == pytest.approx(-0.2)  # episode 5: 0.8 - 1.0; episodes 1-4 do not count
    assert set(row["success_by_episode"]) == {"ad", "explorer"}
    # --save merges: a file's row is replaced, the other files' rows are kept
    saved = tmp_path / "runs.json"
    saved.write_text(json.dumps([{"file": "other.json"}, {"file": str(path), "mean_1_10": -1}]))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "curves.py"), str(path), "--save", str(saved)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(saved.read_text())
    assert [r["file"] for r in rows] == ["other.json", str(path)] and rows[1]["mean_1_10"] == row["mean_1_10"]


def test_data_study_puts_held_out_and_training_goals_side_by_side(tmp_path, monkeypatch):
    import json

    sys.path.insert(0, str(ROOT / "tests"))
    from test_ad_dt import ENV, write_collection

    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    write_collection(tmp_path / "few", train_goals=[[0, 0]], num_streams=3, steps=40)
    write_collection(tmp_path / "many", train_goals=[[0, 0], [8, 8]], num_streams=1, steps=40, env_config={**ENV, "random_start": True})
    # a model that memorised its goals (training above held-out) and one that did not; 4 seeds per goal
    curves = {"memorised": ([0.1] * 50, [0.9] * 50, 1), "general": ([0.2] * 10 + [0.8] * 40, [0.2] * 10 + [0.85] * 40, 2)}
    for name, (held_out, train, goals) in curves.items():
        diag = {"success_episodes_11_20": float(np.mean(held_out[10:20])), "success_after_success": 0.5}
        train_diag = {"success_episodes_11_20": float(np.mean(train[10:20])), "success_after_success": 0.95}
        results = {"checkpoint": {"train_args": {"history_len": None, "keep_every": 1, "seq_len": 16}},
                   "methods": {"ad": {"success_by_episode": {"mean": held_out}, "runs": 4 * 3}},
                   "diagnostics": {"held_out": {"ad": diag, "random": {"success_episodes_11_20": 0.17}},
                                   "train_goals": {"diagnostics": {"ad": train_diag}, "methods": {"ad": {"success_by_episode": {"mean": train}}}},
                                   "teacher_forced_loss": {"held_out": 0.9, "train": 0.3}}}
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / "results.json").write_text(json.dumps(results))
    configs = {"memorised": ("few", []), "general": ("many", []), "not_run": ("many", [])}
    sweep.summarize("data", configs, sweep.Args(out_dir=str(tmp_path / "out"), eval_seeds=4))
    rows = {row["config"]: row for row in json.loads((tmp_path / "out" / "data.json").read_text())}
    assert set(rows) == {"memorised", "general"}  # a config without results is left out
    assert (rows["memorised"]["train_goals"], rows["memorised"]["streams_per_goal"]) == (1, 3)
    assert (rows["general"]["train_goals"], rows["general"]["streams_per_goal"]) == (2, 1)
    assert rows["memorised"]["success_41_50"] == pytest.approx(0.1) and rows["memorised"]["train_success_41_50"] == pytest.approx(0.9)
    assert rows["general"]["success_11_20"] == pytest.approx(0.8) and rows["general"]["train_success_41_50"] == pytest.approx(0.85)
    assert rows["general"]["held_out_goals"] == 3
    assert (rows["memorised"]["room"], rows["memorised"]["random_start"], rows["general"]["random_start"]) == (9, False, True)
    table = (tmp_path / "out" / "data.md").read_text()
    assert "| memorised | 9x9, centre | 1 x 3 | 3 | 0.10 / 0.90 | 0.10 / 0.90 | 0.50 / 0.95 | 0.90 / 0.30 |" in table
    assert "| general | 9x9, random | 2 x 1 |" in table
    assert (tmp_path / "out" / "data_study.png").stat().st_size > 10_000


def dynaq_history(goal, num_streams, steps, eps, seed=0):
    """A Dyna-Q history in the layout the loaders return (arrays [streams, steps] and its "meta"), written by the
    batched learner in the numpy DarkRoom, as collect_histories_tabular.py writes one."""
    import collect_histories as ch
    import collect_histories_tabular as tab

    envs = ch.DarkRoomVectorEnv(np.array([goal] * num_streams), 9, True, 20)
    learner = tab.DynaQLearner(num_streams, 81, [np.random.default_rng(seed)], 0.5, 0.9, 20, eps)
    keys = ("states", "actions", "rewards", "next_states", "terminated", "truncated")
    h = {key: [] for key in keys}
    state, _ = envs.reset()
    for _ in range(steps):
        action = learner.act(state)
        next_state, reward, terminated, truncated, info = envs.step(action)
        learner.observe(info["final_obs"], reward, terminated, terminated | truncated)
        for key, value in zip(keys, (state, action, reward, info["final_obs"], terminated, truncated)):
            h[key].append(value)
        state = next_state
    h = {key: np.stack(value, 1) for key, value in h.items()}
    algo = {"dynaq_q0": 0.5, "dynaq_gamma": 0.9, "dynaq_sweeps": 20, "dynaq_eps": eps}
    return {**h, "meta": {"source": "dynaq", "goal": goal, "algo": algo, "env": {"size": 9}}}


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_entropy_floor_replays_the_learner_that_wrote_the_history(eps):
    import entropy_floor

    h = dynaq_history([1, 2], num_streams=6, steps=150, eps=eps)
    assert h["rewards"].any()
    entropy = entropy_floor.action_entropy(h)
    # at a stream's first step every pair is untried: all 5 actions tie, whatever eps
    np.testing.assert_allclose(entropy[:, 0], np.log(5))
    # one best action: (1 - eps) + eps / 5 on it, eps / 5 on each of the other 4
    p, q = 1 - eps + eps / 5, eps / 5
    single = -(p * np.log(p) + (4 * q * np.log(q) if q else 0.0))
    assert np.isclose(entropy, single).mean() > 0.3  # once a goal is known, most steps have one best action
    assert (entropy >= single - 1e-9).all() and (entropy <= np.log(5) + 1e-9).all()
    if eps == 0:  # a history the learner could not have written is refused
        t = np.flatnonzero(entropy[2] == 0)[0]  # a step with one best action: any other is off-policy
        h["actions"][2, t] = (h["actions"][2, t] + 1) % 5
        with pytest.raises(SystemExit, match="not one of the replayed learner's best"):
            entropy_floor.action_entropy(h)


def test_three_splits_takes_mean_and_range_over_the_splits():
    import three_splits

    def row(ad, source, exploit, name):
        return {"file": name, "source": "dynaq", "success_by_episode": {"ad": [ad] * 100, "dynaq": [source] * 100},
                "exploit_rate": exploit}

    out = three_splits.combine([row(0.9, 1.0, 0.98, "a"), row(0.6, 0.9, 0.90, "b"), row(0.75, 0.95, 0.94, "c")])
    assert out["table"]["ad"]["41-50"] == {"mean": 0.75, "min": 0.6, "max": 0.9}
    assert out["table"]["source"]["ep. 1"] == {"mean": 0.95, "min": 0.9, "max": 1.0}
    assert out["table"]["ad"]["exploit rate"] == {"mean": 0.94, "min": 0.9, "max": 0.98}
    assert out["worst_mean_gap"] == -0.2 and out["episodes_more_than_0.05_below"] == 100 and out["splits"] == ["a", "b", "c"]
