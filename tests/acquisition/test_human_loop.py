"""The human-in-the-loop labeling loop: export the queried images, wait, import the label files a
person returns (checked before any is stored), train on them, query again, until the budget is spent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dubito import DubitoError
from dubito.acquisition.config import LEDGER, LoopConfig
from dubito.acquisition.human import HumanLabels, import_labels
from dubito.acquisition.ledger import Ledger
from dubito.acquisition.loop import run_loop
from dubito.acquisition.pool import pool_datasets
from tests.fixtures import TINY_LOOP

TINY = {**TINY_LOOP, "height": 16, "width": 20, "pool_images": 12, "initial": 3}
VOID = 11  # synthetic-camvid: 11 classes, void = 11


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only add overhead


def _config(output: Path, **changes) -> LoopConfig:
    return LoopConfig.flat(**{**TINY, "oracle": "human", "output": str(output), **changes})


def _truth(config: LoopConfig) -> dict[int, np.ndarray]:
    """The synthetic dataset's own targets by id: what an honest annotator returns."""
    plain = pool_datasets(config)[1]
    return {int(plain[p]["id"]): plain[p]["target"].numpy() for p in range(len(plain))}


def _write_label(folder: Path, id: int, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{id}_label.png"
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(path)
    return path


def _export(out: Path, name: str) -> dict:
    """The ids and label format an export folder offers, checking its images."""
    folder = out / "queries" / name
    spec = json.loads((folder / "queries.json").read_text())
    assert spec["task"] == "segmentation" and spec["label_shape"] == [16, 20] and spec["classes"] == 11
    ids = [q["id"] for q in spec["queries"]]
    for q in spec["queries"]:
        assert q["image"] == f"{q['id']}.png" and q["label"] == f"{q['id']}_label.png"
        with Image.open(folder / q["image"]) as img:
            assert img.mode == "RGB" and img.size == (20, 16)
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(f"{i}.png" for i in ids)  # one PNG per id
    assert not folder.with_name(folder.name + ".tmp").exists()
    return {"ids": ids, "shape": tuple(spec["label_shape"])}


def test_human_round_trip_until_finished(tmp_path, mlflow_uri):
    out, answers = tmp_path / "out", tmp_path / "answers"
    config = _config(out)
    truth = _truth(config)

    results = run_loop(config, progress=False)
    assert not results["finished"] and results["curve"] == []
    assert len(results["initial"]) == 3 and results["waiting_for_labels"] == results["initial"]
    assert (out / "results.json").exists()
    exported = {"initial": _export(out, "initial")["ids"]}
    assert exported["initial"] == results["initial"]

    # nothing imported yet: running again waits again, trains nothing
    again = run_loop(_config(out), progress=False)
    assert again["waiting_for_labels"] == results["initial"] and again["curve"] == []

    imported: list[int] = []
    for step in range(10):
        waiting = results["waiting_for_labels"]
        for i in waiting:
            _write_label(answers / f"step-{step}", i, truth[i])
        got, missing = import_labels(out, answers / f"step-{step}")
        assert got == sorted(waiting) and missing == []
        imported += got
        with pytest.raises(DubitoError, match="no queried image is waiting for a label"):
            import_labels(out, answers / f"step-{step}")  # all imported: nothing waits
        results = run_loop(_config(out), progress=False)
        if results["finished"]:
            break
        r = len(results["curve"]) - 1
        assert results["waiting_for_labels"] == results["queried"][r]  # queried by the newest round
        exported[f"round-{r:03d}"] = _export(out, f"round-{r:03d}")["ids"]
        assert exported[f"round-{r:03d}"] == results["waiting_for_labels"]
    assert results["finished"] and results["waiting_for_labels"] == []
    assert [c["round"] for c in results["curve"]] == [0, 1, 2]
    assert [c["labels"] for c in results["curve"]] == [3, 5, 7]
    assert sorted(p.name for p in (out / "rounds").glob("*.pt")) == [
        "round-000.pt",
        "round-001.pt",
        "round-002.pt",
    ]
    assert sorted(p.name for p in (out / "queries").iterdir()) == ["initial", "round-000", "round-001"]

    with Ledger(out / LEDGER) as ledger:
        labeled = ledger.labeled_ids()
        files = ledger.label_files()
        assert ledger.pending(labeled) == []
    # every id queried once, exported once, labelled once
    assert len(labeled) == len(set(labeled)) == 3 + 2 * 2
    all_exported = [i for ids in exported.values() for i in ids]
    assert sorted(all_exported) == sorted(labeled) == sorted(imported)
    assert len(all_exported) == len(set(all_exported))
    # the stored label files are copies in the output, the ones the test wrote
    assert sorted(files) == sorted(labeled)
    for i, path in files.items():
        assert Path(path).parent == out / "labels" and Path(path).name == f"{i}_label.png"
        with Image.open(path) as img:
            np.testing.assert_array_equal(np.asarray(img), truth[i])

    with pytest.raises(DubitoError, match="no queried image is waiting"):
        import_labels(out, answers / "step-0")

    # an honest annotator's labels are the dataset's targets: the human loop trains, scores and
    # queries exactly as the simulated oracle does (the imported labels are used, aligned with
    # the training flips)
    simulated = run_loop(
        LoopConfig.flat(**TINY, oracle="simulated", output=str(tmp_path / "sim")), progress=False
    )
    assert simulated["initial"] == results["initial"]
    assert simulated["queried"] == results["queried"]
    assert simulated["curve"] == results["curve"]


def test_bad_label_files_are_refused_and_leave_the_ledger_unchanged(tmp_path, mlflow_uri):
    out = tmp_path / "out"
    config = _config(out)
    truth = _truth(config)
    results = run_loop(config, progress=False)
    first, second, third = waiting = results["waiting_for_labels"]
    shape = _export(out, "initial")["shape"]

    def refused(folder: Path, bad: Path, match: str) -> None:
        with pytest.raises(DubitoError, match=match) as err:
            import_labels(out, folder)
        assert str(bad) in str(err.value)
        with Ledger(out / LEDGER) as ledger:
            assert ledger.label_files() == {} and ledger.pending(ledger.labeled_ids()) == waiting
        assert not (out / "labels").exists() or not any((out / "labels").iterdir())

    # good files for two ids and a bad one for the third: none is stored
    cases = {
        "shape": (
            np.zeros((shape[0] - 1, shape[1]), np.uint8),
            r"label shape \(15, 20\), expected \(16, 20\)",
        ),
        "transposed": (truth[third].T, r"label shape \(20, 16\)"),
        "class": (np.full(shape, VOID + 1, np.uint8), r"class values outside 0\.\.10 \(void = 11\)"),
        "class-200": (
            np.where(np.arange(shape[1]) == 3, 200, truth[third]).astype(np.uint8),
            "class values outside",
        ),
    }
    for name, (array, match) in cases.items():
        folder = tmp_path / name
        _write_label(folder, first, truth[first])
        _write_label(folder, second, truth[second])
        refused(folder, _write_label(folder, third, array), match)

    unreadable = tmp_path / "unreadable"
    _write_label(unreadable, first, truth[first])
    (unreadable / f"{third}_label.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of a PNG")
    refused(unreadable, unreadable / f"{third}_label.png", "not a PNG image")

    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(np.zeros((*shape, 3), np.uint8)).save(rgb / f"{third}_label.png")
    refused(rgb, rgb / f"{third}_label.png", "cannot read the label.*one channel")

    empty = tmp_path / "empty"
    _write_label(empty, 999, truth[first])  # an id nobody asked for is not a label for a waiting id
    with pytest.raises(DubitoError, match=f"none of the label files waited for .*{first}_label"):
        import_labels(out, empty)
    with Ledger(out / LEDGER) as ledger:
        assert ledger.label_files() == {}

    # void pixels are allowed; a partial import stores what is there, the loop waits for the rest
    partial = tmp_path / "partial"
    void = truth[first].copy()
    void[:4] = VOID
    _write_label(partial, first, void)
    assert import_labels(out, partial) == ([first], [second, third])  # the ids still waiting are named
    with Ledger(out / LEDGER) as ledger:
        assert ledger.pending(ledger.labeled_ids()) == [second, third]
    # the export is made again when a run was killed after recording the queries, before exporting
    shutil.rmtree(out / "queries" / "initial")
    results = run_loop(_config(out), progress=False)
    assert results["waiting_for_labels"] == [second, third] and results["curve"] == []
    assert _export(out, "initial")["ids"] == waiting


def test_import_needs_a_ledger(tmp_path):
    (tmp_path / "labels").mkdir()
    with pytest.raises(DubitoError, match=r"no labeling run here \(no ledger.sqlite\)") as err:
        import_labels(tmp_path / "nothing", tmp_path / "labels")
    assert str(tmp_path / "nothing") in str(err.value)


def test_imported_labels_replace_the_targets_before_the_training_flips(tmp_path):
    """The labels a person returns are for the image as exported (unflipped); the training pool's
    random flips must apply to them as to the image."""
    config = _config(tmp_path / "out")
    pool_train, pool, _ = pool_datasets(config)
    position = {int(pool[p]["id"]): p for p in range(len(pool))}
    ids = sorted(position)[:6]
    labels = tmp_path / "labels"
    honest = {i: _write_label(labels / "honest", i, pool[position[i]]["target"].numpy()) for i in ids[:4]}
    void = {i: _write_label(labels / "void", i, np.full((16, 20), VOID)) for i in ids[4:]}
    files = {i: str(p) for i, p in {**honest, **void}.items()}
    data = HumanLabels(pool_train, pool, files)
    assert (data.task, data.num_classes, data.ignore_index) == ("segmentation", 11, VOID)  # the pool's
    assert len(data) == len(pool_train)
    flipped = 0
    for epoch in range(4):
        data.set_epoch(epoch)
        assert pool_train.epoch == epoch
        for i in ids[:4]:
            want, got = pool_train[position[i]], data[position[i]]
            assert got["id"] == i
            torch.testing.assert_close(got["image"], want["image"])
            assert torch.equal(got["target"], want["target"]) and torch.equal(got["mask"], want["mask"])
            flipped += not torch.equal(got["target"], pool[position[i]]["target"])
        for i in ids[4:]:  # all void: nothing of these images counts in the loss
            got = data[position[i]]
            assert torch.equal(got["target"], torch.full((16, 20), VOID)) and not got["mask"].any()
        unlabelled = max(position)  # no file: the pool's own item
        assert torch.equal(data[position[unlabelled]]["target"], pool_train[position[unlabelled]]["target"])
    assert flipped > 0  # some items were flipped, so the check above means something


def test_imported_depth_with_unknown_pixels_is_masked(tmp_path):
    """Depth labels: NaN or 0 mark unknown pixels (queries.json's format); they must not count."""
    config = _config(tmp_path / "out", dataset="synthetic-make3d")
    pool_train, pool, _ = pool_datasets(config)
    depth = pool[0]["target"].numpy().astype(np.float32).copy()
    depth[0, :5] = np.nan
    depth[1, :3] = 0.0
    unknown = int((~np.isfinite(depth) | (depth <= 0)).sum())
    assert unknown >= 8
    np.save(tmp_path / "0_label.npy", depth)
    data = HumanLabels(pool_train, pool, {0: str(tmp_path / "0_label.npy")})
    assert data.task == "depth"
    for epoch in range(3):
        data.set_epoch(epoch)
        item, want = data[0], pool_train[0]
        torch.testing.assert_close(item["image"], want["image"])
        assert torch.isfinite(item["target"]).all()
        assert int((~item["mask"]).sum()) == unknown
        known = item["mask"]
        torch.testing.assert_close(item["target"][known], want["target"][known].to(item["target"].dtype))


def test_dubito_label_with_a_human_oracle_says_what_to_do_next(tmp_path, mlflow_uri, capsys):
    from dubito.cli import main

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = tmp_path / "study"
    argv = ["label", "--output", str(out), "--oracle", "human", "--acquisition", "bald", "--seeds", "0"]
    assert main([*argv, *flags, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    loop = out / "bald" / "seed-0"
    assert f"waiting for labels: label the images in {loop}/queries/" in printed
    assert f"dubito label import --output {loop}" in printed
    assert len(_export(loop, "initial")["ids"]) == TINY["initial"]
