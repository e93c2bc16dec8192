// The documented dashboard click-path, in headless Chromium, against the bridge and the service
// in the real-systemd test host (tests/e2e/run.sh). Screenshots of each page are kept in
// $E2E_SCREENSHOTS.
import { test, expect } from '@playwright/test';
import AxeBuilder from '@axe-core/playwright';
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';

const TOKEN = process.env.E2E_TOKEN;
const SHOTS = process.env.E2E_SCREENSHOTS || '../../target/e2e/screenshots';
const unique = (prefix) => `${prefix}-${randomBytes(4).toString('hex')}`;

test.describe.configure({ mode: 'serial' });

// Every request the pages make goes to the bridge: no fonts, CDNs or anything else.
let foreign = [];
test.beforeEach(async ({ page, baseURL }) => {
  foreign = [];
  const origin = new URL(baseURL).origin;
  page.on('request', (req) => {
    const url = new URL(req.url());
    if (url.protocol !== 'data:' && url.origin !== origin) foreign.push(req.url());
  });
});
test.afterEach(() => {
  expect(foreign, 'requests to other origins').toEqual([]);
});

// Each page that gets a screenshot is also checked with axe (WCAG 2 A and AA rules).
async function shot(page, name) {
  await page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });
  const { violations } = await new AxeBuilder({ page }).withTags(['wcag2a', 'wcag2aa']).analyze();
  const found = violations.map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(' ')).join(', ')}`);
  expect(found, `accessibility of ${name}`).toEqual([]);
}

async function signIn(page) {
  await page.goto('/');
  const input = page.getByLabel('API token');
  await input.fill(TOKEN);
  await input.press('Enter'); // the keyboard submits the form
  await expect(page.getByRole('heading', { level: 1, name: 'Workspaces' })).toBeVisible();
}

async function openNewWorkspace(page) {
  await page.getByRole('link', { name: 'New Workspace' }).click();
  await expect(page.getByRole('heading', { level: 1, name: 'New Workspace' })).toBeVisible();
}

async function run(page, command) {
  await page.getByLabel('Command').fill(command);
  await page.getByRole('button', { name: 'Run', exact: true }).click();
}

async function destroy(page, name) {
  await page.getByRole('button', { name: 'Destroy' }).click();
  const dialog = page.getByRole('dialog', { name: `Destroy workspace ${name}?` });
  await expect(dialog).toBeVisible();
  await shot(page, '08-destroy-confirmation');
  await dialog.getByRole('button', { name: 'Destroy' }).click();
  await expect(page.getByRole('heading', { level: 1, name: 'Workspaces' })).toBeVisible();
  await expect(page.getByRole('link', { name, exact: true })).toHaveCount(0);
}

test('sign in with the API token; a wrong one is refused', async ({ page }) => {
  await page.goto('/');
  await expect(page.getByRole('heading', { level: 1, name: 'Sign in' })).toBeVisible();
  await shot(page, '01-sign-in');
  await page.getByLabel('API token').fill('not-the-token-0000000');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await expect(page.getByRole('alert')).toHaveText('That token was refused.');
  await expect(page.getByLabel('API token')).toHaveAttribute('aria-invalid', 'true');
  await signIn(page);
  await expect(page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Workspaces' }))
    .toHaveAttribute('aria-current', 'page');
  // The default host workspace is always listed.
  await expect(page.getByRole('row').filter({ hasText: 'host' }).first()).toContainText('ready');
  await shot(page, '02-workspaces');
  // The token lives in this session only: signing out forgets it.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await expect(page.getByRole('heading', { level: 1, name: 'Sign in' })).toBeVisible();
});

test('a host workspace: create, run a command, destroy', async ({ page }) => {
  const name = unique('e2e-host');
  await signIn(page);
  await openNewWorkspace(page);
  await page.getByLabel('Host').check();
  await page.getByLabel('Name', { exact: true }).fill(name);
  // Only the skills that can be installed are offered (the Library's 'leaky' links out of it).
  const skills = page.getByRole('group', { name: 'Skills' });
  await expect(skills.getByRole('checkbox')).toHaveCount(2);
  await expect(skills.getByLabel('leaky')).toHaveCount(0);
  await skills.getByLabel('web').check();
  await page.getByLabel('Environment variables').fill('GREETING=hello from the dashboard');
  await shot(page, '03-new-host-workspace');
  await page.getByRole('button', { name: 'Create' }).click();
  await expect(page.getByRole('heading', { level: 1, name })).toBeVisible();
  await expect(page.locator('#ws-status')).toHaveText('ready');

  await run(page, 'echo "$GREETING"; ls .opencode/skill; echo oops >&2; exit 3');
  await expect(page.locator('#exec-output .exit')).toHaveText('Exit code 3');
  await expect(page.locator('#exec-output pre.stdout')).toHaveText('hello from the dashboard\nweb\n');
  await expect(page.locator('#exec-output pre.stderr')).toHaveText('oops\n');
  await shot(page, '04-host-workspace-command');

  // The list shows it, live.
  await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Workspaces' }).click();
  const row = page.getByRole('row').filter({ has: page.getByRole('link', { name, exact: true }) });
  await expect(row).toContainText('host');
  await expect(row).toContainText('ready');
  await row.getByRole('link', { name }).click();
  await destroy(page, name);
});

test('a terminal on the workspace page: type into a shell, see its answer, find it among the processes', async ({ page }) => {
  const name = unique('e2e-term');
  await signIn(page);
  await openNewWorkspace(page);
  await page.getByLabel('Host').check();
  await page.getByLabel('Name', { exact: true }).fill(name);
  await page.getByRole('button', { name: 'Create' }).click();
  await expect(page.locator('#ws-status')).toHaveText('ready');

  await page.getByRole('button', { name: 'Open terminal' }).click();
  const screen = page.locator('#terminal .xterm-rows');
  await expect(screen).toContainText('#', { timeout: 20000 }); // root's prompt
  // Typed as a person types: into the terminal, which has the focus.
  await page.keyboard.type('echo "sum=$((40+2))"');
  await page.keyboard.press('Enter');
  await expect(screen).toContainText('sum=42');
  // The shell is one of the workspace's background processes.
  const row = page.getByRole('row').filter({ hasText: 'exec bash -l' });
  await expect(row).toContainText('running');
  await shot(page, '11-workspace-terminal');
  await page.keyboard.type('exit 7');
  await page.keyboard.press('Enter');
  await expect(screen).toContainText('exit code 7');
  await expect(row).toContainText('ended');
  await expect(row.getByRole('cell').nth(3)).toHaveText('7');
  await row.getByRole('button', { name: /^Output of process/ }).click();
  await expect(page.locator('#process-output')).toContainText('sum=42');
  await page.getByRole('button', { name: 'Close terminal' }).click();
  await expect(page.locator('#terminal')).toBeHidden();
  await destroy(page, name);
});

test('the files of a workspace: upload, open, download, walk folders, delete', async ({ page }) => {
  const name = unique('e2e-files');
  const text = 'hello from the dashboard\n';
  await signIn(page);
  await openNewWorkspace(page);
  await page.getByLabel('Host').check();
  await page.getByLabel('Name', { exact: true }).fill(name);
  await page.getByRole('button', { name: 'Create' }).click();
  await expect(page.getByRole('heading', { level: 1, name })).toBeVisible();
  await expect(page.locator('#ws-status')).toHaveText('ready');

  const files = page.getByRole('region', { name: 'Files' });
  await expect(files.getByRole('navigation', { name: 'Folder' })).toHaveText('workspace');
  // Picked with the Upload button, as a person picks a file; it goes into the folder shown.
  const chooser = page.waitForEvent('filechooser');
  await files.getByRole('button', { name: 'Upload', exact: true }).click();
  await (await chooser).setFiles({ name: 'hello.txt', mimeType: 'text/plain', buffer: Buffer.from(text) });
  const row = files.getByRole('row').filter({ has: page.getByRole('button', { name: 'hello.txt', exact: true }) });
  await expect(row).toContainText('file');
  await expect(row).toContainText('25 B');
  await expect(files.getByRole('status')).toHaveText('Uploaded hello.txt.');

  // A text file opens in the page.
  await row.getByRole('button', { name: 'hello.txt', exact: true }).click();
  await expect(files.getByRole('region', { name: 'Contents of hello.txt' })).toHaveText(text);
  await shot(page, '13-workspace-files');

  // Downloaded through fetch with the token: the same bytes, under the file's name.
  const downloading = page.waitForEvent('download');
  await row.getByRole('button', { name: 'Download' }).click();
  const download = await downloading;
  expect(download.suggestedFilename()).toBe('hello.txt');
  expect(await readFile(await download.path(), 'utf8')).toBe(text);

  // Deleted after the confirmation: gone from the list, and from the viewer.
  await row.getByRole('button', { name: 'Delete' }).click();
  const dialog = page.getByRole('dialog', { name: 'Delete hello.txt?' });
  await expect(dialog).toBeVisible();
  await dialog.getByRole('button', { name: 'Delete' }).click();
  await expect(row).toHaveCount(0);
  await expect(page.locator('#file-view')).toBeHidden();

  // Folders: listed first, entered and left; one downloads as a .tar.gz.
  await run(page, 'mkdir -p notes && echo inside > notes/a.txt && echo top > alpha.txt');
  await expect(page.locator('#exec-output .exit')).toHaveText('Exit code 0');
  await files.getByRole('button', { name: 'Refresh' }).click();
  const notes = files.getByRole('row').filter({ has: page.getByRole('button', { name: 'notes', exact: true }) });
  await expect(notes).toContainText('folder');
  const listed = await files.getByRole('table', { name: 'Folder contents' }).locator('tbody tr')
    .evaluateAll((rows) => rows.map((r) => r.dataset.name));
  expect(listed.indexOf('notes')).toBeLessThan(listed.indexOf('alpha.txt'));
  expect(listed.indexOf('alpha.txt')).toBeGreaterThan(-1);
  await notes.getByRole('button', { name: 'notes', exact: true }).click();
  await expect(files.locator('[aria-current="location"]')).toHaveText('notes');
  await expect(files.getByRole('row').filter({ hasText: 'a.txt' })).toContainText('7 B');
  await files.getByRole('button', { name: 'Up', exact: true }).click();
  await expect(files.locator('[aria-current="location"]')).toHaveText('workspace');
  const archiving = page.waitForEvent('download');
  await notes.getByRole('button', { name: 'Download' }).click();
  const archive = await archiving;
  expect(archive.suggestedFilename()).toBe('notes.tar.gz');
  const gz = await readFile(await archive.path());
  expect([gz[0], gz[1]]).toEqual([0x1f, 0x8b]); // gzip's magic
  await destroy(page, name);
});

test('an invalid name is refused next to its field', async ({ page }) => {
  await signIn(page);
  await openNewWorkspace(page);
  await page.getByLabel('Name', { exact: true }).fill('Bad Name');
  await page.getByRole('button', { name: 'Create' }).click();
  const error = page.locator('#name-error');
  await expect(error).toBeVisible();
  await expect(error).toContainText("'name'");
  const input = page.getByLabel('Name', { exact: true });
  await expect(input).toHaveAttribute('aria-invalid', 'true');
  await expect(input).toBeFocused();
  await shot(page, '05-invalid-name');
  // Nothing was created.
  await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Workspaces' }).click();
  await expect(page.getByRole('heading', { level: 1, name: 'Workspaces' })).toBeVisible();
  await expect(page.getByRole('link', { name: 'Bad Name' })).toHaveCount(0);
});

test('a container from a template: build, watch it reach ready, run a command', async ({ page }) => {
  const name = unique('e2e-box');
  await signIn(page);
  await openNewWorkspace(page);
  await page.getByLabel('Container').check();
  // The distributions offered are the API's (from its OpenAPI document), with their titles.
  await expect(page.getByLabel('Distribution').locator('option')).toHaveText(
    ['(from the template)', 'Ubuntu Noble (24.04)', 'Ubuntu Jammy (22.04)', 'Debian Bookworm (12)', 'Arch Linux']);
  await page.getByLabel('Name', { exact: true }).fill(name);
  await page.getByLabel('Template').selectOption('fullstack');
  await page.getByRole('group', { name: 'Tools' }).getByLabel('lint').check();
  await shot(page, '06-new-container-workspace');
  await page.getByRole('button', { name: 'Create' }).click();
  await expect(page.getByRole('heading', { level: 1, name })).toBeVisible();
  await expect(page.locator('#ws-status')).toHaveText('pending');

  await page.getByRole('button', { name: 'Build' }).click();
  await expect(page.locator('#ws-status')).toHaveText(/building|ready/);
  await expect(page.locator('#ws-status')).toHaveText('ready', { timeout: 9 * 60 * 1000 });
  await expect(page.getByLabel('Init log')).toContainText('== init script finished: exit code 0');
  await expect(page.getByRole('group', { name: 'Actions' })).toHaveText(/^\s*Rebuild\s*Pause\s*Re-run init\s*Destroy\s*$/);

  // Output streams in while the command runs.
  await run(page, 'cat /workspace/template-env; ls /workspace/.opencode/tool; sleep 3; echo done');
  await expect(page.locator('#exec-output pre.stdout')).toHaveText('yes\nlint\n');
  await expect(page.locator('#exec-output .exit')).toHaveText('Running…');
  await expect(page.locator('#exec-output .exit')).toHaveText('Exit code 0');
  await expect(page.locator('#exec-output pre.stdout')).toHaveText('yes\nlint\ndone\n');
  await shot(page, '07-container-workspace');

  await page.getByRole('button', { name: 'Load debug report' }).click();
  const report = page.getByRole('table', { name: 'Debug report' });
  await expect(report.getByRole('row', { name: /machine_state/ })).toContainText('running');
  await page.getByRole('button', { name: 'Re-run init' }).click();
  await expect(page.locator('#exec-output .exit')).toHaveText('Init script: exit code 0');
  await shot(page, '09-container-debug-report');

  // Egress rules of its network of its own, changed on the running container from its page.
  await expect(page.locator('.props')).toContainText('internet');
  await page.getByLabel('Reachable only', { exact: true }).fill('*.debian.org\n192.0.2.0/24');
  await page.getByRole('button', { name: 'Save egress rules' }).click();
  await expect(page.locator('#egress-form')).toContainText('Saved');
  await expect(page.locator('.props')).toContainText('*.debian.org, 192.0.2.0/24');
  await shot(page, '09b-container-egress-rules');
  // A bad entry is refused in the API's words, and the rules stay.
  await page.getByLabel('Reachable only', { exact: true }).fill('169.254.169.254');
  await page.getByRole('button', { name: 'Save egress rules' }).click();
  await expect(page.locator('#egress-form')).toContainText('link-local');
  await expect(page.locator('.props')).toContainText('*.debian.org, 192.0.2.0/24');

  // Pause and resume.
  await page.getByRole('button', { name: 'Pause' }).click();
  await expect(page.locator('#ws-status')).toHaveText('paused');
  await page.getByRole('button', { name: 'Resume' }).click();
  await expect(page.locator('#ws-status')).toHaveText('ready');

  // A snapshot, a change, a restore; then a fork of the snapshot in one click.
  await run(page, 'echo before > /workspace/state');
  await expect(page.locator('#exec-output .exit')).toHaveText('Exit code 0');
  await page.getByLabel('Snapshot name').fill('good');
  await page.getByRole('button', { name: 'Take snapshot' }).click();
  const snapshots = page.getByRole('table', { name: 'Snapshots' });
  await expect(snapshots.getByRole('row', { name: /good/ })).toBeVisible();
  await run(page, 'echo after > /workspace/state');
  await expect(page.locator('#exec-output .exit')).toHaveText('Exit code 0');
  await shot(page, '14-workspace-snapshots');
  await page.getByRole('button', { name: 'Restore snapshot good' }).click();
  const restore = page.getByRole('dialog', { name: /Restore .* to snapshot good/ });
  await restore.getByRole('button', { name: 'Restore' }).click();
  await run(page, 'cat /workspace/state');
  await expect(page.locator('#exec-output pre.stdout')).toHaveText('before\n');
  const forkName = await page.getByLabel('Name of a fork').inputValue();
  await page.getByRole('button', { name: 'Fork from snapshot good' }).click();
  await expect(page.getByRole('heading', { level: 1, name: forkName })).toBeVisible();
  await expect(page.locator('#ws-status')).toHaveText('ready');
  await run(page, 'cat /workspace/state; hostname');
  await expect(page.locator('#exec-output pre.stdout')).toHaveText(`before\n${forkName}\n`);
  await destroy(page, forkName);
  await page.getByRole('link', { name, exact: true }).click();
  await expect(page.getByRole('heading', { level: 1, name })).toBeVisible();

  await destroy(page, name);
});

test('the templates page lists the Library templates', async ({ page }) => {
  await signIn(page);
  await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Templates' }).click();
  const row = page.getByRole('row').filter({ hasText: 'fullstack' });
  await expect(row).toContainText('debian-bookworm');
  await shot(page, '10-templates');
});
