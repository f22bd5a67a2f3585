"""The AWS emulator (harness.lab.emulators.aws: moto behind a proxy) as boto3 sees it: EC2 with placement groups,
console host keys, fault switches and spot interruptions; S3 (presigned URLs) passed through; and, with a lab,
an instance that is a lab host one can ssh into."""
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from harness.lab.emulators.aws import LAB_IMAGE, SPOT_REASON, AwsEmulator
from labcloud import emulator as control, running

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError, ConnectionClosedError  # noqa: E402

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn3XG2Fyh7/1vQGk9m4sWzpq1H7tRj8Bsqtq3vK5Yyk someone@somewhere"
NO_RETRY = Config(retries={"total_max_attempts": 1, "mode": "standard"})




def client(emu, service="ec2", config=NO_RETRY, region=None):
    return boto3.client(service, endpoint_url=emu.url, region_name=region or emu.region, config=config,
                        **emu.credentials)


def code(excinfo):
    e = excinfo.value.response
    return e["Error"]["Code"], e["ResponseMetadata"]["HTTPStatusCode"]


def run(ec2, n=1, itype="g5.xlarge", run_id="t", **kw):
    tags = [{"ResourceType": "instance", "Tags": [{"Key": "cloudbench-run", "Value": run_id}]}]
    return ec2.run_instances(ImageId=LAB_IMAGE["id"], InstanceType=itype, MinCount=n, MaxCount=n,
                             TagSpecifications=tags, **kw)["Instances"]


