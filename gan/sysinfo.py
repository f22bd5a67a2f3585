"""A system fingerprint of the node it runs on: what hardware and software made a figure.

Run on every node at deploy (``python -m gan.sysinfo`` prints one JSON object; the trainer gathers it from every rank into its summary), so each run records
the machine behind its numbers. CPU facts come from py-cpuinfo (model, family/model/stepping, flags), cores,
frequency and memory from psutil, GPUs from NVML (nvidia-ml-py) with ``nvidia-smi topo -m`` for the topology,
the rest from /sys and the installed packages. Anything that cannot be read is None, never guessed.

``hardware_key`` and ``software_key`` are the parts that decide whether two figures may be compared.
"""
from __future__ import annotations

import glob
import json
import os
import re
import platform
import shutil
import subprocess
import sys

# The ISA features that change a deep-learning step's speed on CPUs (Linux /proc/cpuinfo names).
ISA = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
       "amx_bf16", "amx_int8", "amx_fp16")
# What decides comparability: two runs whose hardware keys differ measured different machines.
HARDWARE_FIELDS = ("cpu.model", "cpu.family", "cpu.model_number", "cpu.stepping", "cpu.isa", "cpu.cores_visible", "gpu.model", "gpu.count", "gpu.memory_mib")
SOFTWARE_FIELDS = ("software.tensorflow", "software.horovod", "software.python", "gpu.driver", "gpu.cuda")


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu(cores_visible=None) -> dict:
    flags, brand, vendor, family, model, stepping, hz = [], None, None, None, None, None, None
    try:
        import cpuinfo  # py-cpuinfo

        info = cpuinfo.get_cpu_info()
        flags, brand, vendor = info.get("flags") or [], info.get("brand_raw"), info.get("vendor_id_raw")
        family, model, stepping = info.get("family"), info.get("model"), info.get("stepping")
        hz = (info.get("hz_advertised") or [None])[0]
    except ImportError:
        text = _read("/proc/cpuinfo") or ""
        fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = fields.get("flags", "").split()
        brand, vendor = fields.get("model name"), fields.get("vendor_id")
        family, model, stepping = (int(fields[k]) if fields.get(k, "").isdigit() else None
                                   for k in ("cpu family", "model", "stepping"))
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        freq = psutil.cpu_freq()
        mhz = (freq.max or freq.current) if freq else None
        mem = psutil.virtual_memory().total
    except ImportError:
        physical, mhz, mem = None, None, None
    if not mhz and hz:
        mhz = hz / 1e6
    visible = cores_visible or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    numa = sorted(glob.glob("/sys/devices/system/node/node[0-9]*"))
    return {"model": brand, "vendor": vendor, "family": family, "model_number": model, "stepping": stepping,
            "isa": [f for f in ISA if f in set(flags)], "cores_visible": visible, "cores_physical": physical,
            "threads_per_core": _threads_per_core(), "mhz": round(mhz) if mhz else None,
            "memory_bytes": mem, "numa_nodes": len(numa) or None}


def _threads_per_core():
    s = _read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    if not s:
        return None
    return sum(int(b) - int(a) + 1 if "-" in part else 1
               for part in s.split(",") for a, _, b in [part.partition("-")])


def gpu() -> dict:
    """NVIDIA GPUs through NVML; all None without a driver (a CPU node)."""
    out = {"model": None, "count": 0, "memory_mib": None, "driver": None, "cuda": None, "topology": None}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 (no package, no driver, no device: a CPU node)
        return out
    try:
        n = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        names = sorted({_text(pynvml.nvmlDeviceGetName(h)) for h in handles})
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        out.update(model=", ".join(names) or None, count=n,
                   memory_mib=min(pynvml.nvmlDeviceGetMemoryInfo(h).total for h in handles) // 2**20 if n else None,
                   driver=_text(pynvml.nvmlSystemGetDriverVersion()), cuda=f"{cuda // 1000}.{cuda % 1000 // 10}")
    finally:
        pynvml.nvmlShutdown()
    if shutil.which("nvidia-smi"):
        p = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
        out["topology"] = p.stdout.strip() if p.returncode == 0 else None
    return out


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def network() -> dict:
    """RDMA devices (InfiniBand, EFA) and the link speed of each non-virtual interface, where readable."""
    rdma = sorted(os.path.basename(p) for p in glob.glob("/sys/class/infiniband/*"))
    links = {}
    for p in sorted(glob.glob("/sys/class/net/*")):
        name = os.path.basename(p)
        if name == "lo" or not os.path.exists(os.path.join(p, "device")):
            continue  # veth, bridges and tunnels have no device, and no meaningful speed
        speed = _read(os.path.join(p, "speed"))
        links[name] = int(speed) if speed and speed.lstrip("-").isdigit() and int(speed) > 0 else None
    return {"rdma": rdma, "efa": [d for d in rdma if d.startswith("efa")], "links_mbps": links}


