"""The lab: real network namespaces with their own sshd (needs root, as CI runs)."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.lab import hosts as lab
from test_run_local import cloudbench

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def netns():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


RECEIVER = ("python3 -c 'import sys, time; f = sys.stdin.buffer; f.read(1); t = time.perf_counter(); "
            "n = 1 + len(f.read()); print(n / (time.perf_counter() - t))'")


def rate(state, src, dst, megabytes):
    """Bytes/s from lab host src to dst over ssh (real TCP through the bridge), timed by the receiver from
    its first byte, so ssh's connection set-up does not count."""
    cmd = ["ip", "netns", "exec", src["netns"]] + lab.ssh_command(state, dst, RECEIVER)
    p = subprocess.run(cmd, input=b"\0" * (megabytes << 20), check=True, capture_output=True, timeout=60)
    return float(p.stdout)


@pytest.fixture
def clean():
    yield
    for name in ("t1", "t2", "t3"):
        lab.down(name)


def test_up_status_ssh_rate_limit_and_down(clean):
    p = cloudbench("lab", "up", "--hosts", 2, "--bandwidth", "40mbit", "--name", "t1", "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(cloudbench("lab", "status", "--name", "t1", "--json").stdout)
    assert st["up"] and len(st["hosts"]) == 2 and all(h["sshd"] and h["rate"] == "40mbit" for h in st["hosts"])
    assert os.path.isfile(st["inventory"]) and "cbl-t1-0" in netns() and "cbl-t1-1" in netns()
    state = json.loads((lab.state_dir("t1") / "state.json").read_text())
    h0, h1 = state["hosts"]
    # ssh with strict host-key checking against the lab's known_hosts; the remote side is the other namespace.
    out = subprocess.run(["ip", "netns", "exec", h0["netns"]] + lab.ssh_command(state, h1, "ip -o -4 addr show eth0"),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and h1["address"] in out.stdout, out.stderr
    # tbf at 40 mbit/s = 5 MB/s; the receiver's clock starts late by what the kernel buffered while python
    # started (up to ~1 MB), hence the margin above 5 MB/s.
    limited = rate(state, h0, h1, 8)
    lab.up(hosts=2, name="t2")
    free = json.loads((lab.state_dir("t2") / "state.json").read_text())
    unlimited = rate(free, free["hosts"][0], free["hosts"][1], 8)
    assert 2e6 < limited < 7e6 and unlimited > 3 * limited, (limited, unlimited)

    p = cloudbench("lab", "down", "--name", "t1")
    assert p.returncode == 0
    assert "cbl-t1" not in netns() and not lab.state_dir("t1").exists()
    assert subprocess.run(["ip", "link", "show", "cbl-t1"], capture_output=True).returncode != 0
    assert not subprocess.run(["pgrep", "-f", "cloudbench-lab/t1/"], capture_output=True).stdout
    assert cloudbench("lab", "down", "--name", "t1").returncode == 0  # safe to repeat
    assert json.loads(cloudbench("lab", "status", "--name", "t1", "--json").stdout)["up"] is False


def test_a_login_does_not_wait_on_a_lock_a_killed_session_left(clean):
    """Lab hosts share root's shell start-up. Where it runs pyenv, a session killed as its host "died" can leave
    pyenv's rehash lock behind; logins then waited 60 s each (a campaign cell once failed on it)."""
    shims = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "shims"
    if not shims.is_dir():
        pytest.skip("no pyenv on this machine")
    lock = shims / ".pyenv-shim"
    lab.up(hosts=1, name="t1")
    state = json.loads((lab.state_dir("t1") / "state.json").read_text())
    ours = not lock.exists()
    try:
        lock.touch()
        t0 = time.monotonic()
        out = subprocess.run(lab.ssh_command(state, state["hosts"][0], "true"), capture_output=True, text=True,
                             timeout=90)
        assert out.returncode == 0 and time.monotonic() - t0 < 15, (time.monotonic() - t0, out.stderr)
    finally:
        if ours:
            lock.unlink(missing_ok=True)


def test_failed_up_undoes_what_it_did_and_spares_what_it_did_not_make(clean):
    subprocess.run(["ip", "netns", "add", "cbl-t3-1"], check=True)  # host 1's name is taken
    try:
        with pytest.raises(lab.LabError, match="cbl-t3-1"):
            lab.up(hosts=2, name="t3")
        assert "cbl-t3-0" not in netns() and not lab.state_dir("t3").exists()
        assert subprocess.run(["ip", "link", "show", "cbl-t3"], capture_output=True).returncode != 0
        assert "cbl-t3-1" in netns()  # not ours: left alone
    finally:
        subprocess.run(["ip", "netns", "del", "cbl-t3-1"])


@pytest.mark.parametrize("args,message", [(["--hosts", "0"], "expected 1 to 50"),
                                          (["--bandwidth", "fast"], "expected a tc rate"),
                                          (["--name", "Bad_Name"], "invalid lab name")])
def test_bad_input_says_what_is_expected(args, message):
    p = cloudbench("lab", "up", *args)
    assert p.returncode == 1 and message in p.stderr


def test_without_root_it_says_so(tmp_path):
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env",
                        f"CLOUDBENCH_LAB_DIR={tmp_path}", "python3", "-c",
                        "import sys; sys.path.insert(0, '.'); from harness.lab import hosts as lab; lab.up(2)"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode != 0 and "needs root" in p.stderr
