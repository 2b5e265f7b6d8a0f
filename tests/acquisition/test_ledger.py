"""The labeling ledger: order and contents survive reopening, rounds are atomic and in order, no id
is labelled twice, settings are checked on reopen, human labels only for queried ids, bad files
are named, and a committed round survives its process being killed."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from dubito import DubitoError
from dubito.acquisition.ledger import INITIAL, Ledger

SETTINGS = {"acquisition": "bald", "seed": 0, "query": 2}


def _count(path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_initial_set_and_rounds_read_back_in_order_after_reopening(tmp_path):
    path = tmp_path / "deep" / "folder" / "ledger.sqlite"  # the folder is created
    with Ledger(path, SETTINGS) as ledger:
        assert ledger.labeled_ids() == [] and ledger.next_round() == 0 and ledger.rounds() == []
        ledger.record_initial([7, 3, 5], flags=[{"has_static": True}, {}, {"dusk": True}])
        ledger.record_round(
            0,
            metrics={"test_mean_iou": 0.25},
            checkpoint="r0.pt",
            seconds=1.5,
            queried=[9, 1],
            scores=[0.9, 0.4],
            flags=[{"has_static": False}, {"has_static": True}],
        )
        ledger.record_round(
            1, metrics={"test_mean_iou": 0.5}, checkpoint="r1.pt", seconds=2.0, queried=[0, 8], scores=[3, 2]
        )
        ledger.record_round(
            2, metrics={"test_mean_iou": 0.75}, checkpoint=None, seconds=0.5
        )  # the last: no queries
        ledger.set_meta("mlflow_run_id", "abc123")
    with Ledger(path, SETTINGS) as ledger:
        assert ledger.labeled_ids() == [7, 3, 5, 9, 1, 0, 8]  # the order chosen, not sorted
        assert ledger.next_round() == 3
        assert [q["id"] for q in ledger.queries(INITIAL)] == [7, 3, 5]
        assert ledger.queries(INITIAL)[0] == {"id": 7, "score": None, "flags": {"has_static": True}}
        assert ledger.queries(0) == [
            {"id": 9, "score": 0.9, "flags": {"has_static": False}},
            {"id": 1, "score": 0.4, "flags": {"has_static": True}},
        ]
        rounds = ledger.rounds()
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert [r["labels"] for r in rounds] == [3, 5, 7]  # labels the round's model was trained on
        assert [r["queried"] for r in rounds] == [[9, 1], [0, 8], []]
        assert [r["metrics"] for r in rounds] == [
            {"test_mean_iou": 0.25},
            {"test_mean_iou": 0.5},
            {"test_mean_iou": 0.75},
        ]
        folder = path.parent  # stored relative to the ledger's folder, read back as files of it
        assert [r["checkpoint"] for r in rounds] == [str(folder / "r0.pt"), str(folder / "r1.pt"), None]
        assert [r["seconds"] for r in rounds] == [1.5, 2.0, 0.5]
        assert all(a["finished"] <= b["finished"] for a, b in zip(rounds, rounds[1:]))
        assert ledger.get_meta("mlflow_run_id") == "abc123"
        assert ledger.get_meta("settings") == SETTINGS
        assert ledger.get_meta("nothing") is None


def test_initial_set_is_recorded_once(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.record_initial([1, 2])
        with pytest.raises(DubitoError, match="initial set is already recorded"):
            ledger.record_initial([3, 4])
        assert ledger.labeled_ids() == [1, 2]


def test_rounds_out_of_order_are_refused(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.record_initial([1, 2])
        with pytest.raises(DubitoError, match=r"round 1 recorded out of order \(next is 0\)"):
            ledger.record_round(1, metrics={}, checkpoint=None, seconds=0.0, queried=[3])
        ledger.record_round(0, metrics={}, checkpoint=None, seconds=0.0, queried=[3])
        for r in (0, 2, -1):  # again, a gap, the initial set's number
            with pytest.raises(DubitoError, match="out of order"):
                ledger.record_round(r, metrics={}, checkpoint=None, seconds=0.0, queried=[4])
        assert ledger.next_round() == 1 and ledger.labeled_ids() == [1, 2, 3]


def test_a_round_that_labels_an_id_again_leaves_nothing_behind(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        ledger.record_initial([1, 2, 3])
        ledger.record_round(0, metrics={"m": 1.0}, checkpoint="r0.pt", seconds=1.0, queried=[4, 5])
        # 6 is new, 2 was labelled in the initial set: the rounds row is inserted before the queries
        with pytest.raises(DubitoError, match=r"round 1 would label ids again \[2\]"):
            ledger.record_round(
                1, metrics={"m": 2.0}, checkpoint="r1.pt", seconds=1.0, queried=[6, 2], scores=[1, 0]
            )
        with pytest.raises(DubitoError, match=r"would label ids again \[4, 5\]"):
            ledger.record_round(1, metrics={"m": 2.0}, checkpoint="r1.pt", seconds=1.0, queried=[5, 7, 4])
        assert ledger.next_round() == 1
        assert [r["round"] for r in ledger.rounds()] == [0]
        assert ledger.queries(1) == []
        assert ledger.labeled_ids() == [1, 2, 3, 4, 5]
        # the connection is not left inside a failed transaction: the round can still be recorded
        ledger.record_round(1, metrics={"m": 2.0}, checkpoint="r1.pt", seconds=1.0, queried=[6, 7])
    # and what another connection sees on disk is exactly that
    assert _count(path, "rounds") == 2 and _count(path, "queries") == 7
    with Ledger(path) as ledger:
        assert [r["queried"] for r in ledger.rounds()] == [[4, 5], [6, 7]]
        assert [r["metrics"] for r in ledger.rounds()] == [{"m": 1.0}, {"m": 2.0}]


def test_a_failed_round_is_not_on_disk_for_other_connections(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        ledger.record_initial([1, 2])
        with pytest.raises(DubitoError):
            ledger.record_round(0, metrics={}, checkpoint=None, seconds=0.0, queried=[3, 1])
        assert _count(path, "rounds") == 0 and _count(path, "queries") == 2


def test_a_duplicate_id_inside_one_batch_is_refused(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        with pytest.raises(DubitoError, match="same id was queried twice"):
            ledger.record_initial([1, 2, 1])
        assert ledger.labeled_ids() == []
        ledger.record_initial([1, 2])
        with pytest.raises(DubitoError, match="same id was queried twice"):
            ledger.record_round(0, metrics={}, checkpoint=None, seconds=0.0, queried=[3, 4, 3])
        assert ledger.rounds() == [] and ledger.next_round() == 0 and ledger.labeled_ids() == [1, 2]
    assert _count(path, "rounds") == 0


def test_settings_mismatch_on_reopen_names_the_keys_that_differ(tmp_path):
    path = tmp_path / "l.sqlite"
    Ledger(path, {"acquisition": "bald", "seed": 0, "query": 2, "model": "tiny"}).close()
    with Ledger(
        path, {"acquisition": "bald", "seed": 0, "query": 2, "model": "tiny"}
    ) as ledger:  # same: fine
        assert ledger.get_meta("settings")["acquisition"] == "bald"
    with Ledger(path) as ledger:  # no settings given: not checked
        assert ledger.labeled_ids() == []
    with pytest.raises(DubitoError) as err:
        Ledger(path, {"acquisition": "entropy", "seed": 0, "query": 3, "dropout": 0.2})
    message = str(err.value)
    assert str(path) in message
    assert "(acquisition, dropout, model, query)" in message  # changed, added and removed keys, sorted
    assert "seed" not in message
    # the stored settings are not overwritten by the refused ones
    with Ledger(path) as ledger:
        assert ledger.get_meta("settings") == {"acquisition": "bald", "seed": 0, "query": 2, "model": "tiny"}


def test_pending_and_record_label(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        ledger.record_initial([5, 1, 3])
        assert ledger.pending(ledger.labeled_ids()) == [5, 1, 3]
        assert ledger.label_files() == {}
        ledger.record_label(1, tmp_path / "1_label.png")
        assert ledger.pending([5, 1, 3]) == [5, 3]  # order kept
        with pytest.raises(DubitoError, match="id 42 was never queried"):
            ledger.record_label(42, "42_label.png")
        ledger.record_round(0, metrics={}, checkpoint=None, seconds=0.0, queried=[42])
        assert ledger.pending(ledger.labeled_ids()) == [5, 3, 42]
        ledger.record_label(42, "42_label.png")
        ledger.record_label(5, "old.png")
        ledger.record_label(5, "5_label.png")  # a label imported again replaces the old one
    with Ledger(path) as ledger:
        # paths are kept relative to the ledger's folder and read back as its files
        assert ledger.label_files() == {
            1: str(tmp_path / "1_label.png"),
            42: str(tmp_path / "42_label.png"),
            5: str(tmp_path / "5_label.png"),
        }
        assert ledger.pending(ledger.labeled_ids()) == [3]
    assert _count(path, "labels") == 3


@pytest.mark.parametrize(
    "content",
    [b"this is not a SQLite database, just some text\n" * 20, b"SQLite format 3\x00" + b"\xff" * 200],
)
def test_a_file_that_is_not_sqlite_is_named(tmp_path, content):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(content)
    with pytest.raises(DubitoError, match="not a dubito ledger") as err:
        Ledger(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == content  # not overwritten


def test_a_folder_in_place_of_the_file_is_an_error(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.mkdir()
    with pytest.raises(DubitoError) as err:
        Ledger(path)
    assert str(path) in str(err.value)


_KILLED_WRITER = """
import os, signal, sys
from dubito.acquisition.ledger import Ledger

