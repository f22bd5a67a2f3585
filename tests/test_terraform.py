"""The terraform provider: module checks offline (fmt, python-hcl2), and the lab module leasing lab hosts
end to end through the CLI (root only: the lab is network namespaces with sshd)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest
import yaml

from harness.lab import hosts as lab
from providers.errors import PlanError
from providers.base import Fleet, FleetSpec
from providers.ssh import SSHProvider
from providers.terraform import TerraformProvider, error_text, module_variables, parse_vars
from conftest import ROOT
from test_run_local import cloudbench, run_ok

MODULES = ROOT / "terraform"
TERRAFORM = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(not TERRAFORM, reason="terraform is not installed")
SMALL = ["--variant", "small", "--steps", "20", "--warmup", "5", "--no-progress"]


@pytest.fixture(autouse=True)
def tf_env(monkeypatch):
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", "/dev/null")  # the env's points at a missing file
    monkeypatch.setenv("TF_IN_AUTOMATION", "1")


def tf(*args, cwd=None):
    return subprocess.run([TERRAFORM, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def load(path):
    with open(path) as f:
        return hcl2.load(f, serialization_options=hcl2.SerializationOptions(strip_string_quotes=True,
                                                                            explicit_blocks=False))


def blocks(module, kind):
    """{name: body} of the module's top-level blocks of one kind (variable, output, resource type ...)."""
    out = {}
    for f in sorted((MODULES / module).glob("*.tf")):
        for item in load(f).get(kind, []):
            for name, body in item.items():
                if kind == "resource":  # {type: {name: body}}: several blocks may share a type
                    out.setdefault(name, {}).update(body)
                else:
                    out[name] = body
    return out


# -- offline: format, parse, variables ----------------------------------------------------------------
@needs_terraform
def test_modules_are_terraform_fmt_clean():
    p = tf("fmt", "-check", "-recursive", "-diff", str(MODULES))
    assert p.returncode == 0, p.stdout + p.stderr


def test_modules_parse_and_declare_what_the_harness_passes_and_reads():
    lab_vars, os_vars = blocks("lab", "variable"), blocks("openstack", "variable")
    assert {"run_id", "instance_count", "hosts", "ssh_key", "known_hosts", "lease_dir", "owner",
            "user"} <= set(lab_vars)
    assert lab_vars["user"]["default"] == "root"
    assert {"cloud", "run_id", "instance_count", "flavor", "image", "public_key", "network", "floating_ip_pool",
            "ssh_cidr", "availability_zone", "slots_per_instance", "ssh_user", "owner"} == set(os_vars)
    assert os_vars["floating_ip_pool"]["default"] == "" and os_vars["ssh_user"]["default"] == "root"
    assert os_vars["availability_zone"]["default"] is None
    for m in ("lab", "openstack"):
        assert "jsonencode" in blocks(m, "output")["hosts"]["value"]
        assert sorted(blocks(m, "variable")) == module_variables(MODULES / m)  # the provider's own reading
    # lab: builtin resources only; openstack: the run's name and tag on everything it makes
    assert set(blocks("lab", "resource")) == {"terraform_data"}
    res = blocks("openstack", "resource")
    assert {"openstack_compute_keypair_v2", "openstack_networking_secgroup_v2", "openstack_networking_secgroup_rule_v2",
            "openstack_networking_port_v2", "openstack_compute_instance_v2", "openstack_networking_floatingip_v2",
            "openstack_networking_floatingip_associate_v2"} == set(res)
    node = res["openstack_compute_instance_v2"]["node"]
    assert node["metadata"] == {"cloudbench-run": "${var.run_id}", "cloudbench-owner": "${var.owner}"}
    assert node["count"] == "${var.instance_count}" and node["image_id"] == "${var.image}"
    # floating IPs go on the run's own ports (an instance's network[0].port is empty for a network by name)
    port = res["openstack_networking_port_v2"]["node"]
    assert node["network"] == [{"port": "${openstack_networking_port_v2.node[count.index].id}"}]
    assert res["openstack_networking_floatingip_associate_v2"]["node"]["port_id"] == node["network"][0]["port"]
    assert port["description"] == "${local.tag}" and port["count"] == "${var.instance_count}"
    assert port["network_id"] == "${var.network}"  # an id: network names need not be unique
    assert "internal_address" in blocks("openstack", "output")["hosts"]["value"]
    assert res["openstack_networking_floatingip_v2"]["node"]["count"] == "${local.floating_ips}"
    assert res["openstack_networking_floatingip_v2"]["node"]["description"] == "${local.tag}"
    local = load(MODULES / "openstack" / "main.tf")["locals"][0]
    assert local["floating_ips"] == '${var.floating_ip_pool != "" ? var.instance_count : 0}'
    assert local["tag"] == "cloudbench-run=${var.run_id}" and local["name"] == "cb-${var.run_id}"
    rules = res["openstack_networking_secgroup_rule_v2"]
    assert rules["ssh"]["port_range_min"] == rules["ssh"]["port_range_max"] == 22
    assert rules["ssh"]["remote_ip_prefix"] == "${var.ssh_cidr}" and rules["ssh"]["protocol"] == "tcp"
    assert rules["internal"]["remote_group_id"] == "${openstack_networking_secgroup_v2.run.id}"
    assert "protocol" not in rules["internal"] and rules["internal"]["ethertype"] == "IPv4"
    req = load(MODULES / "openstack" / "versions.tf")["terraform"][0]["required_providers"][0]["openstack"]
    assert req["source"] == "terraform-provider-openstack/openstack"


