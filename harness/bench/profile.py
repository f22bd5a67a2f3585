"""Where one training step's time goes, by oneDNN primitive class: a reproducible profile of ``gan.train``.

    python -m harness.bench.profile                                  # the fixed-angle model, batch 8, fp32
    python -m harness.bench.profile --precision bf16 --batch-size 8 --steps 4 --json-out prof.json

One process (``--no-horovod``, both cores' threads) runs the trainer with ``ONEDNN_VERBOSE=profile_exec``: oneDNN
then prints every primitive it executes with its wall time. Lines are attributed to the step whose JSON record
follows them; warm-up steps are left out. Per measured step the table gives milliseconds and the share of the
step's own wall time (from the trainer's record) for each class:

- convolution forward / backward data / backward weights (3D convolutions and their gradients, oneDNN's
  implementation named: ``brg`` = brgemm, ``jit`` = JIT kernels, ``amx`` where the tile unit is used);
- reorder (layout conversions between TensorFlow's plain layouts and oneDNN's blocked ones, and casts);
- batch normalization, eltwise (activations), matmul/inner product, pooling, binary, others oneDNN runs;
- the rest of the step: TensorFlow's own (Eigen) kernels, the input pipeline, Python and the runtime.

Verbose mode slows the step by the printing it does; the shares are what counts. Repeat with ``--precision bf16``
to see which classes bf16 makes faster or slower, and where the reorders (casts) go.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from harness.bench import machine_line

ROOT = Path(__file__).resolve().parents[2]
PROP = {"forward_training": "forward", "forward_inference": "forward", "forward": "forward",
        "backward_data": "backward data", "backward_weights": "backward weights", "backward": "backward"}


def classify(fields):
    """(class, implementation) of one ``onednn_verbose ... exec`` line's fields; None for other lines."""
    if "exec" not in fields:
        return None
    i = fields.index("exec")
    try:
        kind, impl, prop = fields[i + 2], fields[i + 3], fields[i + 4]
    except IndexError:
        return None
    if kind in ("convolution", "deconvolution", "batch_normalization", "inner_product", "matmul"):
        return f"{kind} {PROP.get(prop, prop)}", impl
    return kind, impl


def conv_flops(shape):
    """FLOPs of one convolution from oneDNN's problem descriptor (mb8_ic32oc8_id25od25kd5..._iw25ow25kw5...)."""
    dims = dict(re.findall(r"([a-z]+)(\d+)", shape.replace("_", " ")))
    get = lambda k: int(dims.get(k, 1))  # noqa: E731
    return 2 * get("mb") * get("ic") * get("oc") * get("od") * get("oh") * get("ow") * get("kd") * get("kh") * get("kw")


def parse(lines, warmup, shapes=None):
    """Per measured step: {class: ms}, the step's wall time, and implementations seen per class. ``shapes``
    (a dict) receives [ms, calls] per (convolution class, implementation, problem shape) over the measured steps."""
    steps, current, impls = [], collections.Counter(), collections.defaultdict(collections.Counter)
    pending = {}
    for line in lines:
        if line.startswith("onednn_verbose") or line.startswith("dnnl_verbose"):
            fields = line.strip().split(",")
            got = classify(fields)
            if got:
                try:
                    ms = float(fields[-1])
                except ValueError:
                    continue
                current[got[0]] += ms
                impls[got[0]][got[1]] += ms
                if got[0].startswith("convolution"):
                    acc = pending.setdefault((got[0], got[1], fields[-2]), [0.0, 0])
                    acc[0] += ms
                    acc[1] += 1
        elif line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "step":
                if not rec.get("warmup") and rec["step"] > warmup:
                    steps.append((dict(current), float(rec["time_s"]) * 1000.0))
                    for k, (ms, calls) in (pending.items() if shapes is not None else ()):
                        acc = shapes.setdefault(k, [0.0, 0])
                        acc[0] += ms
                        acc[1] += calls
                current, pending = collections.Counter(), {}
    return steps, impls


