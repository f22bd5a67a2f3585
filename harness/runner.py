"""One run: plan -> provision -> deploy -> sweep (points x repetitions) -> teardown.

Teardown runs in ``finally`` and on SIGINT/SIGTERM; every finished point is in samples.parquet at once,
so ``--resume`` finishes an interrupted sweep without redoing measured points. A failed point is recorded
with its log and the sweep goes on.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import signal
import socket
import sys

from harness import machines
from harness import plan as hplan
from providers.errors import CloudbenchError, Interrupted, PointFailed
from harness.results import RunStore, new_run_id
from providers import base

log = logging.getLogger("cloudbench")


def _raise_interrupt(signum, frame):
    # From here on the run only tears down: a second signal, wherever it lands (even before the ``finally``
    # that runs the teardown has begun), is reported and never raises, so it cannot cut the teardown short.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _during_teardown)
    raise Interrupted(signal.Signals(signum).name)


def trainer_args(plan: hplan.RunPlan, data=None):
    """``data``: the trainer's data arguments when they are not the plan's (files staged onto the nodes)."""
    return ("--variant", plan.variant, "--batch-size", str(plan.batch_size), "--steps", str(plan.steps),
            "--warmup", str(plan.warmup), *(data or ("--data", plan.data)), "--precision", plan.precision)


def dry_run_jobs(plan: hplan.RunPlan, offer) -> list:
    """The first repetition of each point as the Jobs a provider would be given (``--dry-run`` manifests)."""
    return [base.Job(run_id=f"dryrun-{plan.provider}", ranks=ranks, trainer_args=trainer_args(plan), metrics_path="",
                     log_path="", timeout_s=plan.point_timeout_s, cpus_per_rank=None if offer.gpus else 1)
            for ranks in plan.sweep]


def check_data(plan, provider):
    """--data s3://...: the provider can stage and the prefix holds data; before anything is provisioned."""
    if plan.data.startswith("s3://"):
        from providers import objstore

        if not hasattr(provider, "stage"):
            raise hplan.PlanError("data", plan.data, f"a local path: the {plan.provider} provider cannot stage "
                                                     "object storage onto its nodes")
        objstore.objects(plan.data, plan.s3_endpoint)


def stage_data(plan, store, provider, fleet):
    """--data s3://...: each node downloads its share; returns the trainer's data arguments (None otherwise)."""
    if not plan.data.startswith("s3://"):
        return None
    from providers import objstore

    assignments, mode = objstore.shards(plan.data, len(fleet.nodes), plan.s3_endpoint)
    path = provider.stage(fleet, assignments)
    store.write_json("data.json", {"source": plan.data, "path": path, "shard": mode,
                                   "files": [[name for name, _ in a] for a in assignments]})
    log.info("data from %s staged on %d node(s) at %s (%s shards)", plan.data, len(fleet.nodes), path, mode)
    return ("--data", path, "--data-shard", mode)


