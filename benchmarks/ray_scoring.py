"""Benchmark: scoring a labeling pool in this process versus on 1 and 2 Ray actors.

Run: ``python -m benchmarks.ray_scoring [--pool 96] [--size 96 128] [--model fc_densenet56] [--samples 8]``.
In one process, on the same model, weights and pool, it times one round of pool scoring (new
weights sent to the actors + MC-dropout scoring of every batch; the actors are started before
the clock runs, as a labeling loop starts them once) and prints images/s, the ratio against
local scoring, and the largest difference of the scores from local scoring (0: bit-identical).

By default an actor runs with this process's PyTorch thread count (the scores are then
bit-identical); ``threads=1`` rows show actors with one thread each, which is what to use when
actors share a machine's cores (their sums differ from local ones at float rounding).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Subset

from benchmarks.timing import best_time


def bench(
    pool_images: int, size: tuple[int, int], model_name: str, samples: int, batch_size: int, repeats: int
) -> list[str]:
    from dubito.acquisition.config import LoopConfig
    from dubito.acquisition.distributed import RayPoolScorer
    from dubito.acquisition.pool import pool_datasets
    from dubito.acquisition.scoring import score_pool
    from dubito.platform.cluster import connect
    from dubito.platform.training import fit

    cpu = torch.device("cpu")
    connect()
    config = LoopConfig.flat(
        dataset="synthetic-camvid",
        model=model_name,
        height=size[0],
        width=size[1],
        pool_images=pool_images,
        epochs=1,
        samples=samples,
        batch_size=batch_size,
        acquisition="bald",
        device="cpu",
    )
    train_set, pool, _ = pool_datasets(config)
    model, spec, _ = fit(config.train_config(0), Subset(train_set, list(range(4))), device=cpu)
    positions = list(range(pool_images))

    def timed(scorer=None) -> tuple[float, torch.Tensor]:
        return best_time(
            lambda: (
                score_pool(
                    model, spec, pool, positions, config.scoring(), 1, cpu, progress=False, scorer=scorer
                ).scores
            ),
            repeats,
        )

    local_s, local = timed()
    threads = torch.get_num_threads()
    rows = [
        f"{'local (this process)':34s} {threads:7d} {pool_images / local_s:10.2f} {1.0:9.2f}x {0.0:12.2e}"
    ]
    for actors, per_actor in ((1, None), (2, None), (2, 1)):
        with RayPoolScorer(
            config.pool(), config.scoring(), spec, actors, device=config.train.device, threads=per_actor
        ) as scorer:
            scorer.devices()  # started and holding the pool before the clock runs
            seconds, scores = timed(scorer)
        name = f"{actors} Ray actor{'s' if actors > 1 else ''}"
        rows.append(
            f"{name:34s} {per_actor or threads:7d} {pool_images / seconds:10.2f} {local_s / seconds:9.2f}x "
            f"{(scores - local).abs().max().item():12.2e}"
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", type=int, default=32, help="pool images")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    parser.add_argument("--model", default="fc_densenet56")
    parser.add_argument("--samples", type=int, default=4, help="MC-dropout samples T")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    print(
        f"pool scoring: {args.pool} synthetic-camvid images {args.size[0]}x{args.size[1]}, {args.model}, T={args.samples}, "
        f"batch {args.batch_size}; best of {args.repeats} rounds"
    )
    print(f"{'scorer':34s} {'threads':>7s} {'img/s':>10s} {'vs local':>10s} {'max |Δscore|':>12s}")
    for row in bench(args.pool, tuple(args.size), args.model, args.samples, args.batch_size, args.repeats):
        print(row, flush=True)


if __name__ == "__main__":
    main()
