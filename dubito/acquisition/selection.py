"""Batch selection: which k pool positions to label, given per-image scores.

:func:`select` returns k distinct positions into the pool, in selection order. Every method
is reproducible: the stochastic ones draw from a CPU ``torch.Generator`` seeded with
``seed``, so the same seed gives the same selection.

- ``topk``: the k highest scores, ties to the lower position.
- ``power``: stochastic power acquisition (Kirsch et al. 2023): k draws without replacement
  with p ∝ score^(1/temperature) (scores clamped ≥ 1e-12), by Gumbel-top-k on log scores.
- ``softmax``: as ``power`` with p ∝ exp(score/temperature).
- ``kcenter``: greedy k-center / core-set (Sener & Savarese 2018) on ``features``.
- ``batchbald``: greedy BatchBALD (Kirsch et al. 2019) on ``prob_samples``.

Each method is declared once as a :class:`Selection` in :data:`SELECTIONS` with the inputs it
needs (``features`` for k-center, ``prob_samples`` for BatchBALD); the labeling loop and the modAL
strategy compute those inputs only for a selection that declares them. Add your own with
:func:`register_selection` or an entry point of the ``dubito.selections`` group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dubito import DubitoError
from dubito.platform.registry import Registry

__all__ = [
    "SELECTIONS",
    "Selection",
    "select",
    "register_selection",
    "joint_mutual_information",
    "MAX_EXACT_CONFIGS",
    "MC_CONFIGS",
]

NEEDS = ("features", "prob_samples")  # what a selection may ask for beyond the scores


@dataclass(frozen=True)
class Selection:
    """A named batch-selection method.

    Attributes:
        name: registry name (``--selection NAME``).
        fn: ``fn(scores (P,) float64, k, *, seed, temperature, **inputs)`` → k distinct
            positions (a (k,) long tensor or a list), where ``inputs`` are what it needs:
            ``features`` (P, F) with ``labeled_features`` (L, F) or None, and/or
            ``prob_samples`` (T, P, C).
        doc: what it does.
        needs: a subset of :data:`NEEDS`. ``features``: the model's deterministic features of
            each pool image (the head's input, pooled over pixels); ``prob_samples``: the MC
            class probabilities the scores came from (image classification only).
    """

    name: str
    fn: Callable[..., Tensor | list[int]] = field(repr=False, compare=False)
    doc: str = ""
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise DubitoError(f"selection {self.name!r}: fn must be callable, got {self.fn!r}")
        if set(self.needs) - set(NEEDS):
            raise DubitoError(f"selection {self.name!r}: needs must be among {NEEDS}, got {self.needs!r}")


#: every selection by name: dubito's own, those registered, and those of installed entry points
SELECTIONS: Registry[Selection] = Registry("selection", "dubito.selections", Selection, __name__)
SCORE_FLOOR = 1e-12
MAX_EXACT_CONFIGS = 4096  # BatchBALD: enumerate the selected set's labelings while C^|set| ≤ this
MC_CONFIGS = 4096  # BatchBALD: labelings sampled per step beyond that
_CHUNK_ELEMENTS = 1 << 22  # BatchBALD: candidates per chunk × configurations × classes


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _descending(keys: Tensor, k: int) -> Tensor:
    """Positions of the k largest keys, ties to the lower position."""
    return torch.sort(keys, descending=True, stable=True).indices[:k]


def _gumbel_top_k(logits: Tensor, k: int, seed: int) -> Tensor:
    """k draws without replacement with p ∝ exp(logits): top-k of logits + Gumbel noise."""
    uniform = torch.rand(logits.shape, generator=_generator(seed), dtype=torch.float64)
    uniform = uniform.clamp_min(torch.finfo(torch.float64).tiny)
    gumbel = -torch.log(-torch.log(uniform))
    return _descending(logits.detach().to("cpu", torch.float64) + gumbel, k)


# --- k-center ----------------------------------------------------------------------------


def _min_distances(points: Tensor, centres: Tensor, chunk: int = 1024) -> Tensor:
    """(P,) Euclidean distance of each point to its nearest centre, centres in chunks."""
    best = torch.full((points.shape[0],), float("inf"), dtype=points.dtype, device=points.device)
    for start in range(0, centres.shape[0], chunk):
        best = torch.minimum(best, torch.cdist(points, centres[start : start + chunk]).amin(1))
    return best


def _kcenter(scores: Tensor, k: int, features: Tensor, labeled: Tensor | None) -> list[int]:
    points = features.to(torch.float64)
    order = torch.arange(points.shape[0], device=points.device)
    chosen: list[int] = []
    if labeled is not None and labeled.shape[0] > 0:
        distance = _min_distances(points, labeled.to(device=points.device, dtype=torch.float64))
    else:
        first = int(_descending(scores, 1)[0])
        chosen.append(first)
        distance = _min_distances(points, points[first : first + 1])
    taken = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    taken[chosen] = True
    score = scores.to(device=points.device, dtype=torch.float64)
    while len(chosen) < k:
        far = torch.where(taken, torch.full_like(distance, float("-inf")), distance)
        # Farthest point; ties (e.g. duplicates at distance 0) to the higher score, then lower position.
        tied = (far == far.max()) & ~taken
        best_score = torch.where(tied, score, torch.full_like(score, float("-inf")))
        tied &= best_score == best_score.max()
        pick = int(order[tied][0])
        chosen.append(pick)
        taken[pick] = True
        distance = torch.minimum(distance, torch.cdist(points, points[pick : pick + 1]).squeeze(1))
    return chosen


# --- BatchBALD ---------------------------------------------------------------------------


class _JointLabels:
    """Labelings of a selected set, as (T, M) per-sample probabilities P[t, m] = Π_i p_t(y_i^m).

    Exact mode enumerates all M = C^n labelings (weight 1 each). Monte-Carlo mode holds M
    labelings drawn from the joint predictive p̄(y) = mean_t P[t, y]; each column is stored
    scaled, P = P' · exp(α_m), for numerical range, and weighs 1/(M p̄(y_m)) (importance
    sampling). Joint entropies H(y_set, y_j) = −Σ_m w_m Σ_c q_mc log q_mc, q_mc = mean_t P[t,m] p_t(c).
    """

    def __init__(
        self,
        num_samples: int,
        dtype: torch.dtype,
        device: torch.device,
        max_exact: int,
        mc_configs: int,
        seed: int,
    ):
        self.probs = torch.ones(num_samples, 1, dtype=dtype, device=device)  # P' (T, M)
        self.log_scale = torch.zeros(1, dtype=dtype, device=device)  # α (M,)
        self.exact = True
        self.max_exact = max_exact
        self.mc_configs = mc_configs
        self.generator = _generator(seed)

    def _draw(self, weights: Tensor, count: int) -> Tensor:
        """``count`` indices drawn with replacement ∝ ``weights`` (rows), on the CPU generator."""
        drawn = torch.multinomial(
            weights.to("cpu", torch.float64), count, replacement=True, generator=self.generator
        )
        return drawn.to(weights.device)

    def joint_entropy(self, candidates: Tensor) -> Tensor:
        """H(y_set, y_j) for candidate class probabilities ``candidates`` (T, J, C) → (J,)."""
        T = self.probs.shape[0]
        q = torch.einsum("tm,tjc->jmc", self.probs, candidates) / T  # q' (J, M, C)
        plogp = torch.special.xlogy(q, q) + q * self.log_scale[None, :, None]
        if self.exact:
            weight = torch.exp(self.log_scale)  # undoes the scaling of q (α = 0 in exact mode)
        else:
            weight = 1.0 / (self.probs.shape[1] * self.probs.mean(0))  # 1 / (M p̄'(y_m))
        return -(plogp.sum(2) * weight[None, :]).sum(1)

    def add(self, point: Tensor) -> None:
        """Extend the set by a point with class probabilities ``point`` (T, C)."""
        T, C = point.shape
        M = self.probs.shape[1]
        if self.exact and M * C <= self.max_exact:
            self.probs = (self.probs[:, :, None] * point[:, None, :]).reshape(T, M * C)
            self.log_scale = self.log_scale.repeat_interleave(C)
            return
        if self.exact:
            # Switch to Monte Carlo: draw labelings of the enumerated set from p̄ (α = 0 here).
            rows = self._draw(self.probs.mean(0)[None], self.mc_configs)[0]
            current = self.probs[:, rows]
            log_p = torch.log(current)
            self.exact = False
        else:
            current = self.probs
            log_p = torch.log(current) + self.log_scale[None]
        # Extend each labeling y with y_new ~ p̄(y_new | y) = Σ_t P[t,y] p_t(·) / Σ_t P[t,y]
        # (ancestral sampling from the joint predictive; a column's scale cancels).
        conditional = torch.einsum("tm,tc->mc", current, point)
        conditional = conditional / conditional.sum(1, keepdim=True).clamp_min(
            torch.finfo(conditional.dtype).tiny
        )
        labels = self._draw(conditional, 1)[:, 0]
        log_p = log_p + torch.log(point[:, labels])
        self.log_scale = log_p.amax(0).clamp_min(torch.finfo(log_p.dtype).min)
        self.probs = torch.exp(log_p - self.log_scale[None])


def _check_prob_samples(prob_samples: Tensor, pool: int | None) -> Tensor:
    if prob_samples.dim() != 3:
        raise DubitoError(
            f"prob_samples must be (T, P, C) class probabilities, got shape {tuple(prob_samples.shape)}"
        )
    if pool is not None and prob_samples.shape[1] != pool:
        raise DubitoError(
            f"prob_samples has {prob_samples.shape[1]} pool items (dim 1) but scores has {pool}"
        )
    return prob_samples.to(torch.float64)


def _aleatoric(probs: Tensor) -> Tensor:
    """(P,) expected entropy mean_t H[p_t] per point from (T, P, C)."""
    return -torch.special.xlogy(probs, probs).sum(2).mean(0)


def _batchbald(k: int, probs: Tensor, max_exact: int, mc_configs: int, seed: int) -> list[int]:
    T, P, C = probs.shape
    conditional = _aleatoric(probs)
    joint = _JointLabels(T, probs.dtype, probs.device, max_exact, mc_configs, seed)
    taken = torch.zeros(P, dtype=torch.bool, device=probs.device)
    chosen: list[int] = []
    conditional_sum = 0.0
    for _ in range(k):
        chunk = max(1, _CHUNK_ELEMENTS // (joint.probs.shape[1] * C))
        gain = torch.cat([joint.joint_entropy(probs[:, s : s + chunk]) for s in range(0, P, chunk)]) - (
            conditional + conditional_sum
        )
        gain = torch.where(taken, torch.full_like(gain, float("-inf")), gain)
        pick = int(_descending(gain, 1)[0])
        chosen.append(pick)
        taken[pick] = True
        conditional_sum += float(conditional[pick])
        joint.add(probs[:, pick])
    return chosen


def joint_mutual_information(
    prob_samples: Tensor,
    indices: Tensor | list[int],
    *,
    max_exact: int = MAX_EXACT_CONFIGS,
    mc_configs: int = MC_CONFIGS,
    seed: int = 0,
) -> Tensor:
    """BatchBALD score I(y_1..y_n; w) = H(y_1..y_n) − Σ_i E_w H(y_i | w) of a set of points.

    ``prob_samples`` (T, P, C); ``indices`` the n ≥ 1 positions of the set. Exact while the
    set has at most ``max_exact`` labelings (C^n), else a Monte-Carlo estimate from
    ``mc_configs`` labelings drawn with ``seed``. Returns a float64 scalar (nats). For one
    point it equals BALD (the mutual information).
    """
    probs = _check_prob_samples(prob_samples, None)
    picks = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    if not picks:
        raise DubitoError("indices must name at least one pool position")
    if min(picks) < 0 or max(picks) >= probs.shape[1]:
        raise DubitoError(f"indices must be in [0, {probs.shape[1]}), got {picks}")
    joint = _JointLabels(probs.shape[0], probs.dtype, probs.device, max_exact, mc_configs, seed)
    for i in picks[:-1]:
        joint.add(probs[:, i])
    last = picks[-1]
    entropy = joint.joint_entropy(probs[:, last : last + 1])[0]
    return entropy - _aleatoric(probs)[picks].sum()


# --- select ------------------------------------------------------------------------------


def _topk(keys: Tensor, k: int, **_: object) -> Tensor:
    return _descending(keys, k)


def _power(keys: Tensor, k: int, *, seed: int, temperature: float, **_: object) -> Tensor:
    if not temperature > 0:
        raise DubitoError(f"temperature must be > 0 for 'power', got {temperature}")
    return _gumbel_top_k(torch.log(keys.clamp_min(SCORE_FLOOR)) / temperature, k, seed)


def _softmax(keys: Tensor, k: int, *, seed: int, temperature: float, **_: object) -> Tensor:
    if not temperature > 0:
        raise DubitoError(f"temperature must be > 0 for 'softmax', got {temperature}")
    return _gumbel_top_k(keys / temperature, k, seed)


def _kcenter_select(
    keys: Tensor, k: int, *, features: Tensor, labeled_features: Tensor | None = None, **_: object
) -> Tensor:
    P = keys.shape[0]
    if features.dim() != 2 or features.shape[0] != P:
        raise DubitoError(f"features must be (P={P}, F), got shape {tuple(features.shape)}")
    if labeled_features is not None and (
        labeled_features.dim() != 2 or labeled_features.shape[1] != features.shape[1]
    ):
        raise DubitoError(
            f"labeled_features must be (L, F={features.shape[1]}), got shape {tuple(labeled_features.shape)}"
        )
    return torch.tensor(_kcenter(keys.to(features.device), k, features.detach(), labeled_features))


def _batchbald_select(keys: Tensor, k: int, *, seed: int, prob_samples: Tensor, **_: object) -> Tensor:
    probs = _check_prob_samples(prob_samples.detach(), keys.shape[0])
    return torch.tensor(_batchbald(k, probs, MAX_EXACT_CONFIGS, MC_CONFIGS, seed))


for _selection in (
    Selection("topk", _topk, "the k highest scores, ties to the lower position"),
    Selection("power", _power, "k draws without replacement, p ∝ score^(1/temperature) (Kirsch et al. 2023)"),
    Selection("softmax", _softmax, "k draws without replacement, p ∝ exp(score/temperature)"),
    Selection(
        "kcenter",
        _kcenter_select,
        "greedy k-center / core-set on the model's features (Sener & Savarese 2018)",
        ("features",),
    ),
    Selection(
        "batchbald",
        _batchbald_select,
        "greedy BatchBALD on the MC class probabilities (Kirsch et al. 2019)",
        ("prob_samples",),
    ),
):
    SELECTIONS.register(_selection, builtin=True)


def register_selection(
    name: str,
    fn: Callable[..., Tensor | list[int]],
    *,
    needs: tuple[str, ...] = (),
    doc: str | None = None,
    replace: bool = False,
) -> Selection:
    """Add a batch-selection method under ``name`` (for ``--selection``, sweeps and ``strategy()``).

    ``fn(scores, k, *, seed, temperature, **inputs)`` returns k distinct positions into the
    (P,) float64 ``scores``; ``needs`` names the inputs it is given (see :class:`Selection`).
    Draws must come from ``seed`` (a CPU ``torch.Generator(...).manual_seed(seed)``), so a run is
    reproducible and resumable. Returns the :class:`Selection`.
    """
    entry = Selection(name, fn, doc if doc is not None else (fn.__doc__ or "").strip(), tuple(needs))
    return SELECTIONS.register(entry, replace=replace)


def select(
    scores: Tensor,
    k: int,
    method: str = "topk",
    *,
    seed: int = 0,
    temperature: float = 1.0,
    features: Tensor | None = None,
    labeled_features: Tensor | None = None,
    prob_samples: Tensor | None = None,
) -> Tensor:
    """Choose k distinct pool positions to label.

    Args:
        scores: (P,) per-image acquisition scores (higher = more worth labelling).
        k: batch size, 1 ≤ k ≤ P.
        method: a name in :data:`SELECTIONS` (see the module docstring).
        seed: seeds the draws of ``power``, ``softmax`` and BatchBALD's Monte-Carlo labelings.
        temperature: > 0, for ``power`` (p ∝ score^(1/temperature)) and ``softmax``
            (p ∝ exp(score/temperature)).
        features: (P, F) pool features, for ``kcenter`` (Euclidean distances).
        labeled_features: (L, F) features of the labelled set, ``kcenter``'s initial centres;
            without them the first pick is the highest-scoring point.
        prob_samples: (T, P, C) MC class probabilities of the pool, for ``batchbald``
            (image classification). BatchBALD computes its own scores from them: ``scores``
            is only checked for its shape. Its first pick is the max-BALD point; joint
            entropies are exact while C^|selected| ≤ :data:`MAX_EXACT_CONFIGS`, then estimated
            from :data:`MC_CONFIGS` labelings sampled with ``seed``.
    Returns:
        (k,) long positions into the pool in selection order, on ``scores``' device.
    """
    if method not in SELECTIONS:
        raise DubitoError(f"unknown selection method {method!r}; known: {', '.join(SELECTIONS)}")
    entry = SELECTIONS[method]
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise DubitoError(f"scores must be a 1-D (P,) tensor, got {shape}")
    P = scores.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise DubitoError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise DubitoError(f"k must be ≥ 1, got {k}")
    if k > P:
        raise DubitoError(f"k={k} is larger than the pool ({P} items)")
    if bool(torch.isnan(scores).any()):  # named by position: the caller maps positions to its items
        bad = torch.nonzero(torch.isnan(scores)).flatten().tolist()
        shown = ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else "")
        raise DubitoError(
            f"scores contain NaN at pool positions {shown} ({len(bad)} of {P}): the model scoring them is diverged or damaged"
        )
    inputs: dict[str, Tensor | None] = {}
    if "features" in entry.needs:
        if features is None:
            raise DubitoError(f"method {method!r} needs features: the (P, F) pool features")
        inputs.update(features=features, labeled_features=labeled_features)
    if "prob_samples" in entry.needs:
        if prob_samples is None:
            raise DubitoError(
                f"method {method!r} needs prob_samples: the (T, P, C) MC class probabilities of the pool"
            )
        inputs["prob_samples"] = prob_samples
    keys = scores.detach().to(torch.float64)
    picked = torch.as_tensor(entry.fn(keys, k, seed=seed, temperature=temperature, **inputs)).flatten()
    if picked.dtype.is_floating_point or picked.dtype == torch.bool:
        raise DubitoError(f"selection {method!r} returned {picked.dtype} values; positions are integers")
    if picked.numel() != k or picked.unique().numel() != k or int(picked.min()) < 0 or int(picked.max()) >= P:
        raise DubitoError(
            f"selection {method!r} returned {picked.tolist()[:20]}: not {k} distinct positions in 0..{P - 1}"
        )
    return picked.to(device=scores.device, dtype=torch.long)
