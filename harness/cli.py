"""The ``cloudbench`` command line: run, report, regress, baseline save, providers, down, gc, env.

Errors the user can act on print one line naming what was expected and exit non-zero (2 for invalid
input); ``--json`` prints one machine-readable object on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

from providers.errors import CloudbenchError

RUNS = Path("results") / "runs"
BASELINES = Path("results") / "baselines"


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


# ------------------------------------------------------------------------------------------ commands
def cmd_run(args):
    from harness import plan as hplan
    from harness import report, runner
    from harness.results import RunStore, is_live
    from providers import base

    root = Path(args.results)
    if args.resume:
        store = RunStore.open(args.resume if os.path.isdir(args.resume) else root / args.resume)
        doc = store.read_json("run.json")
        if is_live(store):
            raise CloudbenchError(f"run {store.run_id} is still running (harness pid {doc.get('pid')})")
        plan = hplan.RunPlan.from_dict(doc["plan"])
        provider = base.get(plan.provider, **dict(plan.provider_options))
    else:
        fields = hplan.load_yaml(args.plan) if args.plan else {}
        options = provider_options(args, fields.pop("provider_options", {}))
        plan = hplan.build(fields, provider=args.provider, gpus=args.gpus, sweep=args.sweep,
                           repetitions=args.repetitions, variant=args.variant, batch_size=args.batch_size,
                           steps=args.steps, warmup=args.warmup, data=args.data, engine=args.engine,
                           precision=args.precision, epoch_events=args.epoch_events,
                           instance_type=args.instance_type, provider_options=options or None,
                           upload=args.upload, s3_endpoint=args.s3_endpoint, retries=args.retries,
                           calibrate=False if args.no_calibrate else None, ci_target=args.ci_target,
                           max_repetitions=args.max_repetitions)
        provider = base.get(plan.provider, **options)
        if args.dry_run:
            return dry_run(plan, provider, args.json)
        plan, store = runner.start(plan, root, provider)
    print(f"cloudbench: run {store.run_id} -> {store.dir}", file=sys.stderr)
    try:
        df = runner.execute(plan, store, provider, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"cloudbench: interrupted; finished points are kept. Resume with: cloudbench run --resume {store.run_id}",
              file=sys.stderr)
        upload(plan, store)
        raise
    except BaseException:
        upload(plan, store)
        raise
    ok = df[df["status"] == "ok"]
    paths = {}
    if len(ok):
        agg, paths = report.write([store.dir])
    uploaded = upload(plan, store)
    state = store.read_json("run.json", {})
    hw = sorted({str(h) for h in ok["hardware_id"].dropna()}) if "hardware_id" in ok else []
    out = {"run_id": store.run_id, "results_dir": str(store.dir), "state": state.get("state"), "uploaded": uploaded,
           "hardware_id": hw[0] if len(hw) == 1 else ("mixed" if hw else None),
           "report": paths, "failed_points": int((df["status"] != "ok").sum()),
           "points": json.loads(df.to_json(orient="records"))}
    if args.json:
        print(json.dumps(out))
    elif len(ok):
        print(report.text_table(agg))
        print(f"\nreport: {paths['html']}  (also {paths['md']})")
    if not len(ok):
        raise CloudbenchError(f"every point failed; see the logs in {store.dir / 'logs'}")
    return 0


def upload(plan, store):
    """--upload s3://...: the results directory goes there (the run has ended, well or not); returns the
    destination. A failed upload is reported, never hides the run's own outcome, and the results stay here."""
    if not plan.upload:
        return None
    from providers import objstore

    try:
        dest, files, size = objstore.upload(store.dir, plan.upload, store.run_id, plan.s3_endpoint,
                                            state=store.read_json("run.json", {}).get("state"))
    except Exception as e:  # noqa: BLE001 (whatever it is, the run's own outcome must come through)
        print(f"cloudbench: upload failed, the results are only in {store.dir}: {e}", file=sys.stderr)
        return None
    store.update_state(uploaded_to=dest)
    print(f"cloudbench: uploaded {files} file(s), {size} bytes to {dest}", file=sys.stderr)
    return dest


def provider_options(args, options=None):
    """--option KEY=VALUE pairs plus the named provider flags (--inventory, --cloud, --provisioner)."""
    from harness import plan as hplan

    options = dict(options or {})
    for opt in args.option or []:
        if "=" not in opt:
            raise hplan.PlanError("option", opt, "KEY=VALUE")
        k, v = opt.split("=", 1)
        options[k] = v
    if args.inventory:
        options["inventory"] = os.path.abspath(args.inventory)
    for flag in ("cloud", "provisioner", "region", "context", "namespace"):
        if getattr(args, flag, None):
            options[flag] = getattr(args, flag)
    if getattr(args, "spot", False):
        options["spot"] = "true"
    return options


