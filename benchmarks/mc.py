"""Benchmark: MC-dropout scoring, dubito's engine side by side with the naive loop and baal.

Run (``pip install -c constraints.txt -e '.[bench]'`` adds baal, a benchmark-only extra)::

    python -m benchmarks.mc speed   [--device cuda] [--models tiny,fc_densenet56] [--sizes 96x128,180x240]
                                    [--batch 4] [--samples 20] [--compile] [--bf16] [--quick]
    python -m benchmarks.mc memory  [--pools 200,2000] [--samples 20]
    python -m benchmarks.mc quality [--epochs 12] [--seeds 0,1]

``speed`` times, in one process, on the same model, weights and inputs: the naive loop (T
forward passes with dropout in train mode under ``no_grad``, the model's plain
concatenating dense blocks); baal 2's ``mc_inference`` with ``replicate_in_memory=True``
on its ``patch_module``'d copy of the model (its default); and dubito's engine in each of
its modes, one speed-up added per row, then the FC-DenseNet dropout placements with
deterministic-prefix caching. Each method is warmed up once (T = 8, which also lets
``chunk_size="auto"`` settle) and then timed ``--repeats`` times (best kept). It prints
images per second, the ratios against the naive loop and against baal, the peak memory
above what was in use before (measured in one more, untimed run: on a CPU the resident
memory sampled every millisecond after ``malloc_trim``; on CUDA ``max_memory_allocated``),
and the largest
deviation of the uncertainties (predictive entropy, aleatoric = expected entropy,
epistemic = mutual information, per pixel, in nats) from a reference:

- engine rows and ``naive``/``baal`` are compared with the engine's plain loop on the same
  dropout masks (naive and baal draw their own masks from the global RNG when timed, so
  they are re-run untimed with the engine's masks injected, through their own code path);
- placement rows are compared with the same placement run by the plain loop (the
  placements are different models, so they are not compared with ``all``).

``memory`` scores synthetic pools of each size with the labeling loop's own scoring
(``score_pool``: T MC samples, BALD, per-image reduction) in a fresh process each, and
prints each process's peak resident memory.

``quality`` trains the tiny FC-DenseNet with each dropout placement on synthetic CamVid
scenes and reports the in-distribution mean IoU, the out-of-distribution AUROC of the
per-image epistemic uncertainty (synthetic indoor rooms), and the MC scoring speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmarks.timing import best_time
from dubito.platform.mc import _chunk_cache, _sample_seed, dropout_modules, mc_dropout_mode, mc_samples
from dubito.platform.models import DROPOUT_PLACEMENTS, FCDenseNet, _DenseBlock
from dubito.platform.uncertainty import classification_uncertainty

WARMUP_SAMPLES = 8
FIELDS = ("predictive_entropy", "aleatoric_entropy", "mutual_information")


# ----------------------------------------------------------------------------- measuring
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator statistics, or the process's
    resident set sampled every millisecond on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)
        self.base = _rss()
        self.top = self.base
        self.running = True

        def sample() -> None:
            while self.running:
                self.top = max(self.top, _rss())
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, _rss()) - self.base


def limit_memory(fraction: float = 0.8) -> None:
    """On Linux, cap this process's address space at what it uses now plus ``fraction`` of the
    available memory, so that a method that cannot fit (baal replicating T images at once) fails
    with an allocation error the benchmark reports, instead of the kernel killing the process."""
    import resource

    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, StopIteration):
        return
    resource.setrlimit(resource.RLIMIT_AS, (size + int(fraction * available), resource.RLIM_INFINITY))


def _memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB GPU"
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return (
        "capped at {:.1f} GiB of address space".format(soft / 2**30)
        if soft != resource.RLIM_INFINITY
        else "host memory"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(
    fn: Callable[[int], Tensor], samples: int, repeats: int, device: torch.device, memory: bool = True
) -> tuple[float, float, Tensor]:
    """(best seconds, peak bytes, probabilities (T, N, C, ...)) of ``fn(samples)`` after a warm-up.

    The peak memory comes from one more, untimed run (NaN with ``memory=False``): on a CPU the
    allocator's free memory is first handed back to the OS (``malloc_trim``), which would
    otherwise slow the timed runs with page faults."""
    fn(min(samples, WARMUP_SAMPLES))
    _sync(device)
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(samples)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    peak = float("nan")
    if memory:
        del out
        with PeakMemory(device) as measured:
            out = fn(samples)
        peak = measured.peak
    return best, peak, out


# ----------------------------------------------------------------------------- the methods
@contextlib.contextmanager
def plain_blocks():
    """The model's dense blocks as written (concatenating at every layer), as a user's model is."""
    _DenseBlock.preallocate = False
    try:
        yield
    finally:
        _DenseBlock.preallocate = True


def naive_loop(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    """What a user writes: eval mode, dropout modules in train mode, T passes under no_grad."""
    was = model.training
    model.eval()
    for m in dropout_modules(model):
        m.train()
    try:
        with torch.no_grad(), plain_blocks():
            return torch.stack([torch.softmax(model(x).float(), 1) for _ in range(samples)])
    finally:
        model.train(was)


def baal_method(model: nn.Module, replicate: bool = True):
    """baal 2's MC inference on its patched copy of the model (``replicate_in_memory=True`` is its default)."""
    from baal.bayesian.dropout import patch_module
    from baal.modelwrapper import mc_inference

    patched = patch_module(copy.deepcopy(model), inplace=True).eval()

    def run(x: Tensor, samples: int) -> Tensor:
        with torch.no_grad(), plain_blocks():  # as baal's ModelWrapper.predict_on_batch
            out = mc_inference(patched, x, samples, replicate_in_memory=replicate)  # (N, C, H, W, T) logits
        return torch.softmax(out.float(), 1).permute(4, 0, 1, 2, 3)

    return run


