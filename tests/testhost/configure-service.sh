#!/bin/bash
# Writes the service's configuration in the running test host: container base trees and
# packages are cached outside the test host (in the harness cache, which survives it), so only
# the first build of a distro on this machine debootstraps.
set -euo pipefail
testhost=$(dirname "${BASH_SOURCE[0]}")/testhost.sh
cache=${TESTHOST_CACHE:-/var/cache/agent-workspaces-testhost}
leader=$("$testhost" env | sed -n 's/^export TESTHOST_LEADER=//p')
[ -n "$leader" ] || { echo "the test host is not running" >&2; exit 1; }
mkdir -p "/proc/$leader/root/etc/agent-workspaces"
printf '[container]\ncache_dir = "%s/service"\n' "$cache" >"/proc/$leader/root/etc/agent-workspaces/config.toml"
