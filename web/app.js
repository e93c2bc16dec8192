// Agent Workspaces dashboard: a client of the REST API (/api/...), nothing more. The token is
// kept in sessionStorage only (this browser tab's session). Pages are hash routes:
//   #/workspaces  #/workspaces/new  #/workspaces/<id>  #/templates
'use strict';

const TOKEN_KEY = 'agent-workspaces-token';
const POLL_MS = 2000;

let pollTimer = null;
let pageCleanup = null; // what a page leaves open (the terminal's WebSocket) closes on navigation
let pageToken = 0; // increases on every navigation; stale async work checks it

// ---- DOM helpers -------------------------------------------------------------------------

/** Builds an element: h('a', {href: '#'}, 'text', child...). Text is always text, never HTML. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function announce(text) {
  const live = document.getElementById('announce');
  live.textContent = '';
  setTimeout(() => { live.textContent = text; }, 30);
}

// ---- the API -----------------------------------------------------------------------------

class ApiError extends Error {
  /** `field`: the request field a 400 is about, as the API names it ("name", "limits.memory_max"). */
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field ? field.split('.')[0] : null;
  }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

/**
 * A request with the token: the response when it succeeded, else an ApiError with the API's code
 * and message. `body` goes as it is (a string, a Blob or File, nothing).
 */
async function apiFetch(method, path, body, headers) {
  let res;
  try {
    res = await fetch(path, { method, headers: { Authorization: `Bearer ${token()}`, ...(headers || {}) }, body });
  } catch (e) {
    throw new ApiError(0, 'unreachable', `The dashboard cannot reach the bridge: ${e.message}`);
  }
  if (res.status === 401) {
    // Signed in before: the token no longer works, so back to the sign-in page.
    if (token() && document.getElementById('token') === null) {
      sessionStorage.removeItem(TOKEN_KEY);
      render();
    }
    throw new ApiError(401, 'unauthorized', 'The API token was refused; sign in again.');
  }
  if (res.ok) return res;
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  const err = (data && data.error) || {};
  throw new ApiError(res.status, err.code || 'error', err.message || `HTTP ${res.status}`, err.field);
}

/** A JSON request: the parsed answer (null for none), or the response itself for an event stream. */
async function api(method, path, body, extraHeaders) {
  const headers = { ...(extraHeaders || {}) };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await apiFetch(method, path, body === undefined ? undefined : JSON.stringify(body), headers);
  if (extraHeaders && extraHeaders.Accept === 'text/event-stream') return res;
  if (res.status === 204) return null;
  const text = await res.text();
  try { return text ? JSON.parse(text) : null; } catch (_) { return null; }
}

// ---- routing -----------------------------------------------------------------------------

function route() {
  const parts = (location.hash || '#/workspaces').replace(/^#\/?/, '').split('/');
  if (parts[0] === 'templates') return { page: 'templates' };
  if (parts[0] === 'workspaces' && parts[1] === 'new') return { page: 'new' };
  if (parts[0] === 'workspaces' && parts[1]) return { page: 'workspace', id: decodeURIComponent(parts[1]) };
  return { page: 'workspaces' };
}

function stopPolling() {
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = null;
}

function poll(fn) {
  stopPolling();
  pollTimer = setInterval(fn, POLL_MS);
}

function render() {
  stopPolling();
  if (pageCleanup) pageCleanup();
  pageCleanup = null;
  pageToken += 1;
  const app = document.getElementById('app');
  app.replaceChildren();
  if (!token()) {
    app.append(signInPage());
    document.getElementById('token').focus();
    return;
  }
  const r = route();
  const main = h('main', { id: 'main', tabindex: '-1' });
  const nav = (href, label, current) =>
    h('li', {}, h('a', { href, 'aria-current': current ? 'page' : null }, label));
  app.append(h('div', { class: 'layout' },
    h('nav', { class: 'sidebar', 'aria-label': 'Main' },
      h('p', { class: 'brand' }, 'Agent Workspaces'),
      h('ul', {},
        nav('#/workspaces', 'Workspaces', r.page !== 'templates'),
        nav('#/templates', 'Templates', r.page === 'templates')),
      h('div', { class: 'signout' },
        h('button', { type: 'button', onclick: () => { sessionStorage.removeItem(TOKEN_KEY); render(); } }, 'Sign out'))),
    main));
  const pages = { workspaces: workspacesPage, new: newWorkspacePage, workspace: workspacePage, templates: templatesPage };
  pages[r.page](main, r, pageToken);
}

function focusHeading(main) {
  const h1 = main.querySelector('h1');
  if (h1) { h1.setAttribute('tabindex', '-1'); h1.focus(); }
}

function showError(container, err) {
  container.replaceChildren(h('div', { class: 'alert', role: 'alert' }, err.message));
}

// ---- sign in -----------------------------------------------------------------------------

function signInPage() {
  const error = h('div');
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'current-password', required: true,
    'aria-describedby': 'token-hint' });
  const form = h('form', { class: 'panel signin', onsubmit: async (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await api('GET', '/api/templates');
      location.hash = '#/workspaces';
      render();
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      showError(error, err.status === 401 ? new Error('That token was refused.') : err);
      input.setAttribute('aria-invalid', 'true');
      input.focus();
    }
  } },
  h('h1', {}, 'Sign in'),
  h('p', { class: 'note' }, 'Agent Workspaces dashboard'),
  error,
  h('div', { class: 'field' },
    h('label', { for: 'token' }, 'API token'),
    input,
    h('p', { class: 'hint', id: 'token-hint' },
      'The token in /etc/agent-workspaces/api-token. It is kept for this browser session only.')),
  h('button', { type: 'submit', class: 'primary' }, 'Sign in'));
  return h('main', { id: 'main' }, form);
}

// ---- the list ----------------------------------------------------------------------------

