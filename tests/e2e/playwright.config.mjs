// Playwright configuration for the dashboard's end-to-end tests; run by tests/e2e/run.sh,
// which brings up the test host and sets the E2E_* variables.
import { defineConfig } from '@playwright/test';

export default defineConfig({
  testDir: '.',
  timeout: 10 * 60 * 1000,
  expect: { timeout: 15 * 1000 },
  workers: 1,
  retries: 0,
  reporter: [['list']],
  outputDir: process.env.E2E_OUTPUT || '../../target/e2e/results',
  use: {
    baseURL: process.env.E2E_BASE_URL || 'http://127.0.0.1:7600',
    viewport: { width: 1366, height: 768 },
    trace: 'retain-on-failure',
    screenshot: 'only-on-failure',
    launchOptions: {
      // Debian's chromium; Playwright downloads no browser. Root needs --no-sandbox.
      executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
      args: ['--no-sandbox'],
    },
  },
});