def by_tag(ec2, run_id):
    res = ec2.describe_instances(Filters=[{"Name": "tag:cloudbench-run", "Values": [run_id]},
                                          {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i for r in res["Reservations"] for i in r["Instances"]]


@pytest.fixture(scope="module")
def emu():
    with AwsEmulator() as e:
        yield e


@pytest.fixture
def cloud(emu):
    control(emu.url, "reset", {})
    yield emu
    control(emu.url, "reset", {})


# -- EC2 --------------------------------------------------------------------------------------------
def test_keys_groups_and_placement_groups(cloud):
    ec2 = client(cloud)
    ec2.import_key_pair(KeyName="k1", PublicKeyMaterial=PUBKEY.encode())
    assert ec2.describe_key_pairs()["KeyPairs"][0]["KeyType"] == "ed25519"
    sg = ec2.create_security_group(GroupName="cb-sg", Description="cloudbench")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    tags = [{"ResourceType": "placement-group", "Tags": [{"Key": "cloudbench-run", "Value": "r1"}]}]
    pg = ec2.create_placement_group(GroupName="cb-r1-pg", Strategy="cluster", TagSpecifications=tags)
    assert pg["PlacementGroup"]["GroupId"].startswith("pg-") and pg["PlacementGroup"]["Strategy"] == "cluster"
    ec2.create_placement_group(GroupName="other", Strategy="spread")
    with pytest.raises(ClientError) as e:
        ec2.create_placement_group(GroupName="other", Strategy="spread")
    assert code(e) == ("InvalidPlacementGroup.Duplicate", 400)
    found = ec2.describe_placement_groups(Filters=[{"Name": "tag:cloudbench-run", "Values": ["r1"]}])
    (g,) = found["PlacementGroups"]
    assert g["GroupName"] == "cb-r1-pg" and g["Tags"] == [{"Key": "cloudbench-run", "Value": "r1"}]
    assert g["State"] == "available" and g["GroupArn"].endswith(":placement-group/cb-r1-pg")
    assert [g["GroupName"] for g in ec2.describe_placement_groups()["PlacementGroups"]] == ["cb-r1-pg", "other"]
    assert ec2.describe_placement_groups(GroupNames=["other"])["PlacementGroups"][0]["Strategy"] == "spread"
    assert ec2.describe_placement_groups(GroupIds=[g["GroupId"]])["PlacementGroups"][0]["GroupName"] == "cb-r1-pg"
    named = ec2.describe_placement_groups(Filters=[{"Name": "group-name", "Values": ["other"]}])["PlacementGroups"]
    assert [g["GroupName"] for g in named] == ["other"]
    with pytest.raises(ClientError) as e:
        ec2.describe_placement_groups(GroupNames=["nope"])
    assert code(e) == ("InvalidPlacementGroup.Unknown", 400)
    with pytest.raises(ClientError) as e:
        ec2.delete_placement_group(GroupName="nope")
    assert code(e) == ("InvalidPlacementGroup.Unknown", 400)
    st = control(cloud.url, "state")
    assert [k["name"] for k in st["key_pairs"]] == ["k1"] and st["security_groups"][0]["rules"] == 1
    assert {g["name"] for g in st["placement_groups"]} == {"cb-r1-pg", "other"} and not st["empty"]
    ec2.delete_placement_group(GroupName="other")
    ec2.delete_placement_group(GroupName="cb-r1-pg")
    ec2.delete_security_group(GroupId=sg)
    ec2.delete_key_pair(KeyName="k1")
    assert control(cloud.url, "state")["empty"]


def test_run_describe_console_terminate(cloud):
    ec2 = client(cloud)
    ec2.import_key_pair(KeyName="k1", PublicKeyMaterial=PUBKEY.encode())
    ec2.create_placement_group(GroupName="pg", Strategy="cluster")
    with pytest.raises(ClientError) as e:
        run(ec2, Placement={"GroupName": "missing"})
    assert code(e) == ("InvalidPlacementGroup.Unknown", 400)
    with pytest.raises(ClientError) as e:
        ec2.run_instances(ImageId=LAB_IMAGE["id"], InstanceType="bogus.type", MinCount=1, MaxCount=1)
    assert code(e) == ("InvalidInstanceType.NotFound", 400)  # type validation is on (moto's code)
    with pytest.raises(ClientError) as e:
        ec2.run_instances(ImageId="ami-12345678", InstanceType="g5.xlarge", MinCount=1, MaxCount=1)
    assert code(e)[0] == "InvalidAMIID.NotFound"  # AMI validation is on
    made = run(ec2, 2, "p4d.24xlarge", KeyName="k1", Placement={"GroupName": "pg"})
    assert [i["Placement"]["GroupName"] for i in made] == ["pg", "pg"]
    ids = sorted(i["InstanceId"] for i in made)
    found = by_tag(ec2, "t")
    assert sorted(i["InstanceId"] for i in found) == ids
    for i in found:  # no lab: moto's own (unreachable) addresses
        assert i["PrivateIpAddress"].startswith("10.") and i["PublicIpAddress"]
        assert i["Placement"]["GroupName"] == "pg" and i["KeyName"] == "k1"
        assert i["NetworkInterfaces"][0]["PrivateIpAddress"] == i["PrivateIpAddress"]
    run(ec2, run_id="elsewhere")
    in_pg = ec2.describe_instances(Filters=[{"Name": "placement-group-name", "Values": ["pg"]},
                                            {"Name": "instance-type", "Values": ["p4d.24xlarge"]}])["Reservations"]
    assert sorted(i["InstanceId"] for r in in_pg for i in r["Instances"]) == ids  # moto lacks this filter
    out = ec2.get_console_output(InstanceId=ids[0])["Output"]  # base64 on the wire; botocore decodes it
    keys = out.split("-----BEGIN SSH HOST KEY KEYS-----\n")[1].split("-----END SSH HOST KEY KEYS-----")[0]
    assert keys.startswith("ssh-ed25519 AAAA") and len(keys.strip().splitlines()) == 1
    with pytest.raises(ClientError) as e:
        ec2.delete_placement_group(GroupName="pg")
    assert code(e) == ("InvalidPlacementGroup.InUse", 400)
    st = control(cloud.url, "state")
    assert sorted(i["id"] for i in st["instances"] if i["placement_group"]) == ids
    assert st["instances"][0]["type"] == "p4d.24xlarge" and st["instances"][0]["tags"] == {"cloudbench-run": "t"}
    assert st["instances"][0]["placement_group"] == "pg" and not st["instances"][0]["spot"]
    ec2.terminate_instances(InstanceIds=ids + [i["InstanceId"] for i in by_tag(ec2, "elsewhere")])
    ec2.delete_placement_group(GroupName="pg")
    ec2.delete_key_pair(KeyName="k1")
    assert control(cloud.url, "state")["empty"]


def test_faults(cloud):
    ec2 = client(cloud)
    known = control(cloud.url, "faults")["known"]
    assert set(known) == {"insufficient_capacity", "throttle", "vcpu_limit", "internal_error", "lost_answer"}
    control(cloud.url, "faults", {"insufficient_capacity": {"count": 1, "zones": ["us-east-1a"],
                                                            "types": ["p4d.24xlarge"]}})
    assert run(ec2, itype="g5.xlarge", run_id="other-type")  # not the type the fault hits
    assert run(ec2, itype="p4d.24xlarge", run_id="zone-b", Placement={"AvailabilityZone": "us-east-1b"})
    with pytest.raises(ClientError) as e:
        run(ec2, itype="p4d.24xlarge", run_id="ice")
    assert code(e) == ("InsufficientInstanceCapacity", 500)
    assert "sufficient p4d.24xlarge capacity in the Availability Zone you requested (us-east-1a)" in str(e.value)
    assert not by_tag(ec2, "ice") and control(cloud.url, "faults")["faults"] == {}

    control(cloud.url, "faults", {"vcpu_limit": {"count": 1, "limit": 32}})
    with pytest.raises(ClientError) as e:
        run(ec2)
    assert code(e) == ("VcpuLimitExceeded", 400)
    assert "current vCPU limit of 32 allows for the instance bucket" in str(e.value)

    control(cloud.url, "faults", {"throttle": 1})
    with pytest.raises(ClientError) as e:
        ec2.describe_instances()
    assert code(e) == ("RequestLimitExceeded", 503)
    control(cloud.url, "faults", {"throttle": 1, "internal_error": 0})
    retrying = client(cloud, config=Config(retries={"total_max_attempts": 2, "mode": "standard"}))
    r = retrying.describe_instances()  # botocore retried the throttled call itself
    assert r["ResponseMetadata"]["RetryAttempts"] == 1

    control(cloud.url, "faults", {"internal_error": 2})
    with pytest.raises(ClientError) as e:
        ec2.describe_key_pairs()
    assert code(e) == ("InternalError", 500)
    assert retrying.describe_key_pairs()["ResponseMetadata"]["RetryAttempts"] == 1

    control(cloud.url, "faults", {"lost_answer": 1})
    with pytest.raises(ClientError) as e:
        run(ec2, run_id="lost")
    assert code(e) == ("504", 504)
    assert len(by_tag(ec2, "lost")) == 1  # carried out: found by its tag
    control(cloud.url, "faults", {"lost_answer": {"count": 1, "mode": "drop"}})
    with pytest.raises(ConnectionClosedError):
        run(ec2, run_id="dropped")
    assert len(by_tag(ec2, "dropped")) == 1
    control(cloud.url, "faults", {"throttle": 3})
    control(cloud.url, "faults", {"throttle": 0})
    assert control(cloud.url, "faults")["faults"] == {}
    with pytest.raises(urllib.error.HTTPError) as e:
        control(cloud.url, "faults", {"nope": 1})
    assert e.value.code == 400


def test_spot_interruption(cloud):
    ec2 = client(cloud)
    (spot,) = run(ec2, run_id="spot", InstanceMarketOptions={"MarketType": "spot"})
    (demand,) = run(ec2, run_id="demand")
    assert spot["InstanceLifecycle"] == "spot"
    assert [i["spot"] for i in control(cloud.url, "state")["instances"]] == [True, False]
    with pytest.raises(urllib.error.HTTPError) as e:
        control(cloud.url, "interrupt", {"instance_id": demand["InstanceId"]})
    assert e.value.code == 409
    r = control(cloud.url, "interrupt", {"instance_id": spot["InstanceId"]})
    assert r["state"] == "terminated"
    (i,) = ec2.describe_instances(InstanceIds=[spot["InstanceId"]])["Reservations"][0]["Instances"]
    assert i["State"]["Name"] == "terminated"
    assert (i["StateReason"]["Code"], i["StateReason"]["Message"]) == SPOT_REASON
    ec2.terminate_instances(InstanceIds=[demand["InstanceId"]])
    assert control(cloud.url, "state")["empty"]


# -- S3 ---------------------------------------------------------------------------------------------
def test_s3_through_the_proxy(cloud):
    s3 = client(cloud, "s3")
    s3.create_bucket(Bucket="cb-data")
    s3.put_object(Bucket="cb-data", Key="showers/a.h5", Body=b"x" * 100_000)
    assert s3.head_object(Bucket="cb-data", Key="showers/a.h5")["ContentLength"] == 100_000
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "cb-data", "Key": "showers/a.h5"}, ExpiresIn=60)
    assert url.startswith(cloud.url)
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == b"x" * 100_000
    st = control(cloud.url, "state")
    assert st["buckets"] == {"cb-data": 1} and st["empty"]  # buckets do not count
    control(cloud.url, "reset", {})
    assert control(cloud.url, "state")["buckets"] == {}


