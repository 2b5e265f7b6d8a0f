"""Trust at the edges: one writer per output (real processes), nothing deleted that dubito did not
write, damaged ledgers refused, copied outputs resume in place, bounded human import, dataset list
entries contained in the root, tracking checked fast, errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dubito import DubitoError
from dubito.acquisition.config import LEDGER, LoopConfig
from dubito.acquisition.human import export_queries, import_labels
from dubito.acquisition.ledger import Ledger, LedgerError
from dubito.acquisition.loop import run_loop
from dubito.cli import main
from dubito.platform.files import (
    LOCK_FILE,
    OutputInUse,
    check_output,
    exclusive,
    load_torch,
    read_json,
    write_json,
)
from dubito.platform.tracking import check_tracking

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    dataset="synthetic-camvid",
    height=16,
    width=20,
    pool_images=12,
    test_images=3,
    initial=3,
    query=2,
    rounds=1,
    epochs=1,
    samples=2,
    batch_size=4,
    device="cpu",
)


def _tree(folder: Path, lock: bool = True) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what "unchanged" is compared on); ``lock=False``
    leaves out the lock files, whose owner line a refused command that got as far as the lock rewrites."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and (lock or p.name != LOCK_FILE))
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


# ----------------------------------------------------------------------------- one writer
_HOLDER = """
import sys, time
from dubito.platform.files import exclusive
with exclusive(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_a_second_process_is_refused_at_once_and_a_dead_holder_never_blocks(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(
            OutputInUse, match=rf"{folder} is in use by process {holder.pid} since \d{{4}}-\d\d-\d\d"
        ):
            with exclusive(folder):
                pass
        assert time.monotonic() - started < 2  # at once, not after a wait
        # the dubito command says the same, writing nothing
        before = _tree(folder)
        done = subprocess.run(
            [sys.executable, "-m", "dubito", "label", "--output", str(folder), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (
            done.returncode == 2
            and f"in use by process {holder.pid}" in done.stderr
            and "Traceback" not in done.stderr
        )
        assert _tree(folder) == before
    finally:
        holder.kill()
        holder.wait()
    with exclusive(folder):  # killed: the kernel released its lock
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--no-progress"],
        ["explore", "--no-progress"],
        ["reproduce", "--no-progress"],
        ["label", "--no-progress"],
        ["evaluate", "--model", "{model}", "--no-progress"],
        ["label", "export"],
        ["label", "import", "--labels", "{tmp}"],
        ["data", "check", "camvid", "--root", "{tmp}/CamVid", "--no-progress"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
@pytest.mark.slow
def test_every_command_writing_an_output_is_refused_while_another_holds_it(tmp_path, argv):
    from dubito.platform.data import get_dataset
    from dubito.platform.training import TrainConfig, build_for, save_model
    from tests.fixtures import make_camvid

    folder = tmp_path / "out"
    model, spec = build_for(TrainConfig(dataset="digits"), get_dataset("digits", "train"))
    save_model(tmp_path / "m.pt", model, spec)
    make_camvid(tmp_path)
    folder.mkdir()
    (folder / LEDGER).write_bytes(b"")  # label export / import look for a loop's ledger before they lock
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(folder)
        argv = [a.replace("{model}", str(tmp_path / "m.pt")).replace("{tmp}", str(tmp_path)) for a in argv]
        done = subprocess.run(
            [sys.executable, "-m", "dubito", *argv, "--output", str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
        )
        assert done.returncode == 2, done.stderr
        assert f"{folder} is in use by process {holder.pid}" in done.stderr and "Traceback" not in done.stderr
        assert _tree(folder) == before
    finally:
        holder.kill()
        holder.wait()


_PROBE = """
import sys
from dubito.platform.files import OutputInUse, exclusive
try:
    with exclusive(sys.argv[1]):
        print("free")
except OutputInUse:
    print("busy")
"""


def _probe(folder: Path) -> str:
    """What another process finds: ``busy`` or ``free``."""
    return subprocess.run(
        [sys.executable, "-c", _PROBE, str(folder)], capture_output=True, text=True, timeout=60
    ).stdout.strip()


@pytest.mark.slow
def test_the_lock_is_reentrant_within_a_process_and_held_until_the_outer_block_ends(tmp_path):
    with exclusive(tmp_path / "a"):
        with exclusive(tmp_path / "a"):
            pass
        assert _probe(tmp_path / "a") == "busy"  # the inner block's end released nothing
        with exclusive(tmp_path / "a" / "inner"):
            assert _probe(tmp_path / "a" / "inner") == "busy"
        assert _probe(tmp_path / "a" / "inner") == "free" and _probe(tmp_path / "a") == "busy"
    assert _probe(tmp_path / "a") == "free"


def test_a_link_where_the_lock_file_belongs_is_never_followed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "precious.txt").write_text("mine")
    (tmp_path / "out" / LOCK_FILE).symlink_to(tmp_path / "precious.txt")
    with pytest.raises(DubitoError, match="a link where dubito keeps its lock file"):
        with exclusive(tmp_path / "out"):
            pass
    assert (tmp_path / "precious.txt").read_text() == "mine"


@pytest.mark.slow
def test_two_label_commands_into_one_output_one_runs_the_other_is_refused(tmp_path, mlflow_uri):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    command = [
        sys.executable,
        "-m",
        "dubito",
        "label",
        f"--output={tmp_path / 'out'}",
        "--acquisition=random",
        "--seeds=0",
        *flags,
        "--no-progress",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "out" / LOCK_FILE).exists():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert (
        second.returncode == 2
        and "is in use by process" in second.stderr
        and "Traceback" not in second.stderr
    )
    with Ledger(tmp_path / "out" / "random" / "seed-0" / LEDGER, create=False) as ledger:
        assert [r["round"] for r in ledger.rounds()] == [0, 1]


# ----------------------------------------------------------------------------- atomic files
def test_atomic_writes_use_unique_temporary_names_and_leave_nothing_behind(tmp_path):
    target = tmp_path / "r.json"
    (tmp_path / "r.json.tmp").write_text("someone else's file")  # the old fixed temporary name
    write_json(target, {"a": float("nan")})
    assert read_json(target) == {"a": None}
    assert (tmp_path / "r.json.tmp").read_text() == "someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.json.tmp"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert (
        target.stat().st_mode & 0o777 == 0o666 & ~mask
    )  # an ordinary file's mode, not mkstemp's private 0600


def test_damaged_json_and_torch_files_are_named_without_torch_advice(tmp_path):
    (tmp_path / "study.json").write_text('{"mlflow_parent_run_id": "ab')
    with pytest.raises(DubitoError, match=r"study.json: damaged or truncated JSON \(line 1\)"):
        read_json(tmp_path / "study.json")
    import torch

    torch.save({"x": torch.ones(3)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all" * 10)
    torch.save({"f": _Pickled()}, tmp_path / "pickled.pt")
    for name in ("truncated.pt", "garbage.pt", "pickled.pt"):
        with pytest.raises(DubitoError) as err:
            load_torch(tmp_path / name, "checkpoint")
        assert str(tmp_path / name) in str(err.value) and "weights_only" not in str(err.value)
    assert torch.equal(load_torch(tmp_path / "good.pt")["x"], torch.ones(3))


class _Pickled:
    """An object torch can only load with pickle (which dubito refuses)."""


@pytest.mark.parametrize("case", ["file", "inside-file"])
def test_outputs_that_cannot_be_folders_are_refused_before_anything_is_written(tmp_path, case, capsys):
    if case == "file":
        output = tmp_path / "a-file"
        output.write_text("mine")
    else:
        (tmp_path / "a-file").write_text("mine")
        output = tmp_path / "a-file" / "out"
    before = _tree(tmp_path)
    with pytest.raises(DubitoError, match="--output"):
        check_output(output)
    for command in (["label"], ["train"], ["explore"], ["evaluate", "--model", str(tmp_path / "m.pt")]):
        assert main([*command, "--output", str(output), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path) in err and "Traceback" not in err
    assert _tree(tmp_path) == before


def test_damaged_files_in_an_output_are_named_by_the_command(tmp_path, mlflow_uri, capsys):
    train_out = tmp_path / "train"
    train_out.mkdir()
    (train_out / "checkpoint.pt").write_bytes(b"PK\x03\x04 a truncated zip")
    assert (
        main(["train", "--dataset", "digits", "--epochs", "1", "--output", str(train_out), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert f"{train_out / 'checkpoint.pt'}: not a readable training checkpoint" in err and "delete it" in err
    assert "weights_only" not in err and "Traceback" not in err
    assert sorted(p.name for p in train_out.iterdir() if p.name != LOCK_FILE) == [
        "checkpoint.pt"
    ]  # nothing else written
    explore_out = tmp_path / "explore"
    explore_out.mkdir()
    (explore_out / "study.json").write_text('{"mlflow_parent_run_id": "ab')
    assert (
        main(
            [
                "explore",
                "--agents",
                "dqn",
                "--sizes",
                "4",
                "--seeds",
                "0",
                "--episodes",
                "2",
                "--output",
                str(explore_out),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{explore_out / 'study.json'}: damaged or truncated JSON" in err and "Traceback" not in err


def test_a_folder_turning_read_only_mid_run_ends_with_the_path_not_a_traceback(
    tmp_path, mlflow_uri, monkeypatch, capsys
):
    """The tests run as root, which no permission bit stops: the file system's refusal is
    injected where dubito renames a finished file into place."""
    import errno

    real = os.replace
    calls = []

    def read_only(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) > 3:  # a few files in: the folder turns read-only
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only)
    code = main(
        ["train", "--dataset", "digits", "--epochs", "3", "--output", str(tmp_path / "t"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{calls[-1]}: on a read-only file system" in err
    assert not [
        p for p in (tmp_path / "t").iterdir() if p.name.endswith(".tmp")
    ]  # no temporary file left behind


def test_data_commands_refuse_an_output_that_is_a_file(tmp_path, capsys):
    from tests.fixtures import make_camvid

    make_camvid(tmp_path)
    (tmp_path / "a-file").write_text("mine")
    for argv in (
        ["data", "check", "camvid", "--root", str(tmp_path / "CamVid")],
        ["data", "show", "synthetic-camvid"],
    ):
        assert main([*argv, "--output", str(tmp_path / "a-file")]) == 2
        err = capsys.readouterr().err
        assert "--output" in err and "names a file" in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "mine"


# ----------------------------------------------------------------------------- tracking
def test_tracking_stores_are_checked_fast_and_never_created(tmp_path):
    started = time.monotonic()
    with pytest.raises(DubitoError, match="no tracking server answered"):
        check_tracking("http://127.0.0.1:1")
    assert time.monotonic() - started < 10
    with pytest.raises(DubitoError, match="does not exist"):
        check_tracking(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    assert not (tmp_path / "no").exists()
    assert check_tracking(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"
    assert not (tmp_path / "x.db").exists()  # a check writes nothing


def test_an_unreachable_tracking_server_fails_the_command_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    started = time.monotonic()
    assert main(["label", "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert time.monotonic() - started < 30
    assert "127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- ledgers
@pytest.fixture(scope="module")
def finished_loop(tmp_path_factory, _mlflow_template):
    from tests.conftest import _fresh_store

    out = tmp_path_factory.mktemp("loop")
    with pytest.MonkeyPatch.context() as mp:
        uri = _fresh_store(_mlflow_template, out / "store")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        results = run_loop(LoopConfig.flat(output=str(out / "loop"), **TINY), progress=False)
    return out / "loop", results, uri


def _damaged(finished_loop, tmp_path, how) -> Path:
    loop = tmp_path / "loop"
    shutil.copytree(finished_loop[0], loop)
    how(loop)
    return loop


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda loop: sqlite3.connect(loop / LEDGER).execute("DROP TABLE queries"), "table.*queries missing"),
        (lambda loop: sqlite3.connect(loop / LEDGER).execute("DROP TABLE rounds"), "table.*rounds missing"),
        (lambda loop: (loop / LEDGER).write_bytes(b""), "the ledger is empty, but 2 round checkpoint"),
        (
            lambda loop: _sql(loop, "DELETE FROM queries WHERE round = 0"),
            "round 0 has no queries, but a later round is recorded",
        ),
        (
            lambda loop: _sql(loop, "DELETE FROM queries WHERE round = 0 AND rank = 0"),
            "round 1 was trained on 5 labels",
        ),
        (lambda loop: _sql(loop, "DELETE FROM rounds WHERE round = 0"), "not contiguous from 0"),
        (
            lambda loop: (loop / "rounds" / "round-001.pt").unlink(),
            "round 1 is recorded, but its model is not usable",
        ),
        (
            lambda loop: (loop / "rounds" / "round-001.pt").write_bytes(b"garbage"),
            "round 1 is recorded, but its model",
        ),
    ],
    ids=[
        "no-queries",
        "no-rounds",
        "zero-bytes",
        "queries-deleted",
        "one-query-deleted",
        "round-deleted",
        "checkpoint-gone",
        "checkpoint-garbage",
    ],
)
def test_a_damaged_ledger_is_refused_and_nothing_is_trained_over_it(
    finished_loop, tmp_path, mlflow_uri, damage, match
):
    loop = _damaged(finished_loop, tmp_path, damage)
    before = _tree(loop, lock=False)
    with pytest.raises(LedgerError, match=match) as err:
        run_loop(LoopConfig.flat(output=str(loop), **TINY), progress=False)
    assert "new --output" in str(err.value)  # how to recover
    assert _tree(loop, lock=False) == before


def test_a_loop_that_cannot_go_on_is_refused_before_any_mlflow_run_is_opened(
    finished_loop, tmp_path, mlflow_uri
):
    from dubito.experiments.labeling_budget import LabelConfig, run_labeling

    study, acquisition = tmp_path / "study", LoopConfig().acquisition  # the finished loop's
    shutil.copytree(finished_loop[0], study / acquisition / "seed-0")
    store = Path(mlflow_uri[len("sqlite:///") :])
    before = store.read_bytes()
    shrunk = {**TINY, "rounds": 0}
    with pytest.raises(DubitoError, match="cannot shrink it"):
        run_loop(LoopConfig.flat(output=str(study / acquisition / "seed-0"), **shrunk), progress=False)
    with pytest.raises(DubitoError, match="cannot shrink it"):
        run_labeling(
            LabelConfig.flat(output=str(study), acquisition=acquisition, seeds="0", **shrunk), progress=False
        )
    with pytest.raises(DubitoError, match="other settings"):
        run_labeling(
            LabelConfig.flat(output=str(study), acquisition=acquisition, seeds="0", **{**TINY, "lr": 0.01}),
            progress=False,
        )
    assert store.read_bytes() == before and not (study / "study.json").exists()


def _sql(loop: Path, statement: str) -> None:
    with sqlite3.connect(loop / LEDGER) as db:
        db.execute(statement)


def test_a_copied_loop_resumes_in_place_never_touching_the_original(finished_loop, tmp_path, mlflow_uri):
    original, results, _ = finished_loop
    before = _tree(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    extended = run_loop(LoopConfig.flat(output=str(copy), **{**TINY, "rounds": 2}), progress=False)
    assert extended["finished"] and [c["round"] for c in extended["curve"]] == [0, 1, 2]
    assert extended["curve"][:2] == results["curve"]
    assert _tree(original) == before  # nothing of the original was written
    with Ledger(copy / LEDGER, create=False) as ledger:
        assert all(Path(r["checkpoint"]).parent == copy / "rounds" for r in ledger.rounds())
        assert ledger.get_meta("mlflow_folder") == str(copy.resolve())
        stored = [c for (c,) in ledger._db.execute("SELECT checkpoint FROM rounds")]
    assert stored == ["rounds/round-000.pt", "rounds/round-001.pt", "rounds/round-002.pt"]
    with Ledger(original / LEDGER, create=False) as ledger:
        original_run = ledger.get_meta("mlflow_run_id")
    with Ledger(copy / LEDGER, create=False) as ledger:
        assert ledger.get_meta("mlflow_run_id") not in (None, original_run)  # a run of its own


# ----------------------------------------------------------------------------- human loop
def _human(tmp_path: Path, mlflow_uri: str) -> tuple[Path, list[int]]:
    out = tmp_path / "human"
    results = run_loop(LoopConfig.flat(output=str(out), oracle="human", **TINY), progress=False)
    return out, results["waiting_for_labels"]


def test_export_never_deletes_what_dubito_did_not_write(tmp_path, mlflow_uri, capsys):
    out, waiting = _human(tmp_path, mlflow_uri)
    config = LoopConfig.flat(output=str(out), oracle="human", **TINY)
    thesis = tmp_path / "mine"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("three years of work")
    for target, match in (
        (thesis, r"holds files an export did not write \(thesis.txt\)"),
        (out, "the loop folder or a folder above it"),
        (tmp_path, "the loop folder or a folder above it"),
        (out / "rounds", "not under its queries"),
    ):
        before = _tree(tmp_path, lock=False)
        with pytest.raises(DubitoError, match=match):
            export_queries(config, target, waiting)
        assert _tree(tmp_path, lock=False) == before
        assert main(["label", "export", "--output", str(out), "--to", str(target)]) == 2
        assert "Traceback" not in capsys.readouterr().err and _tree(tmp_path, lock=False) == before
    assert (thesis / "thesis.txt").read_text() == "three years of work" and (out / LEDGER).exists()
    # a person's label files kept beside the exported images stop a new export of that folder
    pending = out / "queries" / "pending"
    assert main(["label", "export", "--output", str(out)]) == 0
    (pending / f"{waiting[0]}_label.png").write_bytes(b"a person's work")
    assert main(["label", "export", "--output", str(out)]) == 2
    assert f"holds files an export did not write ({waiting[0]}_label.png)" in capsys.readouterr().err
    assert (pending / f"{waiting[0]}_label.png").read_bytes() == b"a person's work"
    (pending / f"{waiting[0]}_label.png").unlink()
    # a mistyped loop folder: refused, nothing created
    for argv in (
        ["label", "export", "--output", str(tmp_path / "typo")],
        ["label", "import", "--output", str(tmp_path / "typo"), "--labels", str(thesis)],
    ):
        assert main(argv) == 2 and "no labeling run here" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    # a new or empty folder, and the loop's own queries folders, are fine (and replaced)
    assert main(["label", "export", "--output", str(out), "--to", str(tmp_path / "new")]) == 0
    assert main(["label", "export", "--output", str(out)]) == 0
    assert main(["label", "export", "--output", str(out)]) == 0
    assert (
        json.loads((out / "queries" / "pending" / "queries.json").read_text())["queries"][0]["id"]
        == waiting[0]
    )
    assert not [p for p in (out / "queries").iterdir() if p.name.endswith(".tmp")]


def test_human_import_is_bounded_contained_and_silent_about_content(tmp_path, mlflow_uri, capsys):
    out, waiting = _human(tmp_path, mlflow_uri)
    secret = tmp_path / "secret.txt"
    secret.write_text("PASSWORD=hunter2\n" * 10)
    labels = tmp_path / "labels"
    labels.mkdir()
    first = waiting[0]
    (labels / f"{first}_label.png").symlink_to(secret)  # a link out of the folder
    with pytest.raises(DubitoError, match="a link; put the label file itself in --labels") as err:
        import_labels(out, labels)
    assert "hunter2" not in str(err.value)
    (labels / f"{first}_label.png").unlink()
    Image.fromarray(np.zeros((4000, 4000), np.uint8)).save(
        labels / f"{first}_label.png"
    )  # small file, huge image
    with pytest.raises(DubitoError, match=r"label shape \(4000, 4000\), expected \(16, 20\); not decoded"):
        import_labels(out, labels)
    (labels / f"{first}_label.png").write_bytes(b"\x00" * 10_000_000)  # larger than any label of 16x20
    with pytest.raises(DubitoError, match="bytes, more than a label"):
        import_labels(out, labels)
    (labels / f"{first}_label.png").unlink()
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(labels / f"{first}_label.png")
    assert (
        main(["label", "import", "--output", str(out), "--labels", str(labels)]) == 1
    )  # partial: not done yet
    err = capsys.readouterr().err
    rest = [i for i in waiting if i != first]
    assert f"{len(rest)} image(s) still wait for a label: ids {', '.join(map(str, rest))}" in err


@pytest.mark.parametrize("text", ["0_3", "\u0663", "3.0", "secret words", "-1", ""])
def test_class_files_hold_plain_ascii_digits(tmp_path, text):
    import torch

    from dubito.acquisition.human import label_bytes

    path = tmp_path / "5_label.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DubitoError, match="plain ASCII digits") as err:
        label_bytes(path, torch.tensor(0))
    assert not text or text not in str(err.value).split(": ", 1)[1]  # the content is never echoed
    path.write_text(" 7\n")
    assert label_bytes(path, torch.tensor(0)) == b" 7\n"


def test_a_dataset_list_entry_outside_the_root_is_refused_by_name(tmp_path):
    from dubito.platform.data import CamVid
    from tests.fixtures import make_camvid

    make_camvid(tmp_path)
    (tmp_path / "outside.png").write_bytes(b"x")
    listing = tmp_path / "CamVid" / "train.txt"
    listing.write_text(listing.read_text() + "/x/../outside.png /x/../outside.png\n/ /\n")
    with pytest.raises(DubitoError, match=r"list entry '/x/\.\./outside\.png' resolves outside --root"):
        CamVid(tmp_path / "CamVid", "train")
    kept = CamVid(tmp_path / "CamVid", "train", strict=False)
    assert len(kept) == 3 and any("outside --root" in p.reason for p in kept.problems)
    assert any("'/' names no file" in p.reason for p in kept.problems)


# ----------------------------------------------------------------------------- defaults
def test_model_defaults_follow_the_dataset(tmp_path, mlflow_uri):
    from dubito.platform.training import TrainConfig, train

    assert LoopConfig.flat(dataset="digits").train.model == "mlp" and LoopConfig().train.model == "tiny"
    assert TrainConfig(dataset="digits").model == "mlp" and TrainConfig().model == "tiny"
    with pytest.raises(DubitoError, match="--model tiny is an image model; --dataset digits holds vectors"):
        LoopConfig.flat(dataset="digits", model="tiny").validate()
    results = train(TrainConfig(dataset="digits", epochs=2, output=str(tmp_path / "digits")), progress=False)
    assert results["spec"]["model"] == "mlp" and results["history"][-1]["val_accuracy"] > 0.5


def test_dubito_evaluate_takes_a_digits_model(tmp_path, mlflow_uri, capsys):
    """`dubito train --dataset digits` then `dubito evaluate`: accuracy, ECE and the uncertainty
    means over the test split equal a direct computation on the same MC samples."""
    import torch

    from dubito.platform.data import get_dataset
    from dubito.platform.metrics import CalibrationHistogram
    from dubito.platform.service import UncertaintyService
    from dubito.platform.training import load_model

    assert (
        main(
            [
                "train",
                "--dataset",
                "digits",
                "--epochs",
                "2",
                "--data-seed",
                "3",
                "--output",
                str(tmp_path / "t"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "t" / "model.pt"),
                "--output",
                str(tmp_path / "e"),
                "--samples",
                "5",
                "--batch-size",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    s = results["summary"]
    model, _ = load_model(tmp_path / "t" / "model.pt")
    test = get_dataset("digits", "test", seed=3)  # the split the model was trained beside (data seed 3)
    service = UncertaintyService(
        model, samples=5, device="cpu", seed=0, logit_noise_samples=10, progress=False
    )  # evaluate's
    hits, mi, ece = [], [], CalibrationHistogram(15)
    for start in range(0, len(test), 64):  # the batches evaluate makes, in its order
        batch = torch.utils.data.default_collate([test[i] for i in range(start, min(start + 64, len(test)))])
        u = service.predict(batch["image"])
        hits += (u.mean_probs.argmax(1) == batch["target"]).tolist()
        mi += u.mutual_information.tolist()
        ece.update(u.mean_probs, batch["target"])
    assert s["accuracy"] == pytest.approx(np.mean(hits), abs=1e-12) and s["accuracy"] > 0.5
    assert s["mutual_information"] == pytest.approx(np.mean(mi), rel=1e-6)
    assert s["ece"] == pytest.approx(ece.ece(), abs=1e-9)
    assert f"accuracy {s['accuracy']:.4f}" in printed and "ood_auroc" not in s
    assert (tmp_path / "e" / "calibration.png").stat().st_size > 0


# ----------------------------------------------------------------------------- non-finite numbers
def test_a_model_with_one_nan_weight_is_named_not_scored(finished_loop, tmp_path, mlflow_uri, capsys):
    import torch

    from dubito.platform.data import get_dataset
    from dubito.platform.service import UncertaintyService
    from dubito.platform.training import load_model, save_model

    model, spec = load_model(finished_loop[0] / "rounds" / "round-001.pt")
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() == 4).view(-1)[0] = float("nan")
    data = get_dataset("synthetic-camvid", "test", size=(16, 20), n=3, seed=0)
    with pytest.raises(DubitoError, match=r"non-finite .* item ids 0, 1, 2"):
        list(UncertaintyService(model, samples=2, device="cpu", progress=False).stream(data))
    from dubito.acquisition.modal import TorchEstimator

    est = TorchEstimator(epochs=1, samples=2, seed=0, hidden=(8,)).fit(
        np.random.default_rng(0).normal(size=(20, 4)), np.arange(20) % 2
    )
    with torch.no_grad():
        next(p for p in est.model_.parameters() if p.dim() == 2)[0, 0] = float("nan")
    with pytest.raises(DubitoError, match=r"TorchEstimator's model .* item ids 0, 1, 2"):
        est.uncertainty(np.ones((3, 4)))
    save_model(tmp_path / "nan.pt", model, spec)
    code = main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "nan.pt"),
            "--output",
            str(tmp_path / "eval"),
            "--no-ood",
            "--images",
            "3",
            "--samples",
            "2",
            "--no-progress",
        ]
    )
    assert code == 2 and "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "results.json").exists()


# ----------------------------------------------------------------------------- every bad input, one table
BAD_INPUTS = [
    (["label", "--lr", "-1"], "--lr"),
    (["label", "--lr", "nan"], "--lr"),
    (["label", "--dropout", "1.5"], "--dropout"),
    (["label", "--variant", "foo"], "--variant"),
    (["label", "--model", "resnet"], "--model"),
    (["label", "--temperature", "nan"], "--temperature"),
    (["label", "--initial", "5000"], "--initial 5000"),
    (["label", "--dataset", "digits", "--model", "tiny"], "--model tiny"),
    (["label", "--static-fraction", "2"], "--static-fraction"),
    (["label", "--device", "gpu0"], "--device"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--dropout", "1.5"], "--dropout"),
    (["train", "--model", "resnet"], "--model"),
    (["train", "--max-depth", "inf"], "--max-depth"),
    (["train", "--dataset", "camvid"], "--root"),
    (["train", "--dataset", "camvid", "--root", "{tmp}/nowhere"], "nowhere"),
    (["explore", "--agents", "dqn,ucb"], "--agents"),
    (["evaluate", "--model", "{tmp}/missing.pt"], "missing.pt"),
    (["evaluate", "--samples", "0"], "--samples"),
    (["reproduce", "--fractions", "x"], "--fractions"),
    (["reproduce", "--epochs", "0"], "--epochs"),
    (["reproduce", "--lr", "-1"], "--lr"),
    (["label", "--dataset", "camvid"], "--root"),
    (["label", "--scorer-gpus", "x"], "--scorer-gpus"),
    (["train", "--dataset", "digits", "--model", "tiny"], "--model tiny"),
    (["explore", "--lr", "nan"], "--lr"),
    (["explore", "--min-replay", "100", "--buffer-size", "50"], "--min-replay"),
    (["sweep", "label", "--grid", "lr=0.001,-1"], "--lr"),  # before Ray starts: no retries of a config error
    (["sweep", "label", "--grid", "seed=0", "--sample", "initial=randint:4:5000"], "--initial"),
    (["sweep", "train", "--grid", "dropout=0.1,1.5"], "--dropout"),
]


@pytest.mark.parametrize("argv, named", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_every_bad_input_is_refused_before_anything_is_written(tmp_path, mlflow_uri, capsys, argv, named):
    store = Path(mlflow_uri[len("sqlite:///") :])
    before = store.read_bytes()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main([*argv, "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert store.read_bytes() == before  # the tracking store as it was


def test_a_missing_sqlite_folder_is_refused_not_created(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/no/such/dir/x.db")
    assert main(["label", "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigterm_ends_like_ctrl_c_and_the_run_resumes(tmp_path, mlflow_uri):
    import signal

    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "rounds": 3}.items()]
    command = [
        sys.executable,
        "-m",
        "dubito",
        "label",
        f"--output={out}",
        "--acquisition=random",
        "--seeds=0",
        *flags,
        "--no-progress",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ledger, deadline = out / "random" / "seed-0" / LEDGER, time.time() + 180
    while True:  # once round 0 is recorded
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        if ledger.exists():
            with contextlib.suppress(DubitoError, sqlite3.Error), Ledger(ledger, create=False) as opened:
                if opened.next_round() >= 1:
                    break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    assert "Traceback" not in process.stderr.read()
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("dubito-label").experiment_id])
    assert runs and {r.info.status for r in runs} == {
        "KILLED"
    }  # the loop's run and the study's, none left RUNNING
    again = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300
    )  # the lock was released
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "random" / "seed-0" / "results.json").read_text())["finished"]


def test_training_stops_on_a_diverged_loss_naming_the_epoch(tmp_path, mlflow_uri, capsys):
    code = main(
        [
            "train",
            "--dataset",
            "digits",
            "--epochs",
            "3",
            "--lr",
            "1e30",
            "--output",
            str(tmp_path / "t"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "epoch 1: the loss became" in err and "--lr" in err
    assert not (tmp_path / "t" / "model.pt").exists()  # no model is written from a diverged run


def test_a_copied_training_folder_resumes_in_place_with_a_run_of_its_own(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from dubito.platform.training import TrainConfig, train

    first = train(TrainConfig(dataset="digits", epochs=1, output=str(tmp_path / "a")), progress=False)
    before = _tree(tmp_path / "a", lock=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    extended = train(TrainConfig(dataset="digits", epochs=2, output=str(tmp_path / "b")), progress=False)
    assert (
        extended["epochs_run"] == 2 and extended["history"][0] == first["history"][0]
    )  # resumed, not retrained
    assert _tree(tmp_path / "a", lock=False) == before
    assert extended["mlflow_run_id"] != first["mlflow_run_id"]
    client = MlflowClient(mlflow_uri)
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "train_loss")] == [
        1
    ]  # the original's run untouched
