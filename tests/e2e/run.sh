#!/bin/bash
# The dashboard's end-to-end tests: boots a fresh test host (tests/testhost/testhost.sh), installs
# the service with `make install`, sets the REST bridge up as an operator would (its user, a
# token, the socket) with a small Library, then drives the dashboard in headless Chromium
# (Debian's `chromium`, through Playwright) from outside the test host, through this machine's
# 127.0.0.1:7600, which the test host forwards to its own (where the bridge listens).
#
# Screenshots of each page: target/e2e/screenshots/; traces of failures: target/e2e/results/.
#   KEEP_TESTHOST=1 tests/e2e/run.sh     leave the test host up afterwards
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
artifacts=$repo/target/e2e
rm -rf "$artifacts"
mkdir -p "$artifacts/screenshots"

[ "$(id -u)" = 0 ] || { echo "the end-to-end tests need root (they boot a test host)" >&2; exit 1; }
# Debian's Chromium, and Node.js for Playwright (any packaging of it will do): installed when
# missing, so that `make test` needs nothing done by hand on a fresh machine.
chromium=${CHROMIUM:-/usr/bin/chromium}
need=()
[ -x "$chromium" ] || [ -n "${CHROMIUM:-}" ] || need+=(chromium)
command -v npm >/dev/null || need+=(nodejs npm)
if ((${#need[@]})); then
  echo "installing ${need[*]} for the dashboard tests (apt-get)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
[ -x "$chromium" ] || { echo "no Chromium at $chromium" >&2; exit 1; }

# Playwright itself, pinned by package-lock.json; it downloads no browser.
(cd tests/e2e && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

# shellcheck source=tests/testhost/session.sh
. tests/testhost/session.sh
testhost_session "$artifacts" "end-to-end tests"
root=$testhost_root

# A Library: two skills, a tool, a debian-bookworm template.
lib=$root/var/lib/agent-workspaces/library
mkdir -p "$lib/skill/python-dev" "$lib/skill/web" "$lib/tool" "$lib/workspace-template"
echo '# Python development' >"$lib/skill/python-dev/SKILL.md"
echo '# Web development' >"$lib/skill/web/SKILL.md"
# A skill that cannot be installed (a link out of the Library): the pickers must not offer it.
mkdir -p "$lib/skill/leaky"
echo '# Leaky' >"$lib/skill/leaky/SKILL.md"
ln -s /etc/shadow "$lib/skill/leaky/shadow"
printf '#!/bin/sh\necho lint\n' >"$lib/tool/lint"
chmod 755 "$lib/tool/lint"
cat >"$lib/workspace-template/fullstack.json" <<'JSON'
{"name": "fullstack", "description": "Web and Python on Debian", "distro": "debian-bookworm",
 "skills": ["web"], "env_vars": {"FROM_TEMPLATE": "yes"},
 "init_script": "#!/bin/sh\necho \"$FROM_TEMPLATE\" > /workspace/template-env\n"}
JSON

token=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
"$testhost" run -- sh -c "systemd-sysusers && umask 077 && echo '$token' >/etc/agent-workspaces/api-token &&
  systemctl start agent-workspaces-http.socket"

cd tests/e2e
E2E_BASE_URL=http://127.0.0.1:7600 E2E_TOKEN=$token E2E_SCREENSHOTS=$artifacts/screenshots \
  E2E_OUTPUT=$artifacts/results CHROMIUM=$chromium npx playwright test "$@"
