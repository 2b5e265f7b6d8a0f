"""Benchmark: MC-dropout chunking — loop (chunk 1) versus replicating the batch, and "auto".

Run: ``python -m benchmarks.mc_chunking [--device cuda] [--quick]``. Times, in one process
and on the same model, weights and inputs, each chunking of dubito's engine, and prints
throughput, the ratio against the plain loop, and the largest deviation of the samples
from the loop's (the engine is chunk-invariant, so it should be 0 up to float rounding).
This is what ``chunk_size="auto"`` is tuned from.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import best_time
from dubito.platform.mc import _chunk_cache, mc_samples
from dubito.platform.models import MLP, FCDenseNet


def bench_case(name: str, model: torch.nn.Module, x: torch.Tensor, samples: int, repeats: int) -> list[str]:
    device = x.device
    model = model.to(device)
    rows = []
    chunks: list = [1, max(1, samples // 4), samples, "auto"]
    base_time = base = None
    for chunk in dict.fromkeys(chunks):
        _chunk_cache.clear()
        seconds, out = best_time(
            lambda: mc_samples(model, x, samples, chunk_size=chunk, seed=0), repeats, device
        )
        if base is None:
            base_time, base = seconds, out.mean
        deviation = (out.mean - base).abs().max().item()
        items_per_s = x.shape[0] / seconds
        rows.append(
            f"{name:34s} {str(chunk):>6s} {items_per_s:12.1f} {base_time / seconds:10.2f}x {deviation:12.2e}"
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller cases (CI smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cases = [
        ("mlp 64 states x 8 features", MLP(8, 4, hidden=(64, 64), variant="epistemic"), torch.randn(64, 8)),
        ("tiny 4 x 3 x 96 x 128", FCDenseNet("tiny", variant="both"), torch.randn(4, 3, 96, 128)),
    ]
    if not args.quick:
        cases.append(
            (
                "fc_densenet56 4 x 3 x 96 x 128",
                FCDenseNet("fc_densenet56", variant="both"),
                torch.randn(4, 3, 96, 128),
            )
        )
    if device.type == "cuda" and not args.quick:
        cases.append(
            (
                "fc_densenet103 4 x 3 x 360 x 480",
                FCDenseNet("fc_densenet103", variant="both"),
                torch.randn(4, 3, 360, 480),
            )
        )
    print(
        f"device {device}, T = {args.samples}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"{'case':34s} {'chunk':>6s} {'items/s':>12s} {'vs loop':>11s} {'max |dev|':>12s}")
    for name, model, x in cases:
        for row in bench_case(name, model, x.to(device), args.samples, args.repeats):
            print(row)


if __name__ == "__main__":
    main()
