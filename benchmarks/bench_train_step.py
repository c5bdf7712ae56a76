# Training speed of ad_dt.py, two configurations side by side: our default update vs the original design's, or one
# reproduce.sh stage's configuration vs its previous one (dropout, 4 heads) or the AD paper's dropout. Docs: benchmarks/README.md
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ad_dt import Args as ADArgs  # noqa: E402
from ad_dt import load_histories, make_dataset  # noqa: E402
from bench_layouts import make_model, train_step  # noqa: E402  (the same model and update as the layout benchmark)


@dataclass
class Args:
    seed: int = 1
    """seed of the models, the window sampling and dropout"""
    num_threads: int = 2
    """CPU threads for torch"""
    compare: Literal["original", "dynaq", "explorer", "a2c", "dynaq_depth", "explorer_depth", "dynaq_paper", "explorer_paper"] = "original"
    """"original": ad_dt.py's defaults (the Dyna-Q stage's) vs the original design's configuration; "dynaq" / "explorer":
    reproduce.sh's configuration of that stage vs the one it had before (residual dropout 0.1, 4 heads, 4 layers), on its
    histories; "dynaq_depth" / "explorer_depth": that stage's configuration with 3 layers vs with 4 (the explorer's now has 3,
    the Dyna-Q stage's 4); "a2c": the A2C stage's update (2 heads, 3 layers, every 8th episode) vs the same with 4 and 4;
    "dynaq_paper" / "explorer_paper": that stage's configuration vs the same with the AD paper's dropout (0.5 on the
    attention weights, 0.1 on the residuals)"""
    histories_dir: str = ""
    """directory written by `collect_histories_tabular.py`; default: `histories` (Dyna-Q, its default) or
    `histories_explorer` or `histories_a2c`, as reproduce.sh names them. Each configuration reads it at its own pace"""
    rounds: int = 4
    """timed rounds; each runs both configurations, in alternating order, so machine load hits both alike"""
    first_updates: Optional[int] = None
    """timed updates of the first configuration per round; default 120 with --compare original (~0.1 s each: about as
    long as one update of the original design's, so that a burst of load is as likely to hit either), else 20"""
    second_updates: Optional[int] = None
    """timed updates of the second configuration per round; default 1 with --compare original (the original design's,
    ~14 s each), else 20"""
    warmup_updates: int = 1
    """untimed updates of each configuration before the rounds"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    original = ADArgs(  # the original design's configuration, as benchmarks/README.md's `ad_dt.py --layout three ...` writes it
        layout="three", seq_len=256, history_len=800_000, keep_every=1, prev_state=False, prev_next_state=False, state_embedding="cell",
        embedding_dim=64, num_layers=4, num_heads=4, feed_forward_dim=2048,
        attention_dropout=0.5, residual_dropout=0.1, embedding_dropout=0.0,
        batch_size=32, learning_rate=3e-4, min_lr=2e-6, betas=(0.9, 0.99), clip_grad=1.0, num_updates=22_000,
    )
    # reproduce.sh's AD stages (the flags that shape an update), then and now
    dynaq = dict(seq_len=256, keep_every=1, history_len=None, prev_state=True, prev_next_state=True, state_embedding="rowcol")
    explorer = dict(seq_len=128, keep_every=1, history_len=None, prev_state=True, prev_next_state=False, state_embedding="cell")
    paper = dict(attention_dropout=0.5, residual_dropout=0.1)  # the AD paper's, by a reproduction's config
    dynaq_now, explorer_now = dict(dynaq, residual_dropout=0.0), dict(explorer, residual_dropout=0.0, num_heads=2, num_layers=3)
    configs, histories_dir = {
        "original": ({"default": ADArgs(), "original": original}, "histories"),
        "dynaq": ({"now": ADArgs(**dynaq_now), "before": ADArgs(**dynaq, residual_dropout=0.1)}, "histories"),
        "explorer": ({"now": ADArgs(**explorer_now), "before": ADArgs(**explorer, residual_dropout=0.1)}, "histories_explorer"),
        "a2c": ({"now": ADArgs(**{**dynaq_now, "keep_every": 8, "num_heads": 2, "num_layers": 3}),
                 "before": ADArgs(**{**dynaq_now, "keep_every": 8})}, "histories_a2c"),
        "dynaq_depth": ({"3layers": ADArgs(**{**dynaq_now, "num_layers": 3}), "4layers": ADArgs(**dynaq_now)}, "histories"),
        "explorer_depth": ({"3layers": ADArgs(**explorer_now), "4layers": ADArgs(**{**explorer_now, "num_layers": 4})}, "histories_explorer"),
        "dynaq_paper": ({"now": ADArgs(**dynaq_now), "paper": ADArgs(**{**dynaq_now, **paper})}, "histories"),
        "explorer_paper": ({"now": ADArgs(**explorer_now), "paper": ADArgs(**{**explorer_now, **paper})}, "histories_explorer"),
    }[args.compare]
    first, second = configs
    stage = args.compare != "original"
    updates_per_round = {first: args.first_updates or (20 if stage else 120), second: args.second_updates or (20 if stage else 1)}
    histories_dir = args.histories_dir or histories_dir
    if not os.path.isfile(os.path.join(histories_dir, "tasks.json")):
        raise SystemExit(f"error: --histories-dir {histories_dir} has no tasks.json; collect it first (benchmarks/README.md says how)")
    tasks, histories = load_histories(histories_dir)
    env = tasks["env"]
    runs, tokens_per_update = {}, {}
    for name, c in configs.items():
        data = make_dataset(histories, c.history_len, c.keep_every)
        model, optimizer, scheduler = make_model(c, env, args.seed)
        runs[name] = (model, optimizer, scheduler, data, c, np.random.default_rng(args.seed))
        tokens_per_update[name] = c.batch_size * c.seq_len * model.config.tokens_per_transition
        print(
            f"{name:7s}: layout {c.layout}, seq_len {c.seq_len} ({c.seq_len * model.config.tokens_per_transition} tokens), "
            f"batch {c.batch_size}, d{c.embedding_dim}, {c.num_layers} layers, {c.num_heads} heads, ff {c.feed_forward_dim}, "
            f"attention dropout {c.attention_dropout}, {sum(p.numel() for p in model.parameters())} parameters; "
            f"{len(data['states'])} transitions (--history-len {c.history_len}, --keep-every {c.keep_every})",
            flush=True,
        )
    del histories, data

    # warm-up, then rounds: a few updates of each configuration in turn
    for name in configs:
        for _ in range(args.warmup_updates):
            train_step(*runs[name])
    round_times = {name: [] for name in configs}  # s/update of each round
    names = tuple(configs)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(updates_per_round[name]):
                train_step(*runs[name])
            round_times[name].append((time.perf_counter() - start) / updates_per_round[name])
    s_per_update = {name: float(np.mean(times)) for name, times in round_times.items()}
    tokens_per_s = {name: tokens_per_update[name] / s_per_update[name] for name in configs}
    print(f"{args.rounds} interleaved rounds, {args.num_threads} threads:", flush=True)
    for name in configs:
        times = round_times[name]
        print(
            f"  {name:7s}: {args.rounds * updates_per_round[name]} updates, {tokens_per_update[name]:6d} tokens/update, "
            f"{s_per_update[name]:.3f} s/update (rounds {min(times):.3f}-{max(times):.3f}), {tokens_per_s[name]:,.0f} tokens/s",
            flush=True,
        )
    # the fastest round of each is the one least slowed by other jobs: small updates suffer more from shared cores
    best = {name: min(times) for name, times in round_times.items()}
    per_token, d = tokens_per_update[second] / tokens_per_update[first], 2 if stage else 1  # decimals: stages differ by tens of %
    print(
        f"speedup: {s_per_update[second] / s_per_update[first]:.{d}f}x per update, "
        f"{s_per_update[second] / s_per_update[first] / per_token:.{d}f}x per token "
        f"(fastest rounds: {best[second] / best[first]:.{d}f}x, {best[second] / best[first] / per_token:.{d}f}x)",
        flush=True,
    )