function statusCell(ws) {
  const s = ws.status;
  const step = ws.build_step;
  const badge = h('span', { class: `status status-${s}` },
    s === 'building' ? h('progress', { 'aria-label': `Building ${ws.name}` }) : null, s,
    s === 'building' && step ? h('span', { class: 'step' }, `: ${step}`) : null);
  return h('td', {}, badge,
    s === 'error' && ws.error_message ? h('div', { class: 'error-text' }, ws.error_message) : null);
}

async function workspacesPage(main, _r, token) {
  const body = h('tbody');
  const error = h('div');
  main.append(
    h('div', { class: 'toolbar' },
      h('h1', {}, 'Workspaces'),
      h('a', { class: 'button primary', href: '#/workspaces/new' }, 'New Workspace')),
    error,
    h('table', { 'aria-label': 'Workspaces' },
      h('thead', {}, h('tr', {}, ['Name', 'Type', 'Distro', 'Status'].map((c) => h('th', { scope: 'col' }, c)))),
      body));
  focusHeading(main);
  const refresh = async () => {
    try {
      const all = await api('GET', '/api/workspaces');
      if (token !== pageToken) return;
      error.replaceChildren();
      body.replaceChildren(...all.map((ws) => h('tr', { 'data-name': ws.name },
        h('td', {}, h('a', { href: `#/workspaces/${encodeURIComponent(ws.id)}` }, ws.name)),
        h('td', {}, ws.workspace_type),
        h('td', {}, ws.distro || '—'),
        statusCell(ws))));
    } catch (err) {
      if (token === pageToken) showError(error, err);
    }
  };
  await refresh();
  if (token === pageToken) poll(refresh);
}

// ---- new workspace -----------------------------------------------------------------------

function parseEnv(text) {
  const env = {};
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const eq = line.indexOf('=');
    if (eq < 1) {
      throw new ApiError(400, 'invalid_argument', `Invalid 'env_vars': "${line}" is not KEY=VALUE`, 'env_vars');
    }
    env[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return env;
}

function field(id, label, control, hint) {
  return h('div', { class: 'field', 'data-field': id },
    h('label', { for: id }, label), control,
    hint ? h('p', { class: 'hint', id: `${id}-hint` }, hint) : null,
    h('p', { class: 'field-error', id: `${id}-error`, hidden: true }));
}

function choiceGroup(id, legend, names) {
  const box = h('fieldset', { id, 'data-field': id, 'aria-describedby': `${id}-error` },
    h('legend', {}, legend),
    names.length
      ? h('div', { class: 'choices' }, names.map((n) =>
        h('label', {}, h('input', { type: 'checkbox', name: id, value: n }), n)))
      : h('p', { class: 'note' }, `The Library has no ${legend.toLowerCase()}.`),
    h('p', { class: 'field-error', id: `${id}-error`, hidden: true }));
  return box;
}

async function newWorkspacePage(main, _r, token) {
  main.append(h('h1', {}, 'New Workspace'));
  focusHeading(main);
  const top = h('div');
  main.append(top);
  let templates = [];
  let library = { skills: [], tools: [] };
  let distros = [];
  try {
    let doc;
    [templates, library, doc] = await Promise.all(
      [api('GET', '/api/templates'), api('GET', '/api/library'), api('GET', '/api/openapi.json')]);
    // The distros are the API's own: the OpenAPI document's, with their titles.
    distros = doc.components.schemas.CreateWorkspace.properties.distro.oneOf
      .map((d) => [d.const, d.title || d.const]);
  } catch (err) {
    showError(top, err);
  }
  if (token !== pageToken) return;

  const kind = h('fieldset', { 'data-field': 'workspace_type' },
    h('legend', {}, 'Kind'),
    h('label', {}, h('input', { type: 'radio', name: 'workspace_type', value: 'host', checked: true }),
      h('span', {}, h('strong', {}, 'Host'), ' — direct execution on the server')),
    h('label', {}, h('input', { type: 'radio', name: 'workspace_type', value: 'container' }),
      h('span', {}, h('strong', {}, 'Container'), ' — isolated environment')));
  const name = h('input', { id: 'name', type: 'text', required: true, autocomplete: 'off',
    'aria-describedby': 'name-hint name-error' });
  const template = h('select', { id: 'template', 'aria-describedby': 'template-hint template-error' },
    h('option', { value: '' }, 'None — configure manually'),
    templates.map((t) => h('option', { value: t.name }, t.description ? `${t.name} — ${t.description}` : t.name)));
  const distro = h('select', { id: 'distro', 'aria-describedby': 'distro-error' },
    h('option', { value: '' }, '(from the template)'),
    distros.map(([v, label]) => h('option', { value: v }, label)));
  distro.value = 'ubuntu-noble';
  const env = h('textarea', { id: 'env_vars', rows: 3, 'aria-describedby': 'env_vars-hint env_vars-error',
    placeholder: 'GREETING=hello' });
  const init = h('textarea', { id: 'init_script', rows: 5, 'aria-describedby': 'init_script-hint init_script-error',
    placeholder: '#!/bin/bash\napt install -y python3' });
  const network = h('select', { id: 'network', 'aria-describedby': 'network-hint network-error' },
    h('option', { value: 'internet' }, 'Internet — a network of its own, the host out of reach'),
    h('option', { value: 'private' }, 'Private — no network at all'),
    h('option', { value: 'host' }, "Host — the server's own network (no network boundary)"));
  const allow = h('textarea', { id: 'egress_allow', rows: 2, 'aria-describedby': 'egress_allow-hint egress_allow-error',
    placeholder: '*.debian.org\npypi.org' });
  const deny = h('textarea', { id: 'egress_deny', rows: 2, 'aria-describedby': 'egress_deny-hint egress_deny-error',
    placeholder: '203.0.113.0/24' });
  const containerOnly = h('div', { id: 'container-settings', hidden: true },
    field('template', 'Template', template, 'A template from the Library, or configure the container yourself.'),
    field('distro', 'Distribution', distro),
    field('init_script', 'Init script', init, 'Runs inside the container after each build; it must be idempotent.'),
    field('network', 'Network', network, 'Internet is right for untrusted code; Host gives it everything on the server.'),
    field('egress_allow', 'Reachable only', allow, 'Internet network: one network or domain name per line; empty for everything public.'),
    field('egress_deny', 'Never reachable', deny, 'One network or domain name per line.'));
  const form = h('form', { class: 'panel', novalidate: true },
    kind,
    field('name', 'Name', name, 'Lowercase letters, digits and dashes, e.g. python-project.'),
    containerOnly,
    choiceGroup('skills', 'Skills', library.skills || []),
    choiceGroup('tools', 'Tools', library.tools || []),
    field('env_vars', 'Environment variables', env, 'One KEY=VALUE per line; visible to every command.'),
    h('button', { type: 'submit', class: 'primary' }, 'Create'));
  main.append(form);

  const isContainer = () => form.querySelector('input[name="workspace_type"]:checked').value === 'container';
  kind.addEventListener('change', () => { containerOnly.hidden = !isContainer(); });
  template.addEventListener('change', () => {
    // A template brings its own distro unless one is chosen here.
    if (template.value && distro.value === 'ubuntu-noble') distro.value = '';
    if (!template.value && !distro.value) distro.value = 'ubuntu-noble';
  });

  const clearErrors = () => {
    top.replaceChildren();
    for (const p of form.querySelectorAll('.field-error')) { p.hidden = true; p.textContent = ''; }
    for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
  };
  const fieldError = (err) => {
    const f = err.field && form.querySelector(`[data-field="${err.field}"]`);
    const p = f && f.querySelector('.field-error');
    if (!p || (f.closest('[hidden]'))) { showError(top, err); return; }
    p.textContent = err.message;
    p.hidden = false;
    const control = f.querySelector('input, select, textarea');
    if (control) { control.setAttribute('aria-invalid', 'true'); control.focus(); }
    announce(err.message);
  };

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    clearErrors();
    const checked = (n) => [...form.querySelectorAll(`input[name="${n}"]:checked`)].map((c) => c.value);
    const body = { name: name.value.trim() };
    try {
      const envVars = parseEnv(env.value);
      if (Object.keys(envVars).length) body.env_vars = envVars;
      const skills = checked('skills');
      const tools = checked('tools');
      if (skills.length) body.skills = skills;
      if (tools.length) body.tools = tools;
      if (isContainer()) {
        body.workspace_type = 'container';
        // Created, then built when the user clicks Build (the documented flow).
        body.build_on_create = false;
        if (template.value) body.template = template.value;
        if (distro.value) body.distro = distro.value;
        if (init.value.trim()) body.init_script = init.value;
        body.network = network.value;
        const egress = { allow: lines(allow.value), deny: lines(deny.value) };
        if (egress.allow.length || egress.deny.length) body.egress = egress;
      } else {
        body.workspace_type = 'host';
      }
      const ws = await api('POST', '/api/workspaces', body);
      announce(`Created workspace ${ws.name}`);
      location.hash = `#/workspaces/${encodeURIComponent(ws.id)}`;
    } catch (err) {
      fieldError(err);
    }
  });
}