def with_engine_masks(model: nn.Module, x: Tensor, samples: int, replicate: bool, seed: int = 0) -> Tensor:
    """The naive loop (``replicate=False``) or baal's replicated pass, with the engine's masks for
    samples 0..T-1 injected, so that their uncertainties can be compared with the engine's."""
    with torch.no_grad(), plain_blocks(), mc_dropout_mode(model) as source:
        if replicate:
            from baal.modelwrapper import mc_inference

            source.generators = [
                torch.Generator(device=x.device).manual_seed(_sample_seed(seed, t)) for t in range(samples)
            ]
            out = mc_inference(model, x, samples, replicate_in_memory=True)
            return torch.softmax(out.float(), 1).permute(4, 0, 1, 2, 3)
        outs = []
        for t in range(samples):
            source.generators = [torch.Generator(device=x.device).manual_seed(_sample_seed(seed, t))]
            outs.append(torch.softmax(model(x).float(), 1))
        return torch.stack(outs)


def engine(model: nn.Module, x: Tensor, samples: int, *, buffered: bool = True, **options) -> Tensor:
    with contextlib.nullcontext() if buffered else plain_blocks():
        return mc_samples(model, x, samples, probs=True, logit_noise_samples=0, seed=0, **options).probs


def max_deviation(probs: Tensor, reference: Tensor) -> float:
    a, b = classification_uncertainty(probs.float()), classification_uncertainty(reference.float())
    return max((getattr(a, f) - getattr(b, f)).abs().max().item() for f in FIELDS)


@dataclass
class Row:
    case: str
    method: str
    seconds: float
    peak: float
    deviation: float | None
    reference: str
    images: int
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def _model(name: str, dropout_at: str, state: dict | None, device: torch.device) -> FCDenseNet:
    torch.manual_seed(0)
    model = FCDenseNet(name, variant="epistemic", dropout=0.2, dropout_at=dropout_at)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device).eval()


