"""The modAL interface: a scikit-learn classifier around a dubito MC-dropout MLP, and
dubito acquisition functions as modAL query strategies.

    from modAL.models import ActiveLearner
    from dubito.acquisition.modal import TorchEstimator, strategy
    from dubito.platform.data import Digits

    pool, test = Digits("train"), Digits("test")
    start = np.arange(10).reshape(-1, 1)          # positions into ``pool``, shape (n, 1)
    learner = ActiveLearner(estimator=TorchEstimator(data=pool), query_strategy=strategy("bald"),
                            X_training=start, y_training=pool.targets[start[:, 0]].numpy())
    unlabeled = np.arange(10, len(pool)).reshape(-1, 1)
    idx, rows = learner.query(unlabeled, n_instances=10)   # idx: positions into ``unlabeled``
    learner.teach(rows, pool.targets[rows[:, 0]].numpy())

**Inputs.** ``X`` is either a float array (N, F) of features, or, when the estimator is given
``data`` (a dubito dataset or any indexable of dict items with ``"image"``/``"target"``), an
integer array of positions into ``data``: shape (n, 1) (recommended: it reads as "one column,
the index", like a feature matrix) or (n,). The pool is then never copied; images are read by
position and flattened to vectors. Both shapes pass modAL's ``teach`` (``check_X_y`` with
``ensure_2d=False, dtype=None`` keeps integer dtypes) and its stacking (``np.concatenate``).

**What modAL 0.4.2 expects from a query strategy** (``modAL/models/base.py``,
``BaseLearner.query``): it is called as ``query_strategy(learner, X_pool, *args, **kwargs)``
with the *learner* (not the estimator) first; its result is unpacked as
``query_result, query_metrics = ...`` inside a bare ``try``/``except`` (if unpacking — or
anything else — fails the strategy is called a second time and its whole result taken as the
indices); ``query`` then returns ``(query_result, retrieve_rows(X_pool, query_result))``, i.e.
``X_pool[query_result]``, plus the metrics when ``return_metrics=True``. modAL's own strategies
return ``multi_argmax``'s ``(indices, values[indices])``. :class:`Strategy` returns exactly
that: ``(positions (k,) int64 ndarray, their scores (k,) float ndarray)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import Tensor
from torch.utils.data import DataLoader

from dubito import DubitoError
from dubito.acquisition.functions import get_acquisition
from dubito.acquisition.scoring import Scored, choose, score_items
from dubito.acquisition.selection import SELECTIONS
from dubito.platform.mc import MCSamples
from dubito.platform.uncertainty import ClassificationUncertainty

__all__ = ["TorchEstimator", "Strategy", "strategy", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "rmsprop")
#: pool rows scored per MC call (bounds memory: T × rows × classes probabilities)
PREDICT_ROWS = 4096


def _mix(seed: int, count: int) -> int:
    """A 63-bit seed that is a function of (seed, count) only."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(count)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DubitoError(f"TorchEstimator: {name} must be a positive integer, got {value!r}")
    return int(value)