def _lab_inventory(tmp_path, hosts=2):
    key, known = tmp_path / "id", tmp_path / "known_hosts"
    key.write_text("k")
    Path(str(key) + ".pub").write_text("ssh-ed25519 AAAAtest cb")
    known.write_text("")
    inv = tmp_path / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"key": str(key), "known_hosts": str(known), "lease_dir": "/tmp/leases",
                                   "hosts": [{"name": f"h{i}", "address": f"10.0.0.{i}", "slots": 2}
                                             for i in range(hosts)]}))
    return inv, key, known


def test_provider_tfvars_are_exactly_the_module_variables(tmp_path):
    inv, key, known = _lab_inventory(tmp_path)
    spec = FleetSpec(run_id="r1", provider="terraform", slots=3, variant="small", workdir=str(tmp_path))
    lab_vars = TerraformProvider(module="lab", inventory=str(inv))._tfvars(spec)
    assert set(lab_vars) == set(module_variables(MODULES / "lab"))
    assert lab_vars["instance_count"] == 2 and [h["name"] for h in lab_vars["hosts"]] == ["h0", "h1"]
    assert lab_vars["ssh_key"] == str(key) and lab_vars["lease_dir"] == "/tmp/leases"
    p = TerraformProvider(module="openstack", key=str(key), known_hosts=str(known), slots="4", user="ubuntu",
                          var="cloud=mycloud,flavor=g1.a100,image=cb,network=private,floating_ip_pool=public",
                          **{"var.ssh_cidr": "203.0.113.7/32", "var.availability_zone": "nova"})
    os_vars = p._tfvars(FleetSpec(run_id="r2", provider="terraform", slots=8, variant="small"))
    assert set(os_vars) == set(module_variables(MODULES / "openstack"))
    assert os_vars["instance_count"] == 2 and os_vars["slots_per_instance"] == 4 and os_vars["ssh_user"] == "ubuntu"
    assert os_vars["public_key"] == "ssh-ed25519 AAAAtest cb" and os_vars["cloud"] == "mycloud"
    assert p.offerings()[0].instance_type == "g1.a100" and p.offerings()[0].slots == 4
    with pytest.raises(PlanError, match=r"variable flavour .*one of its variables: .*flavor"):
        TerraformProvider(module="openstack", var={"flavour": "x"})._tfvars(spec)
    with pytest.raises(PlanError, match="cloudbench sets run_id"):
        TerraformProvider(module="lab", inventory=str(inv), var="run_id=x")._tfvars(spec)
    with pytest.raises(PlanError, match="module lab: --inventory"):
        TerraformProvider(module="lab").offerings()
    with pytest.raises(PlanError, match="option module"):
        TerraformProvider(module=str(tmp_path / "nowhere")).check()
    assert parse_vars('a=1,b=[1,2],c={"x":1,"y":2},d=p,q') == {"a": "1", "b": [1, 2], "c": {"x": 1, "y": 2},
                                                             "d": "p,q"}
    with pytest.raises(PlanError, match="k=v,k2=v2"):
        parse_vars("novalue")


