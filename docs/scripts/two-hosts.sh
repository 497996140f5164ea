#!/usr/bin/env bash
# Emulate two hosts on one machine (root): network namespaces h1 and h2 joined by a veth pair shaped to
# RATE (default 1gbit), and an Open MPI rsh agent that starts a "remote" rank in the namespace owning the
# address. Usage:
#   docs/scripts/two-hosts.sh up [RATE]
#   docs/scripts/two-hosts.sh run target/release/dino train --threads 1 --config my.toml --output-dir runs/x
#   docs/scripts/two-hosts.sh down
set -euo pipefail
agent=/tmp/dino-nsrsh
case "${1:-}" in
up)
    rate=${2:-1gbit}
    ip netns add h1
    ip netns add h2
    ip link add v1 type veth peer name v2
    ip link set v1 netns h1
    ip link set v2 netns h2
    ip -n h1 addr add 10.9.0.1/24 dev v1
    ip -n h2 addr add 10.9.0.2/24 dev v2
    for n in 1 2; do
        ip -n h$n link set v$n up
        ip -n h$n link set lo up
        tc -n h$n qdisc add dev v$n root tbf rate "$rate" burst 256kb latency 50ms
    done
    cat >"$agent" <<'AGENT'
#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
case $host in 10.9.0.2) ns=h2 ;; *) ns=h1 ;; esac
exec ip netns exec "$ns" sh -c "$*"
AGENT
    chmod +x "$agent"
    ;;
run)
    shift
    exec ip netns exec h1 mpirun --allow-run-as-root -np 2 -H 10.9.0.1,10.9.0.2 --bind-to none \
        --mca plm_rsh_agent "$agent" --mca btl tcp,self \
        --mca btl_tcp_if_include 10.9.0.0/24 --mca oob_tcp_if_include 10.9.0.0/24 "$@"
    ;;
down)
    ip netns del h1 || true
    ip netns del h2 || true
    rm -f "$agent"
    ;;
*)
    echo "usage: $0 up [RATE] | run COMMAND... | down" >&2
    exit 2
    ;;
esac