# -- the CLI ------------------------------------------------------------------------------------------
def test_serve_prints_one_json_line():
    p = subprocess.Popen([sys.executable, "-m", "harness.lab.emulators.aws", "serve", "--port", "0"],
                         stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        info = json.loads(p.stdout.readline())
        assert info["image_id"] == LAB_IMAGE["id"] and info["region"] == "us-east-1" and info["lab"] is None
        assert info["pid"] == p.pid and set(info["credentials"]) == {"aws_access_key_id", "aws_secret_access_key"}
        with urllib.request.urlopen(info["auth_url"], timeout=10) as r:
            assert json.loads(r.read())["empty"]
        ec2 = boto3.client("ec2", endpoint_url=info["url"], region_name="us-east-1", **info["credentials"])
        images = ec2.describe_images(Owners=["self"])["Images"]
        assert [(i["ImageId"], i["Name"]) for i in images] == [(LAB_IMAGE["id"], LAB_IMAGE["name"])]
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0


# -- with a lab -----------------------------------------------------------------------------------
LAB = "aws1"


@pytest.fixture(scope="module")
def awslab():
    """Lab "aws1" (2 hosts) and an emulator listening on its bridge, as lab hosts would reach it."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    from harness.lab import hosts as lab

    lab.down(LAB)
    lab.up(hosts=2, name=LAB, slots=1)
    try:
        state = json.loads((lab.state_dir(LAB) / "state.json").read_text())
        with AwsEmulator(lab_state=state, host=state["subnet"].rsplit(".", 1)[0] + ".1") as e:
            yield e, state
    finally:
        lab.down(LAB)


def ssh(key, known_hosts, address, *cmd):
    return subprocess.run(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=yes", "-o",
                           f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                           f"root@{address}", *cmd], capture_output=True, text=True, timeout=30)

def test_lab_instances_are_lab_hosts(awslab, tmp_path):
    emu, state = awslab
    hosts = {h["address"]: h for h in state["hosts"]}
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")], check=True)
    ec2, s3 = client(emu), client(emu, "s3")
    ec2.import_key_pair(KeyName="labkey", PublicKeyMaterial=(tmp_path / "key.pub").read_bytes())
    ec2.create_placement_group(GroupName="pg", Strategy="cluster")
    made = ec2.run_instances(ImageId=LAB_IMAGE["id"], InstanceType="g5.xlarge", MinCount=1, MaxCount=3,
                             KeyName="labkey", Placement={"GroupName": "pg"}, TagSpecifications=[
                                 {"ResourceType": "instance", "Tags": [{"Key": "cloudbench-run", "Value": "lab"}]}])
    made = made["Instances"]
    assert len(made) == 2  # as many as there are free hosts (MinCount 1)
    with pytest.raises(ClientError) as e:  # both hosts taken
        run(ec2, run_id="third")
    assert code(e) == ("InsufficientInstanceCapacity", 500) and not by_tag(ec2, "third")
    found = {i["InstanceId"]: i for i in by_tag(ec2, "lab")}
    assert sorted(found) == sorted(i["InstanceId"] for i in made)
    assert {i["PrivateIpAddress"] for i in found.values()} == set(hosts)
    assert all(i["PublicIpAddress"] == i["PrivateIpAddress"] for i in made)
    iid, inst = next(iter(found.items()))
    address, host = inst["PrivateIpAddress"], hosts[inst["PrivateIpAddress"]]
    out = ec2.get_console_output(InstanceId=iid)["Output"]
    keys = out.split("-----BEGIN SSH HOST KEY KEYS-----\n")[1].split("-----END SSH HOST KEY KEYS-----")[0]
    hostkey = " ".join(open(os.path.join(state["dir"], host["name"], "hostkey.pub")).read().split()[:2])
    assert " ".join(keys.split()[:2]) == hostkey
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{address} {hostkey}\n")
    p = ssh(tmp_path / "key", kh, address, "hostname")
    assert p.returncode == 0 and p.stdout.strip() == host["name"], p.stderr
    # the lab host downloads a presigned S3 URL through the emulator (it listens on the lab's bridge)
    s3.create_bucket(Bucket="cb-lab")
    s3.put_object(Bucket="cb-lab", Key="d.bin", Body=b"0123456789" * 1000)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "cb-lab", "Key": "d.bin"}, ExpiresIn=60)
    p = ssh(tmp_path / "key", kh, address, f"python3 -c \"import urllib.request as u; "
                                           f"print(len(u.urlopen('{url}').read()))\"")
    assert p.returncode == 0 and p.stdout.strip() == "10000", p.stderr
    ec2.terminate_instances(InstanceIds=[iid])
    p = ssh(tmp_path / "key", kh, address, "hostname")
    assert p.returncode != 0 and "Permission denied" in p.stderr
    assert control(emu.url, "state")["hosts"][host["name"]] is None
    # a spot interruption ends what the instance runs, as it would end the VM
    (spot,) = run(ec2, run_id="spot", KeyName="labkey", InstanceMarketOptions={"MarketType": "spot"})
    assert spot["PrivateIpAddress"] == address  # the host just freed
    p = ssh(tmp_path / "key", kh, address, "setsid nohup sleep 321 >/dev/null 2>&1 < /dev/null & echo $!")
    sleeper = int(p.stdout.split()[-1])
    assert running(sleeper)
    control(emu.url, "interrupt", {"instance_id": spot["InstanceId"]})
    assert not running(sleeper) and running(host["sshd_pid"])
    control(emu.url, "reset", {})
    st = control(emu.url, "state")
    assert st["empty"] and set(st["hosts"].values()) == {None}
    assert all("cloudbench-emulator" not in open(os.path.join(state["dir"], h["name"], "authorized_keys")).read()
               for h in state["hosts"])