def speed_case(name: str, size: tuple[int, int], args, device: torch.device, log=print) -> list[Row]:
    """Every method on one (model, image size)."""
    h, w = size
    case = f"{name} {args.batch}x3x{h}x{w}"
    model = _model(name, "all", None, device)
    state = model.state_dict()
    x = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    T, rows = args.samples, []

    def add(
        method: str,
        fn: Callable[[int], Tensor],
        reference: Tensor | None,
        label: str,
        check: Callable[[], Tensor] | None = None,
    ) -> None:
        _chunk_cache.clear()
        try:
            seconds, peak, probs = time_method(fn, T, args.repeats, device, memory=not args.no_memory)
            dev = None if reference is None else max_deviation(probs if check is None else check(), reference)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if "memory" not in str(err).lower():
                raise
            seconds, peak, dev, label = (
                float("nan"),
                float("nan"),
                None,
                f"out of memory ({_memory_note(device)})",
            )
        rows.append(Row(case, method, seconds, peak, dev, label, args.batch, {"chunk": dict(_chunk_cache)}))
        log(format_row(rows[-1], rows))

    reference = engine(model, x, T, buffered=False, chunk_size=1, channels_last=False, prefix_cache=False)
    add(
        "naive loop (train-mode dropout, no_grad)",
        lambda t: naive_loop(model, x, t),
        reference,
        "engine loop, same masks",
        check=lambda: with_engine_masks(model, x, T, replicate=False),
    )
    if not args.no_baal:
        run = baal_method(model)
        add(
            "baal mc_inference, replicate_in_memory",
            lambda t: run(x, t),
            reference,
            "engine loop, same masks",
            check=lambda: with_engine_masks(model, x, T, replicate=True),
        )
        looped = baal_method(model, replicate=False)
        add("baal mc_inference, replicate_in_memory=False", lambda t: looped(x, t), None, "")
    plain = {"chunk_size": 1, "channels_last": False}
    add(
        "engine: loop, NCHW, concatenating blocks",
        lambda t: engine(model, x, t, buffered=False, **plain),
        reference,
        "engine loop",
    )
    add(
        "engine: + preallocated dense blocks",
        lambda t: engine(model, x, t, **plain),
        reference,
        "engine loop",
    )
    add("engine: + channels-last", lambda t: engine(model, x, t, chunk_size=1), reference, "engine loop")
    add(
        f"engine: replicate all T (chunk {T})",
        lambda t: engine(model, x, t, chunk_size=t),
        reference,
        "engine loop",
    )
    add("engine: default (auto chunk, measured)", lambda t: engine(model, x, t), reference, "engine loop")
    if device.type == "cuda" or args.bf16:
        add(
            "engine: default + bf16 autocast",
            lambda t: engine(model, x, t, autocast=True),
            reference,
            "engine loop",
        )
    if args.compile:
        compiled_options = {"autocast": True} if device.type == "cuda" else {}
        engine(model, x, WARMUP_SAMPLES, compile=True, **compiled_options)  # compile outside the timing
        add(
            "engine: default + torch.compile" + (" + bf16" if compiled_options else ""),
            lambda t: engine(model, x, t, compile=True, **compiled_options),
            reference,
            "engine loop",
        )
    for placement in DROPOUT_PLACEMENTS[1:]:
        placed = _model(name, placement, state, device)
        ref = engine(placed, x, T, buffered=False, chunk_size=1, channels_last=False, prefix_cache=False)
        if placement == "head":
            add(
                "dropout_at=head, no prefix cache",
                lambda t: engine(placed, x, t, prefix_cache=False),
                ref,
                "same placement, engine loop",
            )
        add(
            f"dropout_at={placement} + prefix cache",
            lambda t: engine(placed, x, t),
            ref,
            "same placement, engine loop",
        )
        if device.type == "cuda":
            add(
                f"dropout_at={placement} + prefix cache + bf16",
                lambda t: engine(placed, x, t, autocast=True),
                ref,
                "same placement, engine loop",
            )
    return rows


HEADER = (
    f"| {'case':26s} | {'method':44s} | img/s | vs naive | vs baal | peak MiB | max abs dev | reference |"
)


def format_row(row: Row, rows: list[Row]) -> str:
    same = [r for r in rows if r.case == row.case]
    naive = next((r for r in same if r.method.startswith("naive")), None)
    baal = next((r for r in same if r.method == "baal mc_inference, replicate_in_memory"), None)

    def ratio(base: Row | None) -> str:
        return (
            f"{row.rate / base.rate:.2f}x"
            if base and base.rate == base.rate and row.rate == row.rate
            else "-"
        )

    dev = "-" if row.deviation is None else f"{row.deviation:.1e}"
    rate = "-" if row.rate != row.rate else f"{row.rate:5.2f}"
    return (
        f"| {row.case:26s} | {row.method:44s} | {rate:>5s} | {ratio(naive):>8s} | {ratio(baal):>7s} | "
        f"{row.peak / 2**20:8.1f} | {dev:>11s} | {row.reference} |"
    )


