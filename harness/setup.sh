#!/usr/bin/env bash
# Idempotent set-up of a cloudbench environment on a fresh Debian/Ubuntu machine.
#   bash harness/setup.sh [--test] [--gpu]
# Creates the virtualenv ($CLOUDBENCH_VENV, default ./.venv), installs TensorFlow 2.15.1 and the project,
# then builds Horovod 0.28.1 against that TensorFlow once (the wheel is cached in
# ~/.cache/cloudbench/wheels and reused by later venvs). Re-running skips every step already done.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CLOUDBENCH_VENV:-$here/.venv}
cache=${CLOUDBENCH_CACHE:-$HOME/.cache/cloudbench}
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="${extras:+$extras,}test" ;;
    --gpu) extras="${extras:+$extras,}gpu" ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --test and/or --gpu)" >&2; exit 2 ;;
  esac
done

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. System packages Horovod's build needs (only when something is missing).
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v ssh >/dev/null || need_apt+=(openssh-client)
# The tests' lab hosts run their own sshd (network namespaces; root only).
# The tests' Slurm cluster is slurmctld + slurmd (+ munge) from Debian's slurm-wlm.
case ",$extras," in *,test,*)
  [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
  [ -x /usr/sbin/slurmctld ] || need_apt+=(slurm-wlm)
  # The lab's real OpenStack (cloudbench lab up --openstack real): its message queue and database.
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_apt+=(rabbitmq-server)
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql) ;;
esac
command -v ip >/dev/null || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing system packages: ${need_apt[*]} (install them with apt-get as root, then re-run)"; exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  # Services packaged with start scripts (rabbitmq, postgresql, sshd) must not start here: the lab runs its own.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # gone even when apt-get fails (set -e)
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# 2. The virtualenv.
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip wheel
fi
py="$venv/bin/python"
pip=("$venv/bin/pip" install -q --disable-pip-version-check)

# 3. The project and its pinned dependencies (TensorFlow 2.15.1, numpy<2, h5py, pandas, ...).
stamp="$venv/.cloudbench-installed"
want="$(cat "$here/pyproject.toml" | sha1sum | cut -c1-12) extras=$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing cloudbench${extras:+[$extras]} into $venv"
  "${pip[@]}" -e "$here${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi

# 4. Horovod 0.28.1, built against the installed TensorFlow (Gloo always; MPI when mpicxx is present).
if "$py" -c 'import horovod.tensorflow' 2>/dev/null; then
  log "horovod already importable: $("$py" -c 'import horovod; print(horovod.__version__)')"
else
  tfv=$("$py" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)
  pyv=$("$py" -c 'import sys; print("%d%d" % sys.version_info[:2])')
  wheels="$cache/wheels/tf-$tfv-py$pyv"
  mkdir -p "$wheels"
  if ! ls "$wheels"/horovod-0.28.1-*.whl >/dev/null 2>&1; then
    log "building horovod 0.28.1 against tensorflow $tfv (2-4 minutes, once per machine)"
    "${pip[@]}" cloudpickle psutil pyyaml packaging
    export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
    if command -v mpicxx >/dev/null; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
    # The system cmake, never pip's: pip's cmake wheel breaks horovod's build.
    export HOROVOD_CMAKE=$(command -v cmake)
    "$venv/bin/pip" wheel -q --no-cache-dir --no-build-isolation --no-deps -w "$wheels" horovod==0.28.1
  fi
  "${pip[@]}" --no-deps "$wheels"/horovod-0.28.1-*.whl
  "${pip[@]}" cloudpickle psutil pyyaml packaging
  "$py" -c 'import horovod.tensorflow as hvd; print("[setup] horovod", hvd.__version__ if hasattr(hvd, "__version__") else "ok")' >&2
fi
# 5. With --test, as root: the real OpenStack control plane's venv (OpenStack 2026.2 from a pinned lock; about
#    2 minutes, once per lock: kept in /var/cache/cloudbench-lab).
case ",$extras," in *,test,*)
  if [ "$(id -u)" -eq 0 ]; then (cd "$here" && "$py" -m harness.lab.openstack.control install); fi ;;
esac
log "ready: $venv"
