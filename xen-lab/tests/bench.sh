#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: benchmark: our engine then xl remus on the same PVH guest, same epoch interval; checkpoints/s and suspended time per checkpoint
# Both are timed by the same outside instrument (xenft-xen-lab suspend-watch polls the
# domain's SHUTDOWN_suspend state), over the same run length, one after the other.
. /xentest/lib.sh "$@"
EPOCH_MS=${BENCH_EPOCH_MS:-500}
SECS=${BENCH_SECS:-60}
LINK="--local-ip 10.99.0.$H --peer-ip $(peer) --port 7400"
if [ "$H" = 1 ]; then
  xl create -q $CFG || fail "xl create"
  wait_until 120 grep -q DOMU-TICK $CON || fail "guest never ticked"
  D=$(domid_of domu1)
  wait_peer 120 || fail "host 2 unreachable"
  say "ours: protecting domain $D for $SECS s"
  xenft-xen-lab protect "$D" --me host1 --peer host2 $LINK --epoch-ms "$EPOCH_MS" --run-secs "$SECS" > /tmp/protect.log 2>&1 &
  P=$!
  tail -f /tmp/protect.log &
  wait_until 600 grep -q "phase=Protected" /tmp/protect.log || { cat /tmp/protect.log; fail "ours: no checkpoint committed"; }
  xenft-xen-lab suspend-watch "$D" --secs "$((SECS - 5))" --label ours
  wait $P || { tail -n 20 /tmp/protect.log; fail "ours: protect failed"; }
  grep -a "XENLAB" /tmp/protect.log | tail -n 6
  say "remus: waiting for host 2's receiver"
  wait_until 300 sh -c "echo | socat - TCP:10.99.0.2:8003,connect-timeout=1" || fail "no remus receiver"
  say "remus: starting"
  xl remus -i "$EPOCH_MS" -F -n -d -s "" domu1 "socat - TCP:10.99.0.2:8003" > /tmp/remus.log 2>&1 &
  R=$!
  tail -f /tmp/remus.log &
  # remus starts with a full copy; time it once it checkpoints
  wait_until 300 sh -c "xenft-xen-lab suspend-watch $D --secs 2 --label probe | grep -q 'probe_suspends=[1-9]'" || fail "remus never checkpointed"
  xenft-xen-lab suspend-watch "$D" --secs "$((SECS - 5))" --label remus
  tail -n 5 /tmp/remus.log
  say "bench done"
  echo "XENLAB-BENCH-DONE"
  crash_me
fi
xl create -q -p $CFG || fail "xl create -p (replica)"
D=$(domid_of domu1)
xenft-xen-lab replica "$D" --me host2 --peer host1 $LINK --timeout 1500 --no-failover > /tmp/replica.log 2>&1 &
RP=$!
tail -f /tmp/replica.log &
TP=$!
wait $RP ||
  { tail -n 20 /tmp/replica.log; fail "replica"; }
kill $TP
grep -a XENLAB /tmp/replica.log | tail -n 3
xl destroy domu1
wait_until 30 sh -c "! xl list | grep -q domu1"
xl list
mkfifo /tmp/rfifo; trap "" PIPE
socat TCP-LISTEN:8003,reuseaddr - </dev/null >/dev/null
socat -T 30 TCP-LISTEN:8003,reuseaddr STDIO < /tmp/rfifo | xl migrate-receive -r > /tmp/rfifo 2>/tmp/recv.err &
say "remus receiver listening"
# the verdict does not wait for remus's failover (socat's timeout on a half-open TCP
# connection): the receiver is done once its checkpoint count stops growing for 20 s
last=-1; same=0; i=0
while [ $i -lt 120 ]; do
  sleep 5; i=$((i + 1))
  n=$(grep -c 'All records processed' /tmp/recv.err)
  if [ "$n" -gt 0 ] && [ "$n" = "$last" ]; then same=$((same + 1)); else same=0; fi
  last=$n
  [ $same -ge 4 ] && break
done
say "remus receiver done"
tail -n 5 /tmp/recv.err
echo "XENLAB-RESULT remus_receiver_checkpoints=$n"
[ "$n" -gt 0 ] || fail "xl remus never checkpointed"