def speed(args) -> list[Row]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_baal:
        try:
            import baal  # noqa: F401
        except ImportError:
            sys.exit(
                "baal is not installed: pip install -c constraints.txt -e '.[bench]' (or pass --no-baal)"
            )
    if device.type == "cpu" and not args.no_memory_cap:
        limit_memory()
    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"MC-dropout speed: T = {args.samples}, batch {args.batch}, {card}, torch {torch.__version__}")
    print(HEADER)
    print("|" + "|".join("-" * (len(c) + 2) for c in HEADER.strip("|").split("|")) + "|")
    rows: list[Row] = []
    for name in args.models.split(","):
        for size in args.sizes.split(","):
            h, w = (int(v) for v in size.lower().split("x"))
            rows += speed_case(name, (h, w), args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r.__dict__, "rate": r.rate} for r in rows], f, indent=1, default=str)
    return rows


# ----------------------------------------------------------------------------- memory
def memory_child(pool: int, samples: int, height: int, width: int) -> dict:
    """Score a synthetic pool with the labeling loop's scoring; the process's peak memory."""
    import resource

    from dubito.acquisition.config import LoopConfig
    from dubito.acquisition.pool import pool_datasets
    from dubito.acquisition.scoring import score_pool
    from dubito.platform.training import build_for

    config = LoopConfig.flat(
        pool_images=pool, samples=samples, height=height, width=width, test_images=1, device="cpu"
    )
    _, data, _ = pool_datasets(config)
    model, spec = build_for(config.train_config(0), data)
    score_pool(
        model, spec, data, list(range(4)), config.scoring(), 0, torch.device("cpu"), progress=False
    )  # warm-up
    before = _rss()
    start = time.perf_counter()
    scores = score_pool(
        model, spec, data, list(range(pool)), config.scoring(), 0, torch.device("cpu"), progress=False
    ).scores
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"pool": pool, "scored": int(scores.numel()), "seconds": seconds, "peak": peak, "before": before}


def memory(args) -> list[dict]:
    results = []
    print(
        f"Streaming memory: synthetic CamVid {args.height}x{args.width}, tiny FC-DenseNet, T = {args.samples}, "
        f"batch 8, the labeling loop's score_pool, one fresh process per pool"
    )
    print(
        "| pool images | seconds | img/s | peak RSS MiB | RSS before scoring MiB | peak / smallest pool's |"
    )
    print("|---|---|---|---|---|---|")
    for pool in (int(p) for p in args.pools.split(",")):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.mc",
            "memory-child",
            "--pool",
            str(pool),
            "--samples",
            str(args.samples),
            "--height",
            str(args.height),
            "--width",
            str(args.width),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results.append(r)
        print(
            f"| {r['pool']} | {r['seconds']:.1f} | {r['pool'] / r['seconds']:.1f} | {r['peak'] / 2**20:.1f} | "
            f"{r['before'] / 2**20:.1f} | {r['peak'] / results[0]['peak']:.3f} |"
        )
    return results


# ----------------------------------------------------------------------------- quality
def quality(args) -> list[dict]:
    """Train the tiny FC-DenseNet with each placement; OOD AUROC of its epistemic uncertainty and speed."""
    import tempfile

    if args.threads:
        torch.set_num_threads(args.threads)
    results: list[dict] = []
    print(
        f"Dropout placement quality: tiny FC-DenseNet (variant both), synthetic CamVid {args.height}x{args.width}, "
        f"{args.train_images} training scenes, {args.epochs} epochs, T = {args.samples}; OOD = synthetic indoor rooms"
    )
    print("| dropout_at | seed | test mean IoU | OOD AUROC (epistemic) | scoring img/s | speed-up vs all |")
    print("|---|---|---|---|---|---|")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"  # the runs are scratch
        try:
            for seed in (int(s) for s in args.seeds.split(",")):
                for placement in DROPOUT_PLACEMENTS:
                    results.append(_train_and_score(args, f"{tmp}/{placement}-{seed}", placement, seed))
                    r = results[-1]
                    base = next(b for b in results if b["seed"] == seed and b["dropout_at"] == "all")
                    print(
                        f"| {placement} | {seed} | {r['mean_iou']:.4f} | {r['ood_auroc']:.3f} | {r['img_per_s']:.1f} | "
                        f"{r['img_per_s'] / base['img_per_s']:.2f}x |"
                    )
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous
    return results


