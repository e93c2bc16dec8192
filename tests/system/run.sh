#!/bin/bash
# Runs the system tests: boots a fresh disposable test host (real systemd, D-Bus, journald,
# machined, polkitd; see tests/testhost/testhost.sh), installs the service into it with
# `make install`, runs the tests of tests/system inside it as a transient unit, saves its journal
# to target/system-test/journal.txt and takes the test host down again.
#
#   KEEP_TESTHOST=1 tests/system/run.sh     leave the test host up afterwards, for debugging
#   tests/system/run.sh TESTNAME            pass a filter (or other libtest flags) to the tests
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
artifacts=$repo/target/system-test
mkdir -p "$artifacts"

[ "$(id -u)" = 0 ] || { echo "system tests need root (they boot a test host)" >&2; exit 1; }

cargo build --release --locked
# The MCP tests drive the server with the official Python SDK, installed in the test host from
# wheels fetched here.
tests/system/mcp-wheels.sh
# The hostile agent of tests/system/hostile.rs, static as the real one (it runs in containers).
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
  -p agent-workspaces-agent --example hostile_agent --target "$triple"
hostile=target/$triple/release/examples/hostile_agent
bin=$(cargo test --locked --test system --no-run 2>&1 | tee "$artifacts/build.log" |
      sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -1)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  cat "$artifacts/build.log" >&2
  echo "no system test binary" >&2
  exit 1
fi

# shellcheck source=tests/testhost/session.sh
. tests/testhost/session.sh
testhost_session "$artifacts" "system tests"
"$testhost" run -E AGENT_WORKSPACES_TESTHOST=1 -E "HOSTILE_AGENT=$hostile" -- \
  "$repo/$bin" --test-threads=1 "$@"
