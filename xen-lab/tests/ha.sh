#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: level 1 (basic HA) run by the product's xenft-agent on both dom0s (real xenstored): the guest runs on host 1, protected; host 1 killed: host 2's agent restarts it there with xl and says why
# Both dom0s run `xenft-agent` (heartbeats on the lab wire, xenstore on, the domain started
# by `xl create -F`, which lives as long as the domain). No quorum server: the lab has two
# machines; the agent takes over when the peer is silent on every path for peer_dead_ms.
# Timing is slowed for TCG (heartbeat 300 ms, peer dead after 6 s).
. /xentest/lib.sh "$@"
agent_config 1 "{\"domain\": {\"command\": [\"xl\", \"create\", \"-F\", \"$CFG\"]}}"
vm_state() { status | grep -o '"local":"[a-z_-]*"' | head -n1; }
# host 1: the operator's running guest, then protected (the agent takes the primary's VM as
# running, as `xenft vm-protect` of a running VM does)
if [ "$H" = 1 ]; then
  xl create -q $CFG || fail "xl create"
  wait_until 120 grep -q DOMU-TICK $CON || fail "the guest never ticked"
fi
xenft-agent --config $AGENT_CFG > /tmp/agent.log 2>&1 &
AP=$!
wait_until 30 status_has '"vms"' ||
  { tail -n 30 /tmp/agent.log; fail "xenft-agent did not start"; }
say "agent up: $(status | cut -c1-300)"

if [ "$H" = 1 ]; then
  say "guest domain $(domid_of domu1) runs; agent: $(vm_state)"
  wait_until 120 status_has '"phase":"protected"' ||
    { status; tail -n 30 /tmp/agent.log; fail "domu1 never protected"; }
  say "protected: $(status | grep -o '"record":{[^}]*}' | head -n1)"
  sleep 10
  status_has '"primary":"h1"' || { status; fail "the pool no longer records domu1 on h1 though it runs here"; }
  t=$(last_tick); echo "XENLAB-PRIMARY-LAST-TICK $t"
  crash_me
fi

# host 2: the reserved host; must not start the guest while host 1 runs it
wait_until 300 status_has '"primary":"h1"' ||
  { status; fail "host 2's agent never saw domu1 on h1"; }
say "host 2 sees domu1 on h1: $(vm_state)"
xl list | grep -q domu1 && fail "host 2 started domu1 while host 1 runs it"
wait_until 300 sh -c "! busybox ping -c1 -W2 10.99.0.1" || fail "host 1 never went away"
t0=$(cut -d' ' -f1 /proc/uptime)
say "host 1 is gone"
xl list | grep -q domu1 && fail "domu1 already ran here when host 1 stopped answering"
wait_until 120 sh -c "xl list | grep -q domu1" || { tail -n 30 /tmp/agent.log; status; fail "the agent did not restart domu1 here"; }
t1=$(cut -d' ' -f1 /proc/uptime)
wait_until 120 grep -q DOMU-TICK $CON || fail "the restarted guest does not run"
say "domu1 restarted here (domain $(domid_of domu1)) $(echo "$t1 $t0" | awk '{printf "%.1f", $1 - $2}') s after host 1 stopped answering pings; it boots and ticks"
st=$(status)
echo "$st" | grep -q '"primary":"h2"' || { echo "$st"; fail "the agent does not record domu1 on h2"; }
why=$(takeover_reason)
say "agent's decision: $why"
[ -n "$why" ] || { echo "$st"; fail "the agent's status gives no take-over reason"; }
result restart_after_ping_loss_s "$(echo "$t1 $t0" | awk '{printf "%.1f", $1 - $2}')"
result vm_state_h2 "$(vm_state)"
kill -0 $AP || fail "the agent died"
