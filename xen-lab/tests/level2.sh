#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: level 2 run by the product's agent: the guest's disk (qdisk -> our blkback, mirrored) and vif (our netback) on host 1; host 1 killed: host 2's agent promotes the copy, restarts the guest, which finds every acknowledged block, and the relay announces it
# Each dom0 runs the VM's components the way a host would start them: xenft-blkback (primary
# on host 1, secondary on host 2, A-link on the lab wire), qemu-xen for qdisk, xenft-netback
# on the vif `xftvif0` (a fixed `vifname`; on host 2 it waits for the vif to appear) and
# xenft-agent with the real drivers (level 2, no quorum server: two-host rule, slowed timing).
# The agent's domain command is this script's `start-domu`: attach the NBD export on
# /dev/nbd0 and run the guest with `xl create -F`. The guest writes fsync'd pattern blocks
# (DOMU-DISK-ACK k), host 1 streams the acks to host 2 and is killed.
. /xentest/lib.sh "$@"
DISK=/var/lib/xenft/vm1.img
BCTL=/run/xenft/blk.ctl
NCTL=/run/xenft/net.ctl
MAC=00:16:3e:00:99:11
GUEST_IP=10.99.0.11

if [ "${3:-}" = start-domu ]; then   # the agent's domain command (also the operator's on host 1)
  nbd-client -c /dev/nbd0 >/dev/null 2>&1 ||
    nbd-client 127.0.0.1 10809 /dev/nbd0 -N xenft -b 4096 || exit 1
  exec xl create -F $CFG "extra=\"console=hvc0 loglevel=7 xenft_ip=$GUEST_IP/24 xenft_disk=pattern\"" \
    "disk=['format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=/dev/nbd0']" \
    "vif=['mac=$MAC,script=/etc/xen/scripts/vif-xenft,vifname=xftvif0']"
fi

mkdir -p /var/lib/xenft /run/xenft
if [ "$H" = 1 ]; then ROLE=primary; else ROLE=secondary; fi
xenft-blkback --role $ROLE --disk $DISK --size 32M --nbd-tcp 127.0.0.1:10809 --control $BCTL \
  $(alink_args 7500) > /tmp/blk.log 2>&1 &
start_qdisk_backend
xenft-netback --vif xftvif0 --uplink eth0 --mac $MAC --control $NCTL > /tmp/netback.log 2>&1 &
wait_until 30 test -S $NCTL || { tail -n 20 /tmp/netback.log; fail "xenft-netback did not start (no vif yet)"; }
agent_config 2 "{
    \"domain\": {\"command\": [\"/xentest/level2.sh\", \"$H\", \"2\", \"start-domu\"]},
    \"blkback\": {\"control\": \"$BCTL\", \"sync_timeout_ms\": 300000, \"request_timeout_ms\": 20000},
    \"netback\": {\"control\": \"$NCTL\", \"addresses\": [\"$GUEST_IP\"], \"request_timeout_ms\": 20000}
  }"

if [ "$H" = 1 ]; then
  wait_peer 120 || fail "host 2 unreachable"
  wait_until 300 ctl_has $BCTL '{"op":"status"}' '"peer":"in_sync"' ||
    { tail -n 20 /tmp/blk.log; fail "the mirror never reached in_sync"; }
  # the operator runs the VM, then the agent protects it
  /xentest/level2.sh 1 2 start-domu > /tmp/xl.log 2>&1 &
  wait_until 300 grep -q 'DOMU-DISK-ACK 5' $CON || { tail -n 20 $CON; cat /tmp/xl.log; fail "the guest does not write"; }
  xenft-agent --config $AGENT_CFG > /tmp/agent.log 2>&1 &
  wait_until 300 status_has '"phase":"protected"' || { status; tail -n 30 /tmp/agent.log; fail "domu1 never protected"; }
  say "protected: $(status | grep -o '"record":{[^}]*}' | head -n1)"
  tail -n +1 -f $CON | grep --line-buffered 'DOMU-DISK-ACK' | socat -u - TCP:$(peer):7602 &
  a=$(last_ack)
  wait_until 300 grep -q "DOMU-DISK-ACK $((a + 25))" $CON || fail "the guest stopped writing"
  status_has '"primary":"h1"' || { status; fail "the pool no longer records domu1 on h1"; }
  echo "XENLAB-PRIMARY-LAST-ACK $(last_ack)"
  crash_me
fi

socat -u TCP-LISTEN:7602,reuseaddr OPEN:/tmp/acks,creat,append &
xenft-agent --config $AGENT_CFG > /tmp/agent.log 2>&1 &
wait_until 600 status_has '"phase":"protected"' || { status; tail -n 30 /tmp/agent.log; fail "host 2 never saw domu1 protected"; }
say "host 2 sees domu1 protected on h1; disk: $(ctl $BCTL '{"op":"status"}' | cut -c1-200)"
xl list | grep -q domu1 && fail "host 2 runs domu1 while host 1 does"
wait_until 120 busybox ping -c1 -W2 $GUEST_IP || fail "the guest on host 1 does not answer through its relay"
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
c=$(ctl $NCTL '{"op":"counters"}'); say "relay: $c"
ann=$(echo "$c" | sed -n 's/.*"announcements_sent":\([0-9]*\).*/\1/p')
result relay_announcements "${ann:-?}"
[ "${ann:-0}" -gt 0 ] || fail "the relay did not announce the guest after the take-over"
echo "$c" | grep -q '"vif_bound":true' || fail "the relay is not bound to the restarted guest's vif"
say "disk after the take-over: $(ctl $BCTL '{"op":"status"}' | cut -c1-200)"