// ---- one workspace -----------------------------------------------------------------------

function confirmDialog(text, action) {
  return new Promise((resolve) => {
    const dialog = h('dialog', { 'aria-labelledby': 'confirm-title' },
      h('h2', { id: 'confirm-title' }, text),
      h('p', {}, 'This cannot be undone.'),
      h('form', { method: 'dialog', class: 'actions' },
        h('button', { value: 'cancel', autofocus: true }, 'Cancel'),
        h('button', { value: 'ok', class: 'danger' }, action)));
    dialog.addEventListener('close', () => { dialog.remove(); resolve(dialog.returnValue === 'ok'); });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** The non-empty lines of a text, trimmed. */
function lines(text) {
  return text.split('\n').map((l) => l.trim()).filter(Boolean);
}

function props(ws) {
  const row = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
  const list = (a) => (a && a.length ? a.join(', ') : '—');
  return h('dl', { class: 'props' },
    row('Status', h('span', { class: `status status-${ws.status}`, id: 'ws-status' },
      ws.status === 'building' ? h('progress', { 'aria-label': 'Building' }) : null, ws.status,
      ws.status === 'building' && ws.build_step ? h('span', { class: 'step' }, `: ${ws.build_step}`) : null)),
    ws.error_message ? row('Error', h('span', { class: 'error-text', role: 'alert' }, ws.error_message)) : null,
    row('Type', ws.workspace_type),
    ws.distro ? row('Distribution', ws.distro) : null,
    row('Id', ws.id),
    row('Directory', ws.path),
    ws.template ? row('Template', ws.template) : null,
    row('Skills', list(ws.skills)),
    row('Tools', list(ws.tools)),
    row('Environment', list(ws.env_var_names)),
    ws.network ? row('Network', ws.network) : null,
    ws.network === 'internet' ? row('Reachable only', list(ws.egress && ws.egress.allow)) : null,
    ws.network === 'internet' ? row('Never reachable', list(ws.egress && ws.egress.deny)) : null,
    row('Created', new Date(ws.created_at / 1000).toLocaleString()));
}

/** Runs a command, streaming its output into the page as it comes. */
async function runCommand(id, command, out) {
  const stdout = h('pre', { class: 'stdout' });
  const stderr = h('pre', { class: 'stderr' });
  const exit = h('p', { class: 'exit', role: 'status' }, 'Running…');
  out.replaceChildren(exit, h('h3', {}, 'stdout'), stdout, h('h3', {}, 'stderr'), stderr);
  try {
    const res = await api('POST', `/api/workspaces/${encodeURIComponent(id)}/exec`, { command },
      { Accept: 'text/event-stream' });
    if (!(res.headers.get('content-type') || '').startsWith('text/event-stream')) {
      const r = await res.json();
      stdout.textContent = r.stdout;
      stderr.textContent = r.stderr;
      exit.textContent = `Exit code ${r.exit_code}${r.timed_out ? ' (timed out)' : ''}`;
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        let event = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) event = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
        if (!data.length) continue;
        const payload = JSON.parse(data.join('\n'));
        if (event === 'stdout') stdout.append(payload);
        else if (event === 'stderr') stderr.append(payload);
        else if (event === 'exit') {
          exit.textContent = `Exit code ${payload.exit_code}${payload.timed_out ? ' (timed out)' : ''}`;
        } else if (event === 'error') {
          exit.textContent = `Failed: ${payload.error.message}`;
        }
      }
    }
  } catch (err) {
    exit.textContent = `Failed: ${err.message}`;
  }
}

// ---- files -------------------------------------------------------------------------------

const VIEW_MAX = 1024 * 1024; // a text file up to this size is shown in the page; larger ones are downloaded

/** A size in bytes, the way people read it: 512 B, 1.5 KiB, 12 MiB. */
function formatSize(n) {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = -1;
  do { v /= 1024; i += 1; } while (v >= 1024 && i < units.length - 1);
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/** The text of bytes that are UTF-8 with no NUL byte; null for anything else (binary). */
function asText(bytes) {
  let text;
  try { text = new TextDecoder('utf-8', { fatal: true }).decode(bytes); } catch (_) { return null; }
  return text.includes('\0') ? null : text;
}

/** Hands bytes to the browser as a download named `name`, as a link with `download` does. */
function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = h('a', { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  // Revoked a while later: the browser reads the blob after the click.
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

/**
 * The workspace page's file browser: a folder's entries (folders first), a text file shown in the
 * page, downloads (a folder as a .tar.gz), uploads by picking or dropping files, deletion after a
 * confirmation. Paths are relative to the workspace directory ('.'). The bytes go through fetch
 * with the token: a plain link cannot send it. The page shows `section`, calls `setReady` with
 * each refresh (the files can be reached once the workspace is ready) and `close` on leaving.
 */
function fileBrowser(base, token) {
  let parts = []; // the folder shown: names below the workspace directory
  let ready = null;
  let loads = 0; // increases with each listing asked for; an answer to an older one is dropped
  let viewPath = null; // the file the viewer shows
  let viewUrl = null; // the object URL it offers as a download, revoked when it closes
  const pathOf = (p) => (p.length ? p.join('/') : '.');
  const join = (name) => (parts.length ? `${pathOf(parts)}/${name}` : name);
  const query = (params) => new URLSearchParams(params).toString();
  const TYPES = { dir: 'folder', file: 'file', symlink: 'link', other: 'other' };

  const error = h('div');
  const status = h('p', { class: 'note', role: 'status' });
  const crumbs = h('ol');
  const body = h('tbody');
  const table = h('table', { id: 'file-list', 'aria-label': 'Folder contents', tabindex: '-1' },
    h('thead', {}, h('tr', {}, ['Name', 'Type', 'Size', 'Modified', 'Actions']
      .map((t) => h('th', { scope: 'col' }, t)))),
    body);
  const empty = h('p', { class: 'note', hidden: true }, 'This folder is empty.');
  const truncated = h('p', { class: 'note', hidden: true }, 'The folder has more entries than are listed here.');
  const zone = h('div', { class: 'dropzone' }, table, empty, truncated,
    h('p', { class: 'hint' }, 'Drop files here to upload them into this folder.'));
  const input = h('input', { type: 'file', id: 'file-upload', multiple: true, hidden: true,
    'aria-label': 'Files to upload' });
  const up = h('button', { type: 'button', disabled: true, onclick: () => go(parts.slice(0, -1)) }, 'Up');
  const view = h('div', { id: 'file-view', class: 'panel file-view', hidden: true });
  const note = h('p', { class: 'note' }, 'The files can be browsed once the workspace is ready.');
  const content = h('div', { hidden: true },
    h('div', { class: 'toolbar files-bar' },
      h('nav', { class: 'crumbs', 'aria-label': 'Folder' }, crumbs),
      up,
      h('button', { type: 'button', onclick: () => act(() => load()) }, 'Refresh'),
      h('button', { type: 'button',
        onclick: () => act(() => saveArchive(pathOf(parts), parts[parts.length - 1] || 'workspace')) },
      'Download folder'),
      h('button', { type: 'button', class: 'primary', onclick: () => input.click() }, 'Upload'),
      input),
    status, zone, view);
  const section = h('section', { id: 'files', 'aria-labelledby': 'files-heading' },
    h('h2', { id: 'files-heading' }, 'Files'), error, note, content);

  // Each user action: its error shown above the browser, the last one's cleared.
  const act = async (fn) => {
    error.replaceChildren();
    status.textContent = '';
    try {
      await fn();
    } catch (err) {
      if (token === pageToken) showError(error, err);
    }
  };

  const closeView = () => {
    if (viewUrl) URL.revokeObjectURL(viewUrl);
    viewUrl = null;
    viewPath = null;
    view.hidden = true;
    view.replaceChildren();
  };
  const showView = (path, ...children) => {
    closeView();
    const title = h('h3', { tabindex: '-1' }, path);
    view.append(h('div', { class: 'toolbar' }, title,
      h('button', { type: 'button', onclick: closeView }, 'Close')), ...children);
    view.hidden = false;
    viewPath = path;
    title.focus();
  };

  const renderCrumbs = () => {
    const here = parts;
    crumbs.replaceChildren(...['workspace', ...here].map((label, i) => h('li', {},
      i === here.length ? h('span', { 'aria-current': 'location' }, label)
        : h('button', { type: 'button', class: 'link', onclick: () => go(here.slice(0, i)) }, label))));
    up.disabled = here.length === 0;
  };

  const row = (e) => {
    const isDir = e.type === 'dir';
    const opens = e.type !== 'other'; // a socket or a device has nothing to show or download
    return h('tr', { 'data-name': e.name },
      h('td', {}, opens
        ? h('button', { type: 'button', class: isDir ? 'link dir' : 'link',
          onclick: () => (isDir ? go([...parts, e.name]) : act(() => open(e))) }, e.name)
        : e.name),
      h('td', {}, e.type === 'symlink' && e.target ? `link → ${e.target}` : TYPES[e.type] || e.type),
      h('td', {}, isDir ? '—' : formatSize(e.size)),
      h('td', {}, e.mtime_usec ? new Date(e.mtime_usec / 1000).toLocaleString() : '—'),
      h('td', { class: 'actions' },
        opens ? h('button', { type: 'button', 'aria-label': `Download ${e.name}`,
          onclick: () => act(() => download(e)) }, 'Download') : null,
        h('button', { type: 'button', class: 'danger', 'aria-label': `Delete ${e.name}`,
          onclick: () => act(() => remove(e)) }, 'Delete')));
  };

  /** Lists the folder `target` (the one shown, unless given), which is then the one shown. */
  const load = async (target = parts, focus = false) => {
    const seq = ++loads;
    const res = await api('GET', `${base}/files/list?${query({ path: pathOf(target), depth: '1' })}`);
    if (token !== pageToken || seq !== loads) return;
    if (target !== parts) closeView();
    parts = target;
    renderCrumbs();
    const entries = [...res.entries].sort((a, b) => ((a.type === 'dir') !== (b.type === 'dir')
      ? (a.type === 'dir' ? -1 : 1) : a.name.localeCompare(b.name)));
    body.replaceChildren(...entries.map(row));
    empty.hidden = entries.length > 0;
    truncated.hidden = !res.truncated;
    if (focus) table.focus();
  };
  const go = (target) => act(async () => {
    await load(target, true);
    announce(`Folder ${pathOf(target)}`);
  });

  const saveArchive = async (path, name) => {
    status.textContent = `Preparing ${name}.tar.gz…`;
    const res = await apiFetch('GET', `${base}/archive?${query({ path, gzip: 'true' })}`);
    saveBlob(await res.blob(), `${name}.tar.gz`);
    status.textContent = '';
    announce(`Downloaded ${name}.tar.gz`);
  };
  const download = async (e) => {
    const path = join(e.name);
    if (e.type === 'dir') { await saveArchive(path, e.name); return; }
    let res;
    try {
      res = await apiFetch('GET', `${base}/files?${query({ path })}`);
    } catch (err) {
      if (err.code !== 'is_a_directory') throw err;
      await saveArchive(path, e.name); // a link to a folder
      return;
    }
    saveBlob(await res.blob(), e.name);
    announce(`Downloaded ${e.name}`);
  };

  /** Shows a file: its text if it is UTF-8 text of at most VIEW_MAX bytes, else a download. */
  const open = async (e) => {
    const path = join(e.name);
    if (e.type === 'file' && e.size > VIEW_MAX) {
      showView(path, h('p', {}, `${e.name} is ${formatSize(e.size)}, too large to show here.`),
        h('button', { type: 'button', onclick: () => act(() => download(e)) }, `Download ${e.name}`));
      return;
    }
    let res;
    try {
      res = await apiFetch('GET', `${base}/files?${query({ path })}`);
    } catch (err) {
      if (err.code !== 'is_a_directory') throw err;
      await go([...parts, e.name]); // a link to a folder: into it
      return;
    }
    const blob = await res.blob();
    if (token !== pageToken) return;
    const text = blob.size <= VIEW_MAX ? asText(new Uint8Array(await blob.arrayBuffer())) : null;
    if (text === '') {
      showView(path, h('p', { class: 'note' }, 'The file is empty.'));
    } else if (text !== null) {
      // A named, focusable region, so that a long file can be scrolled by keyboard.
      showView(path, h('pre', { id: 'file-content', role: 'region', 'aria-label': `Contents of ${path}`,
        tabindex: '0' }, text));
    } else {
      const url = URL.createObjectURL(blob);
      showView(path, h('p', {}, blob.size > VIEW_MAX ? `${e.name} is ${formatSize(blob.size)}, too large to show here.`
        : `${e.name} is not text.`),
      h('a', { class: 'button', href: url, download: e.name }, `Download ${e.name}`));
      viewUrl = url;
    }
  };

  const remove = async (e) => {
    const isDir = e.type === 'dir';
    const question = isDir ? `Delete the folder ${e.name} and everything in it?` : `Delete ${e.name}?`;
    if (!(await confirmDialog(question, 'Delete'))) return;
    const path = join(e.name);
    await apiFetch('DELETE', `${base}/files?${query(isDir ? { path, recursive: 'true' } : { path })}`);
    if (viewPath && (viewPath === path || viewPath.startsWith(`${path}/`))) closeView();
    announce(`Deleted ${e.name}`);
    await load(parts, true);
  };

  /** Uploads files, one after the other, into the folder shown when they were picked. */
  const upload = (files) => act(async () => {
    const into = parts;
    let done = 0;
    let failure = null;
    for (const f of files) {
      status.textContent = `Uploading ${f.name} (${done + 1} of ${files.length})…`;
      const path = into.length ? `${pathOf(into)}/${f.name}` : f.name;
      try {
        await apiFetch('PUT', `${base}/files?${query({ path, create_parents: 'true' })}`, f,
          { 'Content-Type': 'application/octet-stream' });
      } catch (err) {
        failure = new ApiError(err.status, err.code, `${f.name}: ${err.message}`);
        break;
      }
      done += 1;
    }
    // Said by the status line (a live region), as was each file's progress.
    if (!done) status.textContent = '';
    else if (done === files.length) status.textContent = `Uploaded ${done === 1 ? files[0].name : `${done} files`}.`;
    else status.textContent = `Uploaded ${done} of ${files.length} files.`;
    try {
      if (into === parts) await load();
    } catch (err) {
      failure = failure || err;
    }
    if (failure) throw failure;
  });
  input.addEventListener('change', () => {
    const files = [...input.files];
    input.value = ''; // the same file can be picked again
    if (files.length) upload(files);
  });
  // Files dropped on the list; a dropped folder is refused (its entry cannot be read as bytes).
  zone.addEventListener('dragover', (e) => {
    if (!e.dataTransfer.types.includes('Files')) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = 'copy';
    zone.classList.add('dropping');
  });
  zone.addEventListener('dragleave', (e) => {
    if (!zone.contains(e.relatedTarget)) zone.classList.remove('dropping');
  });
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('dropping');
    const items = [...e.dataTransfer.items].filter((i) => i.kind === 'file');
    const isFolder = (i) => {
      const entry = i.webkitGetAsEntry && i.webkitGetAsEntry();
      return Boolean(entry && entry.isDirectory);
    };
    const files = items.filter((i) => !isFolder(i)).map((i) => i.getAsFile()).filter(Boolean);
    if (files.length) upload(files);
    if (files.length < items.length) {
      showError(error, new Error('Folders cannot be dropped here, only files.'));
    }
  });

  const setReady = (now) => {
    if (now === ready) return;
    ready = now;
    note.hidden = now;
    content.hidden = !now;
    if (now) act(() => load());
    else closeView();
  };
  return { section, setReady, close: closeView };
}

async function workspacePage(main, r, token) {
  const top = h('div');
  const header = h('div', { class: 'toolbar' }, h('h1', {}, r.id));
  const details = h('div', { class: 'panel' });
  const actions = h('div', { class: 'toolbar', role: 'group', 'aria-label': 'Actions' });
  // A named, focusable region, so that the scrolling log can be read and scrolled by keyboard.
  const initLog = h('pre', { id: 'init-log', role: 'region', 'aria-label': 'Init log', tabindex: '0' });
  const debug = h('div');
  const out = h('div', { id: 'exec-output' });
  const command = h('input', { id: 'command', type: 'text', autocomplete: 'off', spellcheck: 'false',
    placeholder: 'ls -la' });
  main.append(top, header, actions, details,
    h('h2', {}, 'Run a command'),
    h('form', { class: 'exec-form', onsubmit: (e) => {
      e.preventDefault();
      if (command.value.trim()) runCommand(r.id, command.value, out);
    } },
    h('label', { for: 'command', class: 'visually-hidden' }, 'Command'),
    command,
    h('button', { type: 'submit', class: 'primary' }, 'Run')),
    out);
  const terminalBox = h('div', { id: 'terminal', class: 'terminal', hidden: true });
  const terminalButton = h('button', { type: 'button', id: 'open-terminal' }, 'Open terminal');
  const processes = h('div', { id: 'processes' });
  const processOutput = h('pre', { id: 'process-output', class: 'stdout', hidden: true, role: 'region',
    'aria-label': 'Process output', tabindex: '0' });
  main.append(h('h2', {}, 'Terminal'), terminalButton, terminalBox,
    h('h2', {}, 'Processes'), processes, processOutput);
  const files = fileBrowser(`/api/workspaces/${encodeURIComponent(r.id)}`, token);
  main.append(files.section);
  const allowRules = h('textarea', { id: 'edit-egress_allow', rows: 3, 'aria-describedby': 'edit-egress-hint' });
  const denyRules = h('textarea', { id: 'edit-egress_deny', rows: 3, 'aria-describedby': 'edit-egress-hint' });
  const egressResult = h('div', { role: 'status' });
  const egressForm = h('form', { class: 'panel', id: 'egress-form', hidden: true, onsubmit: async (e) => {
    e.preventDefault();
    egressResult.replaceChildren();
    try {
      await api('PATCH', base, { egress: { allow: lines(allowRules.value), deny: lines(denyRules.value) } });
      egressResult.append(h('p', {}, 'Saved: the running container has the new rules.'));
      announce('Egress rules saved');
      await refresh();
    } catch (err) {
      showError(egressResult, err);
    }
  } },
  h('p', { class: 'hint', id: 'edit-egress-hint' },
    'One IPv4 network or domain name per line (*.example.com for the names below it). With entries in the first, only they are reachable.'),
  h('label', { for: 'edit-egress_allow' }, 'Reachable only'), allowRules,
  h('label', { for: 'edit-egress_deny' }, 'Never reachable'), denyRules,
  h('button', { type: 'submit' }, 'Save egress rules'), egressResult);
  // Snapshots: taken, listed, restored, forked (one click: the fork's name is filled in), deleted.
  const snapshotName = h('input', { id: 'snapshot-name', type: 'text', autocomplete: 'off',
    spellcheck: 'false', placeholder: 'good-state', 'aria-describedby': 'snapshot-hint' });
  const forkName = h('input', { id: 'fork-name', type: 'text', autocomplete: 'off', spellcheck: 'false' });
  const snapshotList = h('div', { id: 'snapshots' });
  const snapshotResult = h('div', { role: 'status' });
  const fork = async (snapshot) => {
    snapshotResult.replaceChildren();
    try {
      const made = await api('POST', `${base}/fork`, snapshot ? { name: forkName.value, snapshot }
        : { name: forkName.value });
      announce(`Forked workspace ${made.name}`);
      location.hash = `#/workspaces/${encodeURIComponent(made.id)}`;
    } catch (err) {
      showError(snapshotResult, err);
    }
  };
  const snapshotSection = h('section', { 'aria-labelledby': 'snapshots-heading' },
    h('h2', { id: 'snapshots-heading' }, 'Snapshots'),
    h('form', { class: 'toolbar', id: 'snapshot-form', onsubmit: async (e) => {
      e.preventDefault();
      snapshotResult.replaceChildren();
      try {
        const s = await api('POST', `${base}/snapshots`, { name: snapshotName.value });
        announce(`Snapshot ${s.name} taken`);
        snapshotName.value = '';
        await refresh();
      } catch (err) {
        showError(snapshotResult, err);
      }
    } },
    h('label', { for: 'snapshot-name' }, 'Snapshot name'), snapshotName,
    h('button', { type: 'submit' }, 'Take snapshot')),
    h('p', { class: 'hint', id: 'snapshot-hint' },
      'A running workspace is frozen while its own files are copied; a stopped one is captured at once.'),
    h('div', { class: 'toolbar' },
      h('label', { for: 'fork-name' }, 'Name of a fork'), forkName,
      h('button', { type: 'button', id: 'fork-now', onclick: () => fork('') }, 'Fork as it is now')),
    snapshotList, snapshotResult);
  let shownSnapshots = null;
  const loadSnapshots = async (ws) => {
    const key = JSON.stringify(ws.snapshots || []);
    if (key === shownSnapshots) return;
    shownSnapshots = key;
    const list = await api('GET', `${base}/snapshots`);
    snapshotList.replaceChildren(list.length === 0 ? h('p', {}, 'No snapshots.')
      : h('table', { 'aria-label': 'Snapshots' },
        h('thead', {}, h('tr', {}, ['Name', 'Taken', 'Size', 'Actions']
          .map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, list.map((s) => h('tr', {},
          h('td', {}, s.name),
          h('td', {}, new Date(s.created_at / 1000).toLocaleString()),
          h('td', {}, formatSize(s.bytes)),
          h('td', {},
            h('button', { type: 'button', 'aria-label': `Fork from snapshot ${s.name}`,
              onclick: () => fork(s.name) }, 'Fork'),
            h('button', { type: 'button', 'aria-label': `Restore snapshot ${s.name}`,
              onclick: async () => {
                if (!(await confirmDialog(`Restore ${ws.name} to snapshot ${s.name}? Its processes end.`, 'Restore'))) return;
                act(`Restored snapshot ${s.name}`, () => api('POST', `${base}/snapshots/${encodeURIComponent(s.name)}/restore`));
              } }, 'Restore'),
            h('button', { type: 'button', class: 'danger', 'aria-label': `Delete snapshot ${s.name}`,
              onclick: () => act(`Deleted snapshot ${s.name}`,
                () => api('DELETE', `${base}/snapshots/${encodeURIComponent(s.name)}`)) }, 'Delete')))))));
  };
  const containerSections = h('div', { hidden: true },
    snapshotSection,
    h('h2', { id: 'egress-heading', hidden: true }, 'Egress rules'), egressForm,
    h('h2', {}, 'Init log'), initLog,
    h('h2', {}, 'Debug report'),
    h('button', { type: 'button', onclick: () => loadDebug() }, 'Load debug report'),
    debug);
  main.append(containerSections);

  let last = null;
  const act = async (label, fn) => {
    top.replaceChildren();
    try {
      await fn();
      announce(label);
      await refresh();
    } catch (err) {
      showError(top, err);
    }
  };
  const base = `/api/workspaces/${encodeURIComponent(r.id)}`;
  const loadDebug = async () => {
    try {
      const info = await api('GET', `${base}/debug`);
      debug.replaceChildren(h('table', { 'aria-label': 'Debug report' },
        h('tbody', {}, Object.keys(info).sort().map((k) => h('tr', {},
          h('th', { scope: 'row' }, k),
          h('td', {}, Array.isArray(info[k]) ? info[k].join(', ') : String(info[k])))))));
    } catch (err) {
      showError(debug, err);
    }
  };
  // The terminal: a login shell in the workspace over the bridge's WebSocket (xterm.js).
  let session = null;
  const closeTerminal = () => {
    if (session) {
      session.ws.close();
      session.term.dispose();
      session = null;
    }
    terminalBox.hidden = true;
    terminalBox.replaceChildren();
    terminalButton.textContent = 'Open terminal';
  };
  pageCleanup = () => { closeTerminal(); files.close(); };
  const openTerminal = () => {
    if (session) { closeTerminal(); return; }
    const term = new Terminal({ cols: 100, rows: 28, scrollback: 2000 });
    terminalBox.hidden = false;
    term.open(terminalBox);
    // A browser's WebSocket cannot send Authorization: the token goes as a subprotocol.
    const hex = Array.from(new TextEncoder().encode(sessionStorage.getItem(TOKEN_KEY) || ''),
      (b) => b.toString(16).padStart(2, '0')).join('');
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${scheme}//${location.host}${base}/terminal?cols=${term.cols}&rows=${term.rows}`,
      ['agent-workspaces.terminal', `bearer.${hex}`]);
    ws.binaryType = 'arraybuffer';
    const encoder = new TextEncoder();
    ws.onmessage = (e) => {
      if (typeof e.data !== 'string') { term.write(new Uint8Array(e.data)); return; }
      try {
        const m = JSON.parse(e.data);
        if ('exit_code' in m) {
          term.write(`\r\n[the shell ended: exit code ${m.exit_code}]\r\n`);
          announce(`The terminal's shell ended with exit code ${m.exit_code}`);
        }
      } catch (_) { /* not ours to read */ }
    };
    ws.onerror = () => term.write('\r\n[the terminal could not connect]\r\n');
    term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d)); });
    term.onResize(({ cols, rows }) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ cols, rows }));
    });
    session = { term, ws };
    terminalButton.textContent = 'Close terminal';
    term.focus();
  };
  terminalButton.addEventListener('click', openTerminal);

  // Background processes: listed with each refresh, their output on demand.
  let shownProcesses = '';
  const showOutput = async (id) => {
    try {
      const o = await api('GET', `${base}/processes/${encodeURIComponent(id)}/output?max_bytes=65536`);
      processOutput.hidden = false;
      processOutput.textContent = o.data || '(no output)';
      announce(`Output of process ${id} shown`);
    } catch (err) {
      showError(top, err);
    }
  };
  const stopProcess = (id) => act(`Process ${id} stopped`,
    () => api('DELETE', `${base}/processes/${encodeURIComponent(id)}`));
  const renderProcesses = (list) => {
    const json = JSON.stringify(list);
    if (json === shownProcesses) return;
    shownProcesses = json;
    processes.replaceChildren(list.length === 0 ? h('p', {}, 'No background processes.')
      : h('table', { 'aria-label': 'Processes' },
        h('thead', {}, h('tr', {}, ['ID', 'Command', 'State', 'Exit code', 'Actions']
          .map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, list.map((p) => h('tr', {},
          h('td', {}, p.id),
          h('td', {}, h('code', {}, p.command)),
          h('td', {}, p.running ? 'running' : 'ended'),
          h('td', {}, p.running ? '' : String(p.exit_code)),
          h('td', {},
            h('button', { type: 'button', 'aria-label': `Output of process ${p.id}`,
              onclick: () => showOutput(p.id) }, 'Output'),
            p.running ? h('button', { type: 'button', class: 'danger', 'aria-label': `Stop process ${p.id}`,
              onclick: () => stopProcess(p.id) }, 'Stop') : null))))));
  };

  const renderActions = (ws) => {
    const container = ws.workspace_type === 'container';
    const busy = ws.status === 'building' || ws.status === 'destroying';
    actions.replaceChildren(...[
      container && (ws.status === 'pending' || ws.status === 'error')
        ? h('button', { type: 'button', class: 'primary', disabled: busy,
          onclick: () => act('Build started', () => api('POST', `${base}/build`)) }, 'Build') : null,
      container && ws.status !== 'pending'
        ? h('button', { type: 'button', disabled: busy,
          onclick: () => act('Rebuild started', () => api('POST', `${base}/rebuild`)) }, 'Rebuild') : null,
      container && ws.status === 'ready'
        ? h('button', { type: 'button', onclick: () => act('Paused',
          () => api('POST', `${base}/pause`)) }, 'Pause') : null,
      container && ws.status === 'paused'
        ? h('button', { type: 'button', class: 'primary', onclick: () => act('Resumed',
          () => api('POST', `${base}/resume`)) }, 'Resume') : null,
      container && ws.status === 'ready'
        ? h('button', { type: 'button', onclick: () => act('Init script ran again', async () => {
          const res = await api('POST', `${base}/rerun-init`);
          out.replaceChildren(h('p', { class: 'exit', role: 'status' }, `Init script: exit code ${res.exit_code}`),
            h('pre', { class: 'stdout' }, res.stdout), h('pre', { class: 'stderr' }, res.stderr));
        }) }, 'Re-run init') : null,
      ws.id !== 'host'
        ? h('button', { type: 'button', class: 'danger', disabled: ws.status === 'destroying',
          onclick: async () => {
            if (!(await confirmDialog(`Destroy workspace ${ws.name}?`, 'Destroy'))) return;
            top.replaceChildren();
            try {
              await api('DELETE', base);
              announce(`Destroyed workspace ${ws.name}`);
              location.hash = '#/workspaces';
            } catch (err) {
              showError(top, err);
            }
          } }, 'Destroy') : null,
    ].filter(Boolean));
  };
  const refresh = async () => {
    try {
      const ws = await api('GET', base);
      if (token !== pageToken) return;
      header.firstChild.textContent = ws.name;
      document.title = `${ws.name} — Agent Workspaces`;
      const changed = !last || last.status !== ws.status || last.error_message !== ws.error_message;
      details.replaceChildren(props(ws));
      if (changed) {
        renderActions(ws);
        if (last) announce(`Status: ${ws.status}`);
      }
      // A file call or a command resumes a paused workspace.
      const usable = ws.status === 'ready' || ws.status === 'paused';
      files.setReady(usable);
      if (usable) {
        const list = await api('GET', `${base}/processes`);
        if (token !== pageToken) return;
        renderProcesses(list);
      }
      const container = ws.workspace_type === 'container';
      containerSections.hidden = !container;
      snapshotSection.hidden = !usable;
      if (container && usable) {
        if (!forkName.value) forkName.value = `${ws.name}-fork-${Math.random().toString(16).slice(2, 6)}`;
        await loadSnapshots(ws);
        if (token !== pageToken) return;
      }
      const internet = ws.network === 'internet';
      egressForm.hidden = !internet;
      egressForm.previousSibling.hidden = !internet;
      // The form shows the rules as saved until the user edits them.
      if (internet && (!last || JSON.stringify(last.egress) !== JSON.stringify(ws.egress))) {
        allowRules.value = ((ws.egress && ws.egress.allow) || []).join('\n');
        denyRules.value = ((ws.egress && ws.egress.deny) || []).join('\n');
      }
      if (container && (changed || ws.status === 'building')) {
        const log = await api('GET', `${base}/init-log?max_lines=400`);
        if (token !== pageToken) return;
        const follow = initLog.scrollTop + initLog.clientHeight >= initLog.scrollHeight - 4;
        initLog.textContent = log.content || '(empty)';
        if (follow) initLog.scrollTop = initLog.scrollHeight;
      }
      last = ws;
    } catch (err) {
      if (token !== pageToken) return;
      if (err.status === 404) {
        showError(top, new Error(`No workspace '${r.id}'.`));
        stopPolling();
      } else {
        showError(top, err);
      }
    }
  };
  await refresh();
  focusHeading(main);
  if (token === pageToken) poll(refresh);
}

// ---- templates ---------------------------------------------------------------------------

async function templatesPage(main) {
  main.append(h('h1', {}, 'Templates'));
  focusHeading(main);
  const body = h('div');
  main.append(body);
  try {
    const all = await api('GET', '/api/templates');
    body.replaceChildren(all.length
      ? h('table', { 'aria-label': 'Templates' },
        h('thead', {}, h('tr', {}, ['Name', 'Distribution', 'Description'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, all.map((t) => h('tr', {}, h('td', {}, t.name), h('td', {}, t.distro || '—'), h('td', {}, t.description)))))
      : h('p', { class: 'note' }, 'The Library has no templates (workspace-template/NAME.json).'));
  } catch (err) {
    showError(body, err);
  }
}

window.addEventListener('hashchange', render);
window.addEventListener('DOMContentLoaded', render);
