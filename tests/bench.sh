#!/bin/bash
# `make bench`: boots the test host, installs the service, and runs benches/exec_latency.rs,
# benches/mcp_exec.rs and benches/workspace_state.rs inside it, then benches/running_snapshot.rs on this machine. Prints
# latency figures and ratios against baselines measured in the same run.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
testhost=tests/testhost/testhost.sh
bench_bin() {
  cargo bench --locked --bench "$1" --no-run 2>&1 | sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -1
}
bin=$(bench_bin exec_latency)
state_bin=$(bench_bin workspace_state)
snap_bin=$(bench_bin running_snapshot)
mcp_bin=$(bench_bin mcp_exec)
[ -x "$bin" ] && [ -x "$state_bin" ] && [ -x "$snap_bin" ] && [ -x "$mcp_bin" ] ||
  { echo "no benchmark binary" >&2; exit 1; }
"$testhost" up >/dev/null
"$testhost" install >/dev/null
tests/testhost/configure-service.sh
# 256 commands at once on one workspace and 20 builds at once are measured: let them all run.
config=$("$testhost" env | sed -n 's/^export TESTHOST_LEADER=//p')
config=/proc/$config/root/etc/agent-workspaces/config.toml
sed -i 's/^\[container\]$/[container]\nmax_concurrent_builds = 20/' "$config"
printf '\n[exec]\nmax_concurrent = 256\n' >>"$config"
"$testhost" run -- systemctl try-restart agent-workspaced
# Each running container's systemd-nspawn holds a system-bus connection as root: the density
# figure needs more than dbus-daemon's 256 per user (README, "Install on a systemd host").
"$testhost" run -- sh -c 'cat > /etc/dbus-1/system.d/zz-agent-workspaces-density.conf <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <limit name="max_connections_per_user">4096</limit>
  <limit name="max_completed_connections">8192</limit>
</busconfig>
EOF
systemctl reload dbus'
# The REST bridge, set up as an operator would (its user, a token, the socket).
"$testhost" run -- sh -c 'systemd-sysusers &&
  head -c 24 /dev/urandom | base64 > /etc/agent-workspaces/api-token &&
  chmod 600 /etc/agent-workspaces/api-token &&
  systemctl restart agent-workspaces-http.socket'
"$testhost" run -- "$repo/$bin"
# MCP: agent-workspaces-mcp's exec round trip (stdio, the SDK's client) against D-Bus Exec.
"$testhost" run -- "$repo/$mcp_bin"
# Workspace state: snapshots, forks, restore, pause, and how many idle containers run at once
# (BENCH_DENSITY, 500 unless set).
"$testhost" run ${BENCH_DENSITY:+-E BENCH_DENSITY=$BENCH_DENSITY} -- "$repo/$state_bin"
# A running workspace's snapshot, the layer step, on ext4 and on an xfs with reflinks (an image
# loop-mounted in a mount namespace of the bench's own, released with it): on this machine,
# since none of it needs systemd.
command -v mkfs.xfs >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q xfsprogs >/dev/null
"$repo/$snap_bin"
