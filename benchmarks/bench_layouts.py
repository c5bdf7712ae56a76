# ad_dt.py's token layouts side by side: one token per transition vs the original design's three, in speed and in held-out return at equal wall time. Docs: benchmarks/README.md
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ad_dt import (  # noqa: E402
    INPUT_KEYS,
    NUM_ACTIONS,
    ADTransformer,
    evaluate_in_context,
    load_histories,
    lr_factor,
    make_dataset,
    model_config,
    sample_windows,
    summarize_evaluation,
)
from ad_dt import Args as ADArgs  # noqa: E402


@dataclass
class Args:
    seed: int = 1
    """seed of the models, the window sampling, dropout and the evaluation actions (the same for both layouts)"""
    num_threads: int = 2
    """CPU threads for torch"""

    # Data: the explorer histories, at the pace reproduce.sh trains ad_explorer with (AD learns in context from them)
    histories_dir: str = "histories_explorer"
    """directory written by `collect_histories_tabular.py --source explorer --num-envs 1000 --history-len 128000 --tasks all
    --histories-dir histories_explorer`"""
    history_len: Optional[int] = None
    """ad_dt.py's --history-len (None keeps every transition)"""
    keep_every: int = 1
    """ad_dt.py's --keep-every"""

    # (a) speed at ad_dt.py's default hyperparameters, the layouts interleaved so that machine load hits both alike
    warmup_updates: int = 2
    """untimed updates of each layout before the timed rounds"""
    speed_rounds: int = 6
    """timed rounds; each runs both layouts, in alternating order"""
    speed_round_s: float = 4.0
    """seconds of updates of each layout per round (whole updates, at least one): the same time for both layouts,
    so that a burst of load is as likely to hit either"""

    # (b) held-out in-context return at equal wall time
    budget_s: float = 240.0
    """training wall time given to each layout, converted to updates with the s/update measured in (a)
    (so a busy machine during (b) changes neither layout's number of updates)"""
    eval_episodes: int = 20
    """in-context episodes per env, from an empty context"""
    eval_seeds: int = 4
    """envs per held-out goal"""
    report_episodes: Tuple[int, ...] = (1, 5, 10, 20)
    """episodes (1-based) whose success rate is printed"""