@needs_terraform
def test_lab_module_refuses_more_instances_than_hosts(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODULES / "lab", d)
    (d / "terraform.tfvars.json").write_text(json.dumps({
        "run_id": "r", "instance_count": 3, "hosts": [{"name": "a", "address": "10.0.0.1", "slots": 1}],
        "known_hosts": "/dev/null", "lease_dir": "/tmp/l", "owner": "x:1"}))
    assert tf(f"-chdir={d}", "init", "-input=false", "-no-color").returncode == 0
    p = tf(f"-chdir={d}", "plan", "-input=false", "-no-color")
    assert p.returncode == 1
    msg = error_text(p.stderr)
    assert "instance_count is 3" in msg and "number of hosts given (1)" in msg, msg


# -- the lab, end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tflab():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    if not TERRAFORM:
        pytest.skip("terraform is not installed")
    lab.down("tf1")
    st = lab.up(hosts=2, name="tf1", slots=1)
    yield st
    lab.down("tf1")


def leases(st):
    d = Path(st["inventory"]).parent / "leases"
    return {p.name: json.loads(p.read_text()) for p in d.glob("*.lease")} if d.is_dir() else {}


def state_list(tf_dir):
    p = tf(f"-chdir={tf_dir}", "state", "list")
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_run_through_terraform_leases_lab_hosts_and_destroys_everything(tflab, tmp_path):
    out, d, df = run_ok(tmp_path, "--provider", "terraform", "--option", "module=lab", "--inventory",
                        tflab["inventory"], "--gpus", 2, *SMALL, "--repetitions", 1)
    assert len(df) == 2
    two = df[df["gpus"] == 2]
    assert set(two["hosts"]) == {"tf1-h0,tf1-h1"} and (two["nodes"] == 2).all()
    fleet = json.loads((d / "fleet.json").read_text())
    extra = dict(map(tuple, fleet["extra"]))
    assert fleet["provider"] == "terraform" and [n["name"] for n in fleet["nodes"]] == ["tf1-h0", "tf1-h1"]
    assert extra["tf_dir"] == str(d / "terraform") and extra["cpus_per_rank"] == 1
    assert (d / "terraform" / "terraform.tfstate").is_file()  # the state lives with the run's results
    assert (d / "terraform" / "terraform.tfvars.json").is_file() and (d / "terraform" / "inventory.yaml").is_file()
    assert "acquire" in (d / "terraform" / "terraform.log").read_text()
    assert not leases(tflab) and state_list(d / "terraform") == []
    p = cloudbench("down", out["run_id"], "--results", tmp_path, "--json")  # nothing left: safe to repeat
    assert p.returncode == 0 and json.loads(p.stdout)["removed"] == [], p.stderr


def test_held_lease_fails_apply_clearly_and_leaves_nothing_of_the_run(tflab, tmp_path):
    held = Path(tflab["inventory"]).parent / "leases" / "tf1-h1.lease"
    held.parent.mkdir(exist_ok=True)
    held.write_text(json.dumps({"run_id": "other-run", "owner": "elsewhere:1", "host": "tf1-h1",
                                "since": "2026-01-01T00:00:00Z"}) + "\n")
    try:
        p = cloudbench("run", "--provider", "terraform", "--option", "module=lab", "--inventory", tflab["inventory"],
                       "--gpus", 2, *SMALL, "--repetitions", 1, "--results", tmp_path)
        assert p.returncode == 1
        assert "terraform apply of module lab failed" in p.stderr
        assert "host tf1-h1 (root@" in p.stderr and "is leased by run other-run (harness elsewhere:1" in p.stderr
        assert "cloudbench gc --provider ssh --inventory " + tflab["inventory"] in p.stderr, p.stderr
        assert list(leases(tflab)) == ["tf1-h1.lease"]  # h0's lease, taken by the failed apply, is released
        assert leases(tflab)["tf1-h1.lease"]["run_id"] == "other-run"  # another run's lease is never touched
        d = next(tmp_path.iterdir())
        assert json.loads((d / "run.json").read_text())["state"] == "failed"
        assert state_list(d / "terraform") == []
    finally:
        held.unlink(missing_ok=True)