def dry_run(plan, provider, as_json):
    from harness import plan as hplan
    from harness.runner import choose_offering, dry_run_jobs, feasible

    offer = choose_offering(plan, provider)
    plan = hplan.resolve(plan, offer)
    feasible(plan, provider, offer)
    per_node = offer.slots
    nodes = -(-max(plan.sweep) // per_node)
    price = None if offer.price_per_hour is None else offer.price_per_hour * nodes
    launches = len(plan.sweep) * plan.repetitions
    worst = None if price is None else price * launches * plan.point_timeout_s / 3600
    out = {"provider": plan.provider, "instance_type": offer.instance_type, "nodes": nodes, "slots_per_node": per_node,
           "device": "gpu" if offer.gpus else "cpu", "gpu_model": offer.gpu_model, "sweep": list(plan.sweep),
           "repetitions": plan.repetitions, "launches": launches, "price_per_hour": price,
           "cost_upper_bound": worst, "plan": plan.to_dict()}
    manifests = provider.dry_run_manifests(dry_run_jobs(plan, offer), offer) if hasattr(provider, "dry_run_manifests") else None
    if manifests:
        out["manifests"] = manifests
    if as_json:
        print(json.dumps(out))
    else:
        print(f"fleet      {nodes} x {offer.instance_type} ({per_node} slots each, "
              f"{out['device']}{', ' + offer.gpu_model if offer.gpu_model else ''})")
        print(f"points     GPUs {', '.join(map(str, plan.sweep))} x {plan.repetitions} repetitions = {launches} launches")
        print(f"trainer    {plan.variant}, batch {plan.batch_size}/rank, {plan.warmup} warm-up + {plan.steps} steps")
        print("cost       " + ("unknown (no price for this provider)" if price is None else
                              f"{price:.2f}/h for the fleet; at most {worst:.2f} if every launch ran to its timeout"))
        if manifests:
            print("\n# what would be submitted (first repetition of each point)\n" + manifests)
        print("dry run: nothing was provisioned")
    return 0


def cmd_report(args):
    from harness import report

    agg, paths = report.write(args.runs, args.out)
    if args.json:
        print(json.dumps({"report": paths, "points": report.rows_json(agg)}))
    else:
        print(report.text_table(agg))
        print(f"\nreport: {paths['html']}  (also {paths['md']})")
    return 0


def cmd_regress(args):
    from harness import regress

    if not 0 <= args.tolerance < 1:
        from providers.errors import PlanError

        raise PlanError("tolerance", args.tolerance, "a fraction in [0, 1), e.g. 0.05")
    diffs = regress.comparability(args.baseline, args.current)
    if diffs and not args.compare_anyway:
        if args.json:
            print(json.dumps({"exit_code": regress.NOT_COMPARABLE, "comparable": False, "differences": [
                {"field": f, "baseline": a, "current": b, "why": w} for f, a, b, w in diffs], "checks": []},
                default=str))
        print("cloudbench: not comparable: the baseline and the current run ran on different machines: "
              + regress.describe(diffs) + " (keep one baseline per machine class, or pass --compare-anyway)",
              file=sys.stderr)
        return regress.NOT_COMPARABLE
    if diffs:
        print("cloudbench: comparing anyway across different machines: " + regress.describe(diffs), file=sys.stderr)
    checks = regress.compare(args.baseline, args.current, args.tolerance, args.alpha)
    code = regress.exit_code(checks)
    if args.junit:
        regress.junit(checks, args.junit)
    if args.json:
        print(json.dumps({"exit_code": code, "regressions": sum(c.regressed for c in checks),
                          "checks": regress.to_json(checks)}))
    else:
        print(regress.markdown(checks, args.tolerance, args.alpha))
        if code == 2:
            print("no point of the current run matches the baseline "
                  "(same provider, instance type, device, GPUs, variant, batch)", file=sys.stderr)
    return code


def cmd_history(args):
    from harness import history

    df = history.table(args.runs)
    points = history.analyse(df, pvalue=args.pvalue, min_change=args.min_change)
    code = history.exit_code(points)
    if args.html:
        from harness.results import write_atomic

        write_atomic(args.html, history.html_report(df, points).encode())
    if args.json:
        print(json.dumps({"exit_code": code, "runs": int(df["run_id"].nunique()), "change_points": history.to_json(points)}))
    else:
        print(history.text(df, points))
        if args.html:
            print(f"report: {args.html}")
    return code


def cmd_baseline(args):
    from harness.results import copy_run

    dst = copy_run(args.run_dir, Path(args.root) / args.name, overwrite=args.force)
    print(dst)
    return 0


def cmd_providers(args):
    from dataclasses import asdict

    from providers import base

    rows = []
    for name, ep in sorted(base.available().items()):
        try:
            cls = ep.load()
            rows.append({"name": name, "description": cls.description, **asdict(cls.capabilities)})
        except Exception as e:  # a broken third-party plugin must not hide the others
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"})
    if args.json:
        print(json.dumps({"providers": rows}))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['name']:12s} (fails to load: {r['error']})")
                continue
            caps = [c for c in ("gpus", "multi_node", "spot", "prices") if r[c]]
            print(f"{r['name']:12s} {r['description']}\n{'':12s} capabilities: {', '.join(caps) or 'none'}; "
                  f"engines: {', '.join(r['engines'])}{'; ' + r['notes'] if r['notes'] else ''}")
    return 0


