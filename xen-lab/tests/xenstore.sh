#!/bin/sh
# xenlab-hosts: 1
# xenlab-about: agent's xenstore backend vs real xenstored: domain introduce/release, device nodes, transactions
. /xentest/lib.sh "$@"
xenft-xen-lab xenstore --name domu1 --timeout 240 > /tmp/probe.log 2>&1 &
P=$!
wait_until 30 grep -q "watches armed" /tmp/probe.log || { cat /tmp/probe.log; fail "probe did not arm its watches"; }
say "xl create"
xl create -q $CFG || fail "xl create"
wait_until 120 grep -q DOMU-TICK $CON || say "no guest tick yet"
say "guest tick $(last_tick)"
xl destroy domu1 || fail "xl destroy"
wait $P; rc=$?
cat /tmp/probe.log
[ $rc = 0 ] || fail "probe rc=$rc"
grep -q "xenstore: OK" /tmp/probe.log || fail "probe did not finish"
say "xenstore probe passed"