ledger = Ledger(sys.argv[1], {"seed": 0})
ledger.record_initial([10, 11, 12])
ledger.record_round(0, metrics={"m": 0.5}, checkpoint="r0.pt", seconds=1.0, queried=[13, 14], scores=[2.0, 1.0])
ledger.record_round(1, metrics={"m": 0.75}, checkpoint="r1.pt", seconds=1.0, queried=[15, 16], scores=[4.0, 3.0])
os.kill(os.getpid(), signal.SIGKILL)  # no close, no interpreter shutdown
"""


def test_committed_rounds_survive_sigkill(tmp_path):
    path = tmp_path / "ledger.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_KILLED_WRITER))
    proc = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with Ledger(path, {"seed": 0}) as ledger:
        assert ledger.next_round() == 2
        assert ledger.labeled_ids() == [10, 11, 12, 13, 14, 15, 16]
        rounds = ledger.rounds()
        assert [r["queried"] for r in rounds] == [[13, 14], [15, 16]]
        assert [r["metrics"] for r in rounds] == [{"m": 0.5}, {"m": 0.75}]
        assert [q["score"] for q in ledger.queries(1)] == [4.0, 3.0]
        # and the run continues where it stopped
        ledger.record_round(2, metrics={"m": 1.0}, checkpoint="r2.pt", seconds=1.0)
        assert ledger.next_round() == 3
