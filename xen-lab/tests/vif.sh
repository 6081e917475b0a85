#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: the guest's vif through OUR netback relay: host 2 pings the guest on host 1 (vif not bridged, xenft-netback is its only path); relay frozen: silence; relay back: replies
# Host 1 creates the guest with a vif whose hotplug script only brings it up (no bridge) and
# runs `xenft-netback --vif vifD.0 --uplink eth0`. Host 2 pings the guest's address over the
# lab wire; host 1 answers a few requests on port 7603 (stop / cont the relay, its counters).
. /xentest/lib.sh "$@"
GUEST_IP=10.99.0.11
MAC=00:16:3e:00:99:11
NCTL=/run/xenft/net.ctl
mkdir -p /run/xenft

if [ "${3:-}" = serve ]; then   # host 1, one request per connection
  read -r req
  case $req in
    stop) kill -STOP "$(cat /run/xenft/netback.pid)" && echo stopped ;;
    cont) kill -CONT "$(cat /run/xenft/netback.pid)" && echo running ;;
    counters) ctl $NCTL '{"op":"counters"}' ;;
    done) touch /tmp/done; echo bye ;;
    diag)
      D=$(domid_of domu1)
      ctl $NCTL '{"op":"counters"}'; ip -s link show vif$D.0; ip -s link show eth0
      xenstore-ls -f /local/domain/0/backend/vif 2>&1 | grep -E 'state|hotplug|feature-rx|mac' | head -n 20
      tail -n 10 /tmp/netback.log; tail -n 8 $CON ;;
    *) echo "unknown request" ;;
  esac
  exit 0
fi

if [ "$H" = 1 ]; then
  xl create -q $CFG "extra=\"console=hvc0 loglevel=7 xenft_ip=$GUEST_IP/24\"" \
    "vif=['mac=$MAC,script=/etc/xen/scripts/vif-xenft']" || fail "xl create with a vif"
  D=$(domid_of domu1)
  wait_until 60 ip link show vif$D.0 || fail "no vif$D.0 in dom0"
  xenft-netback --vif vif$D.0 --uplink eth0 --mac $MAC --control $NCTL > /tmp/netback.log 2>&1 &
  echo $! > /run/xenft/netback.pid
  wait_until 30 test -S $NCTL || { cat /tmp/netback.log; fail "xenft-netback did not start"; }
  wait_until 120 grep -q DOMU-NET-UP $CON || { tail -n 20 $CON; fail "the guest's eth0 did not come up"; }
  say "guest domain $D up with $GUEST_IP on vif$D.0, relayed by xenft-netback"
  socat -t 30 TCP-LISTEN:7603,reuseaddr,fork SYSTEM:"/xentest/vif.sh 1 2 serve" &
  wait_until 900 test -e /tmp/done || fail "host 2 never finished"
  tail -n 5 /tmp/netback.log
  exit 0
fi

ask() { echo "$1" | socat -t 20 - TCP:$(peer):7603; }
# replies COUNT INTERVAL: how many of COUNT pings the guest answered
# (dom0 has busybox's ping, not iputils)
replies() { busybox ping -c "$1" -i "$2" $GUEST_IP 2>/dev/null | sed -n 's/.* \([0-9]*\) packets received.*/\1/p'; }
wait_peer 120 || fail "host 1 unreachable"
wait_until 300 busybox ping -c1 -W1 $GUEST_IP || { ask diag; ip neigh; fail "the guest on host 1 never answered a ping"; }
say "the guest answers through host 1's relay"
r=$(replies 10 1); result pings_answered "$r/10"
[ "$r" -ge 9 ] || fail "only $r of 10 pings answered"
busybox ping -c 3 $GUEST_IP | tail -n 2
say "relay frozen: $(ask stop)"
r=$(replies 4 1); result pings_answered_relay_frozen "$r/4"
[ "$r" = 0 ] || fail "$r pings answered with the relay frozen: the vif has another path"
say "relay resumed: $(ask cont)"
wait_until 30 busybox ping -c1 -W1 $GUEST_IP || fail "no reply after the relay resumed"
r=$(replies 6 1); result pings_answered_relay_back "$r/6"
[ "$r" -ge 5 ] || fail "only $r of 6 pings answered after the relay resumed"
c=$(ask counters); say "relay counters: $c"
tx=$(echo "$c" | sed -n 's/.*"to_uplink_frames":\([0-9]*\).*/\1/p')
rx=$(echo "$c" | sed -n 's/.*"to_vm_frames":\([0-9]*\).*/\1/p')
result relay_vm_to_uplink_frames "${tx:-?}"; result relay_uplink_to_vm_frames "${rx:-?}"
[ "${tx:-0}" -ge 16 ] && [ "${rx:-0}" -ge 16 ] || fail "relay counters do not show the pings: $c"
ask done >/dev/null
