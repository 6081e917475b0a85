#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: OUR checkpoint engine protects the PVH guest from host 1 to host 2 over the A-link; host 1's QEMU is killed; the replica runs on
# Host 1 (primary) runs the guest and `xenft-xen-lab protect` (cooperative-suspend checkpoints,
# A-link on the lab wire); host 2 builds a paused replica with `xl create -p` and runs
# `xenft-xen-lab replica`, which fails over when the link stays down. PASS: the replica runs and
# its counter continues (first tick after the failover > 1).
. /xentest/lib.sh "$@"
EPOCH_MS=${CKPT_EPOCH_MS:-500}
RUNFOR=${CKPT_RUN_SECS:-60}
LINK="--local-ip 10.99.0.$H --peer-ip $(peer) --port 7400"
if [ "$H" = 1 ]; then
  xl create -q $CFG || fail "xl create"
  wait_until 120 grep -q DOMU-TICK $CON || fail "guest never ticked"
  D=$(domid_of domu1)
  wait_peer 120 || fail "host 2 unreachable"
  say "protecting domain $D, tick $(last_tick)"
  xenft-xen-lab protect "$D" --me host1 --peer host2 $LINK --epoch-ms "$EPOCH_MS" > /tmp/protect.log 2>&1 &
  P=$!
  tail -f /tmp/protect.log &
  # protection starts after pre-copy; then run for RUNFOR seconds
  wait_until 600 grep -q "phase=Protected" /tmp/protect.log || { cat /tmp/protect.log; fail "no checkpoint committed"; }
  say "protected, tick $(last_tick)"
  sleep "$RUNFOR"
  kill -0 $P 2>/dev/null || { cat /tmp/protect.log; fail "protection ended early"; }
  grep -a "XENLAB protect" /tmp/protect.log | tail -n 3
  grep -a "XENLAB-RESULT" /tmp/protect.log | tail -n 3
  tail -n 2 $CON
  t=$(last_tick); say "primary last tick $t"
  echo "XENLAB-PRIMARY-LAST-TICK $t"
  crash_me
fi
xl create -q -p $CFG || fail "xl create -p (replica)"
D=$(domid_of domu1); say "replica is domain $D (paused)"
xenft-xen-lab replica "$D" --me host2 --peer host1 $LINK --timeout 1500 > /tmp/replica.log 2>&1 &
RP=$!
tail -f /tmp/replica.log &
TP=$!
wait $RP
rc=$?
kill $TP
grep -a "XENLAB" /tmp/replica.log | tail -n 8
[ $rc = 0 ] || { tail -n 30 /tmp/replica.log; fail "replica rc=$rc"; }
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
