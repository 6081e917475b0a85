#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: level 2 asked for through XenAPI only: the XenAPI test server is the pool's xapi, `xenft pool-init` and `xenft vm-protect level=2`, the agents (host-local config only) start the mirror and the relay themselves; host 1 killed: host 2's agent promotes the copy, restarts the guest with xl, which finds every acknowledged block, and the relay announces it
# The pool's xapi is `xenft-fake-xapi` on host 2's dom0 (the host that survives): hosts h1 and
# h2 at their dom0 addresses, domu1 (128 MiB, a 32 MiB disk, one vif) running on h1. Host 2
# runs `xenft pool-init` (the A-links on the lab wire; no quorum server: two-host rule) and
# `xenft vm-protect vm=domu1 level=2 secondary=h2`. Each dom0 runs `xenft-agent` with
# host-local facts only (lib.sh `xapi_agent_config`); from the registry each agent starts
# domu1's `xenft-blkback` (primary on h1, secondary on h2) and `xenft-netback` on the vif
# `xftvif0` itself. Domains go through xl: the agent's domain template is this script's
# `start-domu {nbd} {mac}` (attach the VM's mirror export on /dev/nbd0, `xl create -F`), with
# `xl pause|unpause|destroy {name}` for fencing; the operator starts domu1 on host 1 the same
# way. The guest writes fsync'd pattern blocks (DOMU-DISK-ACK k), host 1 streams the acks to
# host 2 and is killed.
. /xentest/lib.sh "$@"
GUEST_IP=10.99.0.11
MAC=00:16:3e:00:99:11
ACK_PORT=7590

if [ "${3:-}" = start-domu ]; then   # the agent's domain command (also the operator's on host 1)
  nbd=$4; mac=$5
  wait_until 10 test -S "$nbd" || { echo "no NBD export at $nbd"; exit 1; }
  nbd-client -c /dev/nbd0 >/dev/null 2>&1 ||
    nbd-client -u "$nbd" /dev/nbd0 -N xenft -b 4096 || exit 1
  exec xl create -F $CFG "extra=\"console=hvc0 loglevel=7 xenft_ip=$GUEST_IP/24 xenft_disk=pattern\"" \
    "disk=['format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=/dev/nbd0']" \
    "vif=['mac=$mac,script=/etc/xen/scripts/vif-xenft,vifname=xftvif0']"
fi

start_qdisk_backend
xapi_agent_config "{\"command\": {
    \"start\": [\"/xentest/level2.sh\", \"$H\", \"2\", \"start-domu\", \"{nbd}\", \"{mac}\"],
    \"pause\": [\"xl\", \"pause\", \"{name}\"], \"resume\": [\"xl\", \"unpause\", \"{name}\"],
    \"destroy\": [\"xl\", \"destroy\", \"{name}\"]}}"
