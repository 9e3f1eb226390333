#!/bin/sh
# The compose stack's `demo` profile: through the bundled CLI, create the demo VM (256 MiB
# of dirty-logged RAM, a 16 MiB ROM at 4 GiB, 1 in 8 of its first 4096 pages write-tracked)
# unless it exists (it survives daemon restarts in the state volume), and keep a
# random-writes workload running on it: workloads do not survive a restart, so one is
# started again whenever none is running.
#
# Environment: PAGETRACK_TARGET, PAGETRACK_TOKEN or PAGETRACK_TOKEN_FILE,
# PAGETRACK_DEMO_VM (demo), PAGETRACK_DEMO_RATE (writes/s, 1000).
set -u
trap "exit 0" TERM INT

vm=${PAGETRACK_DEMO_VM:-demo}
rate=${PAGETRACK_DEMO_RATE:-1000}
token_file=${PAGETRACK_TOKEN_FILE:-/run/secrets/pagetrack-client-token}
if [ -z "${PAGETRACK_TOKEN:-}" ] && [ -f "$token_file" ]; then
    PAGETRACK_TOKEN=$(cat "$token_file")
    export PAGETRACK_TOKEN
fi

create_vm() {
    pagetrack vm create "$vm" --vcpus 4 &&
        pagetrack slot set "$vm" 0 0 256M --log-dirty &&
        pagetrack slot set "$vm" 1 4G 16M --readonly &&
        pagetrack track add "$vm" "$(seq -s, 0 8 4095)"
}

workload_running() {
    pagetrack --json workload list "$vm" | python3 -c '
import json, sys
sys.exit(0 if any(w["state"] == "running" for w in json.load(sys.stdin)) else 1)'
}

while :; do
    if pagetrack info >/dev/null 2>&1; then
        if ! pagetrack vm show "$vm" >/dev/null 2>&1; then
            echo "demo: creating VM $vm"
            create_vm || echo "demo: creating $vm failed; trying again"
        elif ! workload_running; then
            echo "demo: starting a random-writes workload on $vm at $rate writes/s"
            pagetrack workload start "$vm" random-writes --rate "$rate" --vcpus 4 \
                --tracked-fraction 0.25 --option pages=4096 --seed 1 ||
                echo "demo: starting the workload failed; trying again"
        fi
    else
        echo "demo: waiting for pagetrackd at ${PAGETRACK_TARGET:-127.0.0.1:50051}"
    fi
    sleep 5
done
