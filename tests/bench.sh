#!/bin/bash
# `make bench`: boots the test host, installs the service, and runs benches/exec_latency.rs
# inside it. Prints latency figures and ratios against baselines measured in the same run.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
testhost=tests/testhost/testhost.sh
bin=$(cargo bench --locked --bench exec_latency --no-run 2>&1 |
      sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$bin" ] || { echo "no benchmark binary" >&2; exit 1; }
"$testhost" up >/dev/null
"$testhost" install >/dev/null
tests/testhost/configure-service.sh
# 256 commands at once on one workspace and 20 builds at once are measured: let them all run.
config=$("$testhost" env | sed -n 's/^export TESTHOST_LEADER=//p')
config=/proc/$config/root/etc/agent-workspaces/config.toml
sed -i 's/^\[container\]$/[container]\nmax_concurrent_builds = 20/' "$config"
printf '\n[exec]\nmax_concurrent = 256\n' >>"$config"
"$testhost" run -- systemctl try-restart agent-workspaced
# The REST bridge, set up as an operator would (its user, a token, the socket).
"$testhost" run -- sh -c 'systemd-sysusers &&
  head -c 24 /dev/urandom | base64 > /etc/agent-workspaces/api-token &&
  chmod 600 /etc/agent-workspaces/api-token &&
  systemctl restart agent-workspaces-http.socket'
"$testhost" run -- "$repo/$bin"
