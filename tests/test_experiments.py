"""Tests of experiments/sweep.py: the learning-arc measure of the pace study, and that every config names a known source."""
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
