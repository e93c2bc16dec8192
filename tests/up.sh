#!/bin/bash
# `make up`: brings agent-workspaced up for real and shows it answering on the system bus.
# On a machine whose PID 1 is systemd it installs the service there (make install, prefix /usr).
# Elsewhere it boots a disposable test host (tests/testhost/testhost.sh) and installs it inside.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
testhost=tests/testhost/testhost.sh
[ "$(id -u)" = 0 ] || { echo "make up needs root" >&2; exit 1; }

# busctl prints Exec's reply "iayayba{sv} CODE N b1..bN M c1..cM TIMED_OUT ..."; show it readably.
decode_exec() {
  local -a f; read -r -a f
  local i=2 n j text
  for stream in stdout stderr; do
    n=${f[i]}; text=""
    for ((j = 1; j <= n; j++)); do printf -v text '%s\\%03o' "$text" "${f[i + j]}"; done
    printf '   %s: %b' "$stream" "$text"; [ "$n" = 0 ] && echo
    i=$((i + n + 1))
  done
  echo "   exit_code: ${f[1]}, timed_out: ${f[i]}"
}

demo() {  # $1: how to run a command where the service runs
  local run=$1
  echo
  echo "== busctl call org.agent.Workspaces ... ListWorkspaces"
  $run busctl call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces ListWorkspaces
  echo "== busctl call org.agent.Workspaces ... Exec host 'echo hello from \$(hostname); id -un' (as root)"
  # shellcheck disable=SC2016 # $(hostname) runs in the workspace, not here
  $run busctl -- call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces Exec 'ssa{sv}' \
    host 'echo hello from $(hostname); id -un' 0 | tee /dev/stderr | decode_exec
  echo "== systemctl status agent-workspaced"
  $run systemctl --no-pager --lines=5 status agent-workspaced || true
}

if [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ]; then
  make install prefix=/usr
  systemctl daemon-reload
  busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig
  systemctl reload-or-restart agent-workspaced.service 2>/dev/null || true
  demo ""
  echo
  echo "agent-workspaced is installed and bus-activatable on this machine."
  echo "Logs: journalctl -u agent-workspaced   Remove: make uninstall prefix=/usr"
else
  echo "PID 1 is not systemd here: booting a disposable test host with real systemd" >&2
  "$testhost" up >/dev/null
  "$testhost" install
  tests/testhost/configure-service.sh
  demo "$testhost run --"
  # The REST bridge and the dashboard, set up as an operator would: its user, a token, the socket.
  "$testhost" run -- sh -c 'systemd-sysusers >/dev/null &&
    { [ -s /etc/agent-workspaces/api-token ] ||
      (umask 077; head -c 24 /dev/urandom | base64 | tr -d "/+=" >/etc/agent-workspaces/api-token); } &&
    systemctl start agent-workspaces-http.socket'
  leader=$("$testhost" env | sed -n 's/^export TESTHOST_LEADER=//p')
  token=$(cat "/proc/$leader/root/etc/agent-workspaces/api-token")
  echo "== curl http://127.0.0.1:7600/api/workspaces (the socket-activated REST bridge)"
  # shellcheck disable=SC2016 # the token is read inside the test host
  "$testhost" run -- sh -c 'curl -sS -H "Authorization: Bearer $(cat /etc/agent-workspaces/api-token)" \
    http://127.0.0.1:7600/api/workspaces; echo'
  cat <<EOT

agent-workspaced runs in the test host (systemd, D-Bus system bus, polkitd, journald).
  Dashboard and REST:  http://127.0.0.1:7600/   token: $token
  Shell inside:        $testhost enter      (then: busctl tree org.agent.Workspaces, journalctl -u agent-workspaced)
  One command inside:  $testhost run -- busctl call org.agent.Workspaces /org/agent/Workspaces org.agent.Workspaces ListWorkspaces
  From this machine:   eval "\$($testhost env)"; busctl --address="\$TESTHOST_BUS" tree org.agent.Workspaces
  Stop it:             make down
EOT
fi
