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
last_tick() { sed -n 's/.*DOMU-TICK \([0-9]*\).*/\1/p' "${1:-$CON}" 2>/dev/null | tail -n1; }
peer() { if [ "$H" = 1 ]; then echo 10.99.0.2; else echo 10.99.0.1; fi; }
wait_peer() { wait_until "${1:-120}" busybox ping -c1 -W1 "$(peer)"; }
# ask scripts/xen-lab to kill this host's QEMU (a crash the guest cannot see coming)
crash_me() { say "asking for a crash"; sync; echo "XENLAB-KILL-HOST $H"; sleep 600; }
