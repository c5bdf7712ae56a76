"""The pipeline's promise: reproduce.sh's first stage is collect_histories_tabular.py with its defaults, and after it the
design's command, `python ad_dt.py --seq-len 256` with no other flag, trains on those histories with the headline
configuration (the one reproduce.sh's second stage runs)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ad_dt  # noqa: E402
import collect_histories  # noqa: E402
import collect_histories_tabular  # noqa: E402


def test_reproduce_sh_stages_one_and_two_are_the_scripts_defaults():
    script = (ROOT / "reproduce.sh").read_text()
    # stage 1: no flag but the defaults (the split seed and directory), stage 2: the design's command, on the default split
    assert re.search(r'^collect collect_histories_tabular.py --histories-dir "histories\$S"( +#.*)?$', script, re.M)
    assert re.search(r'^ad_and_eval "ad_dynaq\$S" "histories\$S" --seq-len 256$', script, re.M)
    assert 'collect() { local script=$1; shift; "$PYTHON" "$script" --split-seed "$SPLIT_SEED" "$@"; }' in script
    for split_seed, suffix in (("", ""), ("0", ""), ("2", "_split2")):  # the directories' suffix, as the script computes it
        line = next(line for line in script.splitlines() if line.startswith("S=$(")).split("  #")[0]
        env = {key: value for key, value in os.environ.items() if key != "SPLIT_SEED"} | ({"SPLIT_SEED": split_seed} if split_seed else {})
        shown = subprocess.run(["bash", "-c", f'SPLIT_SEED=${{SPLIT_SEED:-0}}; {line}; echo "[$S]"'], env=env, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        assert shown == f"[{suffix}]"
    assert collect_histories_tabular.Args().split_seed == 0
    assert collect_histories_tabular.Args().histories_dir == ad_dt.Args().histories_dir == "histories"


def test_design_command_trains_on_the_default_collection(tmp_path):
    split = collect_histories.make_split(9, 57, 0)
    goals = [f"{r},{c}" for r, c in (split["train"][0], split["train"][1], split["test"][0])]
    # the defaults but three goals (and fewer learners, which changes nothing the command reads)
    collect = subprocess.run([sys.executable, str(ROOT / "collect_histories_tabular.py"), "--tasks", *goals, "--num-envs", "20"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert collect.returncode == 0, collect.stderr[-3000:]
    tiny = ["--num-updates", "2", "--eval-every", "2", "--checkpoint-every", "2", "--eval-episodes", "1", "--eval-seeds", "1",
            "--no-eval-train-goals", "--diagnostic-windows", "2", "--warmup-steps", "1", "--batch-size", "2"]
    train = subprocess.run([sys.executable, str(ROOT / "ad_dt.py"), "--seq-len", "256", *tiny], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr[-3000:]
    assert ": 40 streams, 10240 transitions," in train.stdout  # the 2 training goals x 20 learners x 256 steps
    (checkpoint,) = (tmp_path / "runs").glob("ad_dt__1__*/ad_dt_000002.pt")
    saved = torch.load(checkpoint, weights_only=True)
    defaults = vars(ad_dt.Args())
    headline = {"seq_len": 256, "keep_every": 1, "history_len": None, "prev_state": True, "prev_next_state": True,
                "state_embedding": "rowcol", "residual_dropout": 0.0, "num_updates": 3600}
    assert {key: defaults[key] for key in headline} == headline
    assert {key: saved["args"][key] for key in headline if key != "num_updates"} == {k: v for k, v in headline.items() if k != "num_updates"}
