#!/bin/sh
# xenlab-hosts: 1
# xenlab-about: checkpoint engine's Xen domain backend on a running PVH guest: pause, log-dirty, page mapping, vCPU context
. /xentest/lib.sh "$@"
xl create -q $CFG || fail "xl create"
wait_until 120 grep -q DOMU-TICK $CON || fail "guest never ticked"
D=$(domid_of domu1); say "domu1 is domain $D, tick $(last_tick)"
xenft-xen-lab domain "$D" --run-secs 4 || fail "domain probe"
sleep 5
t=$(last_tick); say "guest tick after the probe: $t"
xenft-xen-lab domain "$D" --run-secs 4 || fail "domain probe (second run)"
sleep 5; [ "$(last_tick)" -gt "$t" ] || fail "the guest stopped ticking after the probe"
tail -n 3 $CON
xl destroy domu1
