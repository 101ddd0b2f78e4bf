#!/usr/bin/env bash
# Molecule targets for provision's roles: a booted Debian 12 under systemd-nspawn,
# reached over SSH through a network namespace of its own (loopback only).
#
#   target.sh rootfs              build (once) the cached base rootfs, print its path
#   target.sh create NAME DIR     overlay the cached rootfs in DIR, boot it as NAME
#   target.sh destroy NAME DIR    stop NAME, unmount and remove DIR's overlay, drop its netns
#
# The base rootfs is built with mmdebstrap once and cached under
# ${XDG_CACHE_HOME:-~/.cache}/provision/molecule/<key>/rootfs, key = sha256 of the
# inputs below (bump RECIPE when the recipe changes). Each scenario boots an
# overlayfs over it (upper dir in the scenario's ephemeral directory), so
# scenarios never touch the cache or each other. Downloaded .debs are shared
# through a bind-mounted apt archive cache next to it.
#
# The target's netns has only loopback. Its apt still reaches the Debian
# mirror: the mirror's name resolves to 127.0.0.1 inside the target, where a
# socat relays each connection over a unix socket (filesystem, not network
# namespaced) to a socat in the host's namespace that connects to the mirror.
set -euo pipefail

RECIPE=1
SUITE=bookworm
MIRROR=${PROVISION_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd,systemd-sysv,dbus,openssh-server,python3,python3-apt,iproute2,ca-certificates,kmod,procps
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/provision/molecule
KEY=$(printf '%s\n' "$RECIPE" "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-16)
ROOTFS=$CACHE/$KEY/rootfs
ARCHIVES=$CACHE/apt-archives
MIRROR_HOSTPORT=${MIRROR#http://}
MIRROR_HOSTPORT=${MIRROR_HOSTPORT%%/*}
MIRROR_HOST=${MIRROR_HOSTPORT%%:*}
MIRROR_PORT=80
[ "$MIRROR_HOST" = "$MIRROR_HOSTPORT" ] || MIRROR_PORT=${MIRROR_HOSTPORT##*:}

die() { printf 'target.sh: %s\n' "$*" >&2; exit 1; }
netns_of() { printf 'pmol-%s' "$1"; }

build_rootfs() {
  mkdir -p "$CACHE/$KEY"
  exec 9>"$CACHE/$KEY/lock"
  flock 9
  if [ ! -d "$ROOTFS" ]; then
    local tmp=$CACHE/$KEY/rootfs.tmp
    rm -rf "$tmp"
    mmdebstrap --quiet --mode=root --variant=minbase --include="$PACKAGES" \
      --skip=cleanup/apt/lists \
      --customize-hook='rm -f "$1/etc/hostname"' \
      --customize-hook='echo "PermitRootLogin prohibit-password" > "$1/etc/ssh/sshd_config.d/molecule.conf"' \
      "$SUITE" "$tmp" "$MIRROR" >&2
    mv "$tmp" "$ROOTFS"
  fi
  flock -u 9
  printf '%s\n' "$ROOTFS"
}

create() {
  local name=$1 dir=$2 ns
  ns=$(netns_of "$name")
  build_rootfs >/dev/null
  mkdir -p "$dir/upper" "$dir/work" "$dir/merged" "$ARCHIVES/partial"
  mountpoint -q "$dir/merged" ||
    mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$dir/upper,workdir=$dir/work" "$dir/merged"
  [ -f "$dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "molecule-$name" -f "$dir/id_ed25519"
  install -d -m 0700 "$dir/merged/root/.ssh"
  install -m 0600 "$dir/id_ed25519.pub" "$dir/merged/root/.ssh/authorized_keys"
  printf '%s\n' "$name" >"$dir/merged/etc/hostname"
  printf '127.0.0.1 localhost %s\n127.0.1.1 %s\n::1 localhost ip6-localhost ip6-loopback\n' \
    "$MIRROR_HOST" "$name" >"$dir/merged/etc/hosts"
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  ip -n "$ns" link set lo up
  # glibc's getaddrinfo(AI_ADDRCONFIG) (Slurm uses it) finds no IPv4 when only
  # loopback holds addresses: give the namespace one documentation-range
  # address on a bridge with no ports (nothing leaves the namespace).
  if ! ip -n "$ns" link show node0 >/dev/null 2>&1; then
    ip -n "$ns" link add node0 type bridge
    ip -n "$ns" addr add 192.0.2.10/32 dev node0
    ip -n "$ns" link set node0 up
  fi
  if [ -f "$dir/nspawn.pid" ] && kill -0 "$(cat "$dir/nspawn.pid")" 2>/dev/null; then
    return 0
  fi
  rm -f "$dir/mirror.sock"
  setsid socat UNIX-LISTEN:"$dir/mirror.sock",fork,mode=0600 TCP:"$MIRROR_HOST:$MIRROR_PORT" </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/relay-host.pid"
  setsid ip netns exec "$ns" socat TCP-LISTEN:"$MIRROR_PORT",bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:"$dir/mirror.sock" \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/relay-netns.pid"
  setsid systemd-nspawn -q --register=no --keep-unit -M "$name" -D "$dir/merged" -b \
    --network-namespace-path="/run/netns/$ns" \
    --bind="$ARCHIVES:/var/cache/apt/archives" \
    </dev/null >"$dir/console.log" 2>&1 &
  echo $! >"$dir/nspawn.pid"
  local i
  for i in $(seq 1 120); do
    if ssh -q -i "$dir/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no \
      -o UserKnownHostsFile=/dev/null -o ConnectTimeout=2 \
      -o ProxyCommand="ip netns exec $ns socat STDIO TCP:127.0.0.1:22" \
      root@"$name" systemctl is-system-running --wait >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$(cat "$dir/nspawn.pid")" 2>/dev/null || die "$name: systemd-nspawn exited, see $dir/console.log"
    sleep 0.5
  done
  die "$name: no SSH after 60 s, see $dir/console.log"
}

destroy() {
  local name=$1 dir=$2 ns pid i
  ns=$(netns_of "$name")
  if [ -f "$dir/nspawn.pid" ]; then
    pid=$(cat "$dir/nspawn.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" # nspawn -b turns SIGTERM into an orderly shutdown of the container
      for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$dir/nspawn.pid"
  fi
  for pidfile in "$dir/relay-netns.pid" "$dir/relay-host.pid"; do
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill -TERM "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  rm -f "$dir/mirror.sock"
  if mountpoint -q "$dir/merged"; then umount "$dir/merged" || umount -l "$dir/merged"; fi
  rm -rf "$dir/upper" "$dir/work" "$dir/merged"
  [ -e "/run/netns/$ns" ] && ip netns del "$ns"
  return 0
}

case ${1:-} in
  rootfs) build_rootfs ;;
  create) [ $# -eq 3 ] || die "usage: target.sh create NAME DIR"; create "$2" "$3" ;;
  destroy) [ $# -eq 3 ] || die "usage: target.sh destroy NAME DIR"; destroy "$2" "$3" ;;
  *) die "usage: target.sh rootfs | create NAME DIR | destroy NAME DIR" ;;
esac
