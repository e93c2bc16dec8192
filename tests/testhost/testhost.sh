#!/bin/bash
# testhost.sh - a disposable "test host" for agent-workspaces: a Debian bookworm tree booted with
# `systemd-nspawn -b`, so that a real systemd (PID 1 inside), the system D-Bus, journald,
# systemd-machined and polkitd run even though this machine's own PID 1 is not systemd.
# The project's service is installed into it and tested there.
#
# Run `testhost.sh help` for the commands and knobs (the text is in usage() below).
#
# How it stays off the machine's own state:
#  * nspawn runs in a private mount namespace with a fresh tmpfs on /run: nspawn keeps its state
#    under /run/systemd/nspawn and refuses to clean it up on a disk file system (this machine's /run
#    is a plain directory on the root fs).
#  * Before nspawn starts, the launching subshell moves itself ($BASHPID, not $$) into a child cgroup
#    named $TESTHOST_NAME in every hierarchy. With --keep-unit nspawn uses its current cgroup, so
#    without that move it would create payload/ and supervisor/ at the machine's root cgroups.
#    The boot is refused when the move did not take effect.
#  * --register=no --keep-unit: there is no host system bus to register with or get a scope from.
#  * --console=read-only: nspawn drains the console into logs/console.log. With a console nobody
#    reads (--console=passive), PID 1 blocks forever on a full pty.
#  * --volatile=overlay: every write lands in a tmpfs overlay; the rootfs template stays pristine.
#    The test host's /tmp, /run and /dev are its own.
#  * Its /var/lib/machines is a fresh directory of this machine ($TESTHOST_DIR/machines), not the
#    overlay: container trees there can be mapped into user namespaces with idmapped mounts,
#    which overlayfs does not support (trees elsewhere in the test host take the chown path).
#  * SIGKILL of nspawn leaves the container's PID 1 alive, so `down` ends with cgroup.kill on the
#    test host's own cgroup. Nothing else is ever signalled, and never by name.
set -euo pipefail

# ---------------------------------------------------------------------------------------------------
# Configuration

