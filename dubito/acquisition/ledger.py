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
Paths (checkpoints, label files) are stored relative to the ledger's folder, so a copied or moved
loop folder resumes in place and never reads the original's files (absolute paths written by
earlier versions are read as the file of that name in this folder).

A ledger is verified when opened, never trusted blindly: its schema, rounds contiguous from 0,
the initial set and every round's queries present (each round's label count is the initial set
plus the queries before it); a ledger that fails is refused with what is wrong and how to recover,
and an empty one is never re-created over existing round checkpoints.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable, Sequence

from dubito import DubitoError
from dubito.platform.files import file_errors, relative_to

__all__ = ["Ledger", "LedgerError", "INITIAL"]

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
_COLUMNS = {
    "meta": ["key", "value"],
    "rounds": ["round", "labels", "metrics", "checkpoint", "seconds", "finished"],
    "queries": ["id", "round", "rank", "score", "flags"],
    "labels": ["id", "path", "imported"],
}
_RECOVER = (
    "move the folder aside (nothing in it is deleted) and run again into a new --output, or "
    "restore the ledger from a backup"
)


class LedgerError(DubitoError):
    """A ledger file that is missing, damaged or inconsistent."""


class Ledger:
    """Durable record of one labeling loop (one acquisition, one seed).

    Args:
        path: the SQLite file.
        settings: the loop's settings; a ledger written with other ``settings`` (for the keys
            that must not change on resume) is refused, naming the keys that differ.
        create: create the ledger (and its folder) when there is none; otherwise a missing or
            empty ledger is refused. An empty ledger beside recorded round checkpoints is always
            refused (it would train those rounds again over them).
    """

    def __init__(
        self, path: str | Path, settings: dict[str, Any] | None = None, *, create: bool = True
    ) -> None:
        self.path = Path(path)
        self.folder = self.path.parent
        if self.path.exists() and not self.path.is_file():
            raise LedgerError(f"{self.path}: not a file (a ledger is a SQLite file)")
        if not self.path.exists() and not create:
            raise LedgerError(
                f"{self.path}: no ledger here; give the folder of one loop, e.g. runs/label/bald/seed-0"
            )
        with file_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30)
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path}: not a dubito ledger ({err}); {_RECOVER}") from None
        try:
            if not tables:
                self._new(create)
            else:
                self.verify(tables)
        except BaseException:
            self._db.close()
            raise
        if settings is not None:
            self._check_settings(settings)

    def _new(self, create: bool) -> None:
        """An empty file (a ledger created, then killed before its schema was written), or none."""
        checkpoints = sorted((self.folder / "rounds").glob("round-*.pt"))
        if checkpoints:
            raise LedgerError(
                f"{self.path}: the ledger is empty, but {len(checkpoints)} round checkpoint(s) are recorded beside it "
                f"({checkpoints[0].name}, ...): its rounds are lost; {_RECOVER}"
            )
        if not create:
            raise LedgerError(f"{self.path}: an empty ledger (no round was ever recorded)")
        try:
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path}: cannot write the ledger ({err})") from None

    def verify(self, tables: set[str] | None = None) -> None:
        """Schema, integrity, rounds contiguous from 0, the initial set and every round's queries
        present; raises :class:`LedgerError` saying what is wrong and how to recover."""
        try:
            if tables is None:
                tables = {
                    r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
            missing = sorted(set(_COLUMNS) - tables)
            if missing:
                raise LedgerError(
                    f"{self.path}: damaged ledger: table(s) {', '.join(missing)} missing; {_RECOVER}"
                )
            for table, columns in _COLUMNS.items():
                have = [r[1] for r in self._db.execute(f"PRAGMA table_info({table})")]
                if have != columns:
                    raise LedgerError(
                        f"{self.path}: damaged ledger: table {table} has columns {have}, expected {columns}; {_RECOVER}"
                    )
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise LedgerError(f"{self.path}: damaged ledger (SQLite: {check}); {_RECOVER}")
            rounds = [tuple(r) for r in self._db.execute("SELECT round, labels FROM rounds ORDER BY round")]
            counts = dict(self._db.execute("SELECT round, COUNT(*) FROM queries GROUP BY round").fetchall())
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path}: damaged ledger ({err}); {_RECOVER}") from None
        if [r for r, _ in rounds] != list(range(len(rounds))):
            raise LedgerError(
                f"{self.path}: damaged ledger: rounds {[r for r, _ in rounds]} are not contiguous from 0; {_RECOVER}"
            )
        if rounds and not counts.get(INITIAL):
            raise LedgerError(
                f"{self.path}: damaged ledger: {len(rounds)} round(s) recorded but no initial set; {_RECOVER}"
            )
        strays = sorted(r for r in counts if r != INITIAL and not 0 <= r < len(rounds))
        if strays:
            raise LedgerError(
                f"{self.path}: damaged ledger: queries of round(s) {strays}, which are not recorded; {_RECOVER}"
            )
        labels = counts.get(INITIAL, 0)
        for r, recorded in rounds:
            if recorded != labels:
                raise LedgerError(
                    f"{self.path}: damaged ledger: round {r} was trained on {recorded} labels, but the initial set and the "
                    f"queries before it hold {labels}; {_RECOVER}"
                )
            if r < len(rounds) - 1 and not counts.get(r):
                raise LedgerError(
                    f"{self.path}: damaged ledger: round {r} has no queries, but a later round is recorded; {_RECOVER}"
                )
            labels += counts.get(r, 0)

    # ------------------------------------------------------------------ settings
    def _check_settings(self, settings: dict[str, Any]) -> None:
        stored = self.get_meta("settings")
        if stored is None:
            with self._db:
                self._db.execute(
                    "INSERT INTO meta VALUES ('settings', ?)", (json.dumps(settings, sort_keys=True),)
                )
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
            raise DubitoError(
                f"{self.path}: round {round} recorded out of order (next is {self.next_round()})"
            )
        labels = len(self.labeled_ids())
        stored = None if checkpoint is None else relative_to(checkpoint, self.folder)
        self._insert_queries(
            round,
            queried,
            scores,
            flags,
            round_row=(round, labels, json.dumps(metrics), stored, seconds, time.time()),
        )

    def _insert_queries(
        self, round: int, ids: Sequence[int], scores, flags, round_row: tuple | None = None
    ) -> None:
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
                raise DubitoError(
                    f"{self.path}: round {round} is recorded already (is another process writing here?)"
                ) from None
            again = sorted(set(ids) & set(self.labeled_ids()))
            raise DubitoError(
                f"{self.path}: round {round} would label ids again {again[:10]} ({err})"
            ) from None

    def add_queries(
        self,
        round: int,
        queried: Sequence[int],
        scores: Sequence[float] | None = None,
        flags: Sequence[dict] | None = None,
    ) -> None:
        """Queries of a recorded round that had none (its loop was given a larger budget), atomically."""
        if round != self.next_round() - 1 or self.queries(round):
            raise DubitoError(f"{self.path}: round {round} is not the last round without queries")
        self._insert_queries(round, queried, scores, flags)

    def record_label(self, id: int, path: str) -> None:
        """A human label file for queried ``id``."""
        if int(id) not in set(self.labeled_ids()):
            raise DubitoError(f"{self.path}: id {id} was never queried; no label can be imported for it")
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO labels VALUES (?, ?, ?)",
                (int(id), relative_to(path, self.folder), time.time()),
            )

    # ------------------------------------------------------------------ reading
    def next_round(self) -> int:
        row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def labeled_ids(self) -> list[int]:
        """Every id labelled so far, in the order it was chosen."""
        return [r[0] for r in self._db.execute("SELECT id FROM queries ORDER BY round, rank")]

    def queries(self, round: int) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT id, score, flags FROM queries WHERE round = ? ORDER BY rank", (round,)
        )
        return [{"id": i, "score": s, "flags": json.loads(f) if f else None} for i, s, f in rows]

    def rounds(self) -> list[dict[str, Any]]:
        """Every recorded round; ``checkpoint`` is the path of its file in this ledger's folder."""
        rows = self._db.execute(
            "SELECT round, labels, metrics, checkpoint, seconds, finished FROM rounds ORDER BY round"
        )
        return [
            {
                "round": r,
                "labels": n,
                "metrics": json.loads(m),
                "checkpoint": self._local(c, "rounds"),
                "seconds": s,
                "finished": f,
                "queried": [q["id"] for q in self.queries(r)],
            }
            for r, n, m, c, s, f in rows
        ]

    def label_files(self) -> dict[int, str]:
        """Imported label files by id, as paths in this ledger's folder."""
        return {i: self._local(p, "labels") for i, p in self._db.execute("SELECT id, path FROM labels")}

    def _local(self, stored: str | None, subfolder: str) -> str | None:
        """A stored path as a file of this folder: relative paths are relative to it; an absolute
        one (written by an earlier version, maybe in the folder this one was copied from) is read
        as the file of that name under ``subfolder`` here, never as the original."""
        if stored is None:
            return None
        path = Path(stored)
        if not path.is_absolute():
            return str(self.folder / path)
        try:
            path.relative_to(self.folder.resolve())
            return str(path)
        except ValueError:
            return str(self.folder / subfolder / path.name)

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
