# shellcheck shell=bash
# Sourced, from the repository root, by the test runners (tests/system/run.sh, tests/e2e/run.sh):
# one fresh test host for a run, with the service installed and configured, its journal saved and
# the host taken down at the end (KEEP_TESTHOST=1 keeps it up).
#
#   testhost_session ARTIFACTS_DIR "what ran" [no-install]
# Sets $testhost (the script) and $testhost_root (the test host's / as seen from here).
# With no-install the test host is left clean (the package test installs the .deb itself).

testhost_session() {
  local artifacts=$1 what=$2 install=${3:-install}
  testhost=$PWD/tests/testhost/testhost.sh  # absolute: the runner may change directory
  # shellcheck disable=SC2064 # expand the arguments now
  trap "testhost_finish '$artifacts' '$what'" EXIT
  "$testhost" down >/dev/null
  "$testhost" up >/dev/null
  if [ "$install" = install ]; then
    "$testhost" install
    tests/testhost/configure-service.sh
  fi
  local leader
  leader=$("$testhost" env | sed -n 's/^export TESTHOST_LEADER=//p')
  # shellcheck disable=SC2034 # read by the runner that sources this
  testhost_root=/proc/$leader/root
}

testhost_finish() {
  local rc=$? artifacts=$1 what=$2
  "$testhost" journal "$artifacts/journal.txt" >/dev/null 2>&1 || true
  if [ "${KEEP_TESTHOST:-0}" = 1 ]; then
    echo "test host left running (KEEP_TESTHOST=1): $testhost enter / $testhost down" >&2
  else
    "$testhost" down >/dev/null 2>&1 || true
  fi
  [ "$rc" = 0 ] || echo "$what failed; the test host's journal and other artifacts are in $artifacts" >&2
  exit "$rc"
}
