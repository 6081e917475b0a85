#!/bin/sh
# xenlab-hosts: 2
# xenlab-about: the guest's disk: blkfront -> qemu-xen qdisk -> /dev/nbd0 -> OUR blkback NBD server, mirrored over the A-link to host 2; copies equal; host 1 killed: host 2 holds every acknowledged write and boots the guest from it
# Host 1 runs `xenft-blkback --role primary` (NBD on 127.0.0.1:10809, A-link to host 2), the
# kernel NBD client puts it on /dev/nbd0 (QEMU's xen-block opens only files and block devices:
# no NBD URL in `target=`), and the guest's disk is `backendtype=qdisk,target=/dev/nbd0`. The
# guest writes block k = "XENFT-BLOCK k" with fsync and prints DOMU-DISK-ACK k when the write
# is acknowledged. After 20 blocks host 1 pauses the guest and both hosts compare sha256 of
# their copies; then the guest writes on, host 1 streams every ack it sees to host 2 and is
# killed. Host 2: the secondary sees the primary gone, is promoted, holds blocks 0..last ack,
# and boots the guest from the promoted copy (the guest checks the pattern itself).
. /xentest/lib.sh "$@"
DISK=/var/lib/xenft/vm1.img
CTL=/run/xenft/blk.ctl
SIZE=32M
NBD=127.0.0.1:10809
mkdir -p /var/lib/xenft /run/xenft
ALINK=$(alink_args 7500)
blk() { ctl $CTL "{\"op\":\"$1\"}"; }
sum_of() { sha256sum < "$1" | cut -c1-64; }
# the blocks 0..n-1 of FILE that hold the pattern, n printed
pattern_prefix() {
  k=0
  while [ "$(dd if="$1" bs=4096 skip=$k count=1 2>/dev/null | head -n1)" = "$(printf 'XENFT-BLOCK %08d' $k)" ]; do
    k=$((k + 1))
  done
  echo $k
}
disk_of() { echo "disk=['format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=$1']"; }

# host 2 serves this on port 7601 during the comparison: reads "ACK SUM" of host 1, answers
if [ "${3:-}" = compare ]; then
  read -r ack theirs
  ours=$(sum_of $DISK); n=$(pattern_prefix $DISK)
  if [ "$ours" = "$theirs" ]; then echo "same $ours blocks=$n"; else echo "differ $ours blocks=$n"; fi
  echo "XENLAB compare at ack $ack: primary $theirs secondary $ours ($n pattern blocks)" > /dev/console
  exit 0
fi

if [ "$H" = 1 ]; then
  wait_peer 120 || fail "host 2 unreachable"
  xenft-blkback --role primary --disk $DISK --size $SIZE --nbd-tcp $NBD --control $CTL $ALINK \
    > /tmp/blk.log 2>&1 &
  wait_until 300 ctl_has $CTL '{"op":"status"}' '"peer":"in_sync"' ||
    { tail -n 20 /tmp/blk.log; blk status; fail "the mirror never reached in_sync"; }
  say "mirror in sync: $(blk status)"
  nbd-client 127.0.0.1 10809 /dev/nbd0 -N xenft -b 4096 || fail "nbd-client could not attach our NBD export"
  say "nbd0: $(cat /sys/block/nbd0/size) sectors"
  start_qdisk_backend
  xl create -q $CFG 'extra="console=hvc0 loglevel=7 xenft_disk=pattern"' "$(disk_of /dev/nbd0)" ||
    fail "xl create with the qdisk disk"
  wait_until 300 grep -q 'DOMU-DISK-ACK 19' $CON || { tail -n 20 $CON; fail "the guest did not write 20 blocks"; }
  # compare the copies: guest paused, in-flight requests given time to finish
  xl pause domu1; sleep 3
  a=$(last_ack); s=$(sum_of $DISK)
  say "guest paused after ack $a; primary copy sha256 $s"
  reply=$(echo "$a $s" | socat -t 60 - TCP:$(peer):7601) || fail "host 2 did not answer the comparison"
  say "host 2: $reply"
  result copies_equal_after_flush "$(echo "$reply" | cut -d' ' -f1)"
  case $reply in same*) ;; *) fail "the copies differ after a flush: $reply" ;; esac
  xl unpause domu1
  # every ack the guest prints goes to host 2 as it comes
  tail -n +1 -f $CON | grep --line-buffered 'DOMU-DISK-ACK' | socat -u - TCP:$(peer):7602 &
  wait_until 300 grep -q "DOMU-DISK-ACK $((a + 20))" $CON || { tail -n 20 $CON; fail "the guest stopped writing"; }
  say "mirror after the run: $(blk status)"
  echo "XENLAB-PRIMARY-LAST-ACK $(last_ack)"
  crash_me
fi

xenft-blkback --role secondary --disk $DISK --size $SIZE --nbd-tcp $NBD --control $CTL $ALINK \
  > /tmp/blk.log 2>&1 &
socat -u TCP-LISTEN:7602,reuseaddr OPEN:/tmp/acks,creat,append &
socat -t 120 TCP-LISTEN:7601,reuseaddr SYSTEM:"/xentest/mirror.sh 2 2 compare" &
wait_until 600 ctl_has $CTL '{"op":"status"}' '"connected":true' ||
  { tail -n 20 /tmp/blk.log; fail "host 1's primary never connected"; }
say "secondary connected: $(blk status)"
# the primary goes silent when host 1 dies: the A-link declares the path down (8 s here)
wait_until 900 test -s /tmp/acks || fail "no acknowledged write reached host 2's log"
wait_until 900 ctl_has $CTL '{"op":"status"}' '"connected":false' ||
  fail "the secondary never saw the primary go"
acked=$(last_ack /tmp/acks)
say "primary gone; last acknowledged block host 1 reported: $acked; $(blk status)"
p=$(blk promote); say "promote: $p"
echo "$p" | grep -q '"reply":"promoted"' || fail "promote refused: $p"
found=$(pattern_prefix $DISK)
result acked_before_crash $((acked + 1))
result blocks_on_copy "$found"
say "host 2's copy holds blocks 0..$((found - 1)); the guest had $((acked + 1)) acknowledged"
[ "$found" -gt "$acked" ] || fail "acknowledged writes missing: copy has $found blocks, block $acked was acknowledged"
# restart the guest here from the promoted copy (level 2 after a host loss), through qdisk again
nbd-client 127.0.0.1 10809 /dev/nbd0 -N xenft -b 4096 || fail "nbd-client on the promoted copy"
start_qdisk_backend
xl create -q $CFG 'extra="console=hvc0 loglevel=7 xenft_disk=verify"' "$(disk_of /dev/nbd0)" ||
  fail "xl create on host 2"
wait_until 300 grep -q 'DOMU-DISK-FOUND' $CON || { tail -n 20 $CON; fail "the restarted guest did not check its disk"; }
g=$(sed -n 's/.*DOMU-DISK-FOUND \([0-9]*\).*/\1/p' $CON | tail -n1)
result guest_found_blocks "$g"
say "the guest restarted on host 2 finds $g pattern blocks on its disk"
[ "$g" -gt "$acked" ] || fail "the restarted guest misses acknowledged blocks ($g found, $((acked + 1)) acknowledged)"