def _train_and_score(args, out: str, placement: str, seed: int) -> dict:
    from dubito.platform.evaluation import EvalConfig, evaluate
    from dubito.platform.training import TrainConfig, train

    config = TrainConfig(
        output=out,
        dropout_at=placement,
        epochs=args.epochs,
        seed=seed,
        height=args.height,
        width=args.width,
        train_images=args.train_images,
        device="cpu",
    )
    train(config, progress=False)
    summary = evaluate(
        EvalConfig(
            model=f"{out}/model.pt",
            output=f"{out}/eval",
            samples=args.samples,
            images=args.test_images,
            figures=0,
            device="cpu",
        ),
        progress=False,
    )["summary"]
    rate = _placement_rate(f"{out}/model.pt", args)
    return {
        "dropout_at": placement,
        "seed": seed,
        "mean_iou": summary["mean_iou"],
        "ood_auroc": summary["ood_auroc"],
        "img_per_s": rate,
    }


def _placement_rate(path: str, args) -> float:
    """Images per second of the service scoring a batch of 4 with the trained model (T = ``--samples``)."""
    from dubito.platform.service import UncertaintyService
    from dubito.platform.training import load_model

    model, _ = load_model(path, "cpu")
    service = UncertaintyService(model, samples=args.samples, device="cpu", seed=0, progress=False)
    x = torch.randn(4, 3, args.height, args.width, generator=torch.Generator().manual_seed(1))
    best, _ = best_time(lambda: service.predict(x), max(1, args.repeats))  # warm-up: the measured chunk size
    return x.shape[0] / best


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="img/s of the naive loop, baal and the engine's modes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--models", default=None, help="FC-DenseNet configs (CPU: tiny,fc_densenet56; CUDA: fc_densenet103)"
    )
    p.add_argument("--sizes", default=None, help="HxW list (CPU: 96x128,180x240; CUDA: 360x480)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=None, help="T (CPU: 20; CUDA: 50)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method (best kept)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: as set)")
    p.add_argument(
        "--compile", action="store_true", help="add torch.compile rows (compiles outside the timing)"
    )
    p.add_argument("--bf16", action="store_true", help="add a bf16 autocast row on a CPU too")
    p.add_argument("--no-baal", action="store_true", help="leave baal out")
    p.add_argument("--no-memory", action="store_true", help="skip the untimed peak-memory runs")
    p.add_argument(
        "--no-memory-cap",
        action="store_true",
        help="CPU: do not cap the address space (a method that does not fit is then killed)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, 32x40, T = 4 (smoke run)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    m = sub.add_parser("memory", help="peak memory of streaming scoring, by pool size")
    m.add_argument("--pools", default="200,2000")
    m.add_argument("--samples", type=int, default=20)
    m.add_argument("--height", type=int, default=32)
    m.add_argument("--width", type=int, default=40)
    c = sub.add_parser("memory-child", help=argparse.SUPPRESS)
    c.add_argument("--pool", type=int, required=True)
    c.add_argument("--samples", type=int, required=True)
    c.add_argument("--height", type=int, required=True)
    c.add_argument("--width", type=int, required=True)
    q = sub.add_parser("quality", help="OOD AUROC and speed of each dropout placement (trains tiny models)")
    q.add_argument("--epochs", type=int, default=12)
    q.add_argument("--seeds", default="0")
    q.add_argument("--samples", type=int, default=20)
    q.add_argument("--height", type=int, default=72)
    q.add_argument("--width", type=int, default=96)
    q.add_argument("--train-images", type=int, default=120)
    q.add_argument("--test-images", type=int, default=30, help="in-distribution and OOD test scenes each")
    q.add_argument("--repeats", type=int, default=3)
    q.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "speed":
        cuda = args.device.startswith("cuda")
        if args.quick:
            args.models, args.sizes, args.samples = (
                args.models or "tiny",
                args.sizes or "32x40",
                args.samples or 4,
            )
        args.models = args.models or ("fc_densenet103" if cuda else "tiny,fc_densenet56")
        args.sizes = args.sizes or ("360x480" if cuda else "96x128,180x240")
        args.samples = args.samples or (50 if cuda else 20)
        speed(args)
    elif args.command == "memory":
        memory(args)
    elif args.command == "memory-child":
        print(json.dumps(memory_child(args.pool, args.samples, args.height, args.width)))
    else:
        quality(args)


if __name__ == "__main__":
    main()
