# Helpers for the lab tests (sourced). $1 = this host, $2 = number of hosts.
H=${1:-1}; NH=${2:-1}
CFG=/etc/xen/domu1.cfg
CON=/var/log/xen/console/guest-domu1.log
say() { echo "XENLAB T+$(cut -d' ' -f1 /proc/uptime) $*"; }
fail() { say "FAIL: $*"; exit 1; }
# result KEY VALUE: a figure collected by scripts/xen-lab into results.txt
result() { echo "XENLAB-RESULT $1=$2"; }
# wait_until SECONDS CMD...: polls CMD every second
wait_until() { _n=$1; shift; while [ "$_n" -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 1; _n=$((_n - 1)); done; return 1; }
domid_of() { xl domid "$1" 2>/dev/null; }
# the last DOMU-DISK-ACK k in the guest's console log (or FILE)
last_ack() { sed -n 's/.*DOMU-DISK-ACK \([0-9]*\).*/\1/p' "${1:-$CON}" 2>/dev/null | tail -n1; }
last_tick() { sed -n 's/.*DOMU-TICK \([0-9]*\).*/\1/p' "${1:-$CON}" 2>/dev/null | tail -n1; }
peer() { if [ "$H" = 1 ]; then echo 10.99.0.2; else echo 10.99.0.1; fi; }
wait_peer() { wait_until "${1:-120}" busybox ping -c1 -W1 "$(peer)"; }
# ask scripts/xen-lab to kill this host's QEMU (a crash the guest cannot see coming)
crash_me() { say "asking for a crash"; sync; echo "XENLAB-KILL-HOST $H"; sleep 600; }
# qemu-xen in dom0 as the userspace block backend (qdisk), as xencommons starts it
start_qdisk_backend() {
  /usr/libexec/xen-qemu-system-i386 -xen-domid 0 -xen-attach -name dom0 -nographic -M xenpv \
    -daemonize -monitor /dev/null -serial /dev/null -parallel /dev/null -nodefaults \
    -no-user-config -pidfile /run/qemu-dom0.pid || fail "qemu-xen (qdisk backend) did not start"
}
# A-link between the two dom0s on the lab wire (pool secret shared by both images)
ALINK_SECRET=/run/xenft/secret
alink_args() { # alink_args PORT
  mkdir -p /run/xenft; [ -e $ALINK_SECRET ] || echo "xen-lab pool secret, not a real one" > $ALINK_SECRET
  echo "--alink-path 10.99.0.$H:$1=$(peer):$1 --host host$H --peer-host host$((3 - H)) --secret-file $ALINK_SECRET --alink-path-timeout-ms 8000"
}
# ctl SOCKET REQUEST: one request of the components' control contract (xenft_control: JSON
# lines, version 1) on a control socket, e.g. ctl $CTL '{"op":"status"}'; the reply on stdout
# ({"v":1,"ok":{...}} or {"v":1,"err":{"kind":..,"message":..}})
ctl() { printf '{"v":1,"req":%s}\n' "$2" | socat -t 10 - "UNIX-CONNECT:$1" 2>/dev/null; }
# ctl_has SOCKET REQUEST PATTERN: the reply contains PATTERN (for wait_until)
ctl_has() { ctl "$1" "$2" | grep -q "$3"; }
# agent_config LEVEL VM_DRIVERS: writes /etc/xenft-agent.json for domu1 (primary h1, secondary
# h2): heartbeats and management on the lab wire, no quorum server (two-host rule), timing
# slowed for TCG, xenstore on, the real drivers; VM_DRIVERS is domu1's vm_drivers JSON object
AGENT_CFG=/etc/xenft-agent.json
agent_config() {
  _o=$((3 - H))
  mkdir -p /var/lib/xenft /run/xenft
  alink_args 7480 >/dev/null   # writes the pool secret
  cat > $AGENT_CFG <<JSON
{
  "host": "h$H",
  "secret_file": "$ALINK_SECRET",
  "state_file": "/var/lib/xenft/agent-state.json",
  "peers": [{
    "host": "h$_o",
    "alink": [{"local": "10.99.0.$H:7480", "peer": "10.99.0.$_o:7480"}],
    "mgmt": {"local": "10.99.0.$H:7482", "peer": "10.99.0.$_o:7482"}
  }],
  "timing": {"heartbeat_ms": 300, "path_down_ms": 3000, "peer_dead_ms": 6000,
             "lease_ms": 8000, "margin_ms": 2000, "quorum_request_timeout_ms": 1000},
  "status": {"listen": "127.0.0.1:7481"},
  "vms": [{"vm": "domu1", "level": $1, "primary": "h1", "secondary": "h2", "memory_mb": 128}],
  "free_memory_mb": 512,
  "xenstore": true,
  "drivers": "real",
  "vm_drivers": {"domu1": $2}
}
JSON
}
# The pool's xapi for registry-driven tests: the XenAPI test server on host 2's dom0 (the host
# that survives), h1 and h2 at their dom0 addresses, domu1 running on h1.
XAPI_URL=http://10.99.0.2:8080
XAPI_CRED=/etc/xenft/xapi-credentials
XAPI_PASS=/etc/xenft/xapi-password
xapi_files() { mkdir -p /etc/xenft; printf 'root\nxenroot\n' > $XAPI_CRED; echo xenroot > $XAPI_PASS; chmod 600 $XAPI_CRED $XAPI_PASS; }
# xenft ARGS...: the product's CLI against the pool's xapi
xenft_cli() { xenft --url $XAPI_URL -u root --password-file $XAPI_PASS "$@"; }
# xapi_agent_config DOMAINS_JSON: /etc/xenft-agent.json with host-local facts only — who this
# host is, where xapi is, the credential file, directories, timing slowed for TCG, the relay's
# uplink and vif name, and how domains run here (DOMAINS_JSON, the `xapi.domains` value). The
# pool (hosts, A-links, key) and the VMs to protect come from the registry in xapi.
xapi_agent_config() {
  xapi_files
  mkdir -p /var/lib/xenft /run/xenft
  cat > $AGENT_CFG <<JSON
{
  "host": "h$H",
  "secret_file": "/var/lib/xenft/pool-secret",
  "state_file": "/var/lib/xenft/agent-state.json",
  "timing": {"heartbeat_ms": 300, "path_down_ms": 3000, "peer_dead_ms": 6000,
             "lease_ms": 8000, "margin_ms": 2000, "quorum_request_timeout_ms": 1000},
  "status": {"listen": "127.0.0.1:7481"},
  "xapi": {
    "url": "$XAPI_URL",
    "credential_file": "$XAPI_CRED",
    "event_timeout_ms": 5000,
    "mgmt_port": 7482,
    "domains": $1,
    "components": {
      "run_dir": "/run/xenft",
      "disk_dir": "/var/lib/xenft/disks",
      "relay": {"uplink": "eth0", "vif_name": "xftvif0"},
      "alink_path_timeout_ms": 8000
    }
  }
}
JSON
}
# the agent's status (JSON, one line, no blanks after colons)
status() {
  printf 'GET /status HTTP/1.0\r\n\r\n' | socat -t 5 - TCP:127.0.0.1:7481 2>/dev/null |
    awk 'b { print } /^\r?$/ { b = 1 }' | tr -d '\r\n' | sed 's/": */":/g; s/  */ /g'
}
status_has() { status | grep -q "$1"; }
# the agent's take-over reason, from its decision log
takeover_reason() { status | grep -o '"reason":"[^"]*taking over[^"]*"' | tail -n 1; }
