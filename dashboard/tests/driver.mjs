// Drives the dashboard in a real headless Chromium (Debian's) with playwright-core, for the
// Python tests (tests/compat/test_dashboard.py): one JSON command per line on stdin, one JSON
// answer per line on stdout, so each test keeps its own steps and checks in pytest.
//
//   {"cmd": "goto", "url": ...}             {"cmd": "click", "selector": ...}
//   {"cmd": "fill", "selector", "value"}    {"cmd": "text", "selector"}  -> its text
//   {"cmd": "wait_text", "selector", "text", "timeout"?}
//   {"cmd": "count", "selector"}            {"cmd": "upload", "selector", "files"}
//   {"cmd": "type", "text"}                 {"cmd": "press", "key"}
//   {"cmd": "terminal_wait", "text", "timeout"?}  (waits for text in the xterm screen)
//   {"cmd": "screenshot", "path"}           {"cmd": "dialogs", "accept"}
//   {"cmd": "viewport", "width", "height"}  {"cmd": "select", "selector", "value"}
//   {"cmd": "download", "selector", "path"} -> the file's suggested name, saved at path
//   {"cmd": "requests"}  -> URLs the page asked for (hosts checked by the test)
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1360, height: 860 } });
const requested = [];
const consoleErrors = [];
page.on("request", (r) => requested.push(r.url()));
page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
let acceptDialogs = true;
page.on("dialog", (d) => (acceptDialogs ? d.accept() : d.dismiss()));

const DEFAULT_TIMEOUT = 20000;

// xterm.js renders into rows of the DOM; their text is what the user sees.
const screenText = () => page.locator(".xterm-rows").innerText().catch(() => "");

const commands = {
  goto: async ({ url }) => { await page.goto(url); },
  click: async ({ selector }) => { await page.locator(selector).first().click(); },
  fill: async ({ selector, value }) => { await page.locator(selector).first().fill(value); },
  press: async ({ key }) => { await page.keyboard.press(key); },
  type: async ({ text }) => { await page.keyboard.type(text); },
  text: async ({ selector }) => page.locator(selector).first().innerText(),
  count: async ({ selector }) => page.locator(selector).count(),
  wait_text: async ({ selector, text, timeout }) => {
    await page.locator(selector).filter({ hasText: text }).first().waitFor({ timeout: timeout ?? DEFAULT_TIMEOUT });
    return page.locator(selector).filter({ hasText: text }).first().innerText();
  },
  upload: async ({ selector, files }) => { await page.locator(selector).first().setInputFiles(files); },
  terminal_wait: async ({ text, timeout }) => {
    const deadline = Date.now() + (timeout ?? DEFAULT_TIMEOUT);
    for (;;) {
      const shown = await screenText();
      if (shown.includes(text)) return shown;
      if (Date.now() > deadline) {
        const status = await page.locator("[data-test=terminal-status]").innerText().catch(() => "(no status)");
        throw new Error(`the terminal never showed ${JSON.stringify(text)}; status: ${status}; console: ${consoleErrors.join(" | ")}; it shows:\n${shown}`);
      }
      await page.waitForTimeout(100);
    }
  },
  screenshot: async ({ path }) => { await page.screenshot({ path }); },
  download: async ({ selector, path }) => {
    const [download] = await Promise.all([page.waitForEvent("download"), page.locator(selector).first().click()]);
    await download.saveAs(path);
    return download.suggestedFilename();
  },
  viewport: async ({ width, height }) => { await page.setViewportSize({ width, height }); },
  select: async ({ selector, value }) => { await page.locator(selector).first().selectOption(value); },
  dialogs: async ({ accept }) => { acceptDialogs = accept; },
  requests: async () => requested.splice(0),
  console_errors: async () => consoleErrors.splice(0),
};

const lines = createInterface({ input: process.stdin });
process.stdout.write(JSON.stringify({ ready: true }) + "\n");
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  if (command.cmd === "quit") break;
  try {
    const handler = commands[command.cmd];
    if (!handler) throw new Error(`unknown command ${command.cmd}`);
    const value = await handler(command);
    process.stdout.write(JSON.stringify({ ok: true, value: value ?? null }) + "\n");
  } catch (error) {
    // What the page showed, for the failure's message.
    const shown = await page.locator("body").innerText({ timeout: 1000 }).catch(() => "(unreadable)");
    const detail = `\npage ${page.url()} shows:\n${shown.slice(0, 1500)}\nconsole errors: ${consoleErrors.join(" | ")}`;
    process.stdout.write(JSON.stringify({ ok: false, error: String(error?.message ?? error) + detail }) + "\n");
  }
}
await browser.close();
