"""Device check of the MC engine's CUDA paths (run on a GPU machine; CI has none).

``python -m benchmarks.cuda_check`` checks, on the real model and device:
* ``chunk_size="auto"`` probes memory and picks a chunk > 1 on CUDA, and the samples
  equal the plain loop's for the same seed;
* a forced oversized chunk runs out of memory, is halved until it fits, and still gives
  the loop's samples;
* bf16 autocast stays within bf16 tolerance of fp32 for the uncertainty maps;
* BatchNorm statistics and module modes are untouched;
and prints throughput for each. Exits non-zero when a check fails.
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from dubito.platform.mc import _chunk_cache, mc_samples
from dubito.platform.models import FCDenseNet
from dubito.platform.uncertainty import classification_uncertainty


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)
    model = FCDenseNet("fc_densenet103", variant="both").to(device).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 360, 480, device=device)
    samples = 20
    failures = []

    def timed(**kw):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = mc_samples(model, x, samples, seed=1, probs=True, logit_noise_samples=8, **kw)
        torch.cuda.synchronize()
        return out, time.perf_counter() - start

    loop, t_loop = timed(chunk_size=1)
    _chunk_cache.clear()
    auto, t_auto = timed(chunk_size="auto")
    chosen = next(iter(_chunk_cache.values()))
    auto2, t_auto2 = timed(chunk_size="auto")  # cached choice
    dev = max((a - b).abs().max().item() for a, b in zip(loop, auto2))
    print(
        f"loop: {x.shape[0] * samples / t_loop:.1f} img-samples/s; auto chose chunk {chosen}: "
        f"{x.shape[0] * samples / t_auto2:.1f} img-samples/s ({t_loop / t_auto2:.2f}x); max |dev| {dev:.2e}"
    )
    if chosen <= 1:
        failures.append(f"auto chunk on CUDA chose {chosen}")
    if dev > 1e-3:
        failures.append(f"auto-chunked samples deviate from the loop by {dev}")

    _chunk_cache.clear()
    big, t_big = timed(chunk_size=samples)  # replicate everything at once (80 images)
    dev = max((a - b).abs().max().item() for a, b in zip(loop, big))
    print(f"chunk {samples}: {x.shape[0] * samples / t_big:.1f} img-samples/s; max |dev| {dev:.2e}")

    xl = torch.randn(32, 3, 360, 480, device=device)
    try:
        sizes: list[int] = []
        hook = model.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))
        torch.cuda.synchronize()
        start = time.perf_counter()
        halved = mc_samples(
            model, xl, 8, seed=2, chunk_size=8
        )  # 256 images at once: OOM expected, then halving
        torch.cuda.synchronize()
        halving_time = time.perf_counter() - start
        hook.remove()
        tried = [n // xl.shape[0] for n in sizes]
        ref = mc_samples(model, xl, 8, seed=2, chunk_size=1)
        dev = (ref.mean - halved.mean).abs().max().item()
        print(f"OOM halving: chunks tried {tried} in {halving_time:.1f} s; max |dev| from loop {dev:.2e}")
        if tried[0] == 8 and len(set(tried)) == 1:
            print("  (no OOM at 256 images: halving not exercised)")
        if dev > 1e-3:
            failures.append(f"samples after OOM halving deviate from the loop by {dev}")
        del ref, halved
    except torch.OutOfMemoryError as err:
        failures.append(f"OOM halving failed: {err}")
    del xl
    torch.cuda.empty_cache()

    # bf16 on a confident model (head weights scaled so logits spread like a trained net's)
    confident = copy.deepcopy(model)
    with torch.no_grad():
        confident.head.out.weight.mul_(40.0)
    ref32 = mc_samples(confident, x, samples, seed=1, probs=True, logit_noise_samples=8)
    _chunk_cache.clear()
    torch.cuda.synchronize()
    start = time.perf_counter()
    bf16 = mc_samples(confident, x, samples, seed=1, probs=True, logit_noise_samples=8, autocast=True)
    torch.cuda.synchronize()
    t_bf16 = time.perf_counter() - start
    u32 = classification_uncertainty(ref32.probs, ref32.mean)
    u16 = classification_uncertainty(bf16.probs, bf16.mean)
    agree = (u32.prediction == u16.prediction).float().mean().item()
    dev_pe = (u32.predictive_entropy - u16.predictive_entropy).abs().mean().item()
    print(
        f"bf16 autocast: {x.shape[0] * samples / t_bf16:.1f} img-samples/s; mean predictive entropy "
        f"{u32.predictive_entropy.mean().item():.3f} (fp32); prediction agreement {agree:.4f}; "
        f"mean |Δ predictive entropy| {dev_pe:.4f}"
    )
    if agree < 0.98:
        failures.append(f"bf16 predictions agree with fp32 on only {agree:.3f} of pixels")

    after = model.state_dict()
    if any(not torch.equal(state[k], after[k]) for k in state):
        failures.append("model state changed during MC sampling")
    if not all(m.training for m in model.modules()):
        failures.append("module modes not restored")
    print("peak memory", torch.cuda.max_memory_allocated() / 2**30, "GiB")
    for f in failures:
        print("FAIL:", f)
    print("all CUDA checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
