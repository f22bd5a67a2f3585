import json

import numpy as np
import pytest

from conftest import run_module

SUMMARY_KEYS = {"samples_per_s", "samples_per_s_per_rank", "step_time_mean_s", "step_time_std_s", "ranks",
                "batch_size_per_rank", "variant", "tf_version", "horovod_version", "device"}


def records(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_single_process_small(tmp_path):
    out = tmp_path / "m.jsonl"
    p = run_module("gan.train", "--variant", "small", "--batch-size", 4, "--steps", 4, "--warmup", 2,
                   "--metrics-out", out, "--checkpoint-dir", tmp_path / "ckpt")
    assert p.returncode == 0, p.stderr[-3000:]
    recs = records(out.read_text())
    assert recs == records(p.stdout)
    assert recs[0]["event"] == "start"
    steps = [r for r in recs if r["event"] == "step"]
    assert [s["warmup"] for s in steps] == [True, True, False, False, False, False]
    s = recs[-1]
    assert s["event"] == "summary" and SUMMARY_KEYS <= set(s)
    assert s["ranks"] == 1 and s["steps"] == 4 and s["device"] == "cpu" and s["tf_version"] == "2.15.1"
    measured = [r["time_s"] for r in steps if not r["warmup"]]
    assert s["step_time_mean_s"] == pytest.approx(np.mean(measured), rel=1e-3)
    assert s["samples_per_s"] == pytest.approx(4 / np.mean(measured), rel=1e-3)
    assert (tmp_path / "ckpt" / "generator.weights.h5").exists()


@pytest.mark.parametrize("variant", ["fixed", "angle"])
def test_full_models_train_one_step(variant, tmp_path):
    p = run_module("gan.train", "--variant", variant, "--batch-size", 2, "--steps", 1, "--warmup", 0,
                   "--no-horovod")
    assert p.returncode == 0, p.stderr[-3000:]
    s = records(p.stdout)[-1]
    assert s["variant"] == variant and s["engine"] == "none" and s["horovod_version"] is None
    assert all(np.isfinite(v) for v in s["final_losses"].values())
    # Grappler optimised the step: its remapper (Conv3D + BiasAdd + LeakyRelu fusion) did not give up on it.
    assert "remapper failed" not in p.stderr, p.stderr[-3000:]


def test_trains_from_hdf5_file(fixed_file):
    p = run_module("gan.train", "--variant", "small", "--batch-size", 4, "--steps", 2, "--warmup", 1,
                   "--data", fixed_file)
    assert p.returncode == 0, p.stderr[-3000:]
    assert records(p.stdout)[-1]["data"] == str(fixed_file)


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--variant", "huge"], "invalid choice"),
    (["--loss-weights", "1,2"], "needs 3 values"),
])
def test_bad_arguments_exit_2(args, message):
    p = run_module("gan.train", *args)
    assert p.returncode == 2 and message in p.stderr


def test_missing_data_file_is_a_clear_error(tmp_path):
    p = run_module("gan.train", "--variant", "small", "--data", tmp_path / "none.h5", "--steps", 1)
    assert p.returncode == 1 and "no HDF5 data" in p.stderr


def test_horovodrun_two_ranks_identical_weights(horovodrun, tmp_path):
    out, dump = tmp_path / "m.jsonl", tmp_path / "weights"
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "gan.train",
           "--variant", "small", "--steps", "20", "--warmup", "5", "--metrics-out", str(out),
           "--dump-weights", str(dump)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = records(out.read_text())[-1]
    assert s["event"] == "summary" and s["ranks"] == 2 and s["samples_per_s"] > 0
    assert s["samples_per_s"] == pytest.approx(2 * s["samples_per_s_per_rank"])
    assert sorted(p["cpus"][0] for p in s["ranks_placement"]) == [0, 1]  # one core each
    assert s["intra_op_threads"] == 1
    w0, w1 = np.load(dump / "weights-rank0.npz"), np.load(dump / "weights-rank1.npz")
    assert set(w0.files) == set(w1.files) and len(w0.files) > 20
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    assert s["weights_identical"] and len(set(s["weights_digest"])) == 1


def test_bfloat16_mixed_precision_step():
    p = run_module("gan.train", "--variant", "small", "--batch-size", 4, "--steps", 2, "--warmup", 1,
                   "--precision", "bf16", "--no-horovod")
    assert p.returncode == 0, p.stderr[-3000:]
    s = records(p.stdout)[-1]
    assert s["precision"] == "bf16" and all(np.isfinite(v) for v in s["final_losses"].values())
    assert "remapper failed" not in p.stderr, p.stderr[-3000:]


def test_float16_on_cpu_is_refused_with_the_alternative():
    p = run_module("gan.train", "--variant", "small", "--steps", 1, "--precision", "fp16", "--no-horovod")
    assert p.returncode == 1 and "needs a GPU" in p.stderr and "bf16" in p.stderr