def cmd_down(args):
    from harness.results import RunStore
    from providers import base

    store = RunStore.open(args.run if os.path.isdir(args.run) else Path(args.results) / args.run)
    fleet_doc = store.read_json("fleet.json")
    plan = store.read_json("run.json", {}).get("plan", {})
    name = (fleet_doc or {}).get("provider") or plan.get("provider")
    provider = base.get(name, **(plan.get("provider_options") or {}))
    fleet = base.Fleet.from_dict(fleet_doc) if fleet_doc else None
    gone = provider.teardown(store.run_id, fleet)
    if store.read_json("run.json", {}).get("state") == "running":
        store.update_state(state="interrupted")
    out = {"run_id": store.run_id, "removed": [r.__dict__ for r in gone]}
    print(json.dumps(out) if args.json else f"run {store.run_id}: removed {len(gone)} resource(s)")
    return 0


def cmd_gc(args):
    from harness.results import RunStore, is_live
    from providers import base

    provider = base.get(args.provider, **provider_options(args))
    root = Path(args.results)
    live = {d.name for d in root.iterdir() if d.is_dir() and (d / "run.json").exists()
            and is_live(RunStore(d))} if root.is_dir() else set()
    orphans = [r for r in provider.list_tagged() if r.run_id not in live and not r.owner_alive]
    removed = []
    if not args.dry_run:
        for run_id in sorted({r.run_id for r in orphans}):
            removed += provider.teardown(run_id)
    out = {"provider": args.provider, "dry_run": args.dry_run, "resources": [r.__dict__ for r in orphans]}
    if args.json:
        print(json.dumps(out))
    else:
        verb = "would remove" if args.dry_run else "removed"
        for r in orphans:
            print(f"{verb} {r.kind} {r.id} (run {r.run_id}) {r.detail}")
        print(f"{len(orphans)} orphaned resource(s); {verb} {len(orphans) if args.dry_run else len(removed)}")
    return 0


def cmd_lab(args):
    from harness.lab import hosts as lab

    if args.action == "up":
        out = lab.up(hosts=args.hosts, bandwidth=args.bandwidth, name=args.name, slots=args.slots,
                     emulate=tuple(args.emulate or ()), openstack=args.openstack)
    elif args.action == "down":
        out = lab.down(args.name)
    elif args.action == "env":
        out = lab.env(args.name)
        if args.json:
            print(json.dumps(out))
        else:
            import shlex

            print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in out.items()), end="")
        return 0
    else:
        out = lab.status(args.name)
    if args.json:
        print(json.dumps(out))
    elif args.action == "down":
        print(f"lab {out['name']}: removed {out['removed_hosts']} host(s)")
    elif not out["up"]:
        print(f"lab {out['name']} is down")
    else:
        for h in out["hosts"]:
            cpus = ",".join(map(str, h.get("cpus") or [])) or "?"
            print(f"{h['name']:10s} {h['address']}:{h['port']}  netns {h['netns']}  slots {h['slots']}  cpus {cpus}  "
                  f"rate {h['rate']}  sshd {'up' if h['sshd'] else 'DOWN'}")
        print(f"inventory  {out['inventory']}")
        for name, emu in (out.get("emulators") or {}).items():
            print(f"{name:10s} {emu.get('url')}  {'up' if emu.get('alive') else 'DOWN'}"
                  + (f"  clouds.yaml {emu['clouds_yaml']} (cloud cloudbench-lab)" if emu.get("clouds_yaml") else "")
                  + (f"  profile {emu['profile']} ({emu['aws_config']})" if emu.get("aws_config") else "")
                  + (f"  kubeconfig {emu['kubeconfig']}" if emu.get("kubeconfig") else ""))
        if out.get("emulators"):
            print(f'variables  eval "$(cloudbench lab env --name {out["name"]})"')
    return 0


