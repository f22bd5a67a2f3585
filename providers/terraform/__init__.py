"""The terraform provider: a Terraform module makes the hosts, the ssh provider runs on them.

    cloudbench run --provider terraform --option module=lab --inventory /run/cloudbench-lab/lab/inventory.yaml
    cloudbench run --provider terraform --option module=openstack --option var=cloud=mycloud,flavor=g1.a100 \\
        --option var.image=cloudbench-2024 ... --option key=~/.ssh/cb --option known_hosts=~/.ssh/cb_known

``module`` is a directory under the checkout's ``terraform/`` (``lab``, ``openstack``) or a path. Its
variables come from ``var`` (a dict, or ``k=v,k2=v2`` from the CLI; ``var.NAME=VALUE`` options also work
and may hold commas) plus what the harness sets: ``run_id`` and ``instance_count`` always, and, where the
module declares them and ``var`` does not, ``owner`` (this harness), ``public_key`` (of ``key``),
``slots_per_instance`` (``slots``) and ``ssh_user`` (``user``). The module must output ``hosts``: a JSON
string listing ``{name, address, slots, user}``.

Each run gets a Terraform working directory ``<results>/<run>/terraform``: a copy of the module, its
``terraform.tfvars.json``, its state and an ssh-provider inventory of what the module made, so that
``cloudbench down <run>`` (or ``terraform -chdir=<that dir> destroy``) can always remove it. Deploy and
launch are the ssh provider's, on that inventory; teardown stops the run's processes there and destroys.

Module ``lab`` leases hosts of an ssh inventory (such as ``cloudbench lab up``'s) with builtin resources
only: the lease files are the ssh provider's own, so ``cloudbench gc --provider ssh`` sees them too. Its
hosts, key, known_hosts, lease_dir and user come from ``--inventory``; other modules take ``key``,
``known_hosts``, ``user``, ``port``, ``python``, ``workdir``, ``slots``, ``gpu_model`` and
``instance_type`` options for the inventory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Optional

from providers.errors import PlanError, ProviderError
from providers.base import Capabilities, Fleet, FleetSpec, Offering, Resource
from providers.cloudvm import OverSSH
from providers.local import harness_owner
from providers.ssh import SSHProvider, _untagged_env, load_inventory

log = logging.getLogger("cloudbench")
ROOT = Path(__file__).resolve().parents[2]
MODULES = ROOT / "terraform"
HARNESS_VARS = ("run_id", "instance_count")  # always set by the harness, never by --option var
INSTALL = ("the terraform provider needs the `terraform` CLI (>= 1.9) on PATH: "
           "https://developer.hashicorp.com/terraform/install (Debian/Ubuntu: add apt.releases.hashicorp.com "
           "and `apt-get install terraform`), or set TERRAFORM=/path/to/terraform")
VARIABLE = re.compile(r'^\s*variable\s+"([^"]+)"', re.M)
TAIL = 30  # lines of terraform's error text kept in a ProviderError


def parse_vars(var) -> dict:
    """``var`` as a dict: a dict as is, or ``k=v,k2=v2``: a comma starts a new variable only before
    ``name=``, so values may hold commas; a value starting with [ or { is JSON."""
    if var is None or var == "":
        return {}
    if isinstance(var, dict):
        return dict(var)
    out = {}
    for item in re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_-]*=)", str(var)):
        if not item.strip():
            continue
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise PlanError("option var", var, "k=v,k2=v2 (or one --option var.NAME=VALUE per variable)")
        out[k.strip()] = _value(v)
    return out


def _value(v):
    v = v.strip()
    if v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            raise PlanError("option var", v, "valid JSON for a list or object value") from None
    return v


def module_variables(path) -> list:
    """Names of the variables a module declares (its top-level *.tf files)."""
    names = []
    for f in sorted(Path(path).glob("*.tf")):
        names += VARIABLE.findall(f.read_text())
    return sorted(set(names))


def tf_env():
    """terraform's environment: untagged, non-interactive, no checkpoint calls, a shared plugin cache."""
    env = _untagged_env()
    env.update(TF_IN_AUTOMATION="1", TF_INPUT="0", CHECKPOINT_DISABLE="1")
    cfg = env.get("TF_CLI_CONFIG_FILE")
    if cfg is not None and not os.path.isfile(os.path.expanduser(cfg)):
        env["TF_CLI_CONFIG_FILE"] = "/dev/null"  # a missing CLI config only makes every command warn
    if "TF_PLUGIN_CACHE_DIR" not in env:
        cache = Path(os.path.expanduser("~/.cache/cloudbench/terraform-plugins"))
        cache.mkdir(parents=True, exist_ok=True)
        env["TF_PLUGIN_CACHE_DIR"] = str(cache)  # one provider download for all runs, not one per run dir
    return env


def error_text(stderr, limit=TAIL):
    """The gist of terraform's errors: each ``Error:`` block without the source excerpt, unwrapped."""
    lines = stderr.replace("\r", "").splitlines()
    blocks, cur = [], None
    for line in lines:
        if line.startswith("Error: "):
            cur = [line]
            blocks.append(cur)
        elif cur is not None:
            cur.append(line)
    if not blocks:
        return "\n".join(x for x in lines if x.strip())[-3000:] or "(no error text)"
    out = []
    for b in blocks:
        keep = [x for x in b if not re.match(r"^\s*(with |on .* line \d+|\d+:|[│├╵╷])", x)]
        paras = " ".join(keep).split("  ")  # blank lines become double spaces: paragraph breaks
        out.append(" ".join(" ".join(p.split()) for p in paras if p.strip()))
    text = "\n".join(out)
    return "\n".join(text.splitlines()[-limit:])[-3000:]


class TerraformProvider(OverSSH):
    name = "terraform"
    description = "hosts made by a Terraform module (lab leases, OpenStack, ...), run over ssh; state in the run dir"
    capabilities = Capabilities(gpus=True, multi_node=True, spot=False, prices=False, engines=("gloo",),
                                notes="--option module=lab|openstack|<dir>, --option var=k=v,...; "
                                      "module lab: --inventory <lab inventory>")

    def __init__(self, module="lab", var=None, inventory=None, host_keys=None, **options):
        """``host_keys``: optional callable(hosts) run after apply and before any ssh, for modules whose
        hosts' keys are only known then (it must make the ``known_hosts`` file hold them)."""
        self.module = str(module or "lab")
        self.vars = parse_vars(var)
        for k in [k for k in options if k.startswith("var.")]:
            self.vars[k[4:]] = _value(str(options.pop(k))) if isinstance(options[k], str) else options.pop(k)
        self.inventory = inventory
        self.host_keys = host_keys
        self.options = options
        self.owner = harness_owner()
        self._ssh = {}  # inventory path -> SSHProvider (it keeps what deploy did, per run)
        self._tf_dirs = {}  # run_id -> tf dir, for a teardown after a provision that did not return
        self._lab_inv = None

    # -- module and inventory ---------------------------------------------------------------------
    @property
    def module_dir(self) -> Path:
        p = Path(os.path.expanduser(self.module))
        if not p.is_absolute() and "/" not in self.module and (MODULES / self.module).is_dir():
            return MODULES / self.module
        return p.resolve()

    @property
    def is_lab(self):
        return self.module_dir == MODULES / "lab"

    @property
    def lab_inv(self):
        if self._lab_inv is None:
            if not self.inventory:
                raise PlanError("inventory", self.inventory, "the hosts' inventory YAML for module lab: --inventory "
                                "/run/cloudbench-lab/<name>/inventory.yaml (see `cloudbench lab status`)")
            self._lab_inv = load_inventory(self.inventory)
        return self._lab_inv

    def _opt(self, key, default=None):
        v = self.options.get(key)
        return default if v is None or v == "" else v

    def _slots(self):
        v = self.vars.get("slots_per_instance", self._opt("slots", 1))
        try:
            n = int(v)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise PlanError("option slots", v, "a positive integer (ranks per instance)")
        return n

    def _ssh_for(self, inventory):
        inventory = str(inventory)
        if inventory not in self._ssh:
            p = SSHProvider(inventory=inventory)
            p.owner = self.owner
            self._ssh[inventory] = p
        return self._ssh[inventory]

    # -- what it offers ---------------------------------------------------------------------------
    def check(self):
        d = self.module_dir
        if not d.is_dir() or not list(d.glob("*.tf")):
            have = ", ".join(sorted(p.name for p in MODULES.iterdir() if p.is_dir())) if MODULES.is_dir() else "none"
            raise PlanError("option module", self.module, f"a Terraform module directory with *.tf files "
                            f"(one of {have} under {MODULES}, or a path)")
        if not self._terraform():
            raise ProviderError(INSTALL)
        if self.is_lab:
            self._ssh_for(self.lab_inv.path).check()
        else:
            key = self._opt("key")
            if key and not os.path.isfile(os.path.expanduser(str(key))):
                raise PlanError("option key", key, "an existing private key file")
        self._tfvars(FleetSpec(run_id="check", provider=self.name, slots=1, variant="small"), check_only=True)

    def _terraform(self):
        exe = os.environ.get("TERRAFORM") or shutil.which("terraform")
        return exe if exe and os.access(exe, os.X_OK) else None

    def offerings(self):
        if self.is_lab:
            h = self.lab_inv.hosts[0]
            return [Offering(instance_type=self.lab_inv.instance_type, gpu_model=h.gpu_model,
                             gpus=h.slots if h.gpu_model else 0, slots=h.slots)]
        slots = self._slots()
        gpu = self._opt("gpu_model")
        itype = self._opt("instance_type") or self.vars.get("flavor") or f"terraform-{self.module_dir.name}"
        return [Offering(instance_type=str(itype), gpu_model=gpu, gpus=slots if gpu else 0, slots=slots)]

    # -- variables --------------------------------------------------------------------------------
    def _lab_hosts(self, slots):
        chosen, total = [], 0
        for h in self.lab_inv.hosts:
            if total >= slots:
                break
            chosen.append(h)
            total += h.slots
        if total < slots:
            raise ProviderError(f"inventory {self.lab_inv.path} has {total} slots on {len(self.lab_inv.hosts)} "
                                f"host(s); the plan needs {slots}")
        return chosen

    def _tfvars(self, spec: FleetSpec, check_only=False):
        """The module's variables for this run; unknown names fail naming the module's variables."""
        declared = module_variables(self.module_dir)
        clash = [k for k in HARNESS_VARS if k in self.vars]
        if clash:
            raise PlanError(f"option var {clash[0]}", self.vars[clash[0]], "nothing: cloudbench sets run_id and "
                            "instance_count itself (from the run and --gpus)")
        if self.is_lab:
            inv = self.lab_inv
            hosts = self._lab_hosts(spec.slots) if not check_only else inv.hosts[:1]
            out = {"run_id": spec.run_id, "instance_count": len(hosts),
                   "hosts": [{"name": h.name, "address": h.address, "slots": h.slots, "port": h.port}
                             for h in inv.hosts],
                   "ssh_key": inv.key or "", "known_hosts": inv.known_hosts, "lease_dir": inv.lease_dir,
                   "owner": self.owner, "user": inv.hosts[0].user, "inventory": inv.path}
        else:
            out = {"run_id": spec.run_id, "instance_count": math.ceil(spec.slots / self._slots())}
            derived = {"owner": lambda: self.owner, "slots_per_instance": self._slots,
                       "ssh_user": lambda: self._opt("user"), "public_key": lambda: self._public_key(check_only)}
            for k, fn in derived.items():
                if k in declared and k not in self.vars:
                    v = fn()
                    if v is not None:
                        out[k] = v
        out.update(self.vars)
        unknown = sorted(set(out) - set(declared))
        if unknown:
            raise PlanError(f"variable {unknown[0]} for module {self.module_dir}", out[unknown[0]],
                            "one of its variables: " + ", ".join(declared))
        return {k: out[k] for k in declared if k in out}

    def _public_key(self, check_only=False):
        if self._opt("public_key"):
            return str(self._opt("public_key"))
        key = self._opt("key")
        if not key:
            return None
        key = os.path.expanduser(str(key))
        if os.path.isfile(key + ".pub"):
            return Path(key + ".pub").read_text().strip()
        if check_only:
            return "ssh-ed25519 (derived at provision)"
        p = subprocess.run(["ssh-keygen", "-y", "-f", key], capture_output=True, text=True)
        if p.returncode != 0:
            raise ProviderError(f"cannot derive the public key of {key}: {p.stderr.strip()}")
        return p.stdout.strip()

    # -- terraform --------------------------------------------------------------------------------
    def _tf(self, tf_dir, *args, check=True, timeout=None):
        """Run terraform in ``tf_dir``; its output is appended to terraform.log there. An interrupt of the
        harness stops terraform gracefully (one SIGINT, so it saves its state) before propagating."""
        exe = self._terraform()
        if not exe:
            raise ProviderError(INSTALL)
        logf = Path(tf_dir) / "terraform.log"
        with open(logf, "a") as lf:
            lf.write(f"$ terraform {' '.join(args)}\n")
            lf.flush()
            proc = subprocess.Popen([exe, f"-chdir={tf_dir}", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True, env=tf_env(), start_new_session=True)
            try:
                out, err = proc.communicate(timeout=timeout)
            except BaseException:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                raise
            lf.write(out + err)
        if check and proc.returncode != 0:
            raise ProviderError(f"terraform {args[0]} failed in {tf_dir}:\n{error_text(err)}")
        return proc.returncode, out, err

    @staticmethod
    def _state_addresses(tf_dir):
        try:
            doc = json.loads((Path(tf_dir) / "terraform.tfstate").read_text())
        except (OSError, json.JSONDecodeError):
            return []
        out = []
        for r in doc.get("resources", []):
            if r.get("mode") == "managed":
                for i in r.get("instances", []):
                    key = i.get("index_key")
                    out.append(f"{r['type']}.{r['name']}" + ("" if key is None else f"[{json.dumps(key)}]"))
        return out

    # -- provision ---------------------------------------------------------------------------------
    def provision(self, spec: FleetSpec, on_record):
        if not spec.workdir:
            raise ProviderError("the terraform provider keeps its state in the run's results directory, "
                                "but the fleet spec names none (FleetSpec.workdir)")
        tfvars = self._tfvars(spec)
        tf_dir = Path(spec.workdir).resolve() / "terraform"
        inv_path = tf_dir / "inventory.yaml"
        self._tf_dirs[spec.run_id] = tf_dir
        if not list(tf_dir.glob("*.tf")):  # a resumed run keeps the configuration its state was made with
            shutil.copytree(self.module_dir, tf_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
                ".terraform", "*.tfstate", "*.tfstate.*", "terraform.tfvars*", "*.auto.tfvars*", "inventory.yaml",
                "terraform.log"))
        (tf_dir / "terraform.tfvars.json").write_text(json.dumps(tfvars, indent=1) + "\n")
        extra = (("tf_dir", str(tf_dir)), ("inventory", str(inv_path)), ("module", str(self.module_dir)))
        itype = self.offerings()[0].instance_type
        fleet = Fleet(run_id=spec.run_id, provider=self.name, instance_type=itype, nodes=(), engine=spec.engine,
                      extra=extra)
        on_record(fleet)  # before terraform makes anything: `cloudbench down` finds the state from here
        self._tf(tf_dir, "init", "-input=false", "-no-color")
        code, _, err = self._tf(tf_dir, "apply", "-auto-approve", "-input=false", "-no-color", check=False)
        if code != 0:
            why = error_text(err)
            try:
                self._destroy(tf_dir)
            except ProviderError as e:
                why += f"\n(and destroying what it made failed too: {e}; retry with cloudbench down {spec.run_id})"
            raise ProviderError(f"terraform apply of module {self.module_dir.name} failed (state in {tf_dir}):\n{why}")
        _, out, _ = self._tf(tf_dir, "output", "-no-color", "-json", "hosts")
        try:
            hosts = json.loads(json.loads(out))
            assert isinstance(hosts, list) and hosts and all("address" in h for h in hosts)
        except (json.JSONDecodeError, TypeError, AssertionError):
            raise ProviderError(f"module {self.module_dir.name}: output `hosts` must be a JSON string listing "
                                f"{{name, address, slots, user}}; it is {out.strip()[:300]!r}") from None
        if callable(self.host_keys):
            self.host_keys(hosts)
        self._write_inventory(inv_path, hosts, itype)
        ssh = self._ssh_for(inv_path)
        chosen = list(ssh.inv.hosts)
        facts = ssh.each(chosen, ssh._probe_host)
        gpu_model = ssh.inv.hosts[0].gpu_model
        device = "gpu" if gpu_model or all(f["gpus"] for f in facts) else "cpu"
        extra = [*extra, *ssh.fleet_facts(chosen, facts, device)]
        fleet = dataclasses.replace(fleet, nodes=tuple(ssh._node(h, device, f) for h, f in zip(chosen, facts)),
                                    extra=tuple(extra))
        on_record(fleet)
        log.info("terraform made %d host(s): %s", len(chosen), ", ".join(h.name for h in chosen))
        return fleet

    def _write_inventory(self, path, hosts, itype):
        import yaml

        if self.is_lab:
            inv = self.lab_inv
            doc = {"key": inv.key, "known_hosts": inv.known_hosts, "python": inv.python, "workdir": inv.workdir,
                   "lease_dir": inv.lease_dir, "deploy": inv.deploy}
            by_name = {h.name: h for h in inv.hosts}
        else:
            doc = {k: self._opt(k) for k in ("key", "known_hosts", "python", "workdir", "port", "deploy")}
            by_name = {}
        doc = {k: v for k, v in doc.items() if v is not None}
        if "port" in doc:
            doc["port"] = int(doc["port"])
        doc["instance_type"] = itype
        if self._opt("gpu_model"):
            doc["gpu_model"] = self._opt("gpu_model")
        rows = []
        for h in hosts:
            row = {"name": str(h.get("name") or h["address"]), "address": str(h["address"]),
                   "slots": int(h.get("slots") or (1 if self.is_lab else self._slots()))}
            if h.get("internal_address") and h["internal_address"] != h["address"]:
                row["internal_address"] = str(h["internal_address"])  # how the hosts reach each other
            if h.get("user"):
                row["user"] = str(h["user"])
            elif self._opt("user"):
                row["user"] = str(self._opt("user"))
            known = by_name.get(row["name"])
            if known is not None:
                row["port"] = known.port
                if known.gpu_model:
                    row["gpu_model"] = known.gpu_model
                if known.labels:
                    row["labels"] = dict(known.labels)
            rows.append(row)
        doc["hosts"] = rows
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    # -- deploy and launch: the ssh provider's ------------------------------------------------------
    def _fleet_ssh(self, fleet: Fleet):
        inv = dict(fleet.extra).get("inventory")
        if not inv or not os.path.isfile(inv):
            raise ProviderError(f"run {fleet.run_id}: no inventory of its hosts ({inv}); was it provisioned?")
        return self._ssh_for(inv)

    # -- teardown and gc -----------------------------------------------------------------------------
    def teardown(self, run_id, fleet: Optional[Fleet] = None):
        """Stop the run's processes, destroy what its state holds, and (module lab) make sure no lease of
        the run is left. Safe to repeat: no state (or an empty one) is nothing to do."""
        extra = dict(fleet.extra) if fleet else {}
        tf_dir = extra.get("tf_dir") or self._tf_dirs.get(run_id)
        lab = Path(extra.get("module") or self.module_dir) == MODULES / "lab"
        labssh = self._ssh_for(self.lab_inv.path) if lab and self.inventory else None
        if tf_dir is None:
            # No state known here (cloudbench gc, or a run recorded by an older harness): for the lab, the
            # ssh provider's own teardown releases the run's leases; otherwise there is nothing to find.
            return labssh.teardown(run_id) if labssh else []
        gone = []
        inv = extra.get("inventory") or str(Path(tf_dir) / "inventory.yaml")
        if os.path.isfile(inv):
            ssh = self._ssh_for(inv)
            names = {n.name for n in fleet.nodes} if fleet and fleet.nodes else None
            hosts = [h for h in ssh.inv.hosts if names is None or h.name in names]
            gone += ssh._stop_run(hosts, run_id)
            scratch = shlex.quote(f"{ssh.inv.workdir}/{run_id}")

            def clean(h):
                try:
                    ssh.remote(h, f"rm -rf {scratch}", timeout=60, check=False)
                except ProviderError as e:
                    log.warning("%s", e)

            ssh.each(hosts, clean)
            ssh._deployed.pop(run_id, None)
        if Path(tf_dir).is_dir():
            gone += self._destroy(Path(tf_dir), run_id, "lease" if lab else "instance")
        if labssh:
            # What terraform could not release (a tainted lease, a crash before the state was saved).
            def release(h):
                try:
                    return h, labssh._release(h, run_id)
                except ProviderError as e:
                    log.warning("%s; its lease stays until `cloudbench gc --provider ssh --inventory %s`", e,
                                labssh.inv.path)
                    return h, False

            for h, released in labssh.each(list(labssh.inv.hosts), release):
                if released:
                    gone.append(Resource(kind="lease", id=h.name, run_id=run_id, detail=labssh._lease_path(h)))
        return gone

    def _destroy(self, tf_dir, run_id=None, kind="instance"):
        tf_dir = Path(tf_dir)
        if not len(self._state_addresses(tf_dir)):
            return []
        before, hosts = self._state_addresses(tf_dir), []
        code, out, _ = self._tf(tf_dir, "output", "-no-color", "-json", "hosts", check=False)
        if code == 0:
            try:
                hosts = json.loads(json.loads(out))
            except (json.JSONDecodeError, TypeError):
                hosts = []
        if not (tf_dir / ".terraform").is_dir():
            self._tf(tf_dir, "init", "-input=false", "-no-color")
        self._tf(tf_dir, "destroy", "-auto-approve", "-input=false", "-no-color")
        left = len(self._state_addresses(tf_dir))
        if left:
            raise ProviderError(f"terraform destroy left {left} resource(s) in {tf_dir}; "
                                f"see {tf_dir / 'terraform.log'}")
        if hosts:
            return [Resource(kind=kind, id=str(h.get("name") or h.get("address")), run_id=run_id or "",
                             detail=f"{h.get('address')} (terraform state {tf_dir})") for h in hosts]
        return [Resource(kind=kind, id=a, run_id=run_id or "", detail=f"terraform state {tf_dir}") for a in before]

    def list_tagged(self):
        """Module lab: the leases and tagged processes on the lab's hosts (the ssh provider's list).

        Other modules: nothing. What terraform made is known from the state files in the run directories
        (``cloudbench down <run>`` destroys it), not from tags this provider could list without the
        cloud's own API; the cloud's provider (e.g. openstack) lists its cloudbench-run tags itself."""
        if not self.is_lab:
            return []
        return self._ssh_for(self.lab_inv.path).list_tagged()
