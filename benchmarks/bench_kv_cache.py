# In-context evaluation speed of ad_dt.py: KV cache vs recomputing the whole window every env step. Docs: benchmarks/README.md
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ad_dt  # noqa: E402


@dataclass
class Args:
    seq_len: int = 256
    """context in transitions (the window that the baseline recomputes every step)"""
    num_goals: int = 23
    """goals evaluated at once (ad_dt.py evaluates the 23 held-out goals)"""
    eval_seeds: int = 4
    """envs per goal: the batch is num_goals x eval_seeds envs"""
    eval_episodes: int = 20
    """episodes per env; an untrained model takes ~20 steps per episode, so 20 episodes pass the re-prefill at
    seq_len and reach it again"""
    num_threads: int = 2
    """CPU threads for torch"""
    seed: int = 1
    """seed of the model, the goals and the actions"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    rng = np.random.default_rng(args.seed)
    cells = [[r, c] for r in range(9) for c in range(9) if (r, c) != (4, 4)]
    goals = [cells[i] for i in rng.choice(len(cells), args.num_goals, replace=False)]
    env = {"size": 9, "terminate_on_goal": True, "max_episode_steps": 20}
    defaults = ad_dt.Args()
    rows = []
    for layout in ("one", "three"):
        torch.manual_seed(args.seed)
        config = ad_dt.GPTConfig(
            seq_len=args.seq_len, layout=layout, embedding_dim=defaults.embedding_dim, num_layers=defaults.num_layers,
            num_heads=defaults.num_heads, feed_forward_dim=defaults.feed_forward_dim,
        )
        model = ad_dt.ADTransformer(config).eval()
        speed, results = {}, {}
        for use_cache in (True, False):
            ad_dt.evaluate_in_context(model, goals[:1], env, 1, 1, use_cache=use_cache)  # warm-up
            start = time.perf_counter()
            results[use_cache] = ad_dt.evaluate_in_context(
                model, goals, env, args.eval_seeds, args.eval_episodes, seed=args.seed, use_cache=use_cache,
                context=args.seq_len, keep_first=0)  # seq_len transitions, cut to the recent half as when measured (longer: slower still)
            steps = results[use_cache]["states"].size  # env steps over all envs
            speed[use_cache] = steps / (time.perf_counter() - start)
        same = np.array_equal(results[True]["actions"], results[False]["actions"])
        err = np.abs(results[True]["logits"] - results[False]["logits"]).max()
        tokens = args.seq_len * config.tokens_per_transition
        print(
            f"layout {layout:5s} ({tokens} tokens, {len(goals) * args.eval_seeds} envs, {results[True]['states'].shape[1]} steps): "
            f"KV cache {speed[True]:9.0f} env steps/s, full recompute {speed[False]:7.0f} env steps/s, "
            f"x{speed[True] / speed[False]:.1f}; same actions: {same}, max |logit diff| {err:.1e}",
            flush=True,
        )
        rows.append((speed[True], speed[True] / speed[False]))
    # the speedup of the slower layout (three tokens per transition: the one that needs the cache most)
    print(f"speedup: {min(rows)[1]:.1f}x")
