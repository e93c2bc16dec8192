#!/bin/bash
# Runs inside a clean test host (tests/package/run.sh): installs the package as an operator
# would, with nothing else installed by hand, and checks it end to end.
set -euo pipefail
deb=$1
export DEBIAN_FRONTEND=noninteractive
step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
apt_quiet() { "$@" >/tmp/apt.log 2>&1 || { tail -n 30 /tmp/apt.log >&2; fail "$*"; }; }

step "apt-get install $deb"
apt_quiet apt-get update
apt_quiet apt-get install -y "$deb"
for p in wget debootstrap zstd systemd-container; do
  dpkg -s "$p" >/dev/null 2>&1 || fail "dependency $p not installed"
done

step "bus activation starts the service on first use"
if systemctl is-active --quiet agent-workspaced; then fail "the service ran before it was called"; fi
busctl call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces ListWorkspaces |
  grep -q '"host"' || fail "ListWorkspaces does not list the host workspace"
systemctl is-active --quiet agent-workspaced || fail "the service is not running after the call"

step "the REST bridge answers with the token the package generated"
[ "$(stat -c '%a %U' /etc/agent-workspaces/api-token)" = "600 root" ] || fail "token mode/owner"
token=$(cat /etc/agent-workspaces/api-token)
[ ${#token} -ge 40 ] || fail "token too short"
systemctl is-enabled --quiet agent-workspaces-http.socket || fail "the bridge's socket is not enabled"
code=$(curl -sS -o /tmp/list.json -w '%{http_code}' -H "Authorization: Bearer $token" http://127.0.0.1:7600/api/workspaces)
[ "$code" = 200 ] || fail "GET /api/workspaces: $code $(cat /tmp/list.json)"
grep -q '"name":"host"' /tmp/list.json || fail "the bridge's list: $(cat /tmp/list.json)"
code=$(curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:7600/api/workspaces)
[ "$code" = 401 ] || fail "without the token: $code"
id agent-workspaces-http >/dev/null || fail "the bridge's user was not created"

step "a debian-bookworm container builds (debootstrap from the archive) and runs a command"
workspacectl create box --type container --distro debian-bookworm --build >/dev/null
for _ in $(seq 1200); do
  status=$(workspacectl status box | sed -n 's/^ *Status: //p')
  [ "$status" = building ] || [ "$status" = pending ] || break
  sleep 0.5
done
[ "$status" = ready ] || { workspacectl init-log box | tail -n 20 >&2; fail "box is $status"; }
out=$(workspacectl exec box -- 'grep VERSION_CODENAME /etc/os-release; id -u' </dev/null)
[ "$out" = $'VERSION_CODENAME=bookworm\n0' ] || fail "exec in box: $out"
map=$(workspacectl exec box -- 'cat /proc/self/uid_map' </dev/null | tr -s ' ')
[[ $map != " 0 0 4294967295" ]] || fail "container root is host root: $map"

step "manual pages and completions are installed"
for f in /usr/share/man/man1/workspacectl.1.gz /usr/share/man/man8/agent-workspaced.8.gz \
  /usr/share/man/man8/agent-workspaces-http.8.gz /usr/share/bash-completion/completions/workspacectl; do
  [ -s "$f" ] || fail "missing $f"
done
zcat /usr/share/man/man1/workspacectl.1.gz | grep -q 'machinectl' || fail "workspacectl(1) text"

step "a reinstall keeps an operator's token"
echo operator-chosen-token-0123456789abcdef >/etc/agent-workspaces/api-token
apt_quiet apt-get install -y --reinstall "$deb"
[ "$(cat /etc/agent-workspaces/api-token)" = operator-chosen-token-0123456789abcdef ] || fail "the token was replaced"

step "purge removes what the package installed, and leaves workspaces' data"
workspacectl destroy box
mkdir -p /var/lib/agent-workspaces/library/skill/mine
apt_quiet apt-get purge -y agent-workspaces
for f in /usr/libexec/agent-workspaced /usr/libexec/agent-workspaces-agent /usr/libexec/agent-workspaces-http \
  /usr/bin/workspacectl /usr/share/dbus-1/system.d/org.agent.Workspaces.conf \
  /usr/share/dbus-1/system-services/org.agent.Workspaces.service /usr/share/polkit-1/actions/org.agent.workspaces.policy \
  /usr/lib/systemd/system/agent-workspaced.service /etc/agent-workspaces /var/cache/agent-workspaces \
  /var/log/agent-workspaces /var/lib/agent-workspaces/records /usr/share/man/man1/workspacectl.1.gz; do
  [ ! -e "$f" ] || fail "$f is left after the purge"
done
[ -d /var/lib/agent-workspaces/library/skill/mine ] || fail "the purge removed the Library"
systemctl is-active --quiet agent-workspaced && fail "the service still runs"
if busctl call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces ListWorkspaces 2>/tmp/err; then
  fail "org.agent.Workspaces still answers"
fi
grep -qi 'not activatable\|ServiceUnknown\|was not provided' /tmp/err || fail "after the purge: $(cat /tmp/err)"
step "package test passed"