SUITE=bookworm
ROOTFS_PACKAGES=systemd,systemd-sysv,dbus,systemd-container,polkitd,libpam-systemd,iproute2,procps,debootstrap,zstd,ca-certificates,psmisc,curl,nftables,python3,python3-venv,python3-gi,python3-dbus,libglib2.0-bin
ROOTFS_FORMAT=2 # bump to rebuild cached trees and tarballs (changes to customize_rootfs do that anyway)
HOST_PACKAGES=(systemd-container debootstrap zstd dbus)
BOOT_TIMEOUT=180 # seconds until the test host must be ready
STOP_TIMEOUT=20  # seconds for a graceful poweroff before SIGKILL

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# The repository is mounted here inside, whatever its path outside (a clone below /tmp, say: the
# test host's systemd cleans its own /tmp at boot, so nothing may be shared there).
REPO_INSIDE=/srv/agent-workspaces
PROG=$0
TESTHOST_DIR=${TESTHOST_DIR:-/var/tmp/agent-workspaces-testhost}
TESTHOST_CACHE=${TESTHOST_CACHE:-/var/cache/agent-workspaces-testhost}
TESTHOST_NAME=${TESTHOST_NAME:-aw-testhost}
TESTHOST_MIRROR=${TESTHOST_MIRROR:-http://deb.debian.org/debian}
# shared: the test host uses this machine's network namespace. slirp: a namespace of its own,
# wired out through slirp4netns (user-space NAT; nothing changes in this machine's namespace),
# in which the test host's root may make veths, routes and nftables tables.
TESTHOST_NET=${TESTHOST_NET:-slirp}
# slirp: TCP ports of the test host's loopback that this machine's loopback forwards to (the REST
# bridge), so a browser here reaches the dashboard.
TESTHOST_FORWARD=${TESTHOST_FORWARD:-7600}

ROOTFS=$TESTHOST_DIR/rootfs
ROOTFS_KEY_FILE=$TESTHOST_DIR/rootfs.key # written once the tree is complete
RUN_DIR=$TESTHOST_DIR/run
LOG_DIR=$TESTHOST_DIR/logs
BUS_DIR=$TESTHOST_DIR/bus # is /run/dbus inside
BUS_SOCKET=$BUS_DIR/system_bus_socket
MACHINES_DIR=$TESTHOST_DIR/machines # is /var/lib/machines inside, emptied at every boot
CONSOLE_LOG=$LOG_DIR/console.log
SUPERVISOR_PID_FILE=$RUN_DIR/supervisor.pid # the systemd-nspawn process
CGROUP_LIST_FILE=$RUN_DIR/cgroups           # the cgroup directories created for the test host
CGROUP_NAME=$TESTHOST_NAME
INSIDE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

usage() {
	cat <<EOF
Usage: $PROG COMMAND [ARGS]

Boots a disposable Debian $SUITE "test host" with systemd-nspawn -b (real systemd as PID 1,
system D-Bus, journald, systemd-machined, polkitd) and runs agent-workspaces tests in it.

Commands:
  up          install missing host packages (${HOST_PACKAGES[*]}), build or restore the
              rootfs, boot, wait until ready, print how to use it. Idempotent.
  down        graceful poweroff, then SIGKILL, then cgroup.kill on the test host's cgroup; remove
              its cgroups, socket and pid files. Exits 0 when nothing is running.
  status      print the state; exit status 1 when not running
  env         print export lines for TESTHOST_LEADER and TESTHOST_BUS:  eval "\$($PROG env)"
  enter       interactive shell inside the test host (nsenter into all its namespaces)
  run [-u USER] [-E VAR=VAL]... -- CMD [ARGS...]
              run CMD inside as a transient service unit (systemd-run --pipe --wait), as USER if
              given, in the caller's working directory. The repository is mounted at
              /srv/agent-workspaces inside (paths into it, in the working directory and in the
              arguments, are translated; $TESTHOST_REPO says where it is), the cache at its own path.
              stdin is /dev/null; CMD's exit status is returned.
  install     make -C <repo> install DESTDIR=/proc/<leader>/root prefix=/usr, then reload systemd
              and dbus-daemon inside. The script builds nothing itself; the Makefile's install
              target builds the release binary if needed.
  journal FILE
              write the test host's whole journal to FILE (short-precise text; journal export
              format when FILE ends in .export; '-' is stdout)
  help        this text

Environment:
  TESTHOST_DIR=$TESTHOST_DIR
              rootfs, run/, logs/ (console.log), bus/ (system_bus_socket), machines/
              (/var/lib/machines inside: on this machine's file system, for idmapped mounts)
  TESTHOST_CACHE=$TESTHOST_CACHE
              .deb cache and rootfs tarballs, kept across runs; mounted at the same path inside
  TESTHOST_NAME=$TESTHOST_NAME    machine name (hostname inside) and cgroup name
  TESTHOST_MIRROR=$TESTHOST_MIRROR
  TESTHOST_NET=$TESTHOST_NET    slirp (a network namespace of its own, out through slirp4netns,
              where the service makes containers' veths, routes and nftables rules) or shared (this
              machine's: only for a service whose containers all have network = host or private)
  TESTHOST_FORWARD=$TESTHOST_FORWARD  slirp: loopback TCP ports forwarded from here to the test host
EOF
}

# ---------------------------------------------------------------------------------------------------
# Small helpers

T0=${EPOCHREALTIME//[.,]/}

log() {
	local us=$((${EPOCHREALTIME//[.,]/} - T0))
	printf '[testhost %3d.%02ds] %s\n' $((us / 1000000)) $((us % 1000000 / 10000)) "$*" >&2
}

die() {
	log "ERROR: $*"
	exit 1
}

path_is_under() { # PATH PREFIX
	[[ $1 == "$2" || $1 == "$2"/* ]]
}

# True while PID exists and is not a zombie.
pid_alive() {
	local stat
	[[ ${1:-} =~ ^[0-9]+$ ]] || return 1
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	[[ ${stat##*) } != Z* ]]
}

# True when PID is in the test host's cgroup (or below it) in the cgroup v2 / name=systemd hierarchy.
pid_in_own_cgroup() {
	grep -Eq "^[0-9]+:(|name=systemd):.*/${CGROUP_NAME}(/.*)?\$" "/proc/$1/cgroup" 2>/dev/null
}

# Runs a command inside all namespaces of the test host, with a clean environment.
inside() {
	nsenter -t "$LEADER" -a env -i PATH="$INSIDE_PATH" LANG=C.UTF-8 "$@"
}

host_busctl() {
	busctl --address="unix:path=$BUS_SOCKET" --timeout=30 -- "$@"
}

# Sets SUPERVISOR (systemd-nspawn) and LEADER (the test host's PID 1, as seen from here) or leaves
# them empty. The recorded PID only counts if it is still our nspawn: right name, right cgroup.
load_state() {
	SUPERVISOR='' LEADER=''
	local pid comm
	pid=$(cat "$SUPERVISOR_PID_FILE" 2>/dev/null) || return 0
	pid_alive "$pid" || return 0
	comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 0
	[ "$comm" = systemd-nspawn ] && pid_in_own_cgroup "$pid" || return 0
	SUPERVISOR=$pid
	LEADER=$(pgrep -P "$SUPERVISOR" -x systemd | head -n 1) || true
}

require_running() {
	load_state
	[ -n "$LEADER" ] || die "test host '$TESTHOST_NAME' is not running (start it with: $PROG up)"
}

require_root() {
	[ "$(id -u)" = 0 ] || die "must run as root"
}

check_config() {
	[[ $TESTHOST_NAME =~ ^[A-Za-z0-9][A-Za-z0-9-]{0,62}$ ]] ||
		die "TESTHOST_NAME='$TESTHOST_NAME' is not a valid machine name (letters, digits, '-')"
	local var path bad
	for var in TESTHOST_DIR TESTHOST_CACHE REPO; do
		path=${!var}
		[[ $path == /* ]] || die "$var=$path must be an absolute path"
		[[ $path != *:* ]] || die "$var=$path must not contain ':' (it is used in nspawn --bind)"
		# nspawn runs with a private, empty /run: nothing below /run is visible to it
		path_is_under "$path" /run && die "$var=$path must not be below /run"
	done
	# The cache appears at the same path inside. Below these the test host's systemd keeps its
	# own (temporary) file systems, so it must not be shared there.
	path=$TESTHOST_CACHE
	for bad in /proc /sys /dev /tmp /var/tmp; do
		path_is_under "$path" "$bad" && die "TESTHOST_CACHE=$path must not be below $bad"
	done
	[ "$path" != / ] || die "TESTHOST_CACHE must not be /"
	return 0
}

prepare_dirs() {
	mkdir -p "$TESTHOST_DIR" "$RUN_DIR" "$LOG_DIR" "$BUS_DIR" "$TESTHOST_CACHE"
	chmod 0755 "$TESTHOST_DIR" "$BUS_DIR"
}

take_lock() { # serialises up/down; fd 9 is closed for the test host itself
	exec 9>"$RUN_DIR/lock"
	flock -w 900 9 || die "another $PROG is still busy (lock $RUN_DIR/lock)"
}

# ---------------------------------------------------------------------------------------------------
# Host packages and the rootfs template

ensure_host_packages() {
	local missing=() pkg
	[ "$TESTHOST_NET" != slirp ] || HOST_PACKAGES+=(slirp4netns iproute2 socat)
	for pkg in "${HOST_PACKAGES[@]}"; do
		# shellcheck disable=SC2016 # ${Status} is dpkg-query's format, not a shell expansion
		dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q ' installed$' || missing+=("$pkg")
	done
	if ((${#missing[@]})); then
		log "installing host packages: ${missing[*]} (log: $LOG_DIR/apt.log)"
		if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"; } \
			>"$LOG_DIR/apt.log" 2>&1; then
			tail -n 20 "$LOG_DIR/apt.log" >&2
			die "apt-get install ${missing[*]} failed"
		fi
	fi
	local cmd
	for cmd in systemd-nspawn debootstrap zstd busctl nsenter unshare setsid flock pgrep; do
		command -v "$cmd" >/dev/null || die "'$cmd' is missing on this machine"
	done
}

# Turns a fresh debootstrap tree into the template. Its text is part of the rootfs key, so editing
# this function rebuilds the cached tree.
customize_rootfs() {
	local root=$1 unit
	# debootstrap copies this machine's /etc/hostname; without it, the hostname is the machine name
	rm -f "$root/etc/hostname"
	printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
	# Empty machine-id: nspawn's random container UUID becomes the machine id of each boot. The dbus
	# postinst wrote its own id; systemd would copy that one, so every boot would share one id.
	: >"$root/etc/machine-id"
	mkdir -p "$root/var/lib/dbus"
	ln -sfn /etc/machine-id "$root/var/lib/dbus/machine-id"
	# Units that only add noise (or try to use a tty) in a short-lived test host
	for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
		fstrim.timer e2scrub_reap.service getty@tty1.service; do
		ln -sfn /dev/null "$root/etc/systemd/system/$unit"
	done
	mkdir -p "$root/etc/agent-workspaces"
	rm -rf "$root"/var/log/journal/* "$root"/var/cache/apt/archives/*.deb
}

rootfs_key() {
	{
		printf '%s\n' "suite=$SUITE" "packages=$ROOTFS_PACKAGES" "mirror=$TESTHOST_MIRROR" "format=$ROOTFS_FORMAT"
		declare -f customize_rootfs
	} | sha256sum | cut -c1-16
}

# rm -rf that never leaves the directory's file system, after unmounting anything below it.
remove_tree() {
	local dir=$1 mnt
	[ -e "$dir" ] || return 0
	while read -r mnt; do
		umount -l "$mnt" 2>/dev/null || true
	done < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
	rm -rf --one-file-system -- "$dir"
}

build_rootfs() { # STAGING TARBALL
	local staging=$1 tarball=$2
	log "debootstrap $SUITE from $TESTHOST_MIRROR (log: $LOG_DIR/debootstrap.log)"
	# Own mount namespace: debootstrap's proc/sys mounts in the target vanish with it, whatever happens.
	if ! unshare --mount --propagation private -- \
		debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" --cache-dir="$TESTHOST_CACHE/debs" \
		"$SUITE" "$staging" "$TESTHOST_MIRROR" >"$LOG_DIR/debootstrap.log" 2>&1; then
		tail -n 25 "$LOG_DIR/debootstrap.log" >&2
		die "debootstrap failed (full log: $LOG_DIR/debootstrap.log)"
	fi
	customize_rootfs "$staging"
	log "caching the rootfs as $tarball"
	local tmp=$tarball.tmp.$$
	if tar -C "$staging" --numeric-owner --xattrs --xattrs-include='*' -cpf - . |
		zstd -q -T0 -3 -o "$tmp"; then
		mv -f "$tmp" "$tarball"
	else
		rm -f "$tmp"
		log "WARNING: could not write $tarball; the next fresh TESTHOST_DIR will debootstrap again"
	fi
}

ensure_rootfs() {
	local key tarball staging=$ROOTFS.new restored=0
	key=$(rootfs_key)
	if [ -d "$ROOTFS" ] && [ "$(cat "$ROOTFS_KEY_FILE" 2>/dev/null)" = "$key" ]; then
		log "rootfs present: $ROOTFS (key $key)"
		return 0
	fi
	tarball=$TESTHOST_CACHE/rootfs-$SUITE-$key.tar.zst
	rm -f "$ROOTFS_KEY_FILE"
	remove_tree "$ROOTFS"
	remove_tree "$staging"
	mkdir -p "$staging" "$TESTHOST_CACHE/debs"
	if [ -s "$tarball" ]; then
		log "restoring the rootfs from $tarball"
		if zstd -dcq -- "$tarball" |
			tar -C "$staging" --numeric-owner --xattrs --xattrs-include='*' -xpf -; then
			restored=1
		else
			log "WARNING: $tarball is unusable; removing it and building the rootfs afresh"
			rm -f "$tarball"
			remove_tree "$staging"
			mkdir -p "$staging"
		fi
	fi
	[ "$restored" = 1 ] || build_rootfs "$staging" "$tarball"
	mv "$staging" "$ROOTFS"
	echo "$key" >"$ROOTFS_KEY_FILE"
	log "rootfs ready: $ROOTFS (key $key)"
}

# ---------------------------------------------------------------------------------------------------
# Cgroups

# Mount point of the hierarchy named by a /proc/PID/cgroup controller field ("" = cgroup v2).
cgroup_mountpoint() {
	local want=$1 fields i fstype opts ctrl ok
	while read -r -a fields; do
		# mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
		for ((i = 6; i < ${#fields[@]}; i++)); do
			[ "${fields[i]}" = - ] && break
		done
		fstype=${fields[i + 1]:-} opts=${fields[i + 3]:-}
		if [ -z "$want" ]; then
			[ "$fstype" = cgroup2 ] && { echo "${fields[4]}"; return 0; }
			continue
		fi
		[ "$fstype" = cgroup ] || continue
		ok=1
		for ctrl in ${want//,/ }; do
			[[ ,$opts, == *",$ctrl,"* ]] || ok=0
		done
		[ "$ok" = 1 ] && { echo "${fields[4]}"; return 0; }
	done </proc/self/mountinfo
	return 1
}

# Called in the boot subshell: move it ($BASHPID; $$ would be the script itself) into a child
# cgroup $CGROUP_NAME of its current cgroup, in every hierarchy, and refuse to go on otherwise.
join_own_cgroup() {
	local self=$BASHPID entries hid ctrls path mnt dir parent dirs=()
	entries=$(cat "/proc/$self/cgroup") # read once: the file changes while we move
	while IFS=: read -r hid ctrls path; do
		[ -n "$hid" ] || continue
		mnt=$(cgroup_mountpoint "$ctrls") || continue
		parent=$mnt${path%/}
		dir=$parent/$CGROUP_NAME
		mkdir -p "$dir"
		if [[ ,$ctrls, == *,cpuset,* ]]; then # a v1 cpuset group takes no tasks until these are set
			[ -s "$dir/cpuset.cpus" ] || cat "$parent/cpuset.cpus" >"$dir/cpuset.cpus"
			[ -s "$dir/cpuset.mems" ] || cat "$parent/cpuset.mems" >"$dir/cpuset.mems"
		fi
		echo "$self" >"$dir/cgroup.procs"
		dirs+=("$dir")
	done <<<"$entries"
	((${#dirs[@]})) || { echo "testhost: no cgroup hierarchy found" >&2; exit 1; }
	printf '%s\n' "${dirs[@]}" >"$CGROUP_LIST_FILE"
	while IFS=: read -r hid ctrls path; do
		[ -n "$hid" ] || continue
		cgroup_mountpoint "$ctrls" >/dev/null || continue
		[[ $path == */"$CGROUP_NAME" ]] || {
			echo "testhost: could not move into cgroup $CGROUP_NAME ($hid:$ctrls:$path); not booting" >&2
			exit 1
		}
	done <"/proc/$self/cgroup"
	pid_in_own_cgroup "$self" || { echo "testhost: not in cgroup $CGROUP_NAME; not booting" >&2; exit 1; }
}

own_cgroup_dirs() { # recorded at boot, plus any found by name (in case the record is lost)
	{
		cat "$CGROUP_LIST_FILE" 2>/dev/null || true
		find /sys/fs/cgroup -maxdepth 5 -type d -name "$CGROUP_NAME" -prune -print 2>/dev/null || true
	} | sort -u | while read -r dir; do
		[ -d "$dir" ] && [ "${dir##*/}" = "$CGROUP_NAME" ] && echo "$dir"
	done
	return 0
}

cgroup_pids() { # every PID in a cgroup subtree
	find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}

kill_cgroup_once() { # DIR: cgroup.kill where the kernel has it, else SIGKILL to each listed PID
	local pids
	pids=$(cgroup_pids "$1")
	[ -n "$pids" ] || return 0
	if [ -f "$1/cgroup.kill" ]; then
		echo 1 >"$1/cgroup.kill"
	else
		# shellcheck disable=SC2086 # one PID per word
		kill -KILL $pids 2>/dev/null || true
	fi
}

# Ends whatever is left in the test host's cgroups (e.g. its PID 1 after nspawn got SIGKILL).
kill_own_cgroups() {
	local dir pids i
	while read -r dir; do
		pids=$(cgroup_pids "$dir")
		[ -n "$pids" ] || continue
		! grep -qx "$$" <<<"$pids" || die "this script itself runs in $dir; refusing to kill that cgroup"
		log "killing the processes left in $dir: $(tr '\n' ' ' <<<"$pids")"
		for i in $(seq 50); do
			((i % 10 != 1)) || kill_cgroup_once "$dir"
			[ -n "$(cgroup_pids "$dir")" ] || break
			sleep 0.1
		done
		[ -z "$(cgroup_pids "$dir")" ] || log "WARNING: processes remain in $dir: $(cgroup_pids "$dir" | tr '\n' ' ')"
	done < <(own_cgroup_dirs | sort_v2_first)
}

sort_v2_first() { # cgroup.kill (v2) reaches every process at once; v1 directories only list PIDs
	local dir v1=()
	while read -r dir; do
		if [ -f "$dir/cgroup.kill" ]; then echo "$dir"; else v1+=("$dir"); fi
	done
	((${#v1[@]} == 0)) || printf '%s\n' "${v1[@]}"
}

remove_own_cgroups() {
	local dir
	while read -r dir; do
		find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
		[ ! -d "$dir" ] || log "WARNING: could not remove cgroup $dir"
	done < <(own_cgroup_dirs)
	rm -f "$CGROUP_LIST_FILE"
}

# ---------------------------------------------------------------------------------------------------
# Boot and shutdown

# A network namespace for the test host, held by a sleeping process in its cgroup and wired out
# through slirp4netns (user-space TCP/UDP NAT, its DNS forwarder at 10.0.2.3; this machine's
# loopback out of reach). Both are ended with the test host's cgroup. Prints the holder's PID.
start_own_network() {
	(
		join_own_cgroup
		exec setsid unshare --net sleep infinity
	) 9>&- </dev/null >/dev/null 2>&1 &
	local holder=$! i own
	own=$(readlink /proc/self/ns/net)
	for i in $(seq 100); do
		[ "$(readlink "/proc/$holder/ns/net" 2>/dev/null || echo "$own")" != "$own" ] && break
		sleep 0.05
	done
	(
		join_own_cgroup
		exec setsid slirp4netns --configure --mtu=65520 --disable-host-loopback "$holder" tap0
	) 9>&- </dev/null >"$LOG_DIR/slirp4netns.log" 2>&1 &
	local routes=
	for i in $(seq 100); do
		routes=$(nsenter -t "$holder" -n ip -4 route 2>/dev/null) || true
		[[ $routes != *default* ]] || break
		sleep 0.05
	done
	[[ $routes == *default* ]] ||
		die "slirp4netns gave the test host's network namespace no route out (log: $LOG_DIR/slirp4netns.log)"
	printf 'nameserver 10.0.2.3\n' >"$RUN_DIR/resolv.conf"
	local port
	for port in $TESTHOST_FORWARD; do
		[[ $port =~ ^[0-9]+$ ]] || die "TESTHOST_FORWARD: '$port' is no port"
		# Each connection to 127.0.0.1:PORT here is carried to 127.0.0.1:PORT in there by a
		# socat that joins the namespace (and nothing else of the test host).
		(
			join_own_cgroup
			exec setsid socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" \
				"EXEC:nsenter --net=/proc/$holder/ns/net socat STDIO TCP\:127.0.0.1\:$port"
		) 9>&- </dev/null >>"$LOG_DIR/forward.log" 2>&1 &
	done
	echo "$holder"
}

start_nspawn() {
	local args=(
		--directory="$ROOTFS" --machine="$TESTHOST_NAME" --boot
		--register=no --keep-unit --console=read-only --volatile=overlay --link-journal=no
		--bind="$BUS_DIR:/run/dbus" --bind="$REPO:$REPO_INSIDE" --bind="$TESTHOST_CACHE"
		--bind="$MACHINES_DIR:/var/lib/machines"
	)
	case $TESTHOST_NET in
	shared) ;;
	slirp)
		local holder
		holder=$(start_own_network) && [ -n "$holder" ] || die "the test host's network namespace could not be made"
		# Its root configures that namespace (veths, addresses, routes, nftables): CAP_NET_ADMIN,
		# which nspawn grants by itself only to a network it made.
		args+=(--network-namespace-path="/proc/$holder/ns/net" --bind-ro="$RUN_DIR/resolv.conf:/etc/resolv.conf"
			--capability=CAP_NET_ADMIN)
		log "network: a namespace of its own (held by PID $holder), out through slirp4netns"
		;;
	*) die "TESTHOST_NET must be shared or slirp, not '$TESTHOST_NET'" ;;
	esac
	[ ! -f "$CONSOLE_LOG" ] || mv -f "$CONSOLE_LOG" "$CONSOLE_LOG.prev"
	remove_tree "$MACHINES_DIR"
	mkdir -m 0700 "$MACHINES_DIR"
	rm -f "$BUS_SOCKET" "$SUPERVISOR_PID_FILE" "$CGROUP_LIST_FILE"
	log "booting: systemd-nspawn ${args[*]}"
	(
		join_own_cgroup
		# A namespace of its own (slirp): /proc/sys/net writable, as nspawn makes it for a network
		# it made itself (the service turns forwarding on there).
		vfs=SYSTEMD_NSPAWN_API_VFS_WRITABLE=no
		[ "$TESTHOST_NET" != slirp ] || vfs=SYSTEMD_NSPAWN_API_VFS_WRITABLE=network
		exec env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 TERM=dumb "$vfs" setsid unshare --mount --propagation private -- \
			bash -c 'mount -t tmpfs -o mode=0755,nosuid,nodev testhost-run /run && exec "$@"' testhost-boot \
			systemd-nspawn "${args[@]}"
	) 9>&- </dev/null >"$CONSOLE_LOG" 2>&1 &
	local pid=$! i
	echo "$pid" >"$SUPERVISOR_PID_FILE"
	for i in $(seq 100); do # until the subshell has become nspawn (no fork on the way)
		[ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd-nspawn ] && return 0
		pid_alive "$pid" || break
		sleep 0.05
	done
	boot_failed "systemd-nspawn did not start"
}

boot_failed() {
	log "ERROR: $*"
	if [ -s "$CONSOLE_LOG" ]; then
		echo "---- last lines of $CONSOLE_LOG ----" >&2
		tail -n 40 "$CONSOLE_LOG" >&2
		echo "----" >&2
	fi
	load_state
	if [ -n "$SUPERVISOR" ]; then
		log "the test host was left running for inspection ($PROG enter); stop it with: $PROG down"
	else
		teardown
	fi
	exit 1
}

wait_ready() {
	local deadline=$((SECONDS + BOOT_TIMEOUT)) state=
	while :; do
		load_state
		[ -n "$SUPERVISOR" ] || boot_failed "the test host exited during boot"
		if [ -n "$LEADER" ]; then
			state=$(timeout 60 nsenter -t "$LEADER" -a systemctl is-system-running --wait 2>/dev/null) || true
			case $state in
			running | degraded) break ;;
			maintenance | stopping) boot_failed "the test host's systemd is in state '$state'" ;;
			esac
		fi
		((SECONDS < deadline)) || boot_failed "not ready after ${BOOT_TIMEOUT}s (state: ${state:-no PID 1 yet})"
		sleep 0.1
	done
	log "systemd is $state (leader PID $LEADER)"
	if [ "$state" = degraded ]; then
		log "WARNING: failed units in the test host:"
		inside systemctl --failed --no-legend --plain --no-pager >&2 || true
	fi
	local i
	for i in $(seq 100); do
		[ -S "$BUS_SOCKET" ] && break
		sleep 0.1
	done
	[ -S "$BUS_SOCKET" ] || boot_failed "no system bus socket at $BUS_SOCKET"
	# bus-activate machined and polkitd now: tests do not pay for it, and a broken one fails here
	host_busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.DBus.Peer Ping ||
		boot_failed "systemd-machined does not answer on the system bus"
	host_busctl call org.freedesktop.PolicyKit1 /org/freedesktop/PolicyKit1/Authority org.freedesktop.DBus.Peer Ping ||
		boot_failed "polkitd does not answer on the system bus"
	local unit bad=0
	for unit in systemd-journald.service dbus.service systemd-machined.service polkit.service; do
		inside systemctl is-active --quiet "$unit" || {
			log "ERROR: $unit is $(inside systemctl is-active "$unit" 2>/dev/null || true)"
			bad=1
		}
	done
	[ "$bad" = 0 ] || boot_failed "core services are not active"
	log "ready: systemd, system bus, journald, machined, polkitd"
}

# Stops whatever is there; quiet when nothing is.
teardown() {
	load_state
	if [ -n "$SUPERVISOR" ]; then
		log "powering off (SIGTERM to systemd-nspawn, PID $SUPERVISOR)"
		kill -TERM "$SUPERVISOR" 2>/dev/null || true
		local i
		for i in $(seq $((STOP_TIMEOUT * 10))); do
			pid_alive "$SUPERVISOR" || break
			sleep 0.1
		done
		if pid_alive "$SUPERVISOR"; then
			log "no poweroff within ${STOP_TIMEOUT}s: SIGKILL to PID $SUPERVISOR"
			kill -KILL "$SUPERVISOR" 2>/dev/null || true
			for i in $(seq 50); do
				pid_alive "$SUPERVISOR" || break
				sleep 0.1
			done
		fi
		# It is no child of ours: this machine's PID 1 reaps it, up to seconds later. Wait for that,
		# so that no <defunct> systemd-nspawn is left behind when `down` returns.
		for i in $(seq 50); do
			[ -e "/proc/$SUPERVISOR" ] || break
			sleep 0.1
		done
	fi
	kill_own_cgroups
	remove_own_cgroups
	rm -f "$SUPERVISOR_PID_FILE"
	remove_tree "$MACHINES_DIR"
	[ ! -d "$BUS_DIR" ] || find "$BUS_DIR" -mindepth 1 -delete 2>/dev/null || true # socket, dbus' containers/
}

print_info() {
	local version state
	version=$(inside systemctl --version 2>/dev/null | head -n 1) || true
	state=$(inside systemctl is-system-running 2>/dev/null) || true
	cat <<EOF
Test host '$TESTHOST_NAME' is up: $version, state $state.
  leader PID $LEADER (its PID 1), supervisor PID $SUPERVISOR (systemd-nspawn)
  system bus:   unix:path=$BUS_SOCKET
                eval "\$($PROG env)"; busctl --address="\$TESTHOST_BUS" list
  run a command (transient unit, in \$PWD, exit status passed on):
                $PROG run [-u USER] [-E VAR=VAL]... -- CMD ARGS...
  shell:        $PROG enter
  install:      $PROG install     (the repo's 'make install' into the test host, then reloads)
  journal:      $PROG journal FILE
  shared:       $REPO as $REPO_INSIDE, $TESTHOST_CACHE at the same path (read-write)
  console log:  $CONSOLE_LOG
  stop:         $PROG down
EOF
}

# ---------------------------------------------------------------------------------------------------
# Commands

cmd_up() {
	prepare_dirs
	take_lock
	load_state
	if [ -n "$LEADER" ]; then
		log "already running (leader PID $LEADER)"
		[ "$(cat "$ROOTFS_KEY_FILE" 2>/dev/null)" = "$(rootfs_key)" ] ||
			log "WARNING: it runs an outdated rootfs; '$PROG down' then '$PROG up' rebuilds it"
	else
		teardown # leftovers of an earlier run, if any
		ensure_host_packages
		ensure_rootfs
		start_nspawn
	fi
	wait_ready
	print_info
}

cmd_down() {
	mkdir -p "$RUN_DIR"
	take_lock
	load_state
	if [ -z "$SUPERVISOR" ] && [ -z "$(own_cgroup_dirs)" ]; then
		log "not running; nothing to do"
	fi
	teardown
	log "down"
}

cmd_status() {
	load_state
	if [ -z "$LEADER" ]; then
		echo "$TESTHOST_NAME: not running"
		if [ -n "$SUPERVISOR" ]; then
			echo "  systemd-nspawn (PID $SUPERVISOR) runs without a PID 1; '$PROG down' cleans up"
		else
			local dir
			while read -r dir; do
				if [ -n "$(cgroup_pids "$dir")" ]; then
					echo "  leftover processes in $dir; '$PROG down' cleans up"
					break
				fi
			done < <(own_cgroup_dirs | sort_v2_first)
		fi
		return 1
	fi
	local state
	state=$(inside systemctl is-system-running 2>/dev/null) || true
	cat <<EOF
$TESTHOST_NAME: running
  state:       $state
  leader:      $LEADER
  supervisor:  $SUPERVISOR
  bus:         unix:path=$BUS_SOCKET
  rootfs:      $ROOTFS (key $(cat "$ROOTFS_KEY_FILE" 2>/dev/null || echo unknown))
  console log: $CONSOLE_LOG
EOF
	if [ "$state" = degraded ]; then
		echo "  failed units:"
		inside systemctl --failed --no-legend --plain --no-pager | sed 's/^/    /' || true
	fi
}

cmd_env() {
	require_running
	printf 'export TESTHOST_LEADER=%q\n' "$LEADER"
	printf 'export TESTHOST_BUS=%q\n' "unix:path=$BUS_SOCKET"
}

cmd_enter() {
	(($# == 0)) || die "enter takes no arguments (use: $PROG run -- CMD)"
	require_running
	# shellcheck disable=SC2016 # expanded by the inner bash
	exec nsenter -t "$LEADER" -a env -i PATH="$INSIDE_PATH" LANG=C.UTF-8 TERM="${TERM:-dumb}" HOME=/root \
		bash -c 'cd -- "$1" 2>/dev/null || cd /; exec bash -l' testhost-enter "$(inside_path "$PWD")"
}

inside_path() { # a path into the repository, as seen inside the test host; anything else unchanged
	case $1 in
	"$REPO") printf '%s\n' "$REPO_INSIDE" ;;
	"$REPO"/*) printf '%s\n' "$REPO_INSIDE/${1#"$REPO"/}" ;;
	*) printf '%s\n' "$1" ;;
	esac
}

cmd_run() {
	local user='' setenv=()
	while (($#)); do
		case $1 in
		-u)
			(($# >= 2)) || die "run: -u needs a USER"
			user=$2
			shift 2
			;;
		-E)
			(($# >= 2)) || die "run: -E needs VAR=VAL"
			[[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "run: -E expects VAR=VAL, got '$2'"
			setenv+=("--setenv=$2")
			shift 2
			;;
		--)
			shift
			break
			;;
		-*) die "run: unknown option '$1' (usage: run [-u USER] [-E VAR=VAL]... -- CMD ARGS...)" ;;
		*) break ;;
		esac
	done
	(($#)) || die "run: no command (usage: run [-u USER] [-E VAR=VAL]... -- CMD ARGS...)"
	require_running
	# Paths into the repository (the working directory, and arguments) are translated to where
	# the repository is mounted inside.
	local wd args=() arg
	wd=$(inside_path "$PWD")
	for arg in "$@"; do args+=("$(inside_path "$arg")"); done
	set -- "${args[@]}"
	[ -d "/proc/$LEADER/root$wd" ] ||
		die "run: the working directory $wd does not exist inside the test host (shared: $REPO as $REPO_INSIDE, $TESTHOST_CACHE)"
	if [ "$wd" != / ] && ! path_is_under "$wd" "$REPO_INSIDE" && ! path_is_under "$wd" "$TESTHOST_CACHE"; then
		log "note: $wd is not shared with the test host; the command runs in the test host's own $wd"
	fi
	setenv+=("--setenv=TESTHOST_REPO=$REPO_INSIDE")
	local props=()
	[ -z "$user" ] || props+=(--property="User=$user")
	exec nsenter -t "$LEADER" -a env -i PATH="$INSIDE_PATH" LANG=C.UTF-8 \
		systemd-run --pipe --wait --quiet --collect --working-directory="$wd" \
		"${props[@]}" "${setenv[@]}" -- "$@" </dev/null
}

cmd_install() {
	(($# == 0)) || die "install takes no arguments"
	require_running
	[ -f "$REPO/Makefile" ] ||
		die "install: there is no $REPO/Makefile; its 'install' target (installing the daemon and its data files) is needed"
	command -v make >/dev/null || die "install: 'make' is not installed on this machine"
	local destdir=/proc/$LEADER/root
	log "make -C $REPO install DESTDIR=$destdir prefix=/usr"
	make -C "$REPO" install DESTDIR="$destdir" prefix=/usr || die "install: make install failed"
	log "systemctl daemon-reload (inside)"
	inside systemctl daemon-reload || die "install: systemctl daemon-reload failed"
	# ReloadConfig returns once dbus-daemon has re-read its configuration (system.d policies)
	inside busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig ||
		die "install: dbus-daemon ReloadConfig failed"
	log "installed; systemd and dbus-daemon have reloaded"
}

cmd_journal() {
	(($# == 1)) || die "usage: $PROG journal FILE"
	require_running
	local out=$1 format=short-precise
	[[ $out != *.export ]] || format='export'
	if [ "$out" = - ]; then
		inside journalctl --no-pager -o "$format"
	else
		inside journalctl --no-pager -o "$format" >"$out" || die "journal: journalctl failed"
		log "journal ($format) written to $out ($(wc -l <"$out") lines)"
	fi
}

main() {
	local cmd=${1:-}
	(($# == 0)) || shift
	case $cmd in
	help | -h | --help)
		usage
		return 0
		;;
	up | down | status | env | enter | run | install | journal) ;;
	*)
		usage >&2
		[ -z "$cmd" ] || echo "unknown command: $cmd" >&2
		return 2
		;;
	esac
	require_root
	check_config
	case $cmd in
	up | down | status | env) (($# == 0)) || die "$cmd takes no arguments" ;;
	esac
	"cmd_$cmd" "$@"
}

main "$@"
