import json

import h5py
import numpy as np
import pytest

from conftest import run_module
from gan import showers

ENERGIES = [10.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0]
THICK_WEIGHT = np.where(np.arange(25) < showers.N_THIN, 1.0, 2.0)  # thick layers: twice the W


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(2024)
    return {e: showers.simulate(np.full(600, e), rng=rng) for e in ENERGIES}


@pytest.mark.parametrize("energy", ENERGIES)
def test_sampling_fraction_within_5_percent_of_geant4_fit(samples, energy):
    sf = samples[energy].sum(axis=(1, 2, 3)).mean() / energy
    fit = showers.sampling_fraction_fit(energy)
    assert abs(sf / fit - 1) < 0.05, (energy, sf, fit)


def test_reference_fit_values():
    np.testing.assert_allclose(showers.sampling_fraction_fit([10, 500]), [0.02183, 0.01810], atol=2e-5)


def test_shower_maximum_moves_deeper_with_log_energy(samples):
    """Mean depth of the visible shower (thin-equivalent energy) grows roughly linearly with ln E."""
    depth = []
    for e in ENERGIES:
        prof = (samples[e].sum(axis=(1, 2)) * THICK_WEIGHT).mean(0)
        depth.append(float((prof * (np.arange(25) + 0.5)).sum() / prof.sum()))
    assert all(b > a for a, b in zip(depth, depth[1:])), depth
    slope, _ = np.polyfit(np.log(ENERGIES), depth, 1)
    assert 0.8 < slope < 3.0, slope  # layers of 0.69 X0 per e-fold of energy; G&P: ~1 X0 per e-fold
    peak = [int(np.argmax((samples[e].sum(axis=(1, 2)) * THICK_WEIGHT).mean(0))) for e in (10.0, 100.0, 500.0)]
    assert peak[0] < peak[1] <= peak[2]


@pytest.mark.parametrize("energy", [10.0, 50.0, 100.0])
def test_resolution_near_calice(samples, energy):
    """Calibrated energy (thick layers weighted x2) resolution: 16.6 %/sqrt(E) (+) 1.1 % within 20 %."""
    e_rec = (samples[energy].sum(axis=(1, 2)) * THICK_WEIGHT).sum(1)
    res = e_rec.std() / e_rec.mean()
    expected = np.hypot(0.166 / np.sqrt(energy), 0.011)
    assert abs(res / expected - 1) < 0.2, (energy, res, expected)


def test_lateral_containment_central_cells(samples):
    img = samples[100.0]
    central = img[:, 10:15, 10:15].sum() / img.sum()
    assert 0.85 < central < 0.99


def test_seed_reproducible():
    a = next(showers.generate("fixed", 8, seed=5))["ECAL"]
    b = next(showers.generate("fixed", 8, seed=5))["ECAL"]
    c = next(showers.generate("fixed", 8, seed=6))["ECAL"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cli_writes_fixed_layout(tmp_path):
    out = tmp_path / "f.h5"
    p = run_module("gan.showers", "--variant", "fixed", "--events", 300, "--out", out, "--seed", 1)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["events"] == 300
    with h5py.File(out) as f:
        assert f["ECAL"].shape == (300, 25, 25, 25) and f["ECAL"].dtype == np.float32
        assert f["target"].shape == (300, 2)
        ep = f["target"][:, 1]
        assert 2.0 <= ep.min() and ep.max() <= 500.0
        sf = f["ECAL"][:].sum(axis=(1, 2, 3)) / ep
        assert 0.015 < np.median(sf) < 0.025


def test_angle_layout_and_measured_angle(angle_file):
    with h5py.File(angle_file) as f:
        assert f["ECAL"].shape == (96, 51, 51, 25)
        for key in ("energy", "theta", "mtheta", "eta", "sum"):
            assert f[key].shape == (96,)
        theta, mtheta = f["theta"][:], f["mtheta"][:]
        np.testing.assert_allclose(f["eta"][:], -np.log(np.tan(theta / 2)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(f["sum"][:], f["ECAL"][:].sum(axis=(1, 2, 3)), rtol=1e-4)
        # Stored in GeV x 50: sampling fraction x 50 ~ 1.
        assert 0.7 < np.median(f["sum"][:] / f["energy"][:]) < 1.4
    assert np.corrcoef(theta, mtheta)[0, 1] > 0.9


def test_bad_arguments_exit_2(tmp_path):
    p = run_module("gan.showers", "--variant", "fixed", "--events", 0, "--out", tmp_path / "x.h5")
    assert p.returncode == 2 and "--events must be a positive integer" in p.stderr
