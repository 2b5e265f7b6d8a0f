"""GPU check of the trainer and the evaluation: FC-DenseNet103 on SyntheticCamVid at 360x480,
224x224 crops, batch 4 (the paper's first stage), fp32 against AMP side by side; resuming the AMP
run on CUDA for one more epoch; then a T = 10 evaluation in and out of distribution.

Run: ``python -m benchmarks.cuda_train_check [--output DIR]`` on a CUDA machine. When MLflow is
not installed (a bare GPU image), runs are not tracked; everything else is the code users run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import torch


class _Untracked:
    run_id = "untracked"

    def log_metrics(self, *args, **kwargs) -> None: ...

    def log_params(self, *args, **kwargs) -> None: ...

    def log_artifact(self, *args, **kwargs) -> None: ...

    def set_tags(self, *args, **kwargs) -> None: ...


@contextlib.contextmanager
def _untracked(*args, **kwargs):
    yield _Untracked()


def main(argv=None) -> None:
    from dubito.platform import evaluation, training

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="runs/cuda_train_check")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=12, help="DataLoader workers rendering the synthetic scenes"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    if importlib.util.find_spec("mlflow") is None:
        training.tracked_run = evaluation.tracked_run = _untracked
    out = Path(args.output)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for amp in (False, True):
        torch.cuda.reset_peak_memory_stats()
        config = training.TrainConfig(
            output=str(out / f"amp-{amp}"),
            model="fc_densenet103",
            height=360,
            width=480,
            crop=224,
            train_images=args.train_images,
            val_images=4,
            epochs=args.epochs,
            batch_size=4,
            amp=amp,
            loader_workers=args.workers,
        )
        started = time.perf_counter()
        results = training.train(config, progress=False)
        history = results["history"]
        report[f"amp={amp}"] = {
            "seconds": time.perf_counter() - started,
            "last_epoch_seconds": history[-1]["epoch_seconds"],
            "train_images_per_s": args.train_images / history[-1]["epoch_seconds"],
            "train_loss": [h["train_loss"] for h in history],
            "val_mean_iou": history[-1]["val_mean_iou"],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        print(f"amp={amp}: {report[f'amp={amp}']}", flush=True)
    report["amp_speedup"] = (
        report["amp=False"]["last_epoch_seconds"] / report["amp=True"]["last_epoch_seconds"]
    )
    # resuming on CUDA: one more epoch from the AMP run's checkpoint (RNG states, scaler, optimizer)
    resumed = training.train(dataclasses.replace(config, epochs=args.epochs + 1), progress=False)
    report["resumed"] = {
        "epochs_run": resumed["epochs_run"],
        "history_epochs": [h["epoch"] for h in resumed["history"]],
    }
    print(f"resumed on CUDA: {report['resumed']}", flush=True)
    started = time.perf_counter()
    evaluated = evaluation.evaluate(
        evaluation.EvalConfig(
            model=str(out / "amp-True" / "model.pt"),
            output=str(out / "evaluation"),
            images=8,
            samples=10,
            figures=2,
        ),
        progress=False,
    )
    report["evaluation"] = {
        "seconds": time.perf_counter() - started,
        **{k: v for k, v in evaluated["summary"].items() if not isinstance(v, list)},
    }
    print(json.dumps(report, indent=2, default=float))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
