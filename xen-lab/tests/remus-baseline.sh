#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: xl remus of the PVH guest from host 1 to host 2; host 1's QEMU is killed; the guest counts on on host 2
# Host 1 (primary) creates the guest and protects it with `xl remus` over TCP on the lab wire;
# host 2 (secondary) receives with `xl migrate-receive -r`, and once host 1 is gone the replica
# must run and keep counting past the last tick host 1 showed.
. /xentest/lib.sh "$@"
INTERVAL=${REMUS_INTERVAL_MS:-500}
RUNFOR=${REMUS_RUN_SECS:-60}
if [ "$H" = 1 ]; then
  xl create -q $CFG || fail "xl create"
  wait_until 120 grep -q DOMU-TICK $CON || fail "guest never ticked"
  wait_peer 120 || fail "host 2 unreachable"
  wait_until 60 sh -c "echo | socat - TCP:10.99.0.2:8003,connect-timeout=1" || true
  say "xl remus start, tick $(last_tick)"
  # no disk replication (-n: no network buffering, the guest has no vif); socat over TCP, no ssh
  xl remus -i "$INTERVAL" -F -n -d -s "" domu1 "socat - TCP:10.99.0.2:8003" > /tmp/remus.log 2>&1 &
  sleep "$RUNFOR"
  tail -n 20 /tmp/remus.log
  t=$(last_tick); say "primary last tick $t"
  echo "XENLAB-PRIMARY-LAST-TICK $t"
  crash_me
fi
# host 2: secondary. socat -T is the only failure detector xl remus has; a fifo (not socat EXEC)
# keeps xl alive when socat exits, and SIGPIPE is ignored so it can fail over.
mkfifo /tmp/rfifo; trap "" PIPE
# the first connection is host 1's reachability check: let it pass
socat TCP-LISTEN:8003,reuseaddr - </dev/null >/dev/null
socat -T "${REMUS_TIMEOUT:-5}" TCP-LISTEN:8003,reuseaddr STDIO < /tmp/rfifo | xl migrate-receive -r > /tmp/rfifo 2>/tmp/recv.err &
wait_until 400 sh -c "xl list | grep -q domu1" || fail "replica never appeared"
say "replica appeared"; xl list
wait; say "migrate-receive finished (primary gone)"
cat /tmp/recv.err | tail -n 20
xl list
sleep 25
ls /var/log/xen/console/
CON2=$(ls /var/log/xen/console/guest-domu1*.log | tail -n 1)
tail -n 5 "$CON2"
t=$(last_tick "$CON2")
first=$(sed -n 's/.*DOMU-TICK \([0-9]*\).*/\1/p' "$CON2" | head -n 1)
say "secondary ticks: first $first, last $t"
echo "XENLAB-RESULT remus_receiver_checkpoints=$(grep -c 'All records processed' /tmp/recv.err)"
echo "XENLAB-SECONDARY-LAST-TICK $t"
xl list | grep -q domu1 || fail "no domu1 on host 2"
[ -n "$t" ] || fail "the failed-over guest printed no tick"
[ "$first" -gt 1 ] || fail "the counter restarted"
