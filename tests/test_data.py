import h5py
import numpy as np
import pytest

from gan import data


def test_fixed_preprocessing_matches_authors():
    ecal = np.zeros((2, 25, 25, 25), np.float32)
    ecal[0, 12, 12, 5] = 0.5
    ecal[0, 0, 0, 0] = 5e-7  # below the 1e-6 GeV threshold: dropped
    ecal[1, 1, 2, 3] = 2.0
    out = data.preprocess("fixed", {"ECAL": ecal, "target": np.array([[11, 100.0], [11, 250.0]])})
    assert out["image"].shape == (2, 25, 25, 25, 1)
    assert out["image"][0, 0, 0, 0, 0] == 0.0
    np.testing.assert_allclose(out["image"][0, 12, 12, 5, 0], 50.0)  # x100
    np.testing.assert_allclose(out["energy"], [1.0, 2.5])  # Ep / 100 from target column 1
    np.testing.assert_allclose(out["ecal"], [50.0, 200.0])


def test_angle_preprocessing_power_and_cut():
    ecal = np.zeros((3, 51, 51, 25), np.float32)
    ecal[0, 25, 25, 10] = 50.0
    ecal[1, 25, 25, 10] = 5.0  # sum <= 10 (0.1 GeV): dropped as by the authors
    ecal[2, 20, 25, 10] = 200.0
    block = {"ECAL": ecal, "energy": np.array([100.0, 3.0, 300.0]), "mtheta": np.array([1.5, 1.6, 1.7])}
    out = data.preprocess("angle", block)
    assert len(out["image"]) == 2
    np.testing.assert_allclose(out["image"][0, 25, 25, 10, 0], 50.0 ** 0.85, rtol=1e-6)
    np.testing.assert_allclose(out["ecal"], [50.0, 200.0])  # summed before the power
    np.testing.assert_allclose(out["energy"], [1.0, 3.0])
    np.testing.assert_allclose(out["angle"], [1.5, 1.7])


def test_missing_dataset_is_named():
    with pytest.raises(KeyError, match="target"):
        data.preprocess("fixed", {"ECAL": np.zeros((1, 25, 25, 25))})


def test_shards_are_disjoint_equal_and_cover(fixed_file):
    def energies(rank, size):
        return [round(float(e["energy"]), 6) for e in data.iterate_shard([str(fixed_file)], "fixed", rank, size, epochs=1)]

    a, b = energies(0, 2), energies(1, 2)
    whole = energies(0, 1)
    assert len(a) == len(b) == 256
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(whole)


def test_shuffled_per_epoch_and_seed(fixed_file):
    def first(seed):
        it = data.iterate_shard([str(fixed_file)], "fixed", seed=seed, epochs=1)
        return [float(next(it)["energy"]) for _ in range(5)]

    assert first(1) == first(1)
    assert first(1) != first(2)
    with h5py.File(fixed_file) as f:
        in_file_order = list(f["target"][:5, 1] / 100)
    assert not np.allclose(first(1), in_file_order)


def test_file_dataset_batches(fixed_file):
    ds = data.file_dataset(str(fixed_file.parent), "small", batch_size=4, rank=1, size=2)
    batch = next(iter(ds))
    assert batch["image"].shape == (4, 25, 25, 25, 1)
    assert batch["energy"].shape == (4,) and batch["ecal"].shape == (4,)


def test_angle_file_dataset(angle_file):
    batch = next(iter(data.file_dataset(str(angle_file), "angle", batch_size=3)))
    assert batch["image"].shape == (3, 51, 51, 25, 1) and batch["angle"].shape == (3,)


def test_no_files_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HDF5 data"):
        data.list_files(str(tmp_path / "nothing*.h5"))
