#!/bin/bash
# The Debian package in a clean test host (nothing of the service installed): `apt-get install`
# of the .deb pulls its dependencies from Debian's archive, then tests/package/inside.sh checks
# what an operator relies on, up to the purge. The test host's journal is saved to
# target/package-test/journal.txt.
#
#   tests/package/run.sh target/agent-workspaces_VERSION_ARCH.deb     (make package-test)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
deb=$(realpath "${1:?usage: tests/package/run.sh PACKAGE.deb}")
[ -f "$deb" ] || { echo "no package at $deb (make deb)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "the package test needs root (it boots a test host)" >&2; exit 1; }
case $deb in "$repo"/*) ;; *) echo "the package must be inside the repository ($repo), which the test host shares" >&2; exit 1 ;; esac
artifacts=$repo/target/package-test
mkdir -p "$artifacts"

# shellcheck source=tests/testhost/session.sh
. tests/testhost/session.sh
testhost_session "$artifacts" "package test" no-install
"$testhost" run -- bash "$repo/tests/package/inside.sh" "$deb"
