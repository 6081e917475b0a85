# scripts/lib/deps.sh: sourced by scripts/test, scripts/bench, scripts/demo and scripts/xen-lab.
#
# deps_missing FILE...      prints the Debian packages whose command is missing, from
#                           scripts/deps/*.apt lists ("<command> <debian-package>" per line)
# deps_install WHO FILE...  installs them (apt_install_safe), then checks every command is
#                           there; fails with a message naming the missing tool
# apt_install_safe WHO PKG...
#                           installs Debian packages, never removing or downgrading a package
#                           the machine has: a simulation first names what would be removed or
#                           downgraded and stops; the real install runs with --no-remove and
#                           without --allow-downgrades, so apt itself refuses both as well.
#
# Why: the lab once ran `apt-get install qemu-system-x86`, which removed the machine's newer
# qemu-utils (10.0 from bookworm-backports; qemu-system-common 7.2 conflicts with it), and
# qemu-nbd vanished under the tests and benches that were running.

deps_missing() {
  local f cmd pkg seen=" "
  for f in "$@"; do
    [ -e "$f" ] || continue
    while read -r cmd pkg _; do
      case "$cmd" in '' | '#'*) continue ;; esac
      command -v "$cmd" >/dev/null 2>&1 && continue
      case "$seen" in *" $pkg "*) continue ;; esac
      seen="$seen$pkg "
      echo "$pkg"
    done <"$f"
  done
}

# apt_refusals PKG...: prints one line per installed package that `apt-get install PKG...`
# would remove or downgrade (from a simulation; nothing is changed); status 2 with apt's
# errors when apt cannot install them at all.
apt_refusals() {
  local sim line pkg old new
  sim=$(LC_ALL=C apt-get -s install --no-install-recommends "$@" 2>&1) || {
    # apt cannot install them at all (unknown package, unsolvable conflict): say why.
    printf '%s\n' "$sim" | grep -E '^(E:| )' | sed 's/^/  apt: /'
    return 2
  }
  while IFS= read -r line; do
    case "$line" in
      'Remv '*)
        read -r _ pkg old _ <<<"$line"
        echo "  would remove $pkg ${old:-}"
        ;;
      'Inst '*'['*']'*)
        # "Inst PKG [OLD] (NEW archive [arch])": an upgrade or a downgrade of an installed one.
        pkg=$(printf '%s' "$line" | awk '{print $2}')
        old=$(printf '%s' "$line" | sed -n 's/^Inst [^ ]* \[\([^]]*\)\].*/\1/p')
        new=$(printf '%s' "$line" | sed -n 's/^Inst [^ ]* \[[^]]*\] (\([^ ]*\).*/\1/p')
        if [ -n "$old" ] && [ -n "$new" ] && dpkg --compare-versions "$new" lt "$old"; then
          echo "  would downgrade $pkg from $old to $new"
        fi
        ;;
    esac
  done <<<"$sim"
}

apt_install_safe() {
  local who=$1
  shift
  [ $# -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "$who: need root to install the Debian packages $* (or install them yourself)" >&2
    return 1
  fi
  echo "$who: installing Debian packages: $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || echo "$who: apt-get update failed; trying with the current lists" >&2
  local refusals status=0
  refusals=$(apt_refusals "$@") || status=$?
  if [ "$status" -ne 0 ]; then
    printf '%s: apt cannot install %s:\n%s\n' "$who" "$*" "$refusals" >&2
    return 1
  fi
  if [ -n "$refusals" ]; then
    {
      echo "$who: refusing to install $*: it would change packages this machine has:"
      printf '%s\n' "$refusals"
      echo "$who: no script of ours removes or downgrades an installed package; install a"
      echo "$who: compatible version yourself, or give the tool another way (see the script)."
    } >&2
    return 1
  fi
  # --no-remove: apt fails rather than remove; -y without --allow-downgrades: apt fails rather
  # than downgrade. Both are checked above already; this holds if the simulation missed one.
  if ! apt-get install -y -qq --no-install-recommends --no-remove "$@" >/dev/null; then
    echo "$who: apt-get install $* failed (nothing was removed or downgraded)" >&2
    return 1
  fi
}

deps_install() {
  local who=$1
  shift
  local missing=()
  mapfile -t missing < <(deps_missing "$@")
  [ ${#missing[@]} -eq 0 ] && return 0
  local f cmd pkg gone=()
  if ! apt_install_safe "$who" "${missing[@]}"; then
    for f in "$@"; do
      [ -e "$f" ] || continue
      while read -r cmd pkg _; do
        case "$cmd" in '' | '#'*) continue ;; esac
        command -v "$cmd" >/dev/null 2>&1 || gone+=("$cmd ($pkg, listed in $f)")
      done <"$f"
    done
    printf '%s: stopping: missing %s\n' "$who" "${gone[*]}" >&2
    return 1
  fi
  for f in "$@"; do
    [ -e "$f" ] || continue
    while read -r cmd pkg _; do
      case "$cmd" in '' | '#'*) continue ;; esac
      command -v "$cmd" >/dev/null 2>&1 || gone+=("$cmd ($pkg, listed in $f)")
    done <"$f"
  done
  if [ ${#gone[@]} -gt 0 ]; then
    printf '%s: still missing after the install: %s\n' "$who" "${gone[*]}" >&2
    return 1
  fi
}
