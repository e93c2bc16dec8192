// A browser in a workspace, driven from outside through the port proxy (tests/e2e/run.sh): a
// debian-bookworm container whose init script installs Debian's chromium; two background
// processes in it, a small HTTP server and headless Chromium with its DevTools port, run as an
// unprivileged user so that Chromium's own sandbox is on; Playwright on this machine connects
// over CDP through /api/workspaces/{id}/ports/9333, opens the page the workspace serves, reads
// its title and takes a screenshot.
import { test, expect } from '@playwright/test';
import { randomBytes } from 'node:crypto';

const TOKEN = process.env.E2E_TOKEN;
const BASE = process.env.E2E_BASE_URL || 'http://127.0.0.1:7600';
const SHOTS = process.env.E2E_SCREENSHOTS || '../../target/e2e/screenshots';
const DEVTOOLS = 9333;
const SITE = 8765;

const INIT = `#!/bin/sh
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium python3 >/dev/null
id browser >/dev/null 2>&1 || useradd -m browser
mkdir -p /workspace/site
printf '<!doctype html><html lang="en"><title>Hello from the workspace</title><h1>Served inside</h1></html>\\n' \\
  > /workspace/site/index.html
`;

async function api(method, path, body) {
  const res = await fetch(`${BASE}${path}`, {
    method,
    headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

async function until(what, seconds, fn) {
  const end = Date.now() + seconds * 1000;
  let last;
  while (Date.now() < end) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
  throw new Error(`${what} within ${seconds} s; last: ${last}`);
}

test('Chromium in a container workspace, driven over CDP through the port proxy', async ({ playwright }) => {
  test.setTimeout(25 * 60 * 1000);
  const name = `e2e-browser-${randomBytes(4).toString('hex')}`;
  await api('POST', '/api/workspaces', {
    name, workspace_type: 'container', distro: 'debian-bookworm', init_script: INIT, build_on_create: true,
  });
  try {
    const ws = await until('the workspace to be built', 1200, async () => {
      const w = await api('GET', `/api/workspaces/${name}`);
      if (w.status === 'error') {
        const log = await api('GET', `/api/workspaces/${name}/init-log?max_lines=40`);
        throw new Error(`build failed: ${w.error_message}\n${log.content}`);
      }
      return w.status === 'ready' && w;
    });
    expect(ws.status).toBe('ready');
    const start = (command) => api('POST', `/api/workspaces/${name}/processes`, { command });
    await start(`exec python3 -m http.server ${SITE} --bind 127.0.0.1 --directory /workspace/site`);
    // Unprivileged, Chromium's sandbox works inside the container: no --no-sandbox.
    const chromium = await start(`exec runuser -u browser -- chromium --headless=new --disable-gpu `
      + `--remote-debugging-address=127.0.0.1 --remote-debugging-port=${DEVTOOLS} `
      + `--user-data-dir=/home/browser/profile about:blank`);

    const proxy = `${BASE}/api/workspaces/${name}/ports/${DEVTOOLS}`;
    const version = await until('the DevTools endpoint through the proxy', 120, async () => {
      const res = await fetch(`${proxy}/json/version`, { headers: { Authorization: `Bearer ${TOKEN}` } });
      return res.ok && res.json();
    });
    // The browser names its own address; reach it through the proxy instead.
    const endpoint = version.webSocketDebuggerUrl.replace(/^ws:\/\/[^/]+/, proxy.replace(/^http/, 'ws'));
    const browser = await playwright.chromium.connectOverCDP(endpoint, {
      headers: { Authorization: `Bearer ${TOKEN}` },
    });
    const context = browser.contexts()[0] ?? await browser.newContext();
    const page = await context.newPage();
    // The browser is inside: the workspace's own loopback.
    await until('the page served inside', 60, async () => (await page.goto(`http://127.0.0.1:${SITE}/`)).ok());
    await expect(page).toHaveTitle('Hello from the workspace');
    await expect(page.getByRole('heading', { name: 'Served inside' })).toBeVisible();
    await page.screenshot({ path: `${SHOTS}/12-browser-in-a-workspace.png` });
    await browser.close();

    // The sandbox is on: Chromium's processes run as the unprivileged user.
    // (Chromium's processes by their executable: this check's own command line names both.)
    const check = await api('POST', `/api/workspaces/${name}/exec`, {
      command: 'n=0; s=0; for d in /proc/[0-9]*; do case "$(readlink $d/exe 2>/dev/null)" in */chromium/chromium) '
        + '[ "$(stat -c %U $d)" = browser ] && n=$((n+1)); '
        + 'case "$(tr "\\0" " " < $d/cmdline)" in *--no-sandbox*) s=$((s+1));; esac;; esac; done; echo $n; echo $s',
    });
    const [asBrowser, noSandbox] = check.stdout.trim().split('\n').map(Number);
    expect(asBrowser).toBeGreaterThan(0);
    expect(noSandbox).toBe(0);
    await api('DELETE', `/api/workspaces/${name}/processes/${chromium.id}`);
  } finally {
    await api('DELETE', `/api/workspaces/${name}`).catch(() => {});
  }
});
