#!/bin/sh
# xenft's post-install step, shared by the .deb (postinst configure) and the .rpm (%post).
# It creates what the agent needs and never overwrites anything that exists: an upgrade or a
# re-install keeps the administrator's configuration, credentials and keys untouched.
#   /etc/xenft                 0700  configuration, credentials, the pool's A-link key
#   /var/lib/xenft, ./disks    0700  the agent's state, the disk copies
#   /run/xenft                 0700  per-VM runtime directories (also by tmpfiles.d)
#   /etc/xenft/agent.json      on an xapi host (XCP-ng / XenServer) only: the agent following
#                              the pool's registry through xapi's local socket, named after
#                              this host; on other hosts, see /usr/share/doc/xenft/
#   /etc/xenft/xapi-credentials  on an xapi host only: dom0's local login (root, empty
#                              password: xapi's local socket trusts dom0's root), mode 0600
#   /usr/libexec/xapi-storage-script/{volume/org.xen.xapi.storage.xenft,datapath/xenft}/
#                              on an xapi host with SMAPIv3 only: the xenft SR's plugin
#                              scripts, symlinks named after the methods to
#                              /usr/libexec/xenft/xenft-sr (xapi-storage-script runs the
#                              script named after each call); existing entries are kept
# XENFT_ROOT prefixes every path (tests install into a scratch root).
set -eu
R=${XENFT_ROOT:-}

mkdir -p "$R/etc/xenft" "$R/var/lib/xenft/disks" "$R/run/xenft"
chmod 0700 "$R/etc/xenft" "$R/var/lib/xenft" "$R/var/lib/xenft/disks" "$R/run/xenft"

if [ -S "$R/var/lib/xcp/xapi" ]; then
  if [ ! -e "$R/etc/xenft/xapi-credentials" ]; then
    umask 077
    printf 'root\n\n' > "$R/etc/xenft/xapi-credentials"
    echo "xenft: created /etc/xenft/xapi-credentials (dom0's local login to xapi)"
  fi
  if [ ! -e "$R/etc/xenft/agent.json" ]; then
    host=$(hostname 2>/dev/null || echo localhost)
    sed "s/@HOSTNAME@/$host/" "$R/usr/share/xenft/agent-xapi.json" > "$R/etc/xenft/agent.json"
    chmod 0600 "$R/etc/xenft/agent.json"
    echo "xenft: created /etc/xenft/agent.json for host $host (check that xapi names this host so)"
  fi
  SS="$R/usr/libexec/xapi-storage-script"
  if [ -d "$SS" ]; then
    vol="$SS/volume/org.xen.xapi.storage.xenft"
    dp="$SS/datapath/xenft"
    mkdir -p "$vol" "$dp"
    for m in Plugin.Query Plugin.diagnostics SR.create SR.attach SR.detach SR.destroy SR.stat \
             SR.ls SR.set_name SR.set_description Volume.create Volume.destroy Volume.resize \
             Volume.stat Volume.set_name Volume.set_description Volume.set Volume.unset; do
      [ -e "$vol/$m" ] || [ -L "$vol/$m" ] || ln -s /usr/libexec/xenft/xenft-sr "$vol/$m"
    done
    for m in Plugin.Query Datapath.open Datapath.attach Datapath.activate Datapath.deactivate \
             Datapath.detach Datapath.close; do
      [ -e "$dp/$m" ] || [ -L "$dp/$m" ] || ln -s /usr/libexec/xenft/xenft-sr "$dp/$m"
    done
    echo "xenft: installed the xenft SR plugin (SR type xenft); configure /etc/xenft/sr.json"
  fi
else
  echo "xenft: no xapi on this host: write /etc/xenft/agent.json yourself (see /usr/share/doc/xenft/README.md)"
fi

if [ -z "$R" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemd-tmpfiles --create /usr/lib/tmpfiles.d/xenft.conf >/dev/null 2>&1 || true
  systemctl daemon-reload || true
  echo "xenft: start the agent with: systemctl enable --now xenft-agent"
fi
exit 0