def software(with_frameworks=True) -> dict:
    os_release = dict(line.split("=", 1) for line in (_read("/etc/os-release") or "").splitlines() if "=" in line)
    out = {"os": os_release.get("PRETTY_NAME", "").strip('"') or platform.system(), "kernel": platform.release(),
           "python": platform.python_version(), "tensorflow": None, "onednn": None, "cudnn": None, "nccl": None,
           "horovod": None, "horovod_controllers": None, "image": os.environ.get("CLOUDBENCH_IMAGE")}
    if not with_frameworks:
        return out
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        build = tf.sysconfig.get_build_info()
        out.update(tensorflow=tf.__version__, cudnn=build.get("cudnn_version"),
                   onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 CPUs)"))
    except ImportError:
        pass
    try:
        import horovod
        import horovod.tensorflow as hvd

        out.update(horovod=horovod.__version__, horovod_controllers=[c for c, built in (
            ("gloo", hvd.gloo_built()), ("mpi", hvd.mpi_built()), ("nccl", hvd.nccl_built()))
            if built])
    except ImportError:
        pass
    return out


def collect(with_frameworks=True, cores_visible=None) -> dict:
    """The whole fingerprint of this node (``cores_visible``: the node's, when this process has pinned itself
    to fewer)."""
    return {"host": platform.node(), "cpu": cpu(cores_visible), "gpu": gpu(), "network": network(),
            "software": software(with_frameworks)}


def _get(fp, dotted):
    v = fp
    for k in dotted.split("."):
        v = (v or {}).get(k) if isinstance(v, dict) else None
    return tuple(v) if isinstance(v, list) else v


def hardware_key(fp) -> dict:
    return {f: _get(fp, f) for f in HARDWARE_FIELDS}


def software_key(fp) -> dict:
    return {f: _get(fp, f) for f in SOFTWARE_FIELDS}


def differences(a, b, fields=HARDWARE_FIELDS + SOFTWARE_FIELDS) -> list:
    """[(field, a's value, b's value)] where two fingerprints differ on the fields that decide comparability."""
    return [(f, _get(a, f), _get(b, f)) for f in fields if _get(a, f) != _get(b, f)]


def summary(fp) -> str:
    """One line naming the machine: CPU model, visible cores, ISA features, GPUs."""
    c, g = fp.get("cpu") or {}, fp.get("gpu") or {}
    isa = ",".join(i for i in (c.get("isa") or []) if i.startswith(("avx512", "amx")) or i == "avx2") or "no AVX2"
    gpus = f"; {g['count']} x {g['model']}" if g.get("count") else "; no GPU"
    mhz = f" @ {c['mhz'] / 1000:.1f} GHz" if c.get("mhz") else ""
    return f"{c.get('model') or 'unknown CPU'}{mhz}, {c.get('cores_visible')} cores visible ({isa}){gpus}"


# Dense (not sparse) peak TFLOP/s from NVIDIA's datasheets, by precision: the FP32 CUDA-core rate, and the
# tensor-core rate TensorFlow uses for fp32 matmuls/convolutions on Ampere and newer (TF32, on by default),
# bf16 and fp16. The first pattern found in the device name wins, so longer names come first.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),        # SXM5 (also taken for NVL)
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05}),
    ("L40", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.05, "fp16": 181.05}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),          # A10; AWS's A10G assumed alike
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    ("V100S", {"fp32": 16.4, "fp16": 130.0}),
    ("V100", {"fp32": 15.7, "fp16": 125.0}),                                      # SXM2
    ("T4", {"fp32": 8.1, "fp16": 65.0}),
)


def gpu_datasheet_peak(device_name, precision, tf32=True):
    """(peak FLOP/s, basis) for a GPU name as TensorFlow or nvidia-smi prints it ("NVIDIA A100-SXM4-40GB",
    "Tesla V100-SXM2-16GB"), at the rate ``precision`` (fp32, bf16, fp16) runs at; (None, why) if unknown.
    A pattern matches as a whole model name ("A10" matches "A10G" but not "A100" or "RTX A1000")."""
    name = (device_name or "").upper()
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(pattern.upper())}(?![0-9])", name):
            if pattern == "V100" and "PCIE" in name:  # the PCIe V100 runs at a lower clock
                pattern, peaks = "V100 PCIe", {"fp32": 14.0, "fp16": 112.0}
            key = "tf32" if precision == "fp32" and tf32 and "tf32" in peaks else precision
            if key not in peaks:
                return None, f"{pattern} has no {precision} tensor cores in its datasheet"
            return peaks[key] * 1e12, f"{pattern} datasheet {key} dense peak {peaks[key]:g} TFLOP/s"
    return None, f"no datasheet peak known for {device_name!r}"

if __name__ == "__main__":
    print(json.dumps(collect(with_frameworks="--no-frameworks" not in sys.argv)))