def test_the_lease_script_reads_the_answer_from_stdout_whatever_a_login_prints_on_stderr(tflab, tmp_path):
    """A host whose shell start-up warns on stderr (a locale, a busy pyenv lock) must not make its lease look
    unreadable: real ssh to the lab host, with a warning printed beside it on stderr."""
    noisy = tmp_path / "bin"
    noisy.mkdir()
    (noisy / "ssh").write_text(f"#!/bin/sh\necho 'bash: warning: a noisy login' >&2\nexec {shutil.which('ssh')} \"$@\"\n")
    (noisy / "ssh").chmod(0o755)
    inv = yaml.safe_load(Path(tflab["inventory"]).read_text())
    h1 = inv["hosts"][1]
    held = Path(inv["lease_dir"]) / f"{h1['name']}.lease"
    held.parent.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{noisy}:{os.environ['PATH']}", "CB_NAME": h1["name"],
           "CB_ADDRESS": h1["address"], "CB_PORT": "22", "CB_USER": inv["user"], "CB_KEY": inv["key"],
           "CB_KNOWN_HOSTS": inv["known_hosts"], "CB_LEASE_DIR": inv["lease_dir"], "CB_RUN_ID": "r-noisy",
           "CB_RUN_JSON": '"r-noisy"', "CB_OWNER_JSON": '"here:1"', "CB_HOST_JSON": json.dumps(h1["name"]),
           "CB_INVENTORY": tflab["inventory"]}
    script = str(ROOT / "terraform" / "lab" / "lease.sh")
    try:
        held.write_text(json.dumps({"run_id": "other-run", "owner": "elsewhere:1", "host": h1["name"],
                                    "since": "2026-01-01T00:00:00Z"}) + "\n")
        p = subprocess.run(["sh", script, "acquire"], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "is leased by run other-run (harness elsewhere:1" in p.stderr, p.stderr
        held.unlink()
        p = subprocess.run(["sh", script, "acquire"], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "leased" in p.stdout, p.stderr
        assert json.loads(held.read_text())["run_id"] == "r-noisy"
        p = subprocess.run(["sh", script, "release"], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "released" in p.stdout and not held.exists(), p.stderr
    finally:
        held.unlink(missing_ok=True)


def test_a_crashed_harness_leases_are_found_and_released_from_the_record(tflab, tmp_path):
    inv = tflab["inventory"]
    a = TerraformProvider(module="lab", inventory=inv)
    recorded = []
    fleet = a.provision(FleetSpec(run_id="run-crash", provider="terraform", slots=2, variant="small",
                                  workdir=str(tmp_path)), recorded.append)
    assert dict(recorded[0].extra)["tf_dir"] == str(tmp_path / "terraform") and not recorded[0].nodes
    held = leases(tflab)
    assert sorted(held) == ["tf1-h0.lease", "tf1-h1.lease"]
    assert {v["run_id"] for v in held.values()} == {"run-crash"} and set(held["tf1-h0.lease"]) == \
        {"run_id", "owner", "host", "since"}  # the ssh provider's lease format: its gc sees these too
    seen = [(r.kind, r.id, r.run_id, r.owner_alive) for r in SSHProvider(inventory=inv).list_tagged()]
    assert seen == [("lease", "tf1-h0", "run-crash", True), ("lease", "tf1-h1", "run-crash", True)]
    assert len(state_list(tmp_path / "terraform")) == 2
    # Another harness (cloudbench down) with only the recorded fleet: destroys, then nothing is left.
    b = TerraformProvider(module="lab", inventory=inv)
    gone = b.teardown("run-crash", Fleet.from_dict(json.loads(json.dumps(fleet.to_dict()))))
    assert sorted((r.kind, r.id) for r in gone) == [("lease", "tf1-h0"), ("lease", "tf1-h1")]
    assert not leases(tflab) and state_list(tmp_path / "terraform") == []
    assert b.teardown("run-crash", fleet) == [] and b.teardown("run-crash") == []
