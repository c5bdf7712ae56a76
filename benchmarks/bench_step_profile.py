# Where ad_dt.py's training step spends its time, and what two ways of speeding it up on the CPU give: the default
# update (float32, eager) vs the same under torch.compile and under bfloat16 autocast, side by side. Docs: benchmarks/README.md
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ad_dt import Args as ADArgs  # noqa: E402
from ad_dt import load_histories, make_dataset  # noqa: E402
from bench_layouts import make_model, train_step  # noqa: E402  (ad_dt.py's model and update)


@dataclass
class Args:
    seed: int = 1
    """seed of the models and the window sampling"""
    num_threads: int = 2
    """CPU threads for torch"""
    histories_dir: str = "histories"
    """Dyna-Q histories (`collect_histories_tabular.py`'s default); the first 20 training goals are enough to sample windows"""
    rounds: int = 4
    """timed rounds; each runs every variant, in alternating order, so machine load hits all alike"""
    updates: int = 10
    """timed updates of each variant per round"""
    top_ops: int = 8
    """rows of the profile of the default update"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    if not os.path.isfile(os.path.join(args.histories_dir, "tasks.json")):
        raise SystemExit(f"error: --histories-dir {args.histories_dir} has no tasks.json; run `python collect_histories_tabular.py` first")
    tasks, histories = load_histories(args.histories_dir)
    data, train_args = make_dataset(histories[:20]), ADArgs()  # ad_dt.py's defaults: the Dyna-Q stage's update
    del histories
    variants = {"eager": contextlib.nullcontext, "compile": contextlib.nullcontext,
                "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    runs = {}
    for name in variants:
        model, optimizer, scheduler = make_model(train_args, tasks["env"], args.seed)
        runs[name] = [torch.compile(model) if name == "compile" else model, optimizer, scheduler, data, train_args,
                      np.random.default_rng(args.seed)]
    for name, context in variants.items():  # warm-up (torch.compile compiles here)
        start = time.perf_counter()
        with context():
            train_step(*runs[name]), train_step(*runs[name])
        print(f"{name:8s}: 2 warm-up updates in {time.perf_counter() - start:.1f} s", flush=True)
    with FlopCounterMode(display=False) as counter:
        train_step(*runs["eager"])
    gflop = counter.get_total_flops() / 1e9  # attention counted in full, its causal half included

    round_times = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name in list(variants) if round_ % 2 == 0 else list(variants)[::-1]:
            with variants[name]():
                start = time.perf_counter()
                for _ in range(args.updates):
                    train_step(*runs[name])
                round_times[name].append((time.perf_counter() - start) / args.updates)
    best = {name: min(times) for name, times in round_times.items()}  # the round least slowed by other jobs
    print(f"{args.rounds} interleaved rounds of {args.updates} updates, {args.num_threads} threads; {gflop:.2f} GFLOP per update")
    for name, times in round_times.items():
        print(f"  {name:8s}: {best[name]:.3f} s/update (rounds {min(times):.3f}-{max(times):.3f}), {gflop / best[name]:.0f} GFLOP/s, "
              f"speedup over eager {best['eager'] / best[name]:.2f}x")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(3):
            train_step(*runs["eager"])
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top_ops))