def profile(variant, batch, steps, warmup, precision, data, threads, bn="keras2", layers="fast"):
    env = {**os.environ, "ONEDNN_VERBOSE": "profile_exec", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "gan.train", "--no-horovod", "--variant", variant, "--batch-size", str(batch),
           "--steps", str(steps), "--warmup", str(warmup), "--precision", precision, "--data", data, "--bn", bn,
           "--layers", layers]
    if threads:
        cmd += ["--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"gan.train failed (exit {p.returncode}): {p.stderr[-1500:]}")
    shapes = {}
    measured, impls = parse(p.stdout.splitlines(), warmup, shapes)
    if not measured:
        raise SystemExit("no measured step in the trainer's output (is oneDNN in use? TF_ENABLE_ONEDNN_OPTS=0?)")
    n = len(measured)
    step_ms = sum(t for _, t in measured) / n
    per = collections.Counter()
    for parts, _ in measured:
        per.update(parts)
    rows = {k: v / n for k, v in per.items()}
    convs = [{"class": k[0], "implementation": k[1], "shape": k[2], "ms": ms / n, "calls": calls / n,
              "gflops": conv_flops(k[2]) * calls / (ms / 1000.0) / 1e9 if ms > 0 else None}
             for k, (ms, calls) in sorted(shapes.items(), key=lambda kv: -kv[1][0])]
    return {"variant": variant, "batch": batch, "precision": precision, "bn": bn, "layers": layers, "data": data,
            "steps": n, "convolutions": convs,
            "step_ms": step_ms, "classes_ms": rows, "onednn_ms": sum(rows.values()),
            "implementations": {k: dict(c.most_common(3)) for k, c in impls.items()}}


def table(r, top=12) -> str:
    out = [f"{r['variant']} batch {r['batch']} {r['precision']} bn {r['bn']} layers {r.get('layers')} ({r['data']}): "
           f"step {r['step_ms']:.0f} ms (with verbose printing), {r['steps']} steps",
           f"{'class':<34}{'ms/step':>10}{'share':>8}  implementation (most time)"]
    for k, v in sorted(r["classes_ms"].items(), key=lambda kv: -kv[1]):
        impl = next(iter(r["implementations"].get(k, {})), "")
        out.append(f"{k:<34}{v:>10.1f}{100 * v / r['step_ms']:>7.1f}%  {impl}")
    rest = r["step_ms"] - r["onednn_ms"]
    out.append(f"{'not oneDNN (TF kernels, runtime)':<34}{rest:>10.1f}{100 * rest / r['step_ms']:>7.1f}%")
    if r.get("convolutions"):
        out.append(f"\nconvolutions by layer shape (oneDNN problem: mb batch, ic/oc channels in/out, o* output "
                   f"size, k* kernel), the {min(top, len(r['convolutions']))} costliest:")
        out.append(f"{'ms/step':>8} {'calls':>5} {'GFLOP/s':>8}  {'pass':<29} shape")
        for c in r["convolutions"][:top]:
            shape = re.sub(r"(sd|dd|pd|sh|dh|ph|sw|dw|pw)\d+", "", c["shape"])
            rate = f"{c['gflops']:8.1f}" if c["gflops"] is not None else f"{'-':>8}"
            out.append(f"{c['ms']:8.1f} {c['calls']:5.0f} {rate}  {c['class']:<29} {shape}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="fixed")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="fp32", help="comma list: fp32,bf16")
    ap.add_argument("--data", default="synthetic", help="synthetic, or HDF5 files as gan.train takes them")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--bn", default="keras2", help="comma list: keras2,fused (gan.train --bn)")
    ap.add_argument("--layers", default="fast", help="comma list: fast,keras (gan.train --layers)")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    results = []
    for precision in args.precision.split(","):
        for bn in args.bn.split(","):
            for layers in args.layers.split(","):
                r = profile(args.variant, args.batch_size, args.steps, args.warmup, precision, args.data,
                            args.threads, bn, layers)
                results.append(r)
                print(table(r) + "\n", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