def make_model(train_args, env, seed):
    """ad_dt.py's model, optimizer and schedule at the hyperparameters of train_args (an ad_dt.Args), seeded."""
    torch.manual_seed(seed)
    model = ADTransformer(model_config(train_args, env)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=train_args.learning_rate, betas=train_args.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, args=train_args))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, data, train_args, rng):
    """One update of ad_dt.py's training loop (without its TensorBoard writes); returns the loss."""
    batch, _ = sample_windows(data, train_args.batch_size, train_args.seq_len, rng)
    logits = model(*(batch[key] for key in INPUT_KEYS))  # the flags it was not built with are ignored
    loss = F.cross_entropy(logits.reshape(-1, NUM_ACTIONS), batch["actions"].reshape(-1))  # every action of the window
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), train_args.clip_grad)
    optimizer.step()
    scheduler.step()
    return loss.item()


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    # ad_dt.py's defaults when this was measured (the original design's tokens, a 128-transition context, dropout 0.1):
    # batch size, width, learning rate and schedule
    former = dict(seq_len=128, prev_state=False, prev_next_state=False, state_embedding="cell", residual_dropout=0.1)
    defaults = ADArgs(**former)
    layouts = ("one", "three")
    tasks, histories = load_histories(args.histories_dir)
    data = make_dataset(histories, args.history_len, args.keep_every)
    del histories
    env = tasks["env"]
    print(
        f"{args.histories_dir}: {len(data['offsets']) - 1} streams, {len(data['states'])} transitions; ad_dt.py defaults: "
        f"seq_len {defaults.seq_len}, batch {defaults.batch_size}, d{defaults.embedding_dim}, {defaults.num_layers} layers, "
        f"{defaults.num_heads} heads, ff {defaults.feed_forward_dim}, lr {defaults.learning_rate}; {args.num_threads} threads",
        flush=True,
    )

    # (a) speed: the same seconds of updates of each layout in turn, several rounds
    tokens_per_update, runs = {}, {}
    for layout in layouts:
        model, optimizer, scheduler = make_model(replace(defaults, layout=layout), env, args.seed)
        runs[layout] = (model, optimizer, scheduler, np.random.default_rng(args.seed))
        tokens_per_update[layout] = defaults.batch_size * defaults.seq_len * model.config.tokens_per_transition
        for _ in range(args.warmup_updates):
            train_step(*runs[layout][:3], data, defaults, runs[layout][3])
    round_times = {layout: [] for layout in layouts}  # (seconds, updates) of each round
    for round_ in range(args.speed_rounds):
        for layout in layouts if round_ % 2 == 0 else layouts[::-1]:
            start, updates = time.perf_counter(), 0
            while updates == 0 or time.perf_counter() - start < args.speed_round_s:
                train_step(*runs[layout][:3], data, defaults, runs[layout][3])
                updates += 1
            round_times[layout].append((time.perf_counter() - start, updates))
    del runs
    s_per_update = {layout: sum(t for t, _ in r) / sum(n for _, n in r) for layout, r in round_times.items()}
    tokens_per_s = {layout: tokens_per_update[layout] / s_per_update[layout] for layout in layouts}
    print(f"(a) speed, {args.speed_rounds} interleaved rounds of {args.speed_round_s:g} s of each layout:", flush=True)
    for layout in layouts:
        per_round = [t / n for t, n in round_times[layout]]
        print(
            f"  {layout:5s}: {sum(n for _, n in round_times[layout])} updates, {tokens_per_update[layout]:6d} tokens/update, "
            f"{s_per_update[layout]:.3f} s/update (rounds {min(per_round):.3f}-{max(per_round):.3f}), "
            f"{tokens_per_s[layout]:,.0f} tokens/s",
            flush=True,
        )

    # (b) the same wall-clock budget for each layout, as a number of updates, then in-context on the held-out goals
    print(
        f"(b) {args.budget_s:g} s of training each, then {len(tasks['test'])} held-out goals x {args.eval_seeds} envs each, "
        f"{args.eval_episodes} episodes from an empty context, sampled actions:",
        flush=True,
    )
    episodes = [e for e in args.report_episodes if 1 <= e <= args.eval_episodes]
    mean_return = {}
    for layout in layouts:
        num_updates = max(1, round(args.budget_s / s_per_update[layout]))
        train_args = ADArgs(num_updates=num_updates, **former)  # ad_dt.py's warmup + cosine schedule, over these updates
        model, optimizer, scheduler = make_model(replace(train_args, layout=layout), env, args.seed)
        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        losses = [train_step(model, optimizer, scheduler, data, train_args, rng) for _ in range(num_updates)]
        train_time = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate_in_context(model, tasks["test"], env, args.eval_seeds, args.eval_episodes, seed=args.seed,
                                     context=train_args.seq_len, keep_first=0)  # cut at the window, as when these were measured
        eval_time = time.perf_counter() - start
        summary = summarize_evaluation(result)
        mean_return[layout] = float(result["returns"].mean())
        success = ", ".join(f"ep {e} {result['successes'][:, e - 1].mean():.2f}" for e in episodes)
        print(
            f"  {layout:5s}: {num_updates} updates in {train_time:.0f} s (loss of the last 10: {np.mean(losses[-10:]):.3f}); "
            f"success {success}; mean return {mean_return[layout]:.3f}; first success at episode "
            f"{summary['first_success_episode']:.1f}, success after a success {summary['success_after_success']:.2f} "
            f"(evaluation {eval_time:.0f} s)",
            flush=True,
        )
    print(f"ratio: {tokens_per_s['one'] / tokens_per_s['three']:.2f}x", flush=True)
    print(
        f"return: one {mean_return['one']:.3f}, three {mean_return['three']:.3f} "
        f"(mean over {args.eval_episodes} episodes, {args.budget_s:g} s of training each)",
        flush=True,
    )
