# The floor under AD's teacher-forced loss on Dyna-Q histories, per split. Docs: experiments/README.md
#   .venv/bin/python experiments/entropy_floor.py histories [results/ad_dynaq/results.json]
# (on the first STREAMS streams of every history: the mean over all steps of 64 x 80 learners, 2-3 min on one core)
# Dyna-Q acts greedily and breaks ties at random (with --dynaq-eps, a random action at that probability), so where
# k actions tie, no model can predict its action better than log k nats: the mean entropy of the source's own
# action distribution is the lowest loss any model can reach on its histories. This replays every stream's learner
# on its recorded steps and averages that entropy over all steps of the training and of the held-out histories. A
# model that learned the algorithm, not the goals, is as far above the floor on both (its loss minus the floor).
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ad_dt  # noqa: E402
import collect_histories_tabular  # noqa: E402

STREAMS = 64  # per history


def action_entropy(history):
    """Entropy (nats) of the Dyna-Q learner's action distribution at every step of every stream [streams, steps],
    replaying the learner of each stream on the actions it took (its Q before each step gives the tied actions)."""
    meta, (num_streams, steps) = history["meta"], history["states"].shape
    if meta["source"] != "dynaq":
        raise SystemExit(f"error: {meta['goal']} is a {meta['source']} history; the floor is computed for dynaq histories only")
    algo, num_states = meta["algo"], meta["env"]["size"] ** 2
    learner = collect_histories_tabular.DynaQLearner(num_streams, num_states, [np.random.default_rng(0)], algo["dynaq_q0"],
                                                     algo["dynaq_gamma"], algo["dynaq_sweeps"], algo["dynaq_eps"])
    eps, rows, entropy = algo["dynaq_eps"], np.arange(num_streams), np.zeros((num_streams, steps))
    for t in range(steps):
        states, actions = history["states"][:, t].astype(np.int64), history["actions"][:, t].astype(np.int64)
        q = learner.Q[rows, :, states]  # (streams, actions)
        best = q == q.max(1, keepdims=True)
        probs = (1 - eps) * best / best.sum(1, keepdims=True) + eps / ad_dt.NUM_ACTIONS
        entropy[:, t] = -(probs * np.log(np.where(probs > 0, probs, 1))).sum(1)
        if eps == 0 and not best[rows, actions].all():  # the replay must be the learner that wrote the history
            raise SystemExit(f"error: goal {meta['goal']}, step {t}: a recorded action is not one of the replayed learner's best")
        learner.states, learner.actions = states, actions  # what act() would have recorded
        terminated = history["terminated"][:, t]
        learner.observe(history["next_states"][:, t].astype(np.int64), history["rewards"][:, t].astype(np.float32),
                        terminated, terminated | history["truncated"][:, t])
    return entropy


if __name__ == "__main__":
    histories_dir, results = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    floors = {}
    for split, name in (("train", "train"), ("test", "held_out")):
        _, histories = ad_dt.load_histories(ROOT / histories_dir, split)
        first = [{**h, **{key: h[key][:STREAMS] for key in ad_dt.HISTORY_KEYS}} for h in histories]
        floors[name] = float(np.mean([action_entropy(h).mean() for h in first]))  # every history has as many steps
    print(f"{histories_dir}: the source's action entropy (nats per step), training histories {floors['train']:.3f}, "
          f"held-out histories {floors['held_out']:.3f}")
    if results:
        loss = json.loads(Path(results).read_text())["diagnostics"]["teacher_forced_loss"]
        for name in ("train", "held_out"):
            print(f"{name}: AD's loss {loss[name]:.3f}, above the floor by {loss[name] - floors[name]:.3f}")
