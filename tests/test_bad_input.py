"""Bad input to ad_dt.py and eval_ad.py: one `error:` line before any work, nothing written that blocks the corrected
rerun, no held-out goal among the training data, and Ctrl-C as one line with exit code 130."""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ad_dt  # noqa: E402
from test_ad_dt import TEST_GOALS, TRAIN_GOALS, write_collection  # noqa: E402

TINY = ["--seq-len", "16", "--embedding-dim", "16", "--num-layers", "1", "--num-heads", "2", "--feed-forward-dim", "32",
        "--batch-size", "4", "--warmup-steps", "1", "--eval-episodes", "1", "--eval-seeds", "1", "--keep-every", "1",
        "--num-threads", "1", "--diagnostic-windows", "2", "--no-eval-train-goals"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("histories"), num_streams=1, steps=40)


def run_main(script, cwd, monkeypatch, *flags):
    """Run a script's main in this process (no interpreter start-up); returns the SystemExit it raised, or None."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *map(str, flags)])
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        return e
    return None


def assert_one_error_line(error, *words):
    assert error is not None and isinstance(error.code, str), error
    assert error.code.startswith("error: ") and "\n" not in error.code, error.code
    for word in words:
        assert word in error.code, (word, error.code)


# every flag is checked before any work
BAD_FLAGS = [
    (["--seed", "-1"], "--seed"), (["--num-threads", "0"], "--num-threads"), (["--num-heads", "0"], "--num-heads"),
    (["--history-len", "0"], "--history-len"), (["--history-len", "-5"], "--history-len"), (["--eval-every", "0"], "--eval-every"),
    (["--checkpoint-every", "0"], "--checkpoint-every"), (["--eval-seeds", "0"], "--eval-seeds"), (["--batch-size", "-8"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"), (["--embedding-dim", "0"], "--embedding-dim"), (["--num-updates", "0"], "--num-updates"),
    (["--residual-dropout", "1.5"], "--residual-dropout"), (["--attention-dropout", "-0.1"], "--attention-dropout"),
    (["--betas", "1.5", "0.9"], "--betas"), (["--learning-rate", "-1"], "--learning-rate"), (["--learning-rate", "nan"], "--learning-rate"),
    (["--learning-rate", "1e3"], "--learning-rate"),
    (["--min-lr", "1"], "--min-lr"), (["--seq-len", "1"], "--seq-len"), (["--embedding-dim", "30", "--num-heads", "4"], "--embedding-dim"),
    (["--stream-start-frac", "2"], "--stream-start-frac"), (["--eval-temperature", "0"], "--eval-temperature"),
    (["--eval-context", "1"], "--eval-context"), (["--eval-keep-first", "-1"], "--eval-keep-first"),
    (["--eval-context", "256", "--eval-keep-first", "128"], "--eval-keep-first"),
    (["--keep-every", "0"], "--keep-every"), (["--clip-grad", "0"], "--clip-grad"), (["--eval-episodes", "0"], "--eval-episodes"),
    (["--warmup-steps", "-1"], "--warmup-steps"), (["--diagnostic-windows", "-1"], "--diagnostic-windows"),
    (["--histories-dir", "nowhere"], "nowhere"),
    (["--seed", str(2**32)], "--seed"), (["--exp-name", "../../x"], "--exp-name"), (["--exp-name", ""], "--exp-name"),
    # more than the memory or the threads this machine has: refused before the histories are read into windows
    (["--num-threads", "100000"], "--num-threads"), (["--batch-size", str(10**9)], "--batch-size"),
    (["--embedding-dim", str(2**20), "--num-heads", "1"], "--embedding-dim"), (["--eval-episodes", str(10**7)], "--eval-episodes"),
    (["--eval-seeds", str(10**7)], "--eval-seeds"), (["--eval-context", str(10**9)], "--eval-context"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--cuda"], "--cuda"))


@pytest.mark.parametrize("flags, named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_ad_dt_bad_flag_is_one_line_naming_it_and_writes_nothing(flags, named, collection, tmp_path, monkeypatch):
    error = run_main("ad_dt.py", tmp_path, monkeypatch, "--histories-dir", collection, *TINY, *flags)
    assert_one_error_line(error, named)
    assert list(tmp_path.iterdir()) == []


BAD_EVAL_FLAGS = [(["--episodes", "0"], "--episodes"), (["--seeds", "0"], "--seeds"), (["--seed", "-3"], "--seed"),
                  (["--temperature", "0"], "--temperature"), (["--context", "1"], "--context"), (["--video-task", "-1"], "--video-task"),
                  (["--video-task", "99"], "--video-task"), (["--keep-first", "-1"], "--keep-first"),
                  (["--context", "255", "--keep-first", "128"], "--keep-first"),
                  (["--loss-windows", "-1"], "--loss-windows"), (["--num-threads", "0"], "--num-threads"),
                  (["--seed", str(2**32)], "--seed"), (["--exp-name", "../../x"], "--exp-name"),
                  (["--num-threads", "100000"], "--num-threads"), (["--episodes", str(10**7)], "--episodes"),
                  (["--seeds", str(10**6)], "--seeds"), (["--context", str(10**9)], "--context")]


@pytest.mark.parametrize("flags, named", BAD_EVAL_FLAGS, ids=[" ".join(f) for f, _ in BAD_EVAL_FLAGS])
def test_eval_ad_bad_flag_is_one_line_and_writes_nothing(flags, named, trained, tmp_path, monkeypatch):
    error = run_main("eval_ad.py", tmp_path, monkeypatch, "--checkpoint", trained["checkpoint"], "--out-dir", tmp_path / "out", *flags)
    assert_one_error_line(error, named)
    assert list(tmp_path.iterdir()) == []


def test_ad_dt_history_len_below_the_streams_of_a_history_is_one_line(tmp_path, monkeypatch):
    histories = write_collection(tmp_path / "h", num_streams=4, steps=40)
    error = run_main("ad_dt.py", tmp_path, monkeypatch, "--histories-dir", histories, *TINY, "--history-len", 3)
    assert_one_error_line(error, "--history-len 3", "4 streams")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]


# outputs are checked before the work that feeds them
def test_unwritable_outputs_are_refused_before_any_work(collection, trained, tmp_path, monkeypatch):
    (tmp_path / "runs").write_text("a file where ad_dt.py puts its run directories")
    assert_one_error_line(run_main("ad_dt.py", tmp_path, monkeypatch, "--histories-dir", collection, *TINY), "runs")
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    for out_dir in (a_file, a_file / "sub", "/proc/no_such_dir"):  # a file, below a file, on a read-only file system
        error = run_main("eval_ad.py", tmp_path, monkeypatch, "--checkpoint", trained["checkpoint"], "--out-dir", out_dir, "--episodes", 1)
        assert_one_error_line(error, "--out-dir")
    histories_file = tmp_path / "histories_file"
    histories_file.write_text("")
    assert_one_error_line(run_main("ad_dt.py", tmp_path, monkeypatch, "--histories-dir", histories_file, *TINY), str(histories_file))


# resume never mixes another split (held-out goals) into training
@pytest.fixture(scope="module")
def trained(collection, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("trained")
    proc = subprocess.run([sys.executable, str(ROOT / "ad_dt.py"), "--histories-dir", str(collection), *TINY, "--num-updates", "3",
                           "--eval-every", "3", "--checkpoint-every", "3"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (checkpoint,) = cwd.glob("runs/*/ad_dt_000003.pt")
    return {"cwd": cwd, "checkpoint": checkpoint}


def test_resume_refuses_histories_with_another_split_naming_both(trained, tmp_path, monkeypatch):
    other = tmp_path / "other_split"
    swapped_train, swapped_test = [TEST_GOALS[0]] + TRAIN_GOALS[1:], [TRAIN_GOALS[0]] + TEST_GOALS[1:]  # a held-out goal now "trains"
    write_collection(other, swapped_train, swapped_test, num_streams=1, steps=40)
    run_dir = trained["checkpoint"].parent
    before = sorted(p.name for p in run_dir.iterdir())
    error = run_main("ad_dt.py", tmp_path, monkeypatch, "--resume", trained["checkpoint"], "--histories-dir", other, "--num-updates", "6")
    assert_one_error_line(error, str(other), str(trained["checkpoint"]), "train")
    assert sorted(p.name for p in run_dir.iterdir()) == before


# every file read is validated completely, in one place
HISTORY_KEYS = ad_dt.HISTORY_KEYS
ARRAY_CHANGES = ["int64", "int8 negative", "fewer steps", "no steps", "no streams", "3-d", "missing", "too high", "reward off the goal"]
META_CHANGES = ["a list", "no goal", "goal outside", "other env", "format 2", "test split", "not JSON"]
TASKS_CHANGES = ["a list", "no env", "size as text", "goal twice", "goal outside", "not JSON", "empty", "format 2", "train is a number"]

corruptions = st.one_of(
    st.tuples(st.just("flip byte"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("array"), st.sampled_from(HISTORY_KEYS), st.sampled_from(ARRAY_CHANGES)),
    st.tuples(st.just("metadata"), st.just(""), st.sampled_from(META_CHANGES)),
    st.tuples(st.just("tasks.json"), st.just(""), st.sampled_from(TASKS_CHANGES)),
)


def corrupt(root, kind, where, how):
    """Damage one file of a copy of the tiny collection as a bad disk or a careless edit would."""
    path = root / "train" / f"goal_{TRAIN_GOALS[0][0]}_{TRAIN_GOALS[0][1]}.npz"
    if kind in ("flip byte", "truncate"):
        data = bytearray(path.read_bytes())
        i = int(where * len(data))
        if kind == "truncate":
            data = data[:i]
        else:
            data[i] ^= how
        path.write_bytes(bytes(data))
        return
    if kind == "tasks.json":
        tasks = json.loads((root / "tasks.json").read_text())
        text = {"a list": json.dumps([tasks]), "not JSON": "{train: [", "empty": ""}.get(how)
        if text is None:
            if how == "no env":
                del tasks["env"]
            elif how == "size as text":
                tasks["env"]["size"] = "9"
            elif how == "goal twice":
                tasks["train"].append(tasks["test"][0])
            elif how == "goal outside":
                tasks["test"].append([9, 0])
            elif how == "format 2":
                tasks["format_version"] = 2
            elif how == "train is a number":
                tasks["train"] = 57
            text = json.dumps(tasks)
        (root / "tasks.json").write_text(text)
        return
    with np.load(path) as h:
        arrays = {key: h[key] for key in h.files}
    meta = json.loads(arrays["metadata"].item())
    if kind == "metadata":
        changed = {"a list": [meta], "no goal": {k: v for k, v in meta.items() if k != "goal"}, "goal outside": {**meta, "goal": [9, 9]},
                   "other env": {**meta, "env": {**meta["env"], "max_episode_steps": 30}}, "format 2": {**meta, "format_version": 2},
                   "test split": {**meta, "split": "test"}}.get(how)
        arrays["metadata"] = np.array("{not json" if how == "not JSON" else json.dumps(changed))
    else:
        a = arrays[where]
        if how == "missing":
            del arrays[where]
        else:
            arrays[where] = {
                "int64": lambda: a.astype(np.int64), "int8 negative": lambda: np.full(a.shape, -1, np.int8),
                "fewer steps": lambda: a[:, :-1], "no steps": lambda: a[:, :0], "no streams": lambda: a[:0], "3-d": lambda: a[None],
                "too high": lambda: np.full(a.shape, 255 if a.dtype == np.uint8 else 1, a.dtype),
                "reward off the goal": lambda: np.ones_like(a) if where == "rewards" else np.full(a.shape, 255, np.uint8),
            }[how]()
    np.savez_compressed(path, **arrays)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corruption=corruptions)
def test_fuzzed_history_files_are_one_error_line_never_a_traceback(corruption, collection):
    kind, where, how = corruption
    harmless = kind == "array" and where in ("terminated", "truncated") and how == "too high"  # all True: still a valid bool array
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "h"
        shutil.copytree(collection, root)
        corrupt(root, kind, where, how)
        try:
            _, histories = ad_dt.load_histories(root)
            ad_dt.load_histories(root, "test")
        except SystemExit as error:
            assert_one_error_line(error)
            return
    # it loaded: only a change that keeps the file valid may do that (a flipped byte in a zip's unchecked padding)
    assert kind == "flip byte" or harmless, corruption
    _, original = ad_dt.load_histories(collection)
    for h, o in zip(histories, original):
        for key in HISTORY_KEYS:
            assert harmless or np.array_equal(h[key], o[key])


def test_lost_tasks_json_says_how_to_rebuild_it(collection, tmp_path):
    root = tmp_path / "h"
    shutil.copytree(collection, root)
    (root / "tasks.json").unlink()
    with pytest.raises(SystemExit, match="rerun the collect_histories_tabular.py or collect_histories.py command that wrote it"):
        ad_dt.load_histories(root)


# Ctrl-C: exit 130 with one line saying what was kept
def interrupt(args, cwd, after, wait_for=None):
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        if wait_for:  # a line on stdout that says the work has started
            for line in proc.stdout:
                if wait_for in line:
                    break
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # what a terminal would show: the last state of each line (progress bars redraw with \r), without the progress bars
    shown = [line.split("\r")[-1].strip() for line in stderr.split("\n")]
    return proc.returncode, [line for line in shown if line and "%|" not in line]


def test_ctrl_c_during_training_and_evaluation_exits_130_with_one_line(collection, trained, tmp_path):
    # (during the imports: the same on_interrupt as collect_histories.py's and a2c_darkroom.py's, tested there)
    flags = [ROOT / "ad_dt.py", "--histories-dir", collection, *TINY, "--num-updates", "100000", "--checkpoint-every", "2", "--eval-every", "100000"]
    code, lines = interrupt(flags, tmp_path, after=1.5, wait_for="streams")
    assert code == 130 and len(lines) == 1 and "--resume" in lines[-1], lines
    code, lines = interrupt([ROOT / "eval_ad.py", "--checkpoint", trained["checkpoint"], "--episodes", 2000, "--context", 256,  # long, and fits in memory
                             "--out-dir", tmp_path / "out"],
                            tmp_path, after=1.0, wait_for="held-out goals x")
    assert code == 130 and len(lines) == 1 and lines[0].startswith("interrupted: "), lines
    assert not list((tmp_path / "out").glob("*.tmp*"))


# histories that would put other data into a run without a word
def rewrite_history(path, **meta_changes):
    with np.load(path) as h:
        arrays = {key: h[key] for key in h.files}
    meta = {**json.loads(arrays.pop("metadata").item()), **meta_changes}
    np.savez_compressed(path, metadata=np.array(json.dumps(meta)), **arrays)


def test_history_holding_another_goal_than_its_name_is_refused(collection, tmp_path, monkeypatch):
    histories = Path(shutil.copytree(collection, tmp_path / "h"))
    first, second = sorted((histories / "train").glob("*.npz"))[:2]
    shutil.copy(first, second)  # second's name, first's goal
    error = run_main("ad_dt.py", tmp_path, monkeypatch, "--histories-dir", histories, *TINY)
    assert_one_error_line(error, str(second), "not the goal its name says")
    assert not (tmp_path / "runs").exists()


def test_two_files_of_one_goal_are_refused(collection, tmp_path, monkeypatch):
    histories = Path(shutil.copytree(collection, tmp_path / "h"))
    first = sorted((histories / "train").glob("*.npz"))[0]
    shutil.copy(first, histories / "train" / "extra.npz")
    error = run_main("ad_dt.py", tmp_path, monkeypatch, "--histories-dir", histories, *TINY)
    assert_one_error_line(error, "extra.npz", "not the goal its name says")


def test_history_of_another_source_in_the_directory_is_refused(collection, tmp_path, monkeypatch):
    histories = Path(shutil.copytree(collection, tmp_path / "h"))
    odd = sorted((histories / "train").glob("*.npz"))[1]
    rewrite_history(odd, source="dynaq", algo={"num_envs": 500})
    error = run_main("ad_dt.py", tmp_path, monkeypatch, "--histories-dir", histories, *TINY)
    assert_one_error_line(error, str(odd), "dynaq", "its own --histories-dir")


def test_resume_or_evaluation_on_another_sources_histories_is_refused(collection, trained, tmp_path, monkeypatch):
    histories = Path(shutil.copytree(collection, tmp_path / "h"))
    tasks = json.loads((histories / "tasks.json").read_text())
    (histories / "tasks.json").write_text(json.dumps({**tasks, "source": "dynaq"}))
    for path in histories.glob("*/*.npz"):  # the same split and env, another source
        rewrite_history(path, source="dynaq")
    error = run_main("ad_dt.py", tmp_path, monkeypatch, "--resume", trained["checkpoint"], "--histories-dir", histories)
    assert_one_error_line(error, "another source", "start a new run")
    error = run_main("eval_ad.py", tmp_path, monkeypatch, "--checkpoint", trained["checkpoint"], "--histories-dir", histories,
                     "--out-dir", tmp_path / "out")
    assert_one_error_line(error, "another task split, env or source")
    assert not (tmp_path / "out").exists()


def test_no_previous_state_marker_is_not_a_cell_of_the_largest_room():
    size = 16
    goal, cell = [0, 0], size * size - 1  # the last cell, (15, 15): the marker's value before
    history = {key: np.full((1, 3), cell, np.uint8) for key in ("states", "next_states")}
    history.update(actions=np.zeros((1, 3), np.uint8), rewards=np.zeros((1, 3), np.uint8), timesteps=np.arange(3, dtype=np.uint8)[None],
                   terminated=np.zeros((1, 3), bool), truncated=np.zeros((1, 3), bool), meta={"goal": goal})
    data = ad_dt.make_dataset([history])
    assert data["prev_states"][0] == ad_dt.NO_STATE and data["prev_states"][1] == cell
    config = ad_dt.GPTConfig(num_states=size * size, seq_len=4, embedding_dim=16, num_layers=1, num_heads=2, feed_forward_dim=32,
                             prev_state=True, prev_next_state=True)
    torch.manual_seed(0)
    model = ad_dt.ADTransformer(config).eval()
    window = {key: torch.from_numpy(data[key][None, :3].astype(np.int64)) for key in ad_dt.INPUT_KEYS}
    seen = dict(window, prev_states=torch.full((1, 3), cell), prev_next_states=torch.full((1, 3), cell))
    with torch.no_grad():  # the first transition's logits tell "no previous state" from "came from cell 255"
        assert not torch.allclose(model(**window)[0, 0], model(**seen)[0, 0])
