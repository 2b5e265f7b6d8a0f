"""The labeling ledger: a SQLite file (standard library only) that records every round of a
labeling loop durably, so a crashed or killed run resumes without losing or repeating a label.

Tables:
    ``meta(key, value)``: the loop's settings (JSON) and its MLflow run id.
    ``rounds(round, labels, metrics, checkpoint, seconds, finished)``: one row per finished round:
        the model trained on ``labels`` labels, its test metrics (JSON) and checkpoint path.
    ``queries(id, round, rank, score, flags)``: every labelled id, once (``id`` is the primary
        key, so no id can be labelled twice); ``round = -1`` holds the initial random set, round r
        the ids queried after round r's model.
    ``labels(id, path, imported)``: human-in-the-loop labels imported for queried ids.

Each round is written in one transaction: its row and its queries land together or not at all.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable, Sequence

from dubito import DubitoError

__all__ = ["Ledger", "INITIAL"]

INITIAL = -1  # the round number of the initial random set

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, labels INTEGER NOT NULL, metrics TEXT NOT NULL,
    checkpoint TEXT, seconds REAL, finished REAL NOT NULL);
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY, round INTEGER NOT NULL, rank INTEGER NOT NULL, score REAL, flags TEXT,
    UNIQUE (round, rank));
CREATE TABLE IF NOT EXISTS labels (id INTEGER PRIMARY KEY REFERENCES queries(id), path TEXT NOT NULL, imported REAL NOT NULL);
"""


class Ledger:
    """Durable record of one labeling loop (one acquisition, one seed).

    Args:
        path: the SQLite file (created with its folder).
        settings: the loop's settings; a ledger written with other ``settings`` (for the keys
            that must not change on resume) is refused, naming the keys that differ.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise DubitoError(f"{self.path}: not a dubito ledger ({err})") from None
        if settings is not None:
            self._check_settings(settings)

    # ------------------------------------------------------------------ settings
    def _check_settings(self, settings: dict[str, Any]) -> None:
        stored = self.get_meta("settings")
        if stored is None:
            with self._db:
                self._db.execute("INSERT INTO meta VALUES ('settings', ?)", (json.dumps(settings, sort_keys=True),))
            return
        if stored != json.loads(json.dumps(settings)):
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise DubitoError(
                f"{self.path}: this output holds a labeling run with other settings ({', '.join(changed)}); "
                "use another --output, or delete it to start over"
            )

    def get_meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # ------------------------------------------------------------------ writing
    def record_initial(self, ids: Sequence[int], flags: Sequence[dict] | None = None) -> None:
        """The initial random set, in one transaction (refused when there is one already)."""
        if self.labeled_ids():
            raise DubitoError(f"{self.path}: the initial set is already recorded")
        self._insert_queries(INITIAL, ids, None, flags)

    def record_round(
        self,
        round: int,
        *,
        metrics: dict[str, float],
        checkpoint: str | None,
        seconds: float,
        queried: Sequence[int] = (),
        scores: Sequence[float] | None = None,
        flags: Sequence[dict] | None = None,
    ) -> None:
        """Round ``round``: its model's metrics and checkpoint, and the ids it queried, atomically."""
        if round != self.next_round():
            raise DubitoError(f"{self.path}: round {round} recorded out of order (next is {self.next_round()})")
        labels = len(self.labeled_ids())
        self._insert_queries(
            round, queried, scores, flags,
            round_row=(round, labels, json.dumps(metrics), checkpoint, seconds, time.time()),
        )  # fmt: skip

    def _insert_queries(self, round: int, ids: Sequence[int], scores, flags, round_row: tuple | None = None) -> None:
        ids = [int(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise DubitoError(f"round {round}: the same id was queried twice in one batch")
        scores = [None] * len(ids) if scores is None else [float(s) for s in scores]
        flags = [None] * len(ids) if flags is None else [json.dumps(f) for f in flags]
        try:
            with self._db:  # one transaction: all of it or nothing
                if round_row is not None:
                    self._db.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?)", round_row)
                self._db.executemany(
                    "INSERT INTO queries VALUES (?, ?, ?, ?, ?)",
                    [(i, round, rank, s, f) for rank, (i, s, f) in enumerate(zip(ids, scores, flags))],
                )
        except sqlite3.IntegrityError as err:
            if round_row is not None and round < self.next_round():
                raise DubitoError(f"{self.path}: round {round} is recorded already (is another process writing here?)") from None
            again = sorted(set(ids) & set(self.labeled_ids()))
            raise DubitoError(f"{self.path}: round {round} would label ids again {again[:10]} ({err})") from None

    def add_queries(self, round: int, queried: Sequence[int], scores: Sequence[float] | None = None,
                    flags: Sequence[dict] | None = None) -> None:  # fmt: skip
        """Queries of a recorded round that had none (its loop was given a larger budget), atomically."""
        if round != self.next_round() - 1 or self.queries(round):
            raise DubitoError(f"{self.path}: round {round} is not the last round without queries")
        self._insert_queries(round, queried, scores, flags)

    def record_label(self, id: int, path: str) -> None:
        """A human label file for queried ``id``."""
        if int(id) not in set(self.labeled_ids()):
            raise DubitoError(f"{self.path}: id {id} was never queried; no label can be imported for it")
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO labels VALUES (?, ?, ?)", (int(id), str(path), time.time()))

    # ------------------------------------------------------------------ reading
    def next_round(self) -> int:
        row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def labeled_ids(self) -> list[int]:
        """Every id labelled so far, in the order it was chosen."""
        return [r[0] for r in self._db.execute("SELECT id FROM queries ORDER BY round, rank")]

    def queries(self, round: int) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT id, score, flags FROM queries WHERE round = ? ORDER BY rank", (round,))
        return [{"id": i, "score": s, "flags": json.loads(f) if f else None} for i, s, f in rows]

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT round, labels, metrics, checkpoint, seconds, finished FROM rounds ORDER BY round")
        return [
            {"round": r, "labels": n, "metrics": json.loads(m), "checkpoint": c, "seconds": s, "finished": f,
             "queried": [q["id"] for q in self.queries(r)]}
            for r, n, m, c, s, f in rows
        ]  # fmt: skip

    def label_files(self) -> dict[int, str]:
        return {i: p for i, p in self._db.execute("SELECT id, path FROM labels")}

    def pending(self, ids: Iterable[int]) -> list[int]:
        """Those of ``ids`` without an imported label."""
        have = self.label_files()
        return [i for i in ids if i not in have]

    def close(self) -> None:
        with closing(self._db):
            pass

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