def cmd_env(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from gan import sysinfo
    from harness import machines

    fp = sysinfo.collect(with_frameworks=not args.hardware_id)
    hw = machines.ids({"here": fp})["hardware_id"]
    if args.hardware_id:  # a machine-class name for per-machine baselines (nightly CI)
        print(hw)
        return 0
    info = {**environment(), "machine": sysinfo.summary(fp), "hardware_id": hw}
    if args.json:
        info["fingerprint"] = fp
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:14s} {v}")
    return 0


# -------------------------------------------------------------------------------------------- parser
def parser():
    ap = argparse.ArgumentParser(prog="cloudbench", description="Benchmark distributed 3DGAN training across clouds.")
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="provision, sweep GPU counts, collect, tear down, report")
    r.add_argument("--provider", help="provider name (default local); see `cloudbench providers`")
    r.add_argument("--plan", help="YAML plan file; flags override its fields")
    r.add_argument("--gpus", help="largest point (default: every slot of one instance/this machine)")
    r.add_argument("--sweep", help="GPU counts, e.g. 1,2,4 (default powers of two up to --gpus, plus --gpus)")
    r.add_argument("--repetitions", help="launches per point (default 3)")
    r.add_argument("--retries", help="relaunches of a point whose failure the provider repaired, e.g. a reclaimed "
                                     "spot instance it replaced (default 0: the point is recorded as failed)")
    r.add_argument("--ci-target", metavar="FRACTION", help="add repetitions to a point until its 95 %% interval's "
                                                            "half-width is below this fraction of its median, e.g. 0.03")
    r.add_argument("--max-repetitions", help="the most repetitions --ci-target may reach (default 10)")
    r.add_argument("--no-calibrate", action="store_true", help="skip the scaling model's allreduce calibration "
                                                                "(predictions fall back to the provider's raw link)")
    r.add_argument("--variant", help="fixed (default), angle, or small (tests only)")
    r.add_argument("--batch-size", help="per rank (default: recipe on GPUs, 8 on CPU workers)")
    r.add_argument("--steps", help="measured steps per launch (default 20)")
    r.add_argument("--warmup", help="warm-up steps per launch, not timed (default 5)")
    r.add_argument("--data", help="synthetic (default), an HDF5 path on the nodes, or s3://BUCKET/PREFIX (each node "
                                  "downloads its share of the .h5 objects)")
    r.add_argument("--upload", metavar="S3_URL", help="s3://BUCKET/PREFIX: put the results directory there at the end")
    r.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint for --data/--upload (default: boto3's, e.g. "
                                                         "AWS_ENDPOINT_URL); Exoscale SOS: https://sos-ZONE.exo.io")
    r.add_argument("--engine", help="gloo (default) or mpi")
    r.add_argument("--precision", help="fp32 (default), bf16, fp16 (GPUs)")
    r.add_argument("--epoch-events", help="training events per epoch for time/cost per epoch")
    r.add_argument("--instance-type", help="pick this offering of the provider")
    r.add_argument("--option", action="append", metavar="KEY=VALUE", help="provider option (repeatable)")
    r.add_argument("--inventory", help="ssh provider: the hosts' inventory YAML (e.g. `cloudbench lab status`)")
    r.add_argument("--cloud", help="openstack provider: the clouds.yaml entry (default $OS_CLOUD, else OS_*)")
    r.add_argument("--provisioner", help="openstack provider: sdk (default, libcloud) or terraform")
    r.add_argument("--region", help="aws: the region; exoscale: the zone (default: the profile's/environment's)")
    r.add_argument("--spot", action="store_true", help="aws: spot instances")
    r.add_argument("--context", help="kubernetes: the kubeconfig context (default: the current one)")
    r.add_argument("--namespace", help="kubernetes: the namespace (default: the context's, else default)")
    r.add_argument("--results", default=str(RUNS), help="runs directory (default results/runs)")
    r.add_argument("--resume", metavar="RUN_ID", help="finish an interrupted run")
    r.add_argument("--dry-run", action="store_true", help="print fleet, points and cost; buy nothing")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_run)

    rp = sub.add_parser("report", help="tables and plots over one or more runs")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="directory for report.md/html/csv (default: the first run's)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(fn=cmd_report)

    rg = sub.add_parser("regress", help="exit 1 on a significant scaling regression against a baseline")
    rg.add_argument("--baseline", nargs="+", required=True, metavar="DIR")
    rg.add_argument("--current", nargs="+", required=True, metavar="DIR")
    rg.add_argument("--tolerance", type=float, default=0.05, help="allowed relative drop (default 0.05)")
    rg.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    rg.add_argument("--junit", help="write JUnit XML here")
    rg.add_argument("--compare-anyway", action="store_true",
                    help="compare even when the two sides ran on different hardware or software (exit 3 otherwise)")
    rg.add_argument("--json", action="store_true")
    rg.set_defaults(fn=cmd_regress)

    h = sub.add_parser("history", help="change points over runs in time order (E-Divisive); exit 1 on a drop")
    h.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_FOLDER")
    h.add_argument("--pvalue", type=float, default=0.01, help="permutation test level (default 0.01)")
    h.add_argument("--min-change", type=float, default=0.05,
                   help="smallest relative change reported (default 0.05)")
    h.add_argument("--html", help="write the series, change points and each run's version here")
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_history)

    b = sub.add_parser("baseline", help="manage baselines")
    bsub = b.add_subparsers(dest="action", required=True)
    bs = bsub.add_parser("save", help="copy a run to results/baselines/NAME")
    bs.add_argument("run_dir")
    bs.add_argument("name")
    bs.add_argument("--root", default=str(BASELINES))
    bs.add_argument("--force", action="store_true", help="replace an existing baseline")
    bs.set_defaults(fn=cmd_baseline)

    p = sub.add_parser("providers", help="list providers and their capabilities")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_providers)

    d = sub.add_parser("down", help="tear down one run's fleet from its saved record")
    d.add_argument("run", metavar="RUN_ID")
    d.add_argument("--results", default=str(RUNS))
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_down)

    g = sub.add_parser("gc", help="find (and remove) tagged resources of no live run")
    g.add_argument("--provider", required=True)
    g.add_argument("--results", default=str(RUNS))
    g.add_argument("--dry-run", action="store_true")
    g.add_argument("--inventory", help="ssh provider: the inventory whose hosts to scan")
    g.add_argument("--cloud", help="openstack provider: the clouds.yaml entry whose project to scan")
    g.add_argument("--region", help="aws: the region to scan; exoscale: the zone")
    g.add_argument("--context", help="kubernetes: the kubeconfig context")
    g.add_argument("--namespace", help="kubernetes: the namespace to scan")
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="provider option (repeatable)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_gc)

    lab = sub.add_parser("lab", help="hosts on this machine: network namespaces with sshd (needs root)")
    lsub = lab.add_subparsers(dest="action", required=True)
    for action, text in (("up", "create the lab"), ("down", "remove the lab (safe to repeat)"),
                         ("status", "show hosts and the inventory path"),
                         ("env", "print the variables that point the providers at the lab's emulators (eval it)")):
        a = lsub.add_parser(action, help=text)
        a.add_argument("--name", default="lab", help="lab name, 1-6 lower-case letters/digits (default lab)")
        a.add_argument("--json", action="store_true")
        if action == "up":
            a.add_argument("--hosts", type=int, default=2)
            a.add_argument("--bandwidth", default=None, help="per-host egress limit, e.g. 100mbit (tc tbf)")
            a.add_argument("--slots", type=int, default=None, help="ranks per host (default: this machine's cores / hosts, at least 1)")
            a.add_argument("--emulate", action="append", choices=["openstack", "aws", "exoscale", "kubernetes"],
                           help="also start a cloud API emulator whose servers are the lab hosts (repeatable)")
            a.add_argument("--openstack", choices=["emulated", "real"], default=None,
                           help="an OpenStack whose servers are the lab hosts: the emulator (same as --emulate "
                                "openstack) or real Keystone, Nova, Neutron, Glance and Placement (docs/lab.md)")
        a.set_defaults(fn=cmd_lab)

    e = sub.add_parser("env", help="show this machine's fingerprint and TensorFlow/Horovod/CPU/GPU environment")
    e.add_argument("--json", action="store_true", help="everything, the whole fingerprint included")
    e.add_argument("--hardware-id", action="store_true",
                   help="print only the id of this machine's hardware class (for one baseline per class)")
    e.set_defaults(fn=cmd_env)
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="cloudbench: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except CloudbenchError as e:
        print(f"cloudbench: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # runner.Interrupted (SIGINT/SIGTERM) is one
        # Everything is torn down: a further signal must not turn exit 130 into death by signal while the
        # interpreter shuts down (it restores the default handlers there).
        import signal

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        print(f"cloudbench: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
