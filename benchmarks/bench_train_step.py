# Training speed of ad_dt.py: our default update vs the original design's configuration, measured side by side. Docs: benchmarks/README.md
import os
import sys
import time
from dataclasses import dataclass

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
    histories_dir: str = "histories"
    """directory written by `collect_histories.py` (the A2C histories, the original design's data); each configuration reads
    it at its own pace (--history-len/--keep-every)"""
    rounds: int = 4
    """timed rounds; each runs both configurations, in alternating order, so machine load hits both alike"""
    default_updates: int = 120
    """timed updates of the default configuration per round (~0.1 s each: about as long as one update of the original design's,
    so that a burst of load is as likely to hit either)"""
    original_updates: int = 1
    """timed updates of the original design's configuration per round (~14 s each)"""
    warmup_updates: int = 1
    """untimed updates of each configuration before the rounds"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    configs = {
        "default": ADArgs(),
        # the original design's configuration, as benchmarks/README.md's `ad_dt.py --layout three --seq-len 256 ...` command writes it
        "original": ADArgs(
            layout="three", seq_len=256, history_len=800_000, keep_every=1,
            embedding_dim=64, num_layers=4, num_heads=4, feed_forward_dim=2048,
            attention_dropout=0.5, residual_dropout=0.1, embedding_dropout=0.0,
            batch_size=32, learning_rate=3e-4, min_lr=2e-6, betas=(0.9, 0.99), clip_grad=1.0, num_updates=22_000,
        ),
    }
    updates_per_round = {"default": args.default_updates, "original": args.original_updates}
    tasks, histories = load_histories(args.histories_dir)
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
    per_token = tokens_per_update['original'] / tokens_per_update["default"]
    print(
        f"speedup: {s_per_update['original'] / s_per_update['default']:.1f}x per update, "
        f"{s_per_update['original'] / s_per_update['default'] / per_token:.1f}x per token "
        f"(fastest rounds: {best['original'] / best['default']:.1f}x, {best['original'] / best['default'] / per_token:.1f}x)",
        flush=True,
    )
