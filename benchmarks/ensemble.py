"""Benchmark: a deep ensemble's members as one batched forward versus a per-member loop.

Run: ``python -m benchmarks.ensemble [--device cuda] [--members 5] [--quick] [--large]``. Times, in
one process and on the same members, weights and inputs, ``ensemble_samples(batched=True)`` (FC-DenseNets:
one network of grouped convolutions, :class:`~dubito.platform.ensemble.GroupedFCDenseNet`; MLPs:
``torch.func`` vmap) and ``batched=False``, and prints throughput, the batched path's speed over the loop's, and the
largest deviation of the outputs and of the decomposition's epistemic part (mutual information
for classifiers, the members' variance for regressors) from the loop's — they agree to float
rounding. The target of the backends issue: on 2 CPU cores, K = 5 of the tiny FC-DenseNet on 4
images at 96×128, batched ≥ 2× the loop; ``--large`` adds FC-DenseNet103 on 2 images at 360×480
(the GPU target).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import best_time
from dubito.platform.ensemble import Ensemble, ensemble_samples
from dubito.platform.models import MLP, FCDenseNet
from dubito.platform.uncertainty import classification_uncertainty, regression_uncertainty


def bench_case(name: str, ensemble: Ensemble, x: torch.Tensor, repeats: int) -> dict:
    """One model: the loop's and the batched path's items/s, their ratio and the deviations."""
    classes = ensemble.task in ("classification", "segmentation")
    seconds, outputs = {}, {}
    for batched in (False, True):
        seconds[batched], outputs[batched] = best_time(
            lambda b=batched: ensemble_samples(ensemble, x, probs=classes, seed=0, batched=b),
            repeats,
            x.device,
        )
    loop, fast = outputs[False], outputs[True]
    if classes:
        epistemic = [classification_uncertainty(o.probs, o.mean).mutual_information for o in (loop, fast)]
    else:
        epistemic = [regression_uncertainty(o.mean, o.log_var).epistemic_var for o in (loop, fast)]
    return {
        "case": name,
        "members": len(ensemble),
        "loop_items_per_s": x.shape[0] / seconds[False],
        "batched_items_per_s": x.shape[0] / seconds[True],
        "speedup": seconds[False] / seconds[True],
        "max_output_deviation": (fast.mean - loop.mean).abs().max().item(),
        "max_epistemic_deviation": (epistemic[1] - epistemic[0]).abs().max().item(),
    }


def cases(
    members: int, quick: bool, device: torch.device, large: bool = False
) -> list[tuple[str, Ensemble, torch.Tensor]]:
    torch.manual_seed(0)
    h, w = (32, 48) if quick else (96, 128)
    dense = Ensemble(
        [FCDenseNet("tiny", num_classes=11, variant="both", dropout=0.2).eval() for _ in range(members)]
    )
    mlp = Ensemble(
        [MLP(1, 1, (64, 64), task="regression", variant="both", dropout=0.0) for _ in range(members)]
    )
    plain = Ensemble(  # no logit-noise head: the networks alone
        [FCDenseNet("tiny", num_classes=11, variant="epistemic", dropout=0.2).eval() for _ in range(members)]
    )
    images = torch.randn(4, 3, h, w, device=device)
    out = [
        (f"tiny FC-DenseNet both, 4 images {h}x{w}", dense.to(device), images),
        (f"tiny FC-DenseNet epistemic, 4 images {h}x{w}", plain.to(device), images),
        ("heteroscedastic MLP, 256 points", mlp.to(device), torch.randn(256, 1, device=device)),
    ]
    if large:
        big = Ensemble(
            [FCDenseNet("fc_densenet103", num_classes=11, variant="both").eval() for _ in range(members)]
        )
        out.append(
            ("FC-DenseNet103, 2 images 360x480", big.to(device), torch.randn(2, 3, 360, 480, device=device))
        )
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small images, one repeat (a smoke run)")
    parser.add_argument("--large", action="store_true", help="also FC-DenseNet103 at 360x480 (a GPU case)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    print(f"device {device}, {torch.get_num_threads()} threads, K = {args.members} members")
    print(
        f"{'case':40s} {'loop it/s':>10s} {'batched it/s':>13s} {'speed-up':>9s} {'max dev':>9s} {'epist dev':>10s}"
    )
    rows = []
    for name, ensemble, x in cases(args.members, args.quick, device, args.large):
        row = bench_case(name, ensemble, x, repeats)
        rows.append(row)
        print(
            f"{name:40s} {row['loop_items_per_s']:10.1f} {row['batched_items_per_s']:13.1f} "
            f"{row['speedup']:8.2f}x {row['max_output_deviation']:9.1e} {row['max_epistemic_deviation']:10.1e}"
        )
    return rows


if __name__ == "__main__":
    main()
