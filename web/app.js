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

async function api(method, path, body, extraHeaders) {
  const headers = { Authorization: `Bearer ${token()}`, ...(extraHeaders || {}) };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
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
  if (extraHeaders && extraHeaders.Accept === 'text/event-stream' && res.ok) return res;
  if (res.status === 204) return null;
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!res.ok) {
    const err = (data && data.error) || {};
    throw new ApiError(res.status, err.code || 'error', err.message || `HTTP ${res.status}`, err.field);
  }
  return data;
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
  const containerSections = h('div', { hidden: true },
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
  pageCleanup = closeTerminal;
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
      if (ws.status === 'ready') {
        const list = await api('GET', `${base}/processes`);
        if (token !== pageToken) return;
        renderProcesses(list);
      }
      const container = ws.workspace_type === 'container';
      containerSections.hidden = !container;
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