class TorchEstimator(ClassifierMixin, BaseEstimator):
    """A scikit-learn classifier around a dubito MC-dropout MLP (for modAL and sklearn tools).

    Args:
        hidden: hidden layer sizes of the MLP.
        dropout: p of every dropout layer.
        variant: a dubito model variant (``epistemic``: MC dropout; ``both``: MC dropout and
            a logit-noise head trained with the sampled-softmax loss; see ``dubito.platform.models``).
        epochs: passes over the training set per :meth:`fit` (which trains from scratch).
        lr, weight_decay: of the optimizer.
        batch_size: training minibatch size.
        optimizer: ``"adam"`` or ``"rmsprop"``.
        samples: T, MC-dropout samples for :meth:`predict_proba` and :meth:`uncertainty` (per
            member with ``ensemble+dropout``).
        epistemic: ``dropout`` (one MLP, T samples), ``ensemble:K`` (K MLPs trained with
            distinct seeds, one pass each) or ``ensemble+dropout:K`` (K MLPs x T samples).
        logit_noise_samples: ε draws of the logit-noise loss and predictions (``both``/``aleatoric``).
        seed: seeds initialisation, shuffling, dropout masks and MC sampling: the same seed and
            the same data give the same weights and predictions (on the same device).
        device: where the model trains and predicts (``"cpu"``, ``"cuda"``).
        data: optional dataset; then every ``X`` is an integer array of positions into it,
            shape (n,) or (n, 1) (see the module docstring).
        classes: all class labels. Default: ``arange(data.num_classes)`` when ``data`` has
            ``num_classes``, else the labels seen by :meth:`fit` (``np.unique(y)``).

    Fitted attributes: ``model_`` (the MLP, or the :class:`~dubito.platform.ensemble.Ensemble`
    of K, in eval mode), ``classes_`` (C,), ``n_features_in_``.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (128, 128),
        dropout: float = 0.25,
        variant: str = "epistemic",
        epochs: int = 50,
        lr: float = 1e-3,
        batch_size: int = 32,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        samples: int = 20,
        logit_noise_samples: int = 16,
        epistemic: str = "dropout",
        seed: int = 0,
        device: str = "cpu",
        data: Any = None,
        classes: Sequence | None = None,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.variant = variant
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.samples = samples
        self.logit_noise_samples = logit_noise_samples
        self.epistemic = epistemic
        self.seed = seed
        self.device = device
        self.data = data
        self.classes = classes

    # ------------------------------------------------------------------ inputs
    def _check_params(self) -> None:
        from dubito.platform.models import VARIANTS

        if self.variant not in VARIANTS:
            raise DubitoError(f"TorchEstimator: variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.optimizer not in OPTIMIZERS:
            raise DubitoError(
                f"TorchEstimator: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        for name in ("epochs", "batch_size", "samples", "logit_noise_samples"):
            _positive_int(getattr(self, name), name)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise DubitoError(f"TorchEstimator: lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise DubitoError(f"TorchEstimator: weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise DubitoError(f"TorchEstimator: dropout must be in [0, 1), got {self.dropout!r}")
        try:
            hidden = [int(h) for h in self.hidden]
        except (TypeError, ValueError):
            raise DubitoError(
                f"TorchEstimator: hidden must be a sequence of layer sizes, got {self.hidden!r}"
            ) from None
        if any(h < 1 for h in hidden):
            raise DubitoError(f"TorchEstimator: hidden layer sizes must be >= 1, got {self.hidden!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise DubitoError(f"TorchEstimator: seed must be a non-negative integer, got {self.seed!r}")
        from dubito.platform.service import parse_epistemic

        source, _ = parse_epistemic(self.epistemic, "TorchEstimator: epistemic")
        from dubito.platform.models import variant_spec

        if source == "ensemble+dropout" and not variant_spec(self.variant)[1]:
            raise DubitoError(
                f"TorchEstimator: epistemic={self.epistemic!r} needs members with test-time dropout; "
                f"variant {self.variant!r} has none (use 'ensemble:K', or variant epistemic / both)"
            )

    def _positions(self, X: Any, name: str = "X") -> np.ndarray:
        """X as (n,) positions into ``data``."""
        index = np.asarray(X.cpu() if isinstance(X, Tensor) else X)
        if index.ndim == 2 and index.shape[1] == 1:
            index = index[:, 0]
        if index.ndim != 1:
            raise DubitoError(
                f"TorchEstimator: with data, {name} must be positions into data shaped (n,) or (n, 1); "
                f"got shape {index.shape}"
            )
        if index.size and index.dtype.kind not in "iu":
            raise DubitoError(
                f"TorchEstimator: with data, {name} must hold integer positions into data, got dtype {index.dtype} "
                "(to pass features instead, build the estimator without data)"
            )
        index = index.astype(np.int64)
        size = len(self.data)
        if index.size and (index.min() < 0 or index.max() >= size):
            bad = index[(index < 0) | (index >= size)][0]
            raise DubitoError(
                f"TorchEstimator: {name} holds position {bad}, outside the data's 0..{size - 1}"
            )
        return index

    def _features_of(self, X: Any, name: str = "X") -> Tensor:
        """Model inputs (N, F) float32 on the CPU."""
        if self.data is not None:
            index = self._positions(X, name)
            if index.size == 0:
                raise DubitoError(f"TorchEstimator: {name} is empty")
            return self._read(index)
        x = torch.as_tensor(X.cpu() if isinstance(X, Tensor) else np.asarray(X))
        if x.dim() != 2:
            raise DubitoError(
                f"TorchEstimator: {name} must be a 2-D (N, F) feature array, got shape {tuple(x.shape)} "
                "(for positions into a dataset, build the estimator with data=...)"
            )
        if x.shape[0] == 0:
            raise DubitoError(f"TorchEstimator: {name} is empty")
        if not (
            x.is_floating_point()
            or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        ):
            raise DubitoError(f"TorchEstimator: {name} must be numeric, got dtype {x.dtype}")
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise DubitoError(f"TorchEstimator: {name} holds NaN or infinite values")
        return x

    def _read(self, index: np.ndarray) -> Tensor:
        """The flattened images of ``data`` at ``index``, (n, F) float32."""
        return torch.stack([torch.as_tensor(self.data[int(i)]["image"]).reshape(-1) for i in index]).float()

    def _labels(self, X: Any, y: Any, n: int, name: str = "y") -> np.ndarray:
        """The labels (n,) of X: ``y``, or the data's targets when y is None."""
        if y is None:
            if self.data is None:
                raise DubitoError(
                    f"TorchEstimator: {name} is required when the estimator has no data to read targets from"
                )
            return np.asarray(
                [int(torch.as_tensor(self.data[int(i)]["target"]).item()) for i in self._positions(X)]
            )
        labels = np.asarray(y.cpu() if isinstance(y, Tensor) else y)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or labels.shape[0] != n:
            raise DubitoError(
                f"TorchEstimator: {name} must hold one label per row of X ({n}), got shape {labels.shape}"
            )
        return labels

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(
                "TorchEstimator is not fitted yet: call fit(X, y) first (with modAL, give the ActiveLearner "
                "X_training and y_training)"
            )

    def _chunks(self, X: Any) -> Iterator[Tensor]:
        """X's model inputs in blocks of at most PREDICT_ROWS rows, (n, F) float32 on the CPU;
        with ``data`` only one block of images is read at a time."""
        self._check_fitted()
        if self.data is not None:
            index = self._positions(X)
            if index.size == 0:
                raise DubitoError("TorchEstimator: X is empty")
            blocks: Iterator[Tensor] = (
                self._read(index[s : s + PREDICT_ROWS]) for s in range(0, index.size, PREDICT_ROWS)
            )
        else:
            x = self._features_of(X)
            blocks = (x[s : s + PREDICT_ROWS] for s in range(0, x.shape[0], PREDICT_ROWS))
        for block in blocks:
            if block.shape[1] != self.n_features_in_:
                raise DubitoError(
                    f"TorchEstimator: X has {block.shape[1]} features but the model was fitted on {self.n_features_in_}"
                )
            yield block

    # ------------------------------------------------------------------ training
    def fit(self, X: Any, y: Any = None) -> TorchEstimator:
        """Train a fresh MLP on X (N, F) [or positions into ``data``] and labels y (N,).

        ``y`` may be None when ``data`` is given: the targets are then read from it.
        """
        from dubito.platform.ensemble import Ensemble
        from dubito.platform.service import parse_epistemic, resolve_device
        from dubito.platform.training import MEMBER_SEED_STRIDE

        self._check_params()
        device = resolve_device(self.device)
        x = self._features_of(X)
        labels = self._labels(X, y, x.shape[0])
        if self.classes is not None:
            classes = np.asarray(self.classes)
        elif self.data is not None and getattr(self.data, "num_classes", None):
            classes = np.arange(int(self.data.num_classes))
        else:
            classes = np.unique(labels)
        if classes.ndim != 1 or classes.size < 1 or np.unique(classes).size != classes.size:
            raise DubitoError(f"TorchEstimator: classes must be distinct labels, got {classes!r}")
        classes = np.sort(classes)
        encoded = np.searchsorted(classes, labels)
        unknown = (encoded >= classes.size) | (classes[np.minimum(encoded, classes.size - 1)] != labels)
        if unknown.any():
            raise DubitoError(
                f"TorchEstimator: y holds label {labels[unknown][0]!r}, not among the classes {classes.tolist()}"
            )
        target = torch.as_tensor(encoded, dtype=torch.long)
        members = parse_epistemic(self.epistemic, "TorchEstimator: epistemic")[1]
        fitted = [
            self._train(x, target, int(classes.size), int(self.seed) + MEMBER_SEED_STRIDE * k, device)
            for k in range(members)
        ]
        model = fitted[0] if members == 1 else Ensemble(fitted).eval()
        self.model_ = model
        self.classes_ = classes
        self.n_features_in_ = int(x.shape[1])
        return self

    def _train(
        self, x: Tensor, target: Tensor, classes: int, seed: int, device: torch.device
    ) -> torch.nn.Module:
        """One MLP trained from scratch with ``seed`` (initialisation, shuffling, dropout masks)."""
        from dubito.platform.models import build_model
        from dubito.platform.training import TrainConfig, train_epoch

        devices = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=devices):  # seeded, without touching the caller's RNG
            torch.manual_seed(seed)
            model = build_model(
                "mlp",
                in_features=int(x.shape[1]),
                out_features=classes,
                hidden=tuple(int(h) for h in self.hidden),
                task="classification",
                variant=self.variant,
                dropout=float(self.dropout),
            ).to(device)
            opt_cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.RMSprop
            opt = opt_cls(model.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
            # the trainer's own epoch (loss for the head, no clipping here); items are dicts as in any dubito dataset
            items = [
                {"image": x[i], "target": target[i], "mask": torch.tensor(True)} for i in range(x.shape[0])
            ]
            loader = DataLoader(
                items,
                batch_size=int(self.batch_size),
                shuffle=True,
                generator=torch.Generator().manual_seed(seed),
            )
            settings = TrainConfig(logit_noise_samples=int(self.logit_noise_samples), grad_clip=0.0)
            for epoch in range(int(self.epochs)):
                train_epoch(model, loader, opt, settings, device, desc=f"TorchEstimator epoch {epoch + 1}")
        return model.eval()

    # ------------------------------------------------------------------ prediction
    def _mc(
        self, X: Any, samples: int | None, keep_samples: bool
    ) -> tuple[ClassificationUncertainty, MCSamples | None]:
        """The service's uncertainty of X (fields on the CPU) and, if asked, the MC samples it was
        computed from (on the CPU; ``probs`` (T, N, C))."""
        from dubito.platform.service import (
            UncertaintyService,
            check_finite_outputs,
            parse_epistemic,
            resolve_device,
            source_options,
        )

        self._check_fitted()
        T = int(self.samples) if samples is None else samples
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
            raise DubitoError(f"TorchEstimator: samples must be a positive integer, got {samples!r}")
        # A fresh service per call: the same X gives the same MC samples on every call.
        source = parse_epistemic(self.epistemic, "TorchEstimator: epistemic")[0]
        service = UncertaintyService(
            self.model_,
            task="classification",
            **source_options(self.model_, source, int(T)),
            device=resolve_device(self.device),
            logit_noise_samples=int(self.logit_noise_samples),
            seed=int(self.seed),
            progress=False,
        )
        parts: list[dict[str, Tensor]] = []
        kept: list[MCSamples] = []
        row = 0
        for block in self._chunks(X):
            chunk = block.to(service.device)
            u, out = service.predict_with_samples(chunk)
            check_finite_outputs(u, range(row, row + len(chunk)), "TorchEstimator's model (ids: rows of X)")
            row += len(chunk)
            if keep_samples:
                kept.append(MCSamples(*(None if t is None else t.detach().float().cpu() for t in out)))
            parts.append({k: v.detach().cpu() for k, v in u.to_dict().items()})
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if not keep_samples:
            return ClassificationUncertainty(**merged), None
        joined = MCSamples(
            *(
                None if kept[0][f] is None else torch.cat([k[f] for k in kept], 1)
                for f in range(len(MCSamples._fields))
            )
        )
        return ClassificationUncertainty(**merged), joined

    def uncertainty(self, X: Any, *, samples: int | None = None) -> ClassificationUncertainty:
        """The UncertaintyService's decomposition for X: fields (N,), ``mean_probs`` (N, C), on the CPU.

        ``samples`` overrides T for this call. Reproducible: the same X gives the same result.
        """
        return self._mc(X, samples, keep_samples=False)[0]

    def uncertainty_with_samples(
        self, X: Any, *, samples: int | None = None
    ) -> tuple[ClassificationUncertainty, MCSamples]:
        """:meth:`uncertainty` and the MC samples it was computed from (logits ``mean`` (T, N, C),
        ``probs`` (T, N, C)), on the CPU."""
        u, mc = self._mc(X, samples, keep_samples=True)
        assert mc is not None
        return u, mc

    def uncertainty_and_samples(
        self, X: Any, *, samples: int | None = None
    ) -> tuple[ClassificationUncertainty, Tensor]:
        """:meth:`uncertainty` and the per-sample class probabilities it was computed from, (T, N, C)."""
        u, mc = self.uncertainty_with_samples(X, samples=samples)
        return u, mc.probs

    def predict_proba(self, X: Any) -> np.ndarray:
        """MC-dropout mean class probabilities, (N, C) float64, columns in ``classes_`` order."""
        return self.uncertainty(X).mean_probs.double().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class under the MC mean, (N,) labels from ``classes_``."""
        return self.classes_[self.predict_proba(X).argmax(1)]

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Accuracy of :meth:`predict` on X; ``y`` defaults to the data's targets when ``data`` is given."""
        from sklearn.metrics import accuracy_score

        self._check_fitted()
        labels = self._labels(X, y, len(self._positions(X)) if self.data is not None else len(X))
        return float(accuracy_score(labels, self.predict(X), sample_weight=sample_weight))

    def features(self, X: Any) -> Tensor:
        """The MLP's penultimate features (the last hidden layer, dropout off), (N, hidden[-1]) on the CPU."""
        self._check_fitted()
        model = self.model_
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                parts = [model.features(block.to(device)).float().cpu() for block in self._chunks(X)]
        finally:
            model.train(was_training)
        return torch.cat(parts)


# ----------------------------------------------------------------------------- strategies


class Strategy:
    """A dubito acquisition function + batch selection as a modAL query strategy.

    Call it as modAL does: ``strategy(learner, X_pool, n_instances=k)``. ``learner`` is a modAL
    learner whose ``.estimator`` is a :class:`TorchEstimator` (or the estimator itself). It
    scores X_pool with the estimator's MC-dropout uncertainty, picks k positions with
    :func:`dubito.acquisition.selection.select` and returns ``(positions (k,) int64, scores (k,))``
    — modAL's ``(query_idx, query_metrics)`` convention.

    Selection inputs: ``kcenter`` uses the MLP's penultimate features (:meth:`TorchEstimator.features`)
    of the pool, with the learner's ``X_training`` as the initial centres (none for a bare
    estimator: the first pick is then the highest score); ``batchbald`` uses the (T, P, C)
    per-sample probabilities the uncertainty was computed from.

    Randomness (the ``random`` acquisition, ``power``/``softmax`` draws, BatchBALD's MC labelings)
    comes from seeds mixed from (``seed``, call count): the n-th call of a strategy always draws
    the same. Use one strategy object per run (``reset()`` restarts the count). Note: modAL calls
    a strategy a second time when the first call raises, so a failing call counts twice.
    """

    def __init__(
        self,
        name: str,
        *,
        samples: int | None = None,
        selection: str = "topk",
        seed: int = 0,
        temperature: float = 1.0,
        **options: Any,
    ) -> None:
        if not isinstance(name, str):
            raise DubitoError(f"strategy: name must be an acquisition name (str), got {name!r}")
        self.acquisition = get_acquisition(name, **options)
        if selection not in SELECTIONS:
            raise DubitoError(
                f"strategy: selection must be one of {', '.join(SELECTIONS)}, got {selection!r}"
            )
        if samples is not None and (
            isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1
        ):
            raise DubitoError(f"strategy: samples must be a positive integer or None, got {samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DubitoError(f"strategy: seed must be a non-negative integer, got {seed!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise DubitoError(f"strategy: temperature must be > 0, got {temperature!r}")
        self.name = name
        self.samples = None if samples is None else int(samples)
        self.selection = selection
        self.seed = int(seed)
        self.temperature = float(temperature)
        self.options = dict(options)
        self.calls = 0

    def reset(self) -> None:
        """Restart the call count (the next call draws what the first one did)."""
        self.calls = 0

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"strategy({self.name!r}, selection={self.selection!r}, seed={self.seed}{extra})"

    def __call__(
        self, classifier: Any, X_pool: Any, n_instances: int = 1, **kwargs: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the ``n_instances`` pool rows to label and their scores, both (k,) ndarrays."""
        if kwargs:
            raise DubitoError(
                f"strategy {self.name!r}: unexpected query argument(s) {', '.join(sorted(kwargs))}; "
                "it takes X_pool and n_instances (set samples, selection, seed and options in strategy(...))"
            )
        estimator = (
            classifier if isinstance(classifier, TorchEstimator) else getattr(classifier, "estimator", None)
        )
        if not isinstance(estimator, TorchEstimator):
            raise DubitoError(
                f"strategy {self.name!r}: classifier must be a TorchEstimator or a modAL learner wrapping one "
                f"(.estimator), got {type(classifier).__name__}"
                + (f" wrapping {type(estimator).__name__}" if estimator is not None else "")
            )
        if isinstance(n_instances, bool) or not isinstance(n_instances, (int, np.integer)) or n_instances < 1:
            raise DubitoError(
                f"strategy {self.name!r}: n_instances must be a positive integer, got {n_instances!r}"
            )
        call_seed = _mix(self.seed, self.calls)
        self.calls += 1

        # what the acquisition and the selection declared they need, and nothing more
        needs = SELECTIONS[self.selection].needs
        mc = None
        if "prob_samples" in needs or "samples" in self.acquisition.needs:
            u, mc = estimator.uncertainty_with_samples(X_pool, samples=self.samples)
        else:
            u = estimator.uncertainty(X_pool, samples=self.samples)
        pool_size = u.predictive_entropy.shape[0]
        if n_instances > pool_size:
            raise DubitoError(
                f"strategy {self.name!r}: n_instances={n_instances} is larger than the pool ({pool_size} rows)"
            )
        scored = Scored(
            score_items(self.acquisition, u, mc, torch.Generator().manual_seed(call_seed)),
            features=estimator.features(X_pool) if "features" in needs else None,
            prob_samples=mc.probs if "prob_samples" in needs and mc is not None else None,
        )
        labeled = None
        if "features" in needs:  # k-center's first centres: the learner's training set
            known = getattr(classifier, "X_training", None) if classifier is not estimator else None
            if known is not None and len(known) > 0:
                labeled = estimator.features(known)
        picked = choose(
            scored,
            int(n_instances),
            self.selection,
            seed=call_seed,
            temperature=self.temperature,
            labeled=labeled,
        ).cpu()
        return picked.numpy().astype(np.int64), scored.scores[picked].double().numpy()


def strategy(
    name: str,
    *,
    samples: int | None = None,
    selection: str = "topk",
    seed: int = 0,
    temperature: float = 1.0,
    **options: Any,
) -> Strategy:
    """A modAL ``query_strategy`` for acquisition ``name`` (any of
    ``dubito.acquisition.functions.ACQUISITIONS``; ``options`` go to ``get_acquisition``).

    Args:
        samples: MC-dropout T for scoring; None uses the estimator's ``samples``.
        selection: ``topk``, ``power``, ``softmax``, ``kcenter`` or ``batchbald`` (see
            ``dubito.acquisition.selection``).
        seed: base seed of every draw (mixed with the call count).
        temperature: of ``power`` / ``softmax``.
    Returns:
        a :class:`Strategy`, callable as ``query(learner, X_pool, n_instances=1)`` →
        ``(positions (k,), scores (k,))``. Regression-only acquisitions (``total_variance``)
        raise a DubitoError when called, since :class:`TorchEstimator` is a classifier.
    """
    return Strategy(name, samples=samples, selection=selection, seed=seed, temperature=temperature, **options)