# the VM's runtime directory, made by the agent (its uuid comes from xapi)
vm_dir() { dirname "$(ls /run/xenft/*/blkback.sock 2>/dev/null | head -n1)"; }
has_vm_dir() { ls /run/xenft/*/blkback.sock >/dev/null 2>&1; }
# where xapi records domu1 and its copy: "HOST SECONDARY STATE..." (xenft vm-status's columns)
registry() { xenft_cli vm-status vm=domu1 2>/dev/null | awk '$1 == "domu1" { s = $3 " " $5; for (i = 6; i <= NF; i++) s = s " " $i; print s }'; }

if [ "$H" = 1 ]; then
  wait_peer 120 || fail "host 2 unreachable"
  xenft-agent --config $AGENT_CFG > /tmp/agent.log 2>&1 &
  wait_until 600 has_vm_dir ||
    { tail -n 30 /tmp/agent.log; fail "the agent never started domu1's mirror"; }
  D=$(vm_dir); say "the agent started domu1's components in $D: $(ls $D | tr '\n' ' ')"
  wait_until 300 ctl_has $D/blkback.sock '{"op":"status"}' '"peer":"in_sync"' ||
    { tail -n 20 $D/blkback.log; fail "the mirror never reached in_sync"; }
  # the operator runs the VM on its mirrored disk, as the agent's template would
  /xentest/level2.sh 1 2 start-domu $D/nbd.sock $MAC > /tmp/xl.log 2>&1 &
  wait_until 300 grep -q 'DOMU-DISK-ACK 5' $CON || { tail -n 20 $CON; cat /tmp/xl.log; fail "the guest does not write"; }
  wait_until 300 status_has '"phase":"protected"' || { status; tail -n 30 /tmp/agent.log; fail "domu1 never protected"; }
  say "protected: $(status | grep -o '"record":{[^}]*}' | head -n1)"
  tail -n +1 -f $CON | grep --line-buffered 'DOMU-DISK-ACK' | socat -u - TCP:$(peer):$ACK_PORT &
  a=$(last_ack)
  wait_until 300 grep -q "DOMU-DISK-ACK $((a + 25))" $CON || fail "the guest stopped writing"
  status_has '"primary":"h1"' || { status; fail "the pool no longer records domu1 on h1"; }
  echo "XENLAB-PRIMARY-LAST-ACK $(last_ack)"
  crash_me
fi

socat -u TCP-LISTEN:$ACK_PORT,reuseaddr OPEN:/tmp/acks,creat,append &
xenft-fake-xapi --listen 10.99.0.2:8080 --password-file $XAPI_PASS --host h1=10.99.0.1 \
  --host h2=10.99.0.2 --vm "domu1:128,disk=33554432,mac=$MAC" > /tmp/xapi.log 2>&1 &
wait_until 60 xenft_cli host-list || { cat /tmp/xapi.log; fail "the pool's xapi does not answer"; }
# the pool's A-link key, kept by xapi as a secret; the agents read it from there
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > $ALINK_SECRET
xenft_cli pool-init alink:h1=10.99.0.1:7500 alink:h2=10.99.0.2:7500 secret-file=$ALINK_SECRET ||
  fail "xenft pool-init"
xenft-agent --config $AGENT_CFG > /tmp/agent.log 2>&1 &
wait_peer 120 || fail "host 1 unreachable"
t0=$(cut -d' ' -f1 /proc/uptime)
xenft_cli vm-protect vm=domu1 level=2 secondary=h2 || fail "xenft vm-protect"
say "asked through XenAPI: xenft vm-protect vm=domu1 level=2 secondary=h2"
protected() { registry | grep -q ' protected'; }
wait_until 600 protected || { xenft_cli vm-status vm=domu1; status; tail -n 30 /tmp/agent.log; fail "xenft vm-status never said protected"; }
t1=$(cut -d' ' -f1 /proc/uptime)
result protect_s "$(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}')"
say "xenft vm-status: $(xenft_cli vm-status vm=domu1 | tr '\n' ' ')"
D=$(vm_dir)
wait_until 60 status_has '"phase":"protected"' || { status; tail -n 30 /tmp/agent.log; fail "host 2 never saw domu1 protected"; }
say "host 2 sees domu1 protected on h1; disk: $(ctl $D/blkback.sock '{"op":"status"}' | cut -c1-200)"
xl list | grep -q domu1 && fail "host 2 runs domu1 while host 1 does"
wait_until 300 busybox ping -c1 -W2 $GUEST_IP || fail "the guest on host 1 does not answer through its relay"
say "the guest answers pings through host 1's relay"
wait_until 900 test -s /tmp/acks || fail "no acknowledged write reached host 2"
wait_until 900 sh -c "! busybox ping -c1 -W2 10.99.0.1" || fail "host 1 never went away"
acked=$(last_ack /tmp/acks)
say "host 1 is gone; last acknowledged block it reported: $acked"
wait_until 120 sh -c "xl list | grep -q domu1" || { tail -n 30 /tmp/agent.log; status; fail "the agent did not restart domu1 here"; }
wait_until 300 grep -q 'DOMU-DISK-FOUND' $CON || { tail -n 20 $CON; tail -n 20 /tmp/agent.log; fail "the restarted guest did not check its disk"; }
g=$(sed -n 's/.*DOMU-DISK-FOUND \([0-9]*\).*/\1/p' $CON | tail -n1)
result acked_before_crash $((acked + 1))
result blocks_on_copy "$g"
say "the guest restarted here finds $g pattern blocks; $((acked + 1)) were acknowledged on host 1"
[ "$g" -gt "$acked" ] || fail "acknowledged blocks missing: found $g, block $acked was acknowledged"
wait_until 60 grep -q "DOMU-DISK-ACK $g" $CON || fail "the restarted guest cannot write its disk"
st=$(status)
echo "$st" | grep -q '"primary":"h2"' || { echo "$st"; fail "the agent does not record domu1 on h2"; }
why=$(takeover_reason)
say "agent's decision: $why"
[ -n "$why" ] || fail "no take-over reason in the agent's status"
say "xenft vm-status after the take-over: $(registry)"
registry | grep -q '^h2 h1 ' || fail "xapi does not record domu1 on h2 with its copy on h1: $(registry)"
c=$(ctl $D/netback.sock '{"op":"counters"}'); say "relay: $c"
ann=$(echo "$c" | sed -n 's/.*"announcements_sent":\([0-9]*\).*/\1/p')
result relay_announcements "${ann:-?}"
[ "${ann:-0}" -gt 0 ] || fail "the relay did not announce the guest after the take-over"
echo "$c" | grep -q '"vif_bound":true' || fail "the relay is not bound to the restarted guest's vif"
say "disk after the take-over: $(ctl $D/blkback.sock '{"op":"status"}' | cut -c1-200)"
