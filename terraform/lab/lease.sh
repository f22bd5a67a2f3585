#!/bin/sh
# Lease (acquire) or release one host for a cloudbench run, as providers/ssh does (_lease, _release).
# Called by terraform's local-exec with CB_* variables; see main.tf.
set -u
action=$1
q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

lease="$CB_LEASE_DIR/$CB_NAME.lease"
inventory=${CB_INVENTORY:-"<the hosts' inventory>"}
where="$CB_NAME ($CB_USER@$CB_ADDRESS:$CB_PORT)"
remote() {
    if [ -n "$CB_KEY" ]; then
        set -- -i "$CB_KEY" -o IdentitiesOnly=yes "$@"
    fi
    ssh -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR \
        -o "UserKnownHostsFile=$CB_KNOWN_HOSTS" -p "$CB_PORT" "$@" "$CB_USER@$CB_ADDRESS" "$script"
}
# The answer is read from stdout alone: what a login prints on stderr (a shell start-up's warnings) is only
# quoted when the host cannot be reached.
errf=$(mktemp "${TMPDIR:-/tmp}/cb-lease.XXXXXX") || exit 1
trap 'rm -f "$errf"' EXIT

case "$action" in
acquire)
    since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    doc=$(printf '{"run_id": %s, "owner": %s, "host": %s, "since": "%s"}' "$CB_RUN_JSON" "$CB_OWNER_JSON" \
        "$CB_HOST_JSON" "$since")
    script="mkdir -p $(q "$CB_LEASE_DIR") && if (set -C; printf '%s\\n' $(q "$doc") > $(q "$lease")) 2>/dev/null; \
then echo LEASED; else echo HELD; cat $(q "$lease"); fi"
    if ! out=$(remote 2>"$errf"); then
        echo "cloudbench: cannot reach host $where to lease it: $(cat "$errf")" >&2
        exit 1
    fi
    first=$(printf '%s\n' "$out" | sed -n 1p)
    holder=$(printf '%s\n' "$out" | sed -n 2p)
    if [ "$first" = LEASED ]; then
        echo "leased $where for run $CB_RUN_ID"
        exit 0
    fi
    if [ "$first" != HELD ] || [ -z "$holder" ]; then
        echo "cloudbench: host $where: unreadable lease $lease; remove it by hand" >&2
        exit 1
    fi
    case "$holder" in
    *"\"run_id\": $CB_RUN_JSON"*)
        echo "host $where is already leased by this run ($CB_RUN_ID)"  # a resumed run keeps its lease
        exit 0 ;;
    esac
    held_by=$(printf '%s' "$holder" | sed -n 's/.*"run_id": "\([^"]*\)".*/\1/p')
    owner=$(printf '%s' "$holder" | sed -n 's/.*"owner": "\([^"]*\)".*/\1/p')
    since=$(printf '%s' "$holder" | sed -n 's/.*"since": "\([^"]*\)".*/\1/p')
    echo "cloudbench: host $where is leased by run ${held_by:-?} (harness ${owner:-?}, since ${since:-?});" \
        "if that run is gone: cloudbench gc --provider ssh --inventory $inventory" >&2
    exit 1 ;;
release)
    script="grep -qF $(q "\"run_id\": $CB_RUN_JSON") $(q "$lease") 2>/dev/null && rm -f $(q "$lease") \
&& echo RELEASED || true"
    if ! out=$(remote 2>"$errf"); then
        echo "cloudbench: cannot reach host $where; its lease $lease stays until" \
            "cloudbench gc --provider ssh --inventory $inventory: $(cat "$errf")" >&2
        exit 1
    fi
    case "$out" in
    *RELEASED*) echo "released $where (run $CB_RUN_ID)" ;;
    *) echo "host $where: no lease of run $CB_RUN_ID to release" ;;
    esac ;;
*)
    echo "usage: lease.sh acquire|release" >&2
    exit 2 ;;
esac
