#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: the product's xenft-checkpoint protects the PVH guest from host 1 to host 2 over the A-link; host 1's QEMU is killed; the replica runs on
# Host 1 (primary) runs the guest and `xenft-checkpoint primary --xen-domid D` (cooperative-
# suspend checkpoints, A-link on the lab wire); host 2 builds a paused replica with
# `xl create -p` and runs `xenft-checkpoint secondary --xen-domid D`, which fails over by
# itself once the link has had no live path for the path timeout after a committed checkpoint.
# PASS: the replica runs and its counter continues (first tick after the failover > 1).
. /xentest/lib.sh "$@"
EPOCH_MS=${CKPT_EPOCH_MS:-500}
RUNFOR=${CKPT_RUN_SECS:-60}
ALINK="$(alink_args 7400) $(alink_args 7401 | sed 's/ --host.*//')"
if [ "$H" = 1 ]; then
  xl create -q $CFG || fail "xl create"
  wait_until 120 grep -q DOMU-TICK $CON || fail "guest never ticked"
  D=$(domid_of domu1)
  wait_peer 120 || fail "host 2 unreachable"
  say "protecting domain $D, tick $(last_tick)"
  xenft-checkpoint primary --xen-domid "$D" --epoch-ms "$EPOCH_MS" $ALINK > /tmp/protect.log 2>&1 &
  P=$!
  # protection starts after pre-copy; then run for RUNFOR seconds
  wait_until 600 grep -q "pre-copy done" /tmp/protect.log || { tail -n 30 /tmp/protect.log; fail "pre-copy never ended"; }
  say "protected (pre-copy done), tick $(last_tick)"
  sleep "$RUNFOR"
  kill -0 $P 2>/dev/null || { tail -n 30 /tmp/protect.log; fail "protection ended early"; }
  grep -a "commit" /tmp/protect.log | tail -n 2
  tail -n 2 $CON
  t=$(last_tick); say "primary last tick $t"
  echo "XENLAB-PRIMARY-LAST-TICK $t"
  crash_me
fi
xl create -q -p $CFG || fail "xl create -p (replica)"
D=$(domid_of domu1); say "replica is domain $D (paused)"
xenft-checkpoint secondary --xen-domid "$D" $ALINK > /tmp/replica.out 2> /tmp/replica.log &
RP=$!
wait_until 1500 grep -q failover_epoch /tmp/replica.out || { tail -n 30 /tmp/replica.log; fail "no failover"; }
grep -a -i 'applied\|failover\|gone' /tmp/replica.log | tail -n 5
kill -0 $RP 2>/dev/null || fail "xenft-checkpoint secondary exited after the failover (it must keep the domain)"
out=$(cat /tmp/replica.out); say "failover: $out"
result failover_epoch "$(echo "$out" | sed -n 's/.*"failover_epoch":\([0-9]*\).*/\1/p')"
result applied_epochs "$(echo "$out" | sed -n 's/.*"applied_epochs":\([0-9]*\).*/\1/p')"
xl list
n0=$(grep -c DOMU-TICK $CON)
for i in 1 2 3 4; do
  sleep 5
  say "replica vCPU after failover ($i):"
  xenctx -s /domu/System.map -S "$D" 0 2>&1 | head -n 30
done
sleep 5
xl list
xl dmesg | tail -n 20
tail -n 8 $CON
first=$(sed -n 's/.*DOMU-TICK \([0-9]*\).*/\1/p' $CON | sed -n "$((n0 + 1))p")
t=$(last_tick)
say "replica ticks after failover: first $first, last $t"
echo "XENLAB-RESULT replica_first_tick=$first"
echo "XENLAB-SECONDARY-LAST-TICK $t"
[ -n "$first" ] || fail "the replica printed no tick after the failover"
[ "$first" -gt 1 ] || fail "the counter restarted"