def test_cpus_per_rank_beyond_the_host_is_refused():
    p = run_module("gan.train", "--variant", "small", "--steps", 1, "--cpus-per-rank", 64, "--no-horovod")
    assert p.returncode == 1 and "this host offers" in p.stderr


def test_runs_as_one_process_when_horovod_is_not_installed(tmp_path):
    """A `horovod` package that fails to import stands in for a machine without Horovod."""
    (tmp_path / "horovod").mkdir()
    (tmp_path / "horovod" / "__init__.py").write_text("raise ImportError('no horovod on this machine')\n")
    p = run_module("gan.train", "--variant", "small", "--batch-size", 2, "--steps", 1, "--warmup", 0,
                   env={"PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-3000:]
    s = records(p.stdout)[-1]
    assert s["engine"] == "none" and s["horovod_version"] is None and s["ranks"] == 1


def test_mllog_file(tmp_path):
    log = tmp_path / "run" / "mllog.txt"
    p = run_module("gan.train", "--variant", "small", "--batch-size", 2, "--steps", 2, "--warmup", 1,
                   "--mllog", log, "--no-horovod")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith(":::MLLOG ")]
    keys = [json.loads(line[len(":::MLLOG "):])["key"] for line in lines]
    for key in ("submission_benchmark", "global_batch_size", "init_start", "init_stop", "run_start", "run_stop"):
        assert key in keys
    stop = json.loads(lines[keys.index("run_stop")][len(":::MLLOG "):])
    assert stop["metadata"]["status"] == "success"


def test_precision_auto_chooses_what_was_measured_to_pay_and_says_why(monkeypatch):
    from gan import train
    from gan.train import choose_precision

    amx = ["avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    zen4 = ["avx512f", "avx512_bf16"]
    # bf16 pays on AMX, but failed the physics check there: refused, and the reason says both.
    precision, why = choose_precision("cpu", amx)
    assert precision == "fp32" and "1.73x" in why and "refused" in why and "check failed" in why and "13.33" in why
    # On Ampere it would pay, but its physics was never checked on a GPU.
    precision, why = choose_precision("gpu:A100", gpu_capability=(8, 0))
    assert precision == "fp32" and "refused" in why and "not been checked" in why and "TF32" in why
    # AMD's Zen 4: AVX512-BF16 without AMX, where bf16 paid and passed the physics check.
    precision, why = choose_precision("cpu", zen4, cpu_vendor="AuthenticAMD")
    assert precision == "bf16" and "1.43x" in why and "passed the physics check" in why
    # The same instructions on an Intel CPU without AMX: bf16 ran slower than fp32.
    precision, why = choose_precision("cpu", zen4, cpu_vendor="GenuineIntel")
    assert precision == "fp32" and "no AMX" in why and "0.73" in why
    assert choose_precision("cpu", ["avx2"]) == ("fp32", "CPU has no bf16 instructions")
    assert choose_precision("gpu:V100", gpu_capability=(7, 0))[0] == "fp32"
    # A physics check that failed (or never ran) is what holds bf16 back where it pays; a passed one lets it in.
    monkeypatch.setattr(train, "BF16_PHYSICS", {k: (True, "passed") for k in ("amx", "gpu", "amd_avx512_bf16")})
    assert choose_precision("cpu", amx)[0] == "bf16"
    assert choose_precision("gpu:A100", gpu_capability=(8, 0))[0] == "bf16"
    assert choose_precision("cpu", zen4, cpu_vendor="GenuineIntel")[0] == "fp32"
    monkeypatch.setattr(train, "BF16_PHYSICS", {})
    assert choose_precision("cpu", zen4, cpu_vendor="AuthenticAMD")[0] == "fp32"
    # run() feeds it the fingerprint's CPU: the flags it asks about must be among those the fingerprint keeps.
    from gan import sysinfo

    assert {"amx_bf16", "avx512_bf16"} <= set(sysinfo.ISA)
    assert sysinfo.cpu()["vendor"] in ("GenuineIntel", "AuthenticAMD", None)


def test_gpu_mfu_uses_the_datasheet_peak_of_the_precision_it_runs_at():
    """No GPU here: the lookup from the names TensorFlow prints, and the CPU path that must not pretend."""
    from gan.sysinfo import gpu_datasheet_peak
    from gan.train import _gpu_mfu, gpu_peak

    assert gpu_datasheet_peak("NVIDIA A100-SXM4-40GB", "bf16")[0] == 312e12
    assert gpu_datasheet_peak("NVIDIA A100-SXM4-40GB", "fp32")[0] == 156e12  # TF32, TensorFlow's default
    assert gpu_datasheet_peak("NVIDIA A100-SXM4-40GB", "fp32", tf32=False)[0] == 19.5e12
    assert gpu_datasheet_peak("NVIDIA H100 PCIe", "bf16")[0] == 756e12
    assert gpu_datasheet_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == pytest.approx(989.4e12)
    assert gpu_datasheet_peak("NVIDIA L40S", "bf16")[0] == pytest.approx(362.05e12)
    assert gpu_datasheet_peak("NVIDIA L4", "fp16")[0] == 121e12
    assert gpu_datasheet_peak("Tesla V100-SXM2-16GB", "fp16")[0] == 125e12
    assert gpu_datasheet_peak("Tesla V100-PCIE-32GB", "fp32")[0] == 14e12
    assert gpu_datasheet_peak("Tesla V100S-PCIE-32GB", "fp32")[0] == pytest.approx(16.4e12)  # not the V100 PCIe's
    assert gpu_datasheet_peak("NVIDIA A10G", "bf16")[0] == 125e12
    assert gpu_datasheet_peak("NVIDIA RTX A1000", "bf16")[0] is None  # not an A100 nor an A10
    assert gpu_datasheet_peak("NVIDIA L40", "bf16")[0] == pytest.approx(181.05e12)  # not the L4's
    peak, why = gpu_datasheet_peak("Tesla V100-SXM2-16GB", "bf16")
    assert peak is None and "no bf16" in why
    assert gpu_datasheet_peak("Some GPU", "fp32") == (None, "no datasheet peak known for 'Some GPU'")
    assert gpu_peak("cpu", "fp32") == (None, "not a GPU") and _gpu_mfu("cpu", "fp32", 1e12) == {}
    assert _gpu_mfu("gpu:Tesla T4", "fp16", 6.5e12)["mfu_datasheet"] == pytest.approx(0.1)
    assert _gpu_mfu("gpu:Mystery", "fp32", 1e12) == {"datasheet_peak_basis": "no datasheet peak known for 'Mystery'"}


def test_batches_go_to_the_gpu_ahead_of_the_step_and_stay_put_on_a_cpu():
    """The GPU branch runs for real with the CPU as its target: the batches' structure survives the copy."""
    import tensorflow as tf

    from gan import data
    from gan.train import to_device

    ds = data.synthetic_dataset("small", 4, seed=1)
    assert to_device(ds, "cpu") is ds
    moved = to_device(ds, "gpu:any", target="/CPU:0")
    assert moved is not ds
    a, b = next(iter(ds)), next(iter(moved))
    assert sorted(a) == sorted(b) and a["image"].shape == b["image"].shape == (4, 25, 25, 25, 1)
    assert b["image"].dtype == tf.float32


def test_profile_attributes_convolutions_to_measured_steps_with_their_flops():
    from harness.bench.profile import conv_flops, parse

    shape = "mb8_ic32oc8_id25od25kd5sd1dd0pd2_ih25oh25kh5sh1dh0ph2_iw25ow25kw5sw1dw0pw2"
    assert conv_flops(shape) == 2 * 8 * 32 * 8 * 25 ** 3 * 125
    line = "onednn_verbose,primitive,exec,cpu,convolution,brgconv:avx512_core,forward_training,src:a,,alg,{},{}"
    lines = [line.format(shape, 9.0), '{"event": "step", "step": 1, "warmup": true, "time_s": 1}',
             line.format(shape, 2.0), line.format(shape, 3.0),
             '{"event": "step", "step": 2, "warmup": false, "time_s": 0.1}']
    shapes = {}
    steps, impls = parse(lines, warmup=1, shapes=shapes)
    assert steps == [({"convolution forward": 5.0}, 100.0)]  # the warm-up step's 9 ms left out
    assert shapes == {("convolution forward", "brgconv:avx512_core", shape): [5.0, 2]}
    assert impls["convolution forward"]["brgconv:avx512_core"] == 14.0


def test_the_benchmarks_launch_the_trainer_of_a_given_checkout_and_name_its_failure():
    """harness.bench.trainer and .sidebyside launch gan.train through one function: one process without
    Horovod or ranks under horovodrun, from a given checkout, returning the summary line."""
    from pathlib import Path

    from harness.bench.trainer import run_trainer

    root = Path(__file__).resolve().parents[1]
    small = ["--variant", "small", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--data", "synthetic"]
    s = run_trainer(small, cpus_per_rank=1, horovod=False, code_dir=root, timeout=300)
    assert s["event"] == "summary" and s["ranks"] == 1 and s["cpus_per_rank"] == 1 and s["samples_per_s"] > 0
    with pytest.raises(RuntimeError, match=r"(?s)exited 2:.*--batch-size must be >= 1"):
        run_trainer(["--variant", "small", "--batch-size", "0"], horovod=False, code_dir=root, timeout=300)
    with pytest.raises(ValueError, match="needs Horovod"):
        run_trainer(small, ranks=2, horovod=False)