def parse_summary(metrics_path):
    """The trainer's last JSON line, which must be its summary. Raises PointFailed otherwise."""
    try:
        with open(metrics_path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        raise PointFailed("the trainer wrote no metrics file") from None
    if not lines:
        raise PointFailed("the trainer wrote no metrics")
    try:
        last = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise PointFailed(f"unreadable trainer output line: {lines[-1][:200]!r} ({e})") from None
    if last.get("event") != "summary" or "samples_per_s" not in last:
        raise PointFailed(f"the trainer stopped before its summary (last record: {lines[-1][:200]})")
    return last


def environment():
    """The harness's own machine and version (the nodes' fingerprints join it as the points run)."""
    import subprocess
    from importlib import metadata

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        version = metadata.version("cloudbench")
    except metadata.PackageNotFoundError:
        version = None
    return {"host": socket.gethostname(), "python": platform.python_version(), "executable": sys.executable,
            "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
            "harness_started_at": dt.datetime.now(dt.timezone.utc).isoformat(), "commit": commit,
            "cloudbench_version": version}


def choose_offering(plan: hplan.RunPlan, provider):
    """The offering the plan names (--instance-type), the provider's own choice for the plan's GPU count
    (providers that pick a shape, e.g. openstack), or the provider's first."""
    if plan.gpus and hasattr(provider, "shapes"):
        return provider.shapes(plan.gpus, plan.instance_type)[0][0]
    offers = provider.offerings()
    if not offers:
        raise CloudbenchError(f"provider {plan.provider} offers no instance type")
    if not plan.instance_type:
        return offers[0]
    for o in offers:
        if o.instance_type == plan.instance_type:
            return o
    raise hplan.PlanError("instance-type", plan.instance_type, "one of " + ", ".join(o.instance_type for o in offers))


def feasible(plan: hplan.RunPlan, provider, offer):
    """Refuse, before anything starts, a plan the provider cannot meet: more ranks than a single-machine
    provider has, or a --data path that does not exist where the trainer will read it."""
    caps = provider.capabilities
    if not caps.multi_node and max(plan.sweep) > offer.slots:
        raise hplan.PlanError("gpus", max(plan.sweep), f"at most {offer.slots}: the {plan.provider} provider runs on "
                                                        f"one machine, which has {offer.slots} slot(s)")
    if caps.local_files and plan.data not in ("synthetic",) and not plan.data.startswith("s3://") \
            and not os.path.exists(plan.data):
        raise hplan.PlanError("data", plan.data, "synthetic, s3://BUCKET/PREFIX, or an HDF5 file or directory "
                                                 "that exists on this machine")


def start(plan: hplan.RunPlan, root, provider):
    """Resolve the plan against the provider's offering and create the run directory."""
    offer = choose_offering(plan, provider)
    resolved = hplan.resolve(plan, offer)
    feasible(resolved, provider, offer)
    store = RunStore.create(root, new_run_id(plan.provider))
    store.write_json("run.json", {"run_id": store.run_id, "state": "created", "plan": resolved.to_dict(),
                                  "offering": offer.__dict__})
    store.write_json("environment.json", environment())
    return resolved, store


def execute(plan: hplan.RunPlan, store: RunStore, provider, progress=True):
    """Run (or resume) the sweep; returns the samples frame. Always tears down."""
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    fleet = None
    store.update_state(state="running", pid=os.getpid(), resumed=bool(store.done()) or None)
    try:
        _stage(store, "check")
        provider.check()
        engines = provider.capabilities.engines
        if plan.engine not in engines:
            raise hplan.PlanError("engine", plan.engine,
                                  f"one that the {plan.provider} provider supports: {', '.join(engines)}")
        check_data(plan, provider)
        spec = base.FleetSpec(run_id=store.run_id, provider=plan.provider, slots=max(plan.sweep),
                              variant=plan.variant, instance_type=plan.instance_type, engine=plan.engine,
                              options=plan.provider_options, workdir=str(store.dir))
        _stage(store, "provision")
        fleet = provider.provision(spec, on_record=lambda f: store.write_json("fleet.json", f.to_dict()))
        store.write_json("fleet.json", fleet.to_dict())
        _stage(store, "deploy")
        provider.deploy(fleet)
        data = stage_data(plan, store, provider, fleet)
        # CPU workers: each rank gets the same core share at every point (the 1-rank baseline included).
        cpus_per_rank = None
        if fleet.device == "cpu":
            cpus_per_rank = dict(fleet.extra).get("cpus_per_rank") or max(1, fleet.nodes[0].slots // max(plan.sweep))
        calib = {}
        if plan.calibrate:
            _stage(store, "calibrate")
            calib = calibrate(plan, store, provider, fleet, cpus_per_rank, progress)
        done = store.done()
        for gpus in plan.sweep:
            rep = 0
            while rep < plan.repetitions or (rep < plan.max_repetitions and wider_than_target(plan, store, gpus)):
                rep += 1
                if (gpus, rep) in done:
                    continue
                _stage(store, f"point {gpus}x{rep}")
                run_point(plan, store, provider, fleet, gpus, rep, cpus_per_rank, progress, calib.get(str(gpus)),
                          data)
        store.update_state(state="finished", finished_at=dt.datetime.now(dt.timezone.utc).isoformat())
        return store.samples()
    except KeyboardInterrupt:  # Interrupted (SIGINT/SIGTERM), or a KeyboardInterrupt raised before our handler
        store.update_state(state="interrupted")
        raise
    except BaseException:
        store.update_state(state="failed")
        raise
    finally:
        # A second Ctrl-C must not cut the teardown short (paid machines would stay up): it is only noted.
        for s in old:
            signal.signal(s, _during_teardown)
        try:
            _stage(store, "teardown")
            provider.teardown(store.run_id, fleet)
            _stage(store, "torn down")
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def wider_than_target(plan, store, gpus):
    """--ci-target: this point's 95 % throughput interval is still wider than the target (harness.stats)."""
    if not plan.ci_target:
        return False
    from harness import stats

    df = store.samples()
    ok = df[(df["gpus"] == gpus) & (df["status"] == "ok")]["samples_per_s"].tolist()
    width = stats.relative_half_width(ok)
    if width > plan.ci_target:
        log.info("point %d: 95 %% interval +-%.1f %% > target %.1f %%: one more repetition", gpus, 100 * width,
                 100 * plan.ci_target)
        return True
    return False


def _stage(store, name):
    """Where the run is, in run.json (``stage``): what `cloudbench down`, a status check or a test reads."""
    store.update_state(stage=name)


def _during_teardown(signum, frame):
    print(f"cloudbench: {signal.Signals(signum).name} ignored while the fleet is torn down (kill -9 would leave "
          "resources for `cloudbench gc`)", file=sys.stderr)


def calibrate(plan, store, provider, fleet, cpus_per_rank, progress=True):
    """For the scaling model, once per run and multi-rank point, on the fleet itself (gan.commbench): Horovod
    allreduce latency and bandwidth (single tensors and the model's gradient lists) and the trainer's step
    without communication with every rank busy. Kept in commbench.json; a failure only costs the
    prediction (the report then falls back to t(1) and the provider's raw link figures)."""
    found = store.read_json("commbench.json", {}) or {}
    for n in (p for p in plan.sweep if p > 1 and str(p) not in found):
        out = store.dir / "logs" / f"commbench-{n}.json"
        job = base.Job(run_id=store.run_id, ranks=n, module="gan.commbench",
                       trainer_args=("--variant", plan.variant, "--batch-size", str(plan.batch_size)),
                       metrics_path=str(out), log_path=str(out.with_suffix(".log")),
                       timeout_s=min(600.0, plan.point_timeout_s), cpus_per_rank=cpus_per_rank)
        if progress:
            print(f"calibrating the scaling model at {n} ranks (allreduce and busy step)", file=sys.stderr)
        try:
            res = provider.launch(fleet, job)
            if res.returncode != 0:
                raise PointFailed(f"exit code {res.returncode}")
            found[str(n)] = json.loads(out.read_text().splitlines()[-1])
            store.write_json("commbench.json", found)
        except (PointFailed, OSError, ValueError, IndexError) as e:
            log.warning("allreduce calibration at %d ranks failed (%s); predictions use the raw link (log: %s)",
                        n, e, job.log_path)
    return found


def run_point(plan, store, provider, fleet, gpus, rep, cpus_per_rank, progress, calib=None, data=None):
    log_path, metrics_path = store.log_paths(gpus, rep)
    if os.path.exists(metrics_path):  # a resumed point starts from a clean metrics file
        os.remove(metrics_path)
    job = base.Job(run_id=store.run_id, ranks=gpus, trainer_args=trainer_args(plan, data), metrics_path=metrics_path,
                   log_path=log_path, timeout_s=plan.point_timeout_s, cpus_per_rank=cpus_per_rank)
    nodes = len(fleet.placement(gpus))
    row = {"run_id": store.run_id, "provider": fleet.provider, "instance_type": fleet.instance_type,
           "gpu_model": fleet.nodes[0].gpu_model, "device": fleet.device, "nodes": nodes, "gpus": gpus,
           "repetition": rep, "steps": plan.steps, "warmup": plan.warmup, "batch_size_per_rank": plan.batch_size,
           "variant": plan.variant, "precision": plan.precision, "engine": fleet.engine,
           "price_per_hour": None if fleet.price_per_hour is None else fleet.price_per_hour * nodes,
           "currency": fleet.currency, "log_path": os.path.relpath(log_path, store.dir),
           "metrics_path": os.path.relpath(metrics_path, store.dir),
           "started_at": dt.datetime.now(dt.timezone.utc).isoformat(),
           "link_bandwidth_Bps": dict(fleet.extra).get("link_bandwidth_Bps"),
           "link_latency_s": dict(fleet.extra).get("link_latency_s"),
           "allreduce_bandwidth_Bps": (calib or {}).get("bandwidth_Bps"),
           "allreduce_latency_s": (calib or {}).get("latency_s"),
           "compute_step_s": (calib or {}).get("compute_step_s"),
           "compute_step_se_s": (calib or {}).get("compute_step_se_s")}
    bar = _bar(progress, f"{gpus} {'GPU' if fleet.device == 'gpu' else 'rank'}{'s' if gpus > 1 else ''} "
                         f"rep {rep}/{plan.repetitions}", plan.warmup + plan.steps)
    try:
        for attempt in range(1, plan.retries + 2):
            row["attempts"] = attempt
            try:
                measure(provider, fleet, job, row, bar, gpus, store)
                break
            except PointFailed as e:
                if not (e.retryable and attempt <= plan.retries):
                    raise
                log.warning("point %d GPU(s) repetition %d: %s; relaunching (retry %d of %d)", gpus, rep, e,
                            attempt, plan.retries)
                if os.path.exists(metrics_path):
                    os.remove(metrics_path)
                if bar:
                    bar.reset()
    except PointFailed as e:
        row.update(status="failed", error=str(e))
        log.warning("point %d GPU(s) repetition %d failed: %s (log: %s)", gpus, rep, e, log_path)
    finally:
        if bar:
            bar.close()
    store.add_sample(row)
    return row


def measure(provider, fleet, job, row, bar, gpus, store=None):
    """One launch of the point; fills the row from the trainer's summary or raises PointFailed."""
    res = provider.launch(fleet, job, on_progress=bar.update_to if bar else None)
    row["seconds"] = res.seconds
    if res.returncode != 0:
        raise PointFailed(f"trainer exited with code {res.returncode}", job.log_path)
    s = parse_summary(job.metrics_path)
    row.update(status="ok", samples_per_s=s["samples_per_s"], samples_per_s_per_rank=s["samples_per_s_per_rank"],
               step_time_mean_s=s["step_time_mean_s"], step_time_std_s=s["step_time_std_s"],
               hosts=",".join(s.get("hosts", [])), flops_per_sample=s.get("flops_per_sample"),
               tf_version=s.get("tf_version"), horovod_version=s.get("horovod_version"))
    steady(job.metrics_path, row, gpus)
    fps = s.get("fingerprints") or {}
    row.update(machines.ids(fps))
    if fps and store is not None:
        changed = machines.record(store, fps)
        if changed:
            log.warning("node(s) %s changed hardware or software since an earlier point of this run",
                        ", ".join(changed))
    if row.get("heterogeneous"):
        log.warning("the nodes of this point differ (%s): its figures mix machines", row["cpu_model"])
    sizes = s.get("allreduce_bytes_per_step") or []
    if len(sizes) == 4:
        row.update(grad_bytes_d=sizes[0], grad_bytes_g=sizes[2])
    if s.get("ranks") != gpus:
        raise PointFailed(f"the trainer ran {s.get('ranks')} ranks, expected {gpus}", job.log_path)


def step_times(metrics_path):
    """Rank 0's measured (not warm-up) step times, in order, from the trainer's JSON lines."""
    times = []
    with open(metrics_path) as f:
        for line in f:
            if '"event": "step"' in line:
                rec = json.loads(line)
                if not rec.get("warmup"):
                    times.append(float(rec["time_s"]))
    return times


def steady(metrics_path, row, ranks):
    """Time only the settled steps: leading steps still slower than the point's steady state (compilation,
    caches, clocks that the warm-up did not cover) are dropped and counted in ``steady_from``; a point that
    never settles keeps all steps and has ``settled`` False."""
    from harness import stats

    times = step_times(metrics_path)
    start, settled = stats.steady_state(times)
    row.update(steady_from=start, settled=settled)
    if start and settled:
        kept = times[start:]
        row["samples_per_s"] = ranks * row["batch_size_per_rank"] * len(kept) / sum(kept)
        row["samples_per_s_per_rank"] = row["samples_per_s"] / ranks
        row["step_time_mean_s"] = sum(kept) / len(kept)
    if not settled:
        log.warning("point %d rank(s): the step time never settled (%d steps); its figure is over all steps",
                    ranks, len(times))


def _bar(enabled, desc, total):
    if not enabled:
        return None
    from tqdm import tqdm

    class Bar(tqdm):
        def update_to(self, n):
            self.update(max(0, min(n, self.total) - self.n))

    return Bar(total=total, desc=desc, unit="step", file=sys.stderr, leave=True, dynamic_ncols=True, disable=None)

