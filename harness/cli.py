"""The ``cloudbench`` command line.

Implemented so far: ``cloudbench env`` (what this machine offers the trainer). The workload itself runs
as ``python -m gan.train`` (see README.md); ``run``, ``report`` and ``regress`` arrive with the harness.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def environment() -> dict:
    """Versions and resources the trainer will see on this machine."""
    info = {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine()}
    try:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        info["gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
    except ImportError:
        info["tensorflow"] = None
        info["gpus"] = []
    try:
        import horovod
        import horovod.tensorflow as hvd

        info["horovod"] = horovod.__version__
        info["horovod_gloo"] = bool(hvd.gloo_built())
        info["horovod_mpi"] = bool(hvd.mpi_built())
    except ImportError:
        info["horovod"] = None
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cloudbench", description="Benchmark distributed 3DGAN training across clouds.")
    sub = ap.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="show the TensorFlow/Horovod/CPU/GPU environment")
    env.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.command == "env":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        info = environment()
        if args.json:
            print(json.dumps(info))
        else:
            for k, v in info.items():
                print(f"{k:14s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
