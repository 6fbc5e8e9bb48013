// One sandbox: its actions, a terminal, a file browser, resource charts, logs and events.

import { api, ApiError, type Sandbox } from "../api";
import { Chart, SERIES } from "../charts";
import { Envd } from "../envd";
import { openShell, type Shell } from "../terminal";
import { duration, fill, h, notice, until } from "../ui";
import { badge, lifecycleButtons } from "./common";
import { filesPanel } from "./files";

const REFRESH_MS = 5000;
const CHART_WINDOW_S = 15 * 60;
const TABS = ["Terminal", "Files", "Metrics", "Logs & events"] as const;
type Tab = (typeof TABS)[number];

export function sandboxView(main: HTMLElement, id: string): () => void {
  const title = h("div", { class: "title" });
  const actions = h("div", { class: "actions" });
  const messages = h("div", { class: "messages" });
  const tabBar = h("div", { class: "tabs", role: "tablist" });
  const panel = h("section", { class: "panel" });
  fill(main, h("p", {}, h("a", { href: "#/sandboxes" }, "← Sandboxes")), title, actions, messages, tabBar, panel);

  let sandbox: Sandbox | null = null;
  let tab: Tab = "Terminal";
  let stopTab: (() => void) | null = null;
  let stopped = false;
  let timer = 0;

  async function load(): Promise<Sandbox | null> {
    clearTimeout(timer);
    try {
      sandbox = await api.sandbox(id);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        gone();
        return null;
      }
      fill(messages, notice(String((error as Error).message)));
    }
    if (stopped) return null;
    if (sandbox) header(sandbox);
    timer = window.setTimeout(() => void load(), REFRESH_MS);
    return sandbox;
  }

  function gone(): void {
    stopTab?.();
    stopTab = null;
    sandbox = null;
    fill(actions);
    fill(tabBar);
    fill(title, h("h1", {}, id));
    fill(panel, notice(`Sandbox ${id} was not found: it was killed, or it is not one of your team's.`));
  }

  function header(s: Sandbox): void {
    const left = s.state === "running" ? `, ${duration(until(s.endAt))} left` : "";
    fill(title, h("h1", {}, s.sandboxID, " ", badge(s.state)), h("p", { class: "muted" }, `${s.alias || s.templateID}, ${s.cpuCount} vCPU, ${s.memoryMB} MiB${left}`));
    fill(actions, lifecycleButtons(s, messages, async () => {
      const now = await load();
      if (now && now.state !== s.state) show(tab); // a terminal for a resumed sandbox, say
    }));
  }

  function show(next: Tab): void {
    tab = next;
    stopTab?.();
    stopTab = null;
    fill(tabBar, TABS.map((t) => h("button", { role: "tab", class: t === tab ? "tab active" : "tab", "aria-selected": String(t === tab), onclick: () => show(t) }, t)));
    if (!sandbox) return;
    if (tab === "Metrics") stopTab = metricsPanel(panel, id);
    else if (tab === "Logs & events") stopTab = logsPanel(panel, id, sandbox.state === "running");
    else if (sandbox.state !== "running") {
      fill(panel, notice(`The sandbox is paused: resume it to use its ${tab === "Terminal" ? "terminal" : "files"}.`, "info"));
    } else {
      const envd = new Envd(sandbox, sandbox.envdAccessToken ?? null);
      stopTab = tab === "Terminal" ? terminalPanel(panel, envd) : filesPanel(panel, envd);
    }
  }

  function terminalPanel(el: HTMLElement, envd: Envd): () => void {
    const status = h("div", { "data-test": "terminal-status" });
    const screen = h("div", { class: "terminal", "data-test": "terminal" });
    fill(el, status, screen);
    let shell: Shell | null = openShell(screen, envd, (reason) => void ended(reason));
    let closed = false;
    async function ended(reason: { exited: boolean; error?: string }): Promise<void> {
      const restart = h("button", { onclick: () => show("Terminal") }, "New terminal");
      if (reason.exited) {
        fill(status, notice("The shell exited.", "info"), restart);
        return;
      }
      // The stream broke: say why, from the sandbox's state (a pause or kill may still be
      // finishing, so look a few times).
      fill(status, notice("The terminal lost its connection; checking the sandbox…", "info"));
      for (let attempt = 0; attempt < 15 && !closed; attempt++) {
        try {
          const now = await api.sandbox(id);
          if (now.state === "paused") {
            fill(status, notice("The sandbox was paused: this terminal has closed. Resume the sandbox to open a new one."));
            void load();
            return;
          }
        } catch (error) {
          if (error instanceof ApiError && error.status === 404) {
            fill(status, notice("The sandbox was killed: this terminal has closed."));
            timer = window.setTimeout(() => void load(), 2000);
            return;
          }
        }
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
      if (!closed) fill(status, notice(`The terminal lost its connection (${reason.error ?? "unknown"}).`), restart);
    }
    return () => {
      closed = true;
      shell?.close();
      shell = null;
    };
  }

  void load().then((s) => {
    if (s) show(tab);
  });
  return () => {
    stopped = true;
    clearTimeout(timer);
    stopTab?.();
  };
}

function metricsPanel(el: HTMLElement, id: string): () => void {
  const boxes = SERIES.map(() => h("div", { class: "chart" }));
  const messages = h("div");
  fill(el, messages, h("div", { class: "charts", "data-test": "charts" }, boxes));
  const charts = SERIES.map((series, i) => new Chart(boxes[i], series));
  let timer = 0;
  let stopped = false;
  async function refresh(): Promise<void> {
    const end = Math.floor(Date.now() / 1000);
    try {
      const samples = await api.metrics(id, end - CHART_WINDOW_S, end);
      if (stopped) return;
      fill(messages, samples.length ? null : notice("No samples yet: they are taken every few seconds while the sandbox runs.", "info"));
      charts.forEach((c) => c.update(samples));
    } catch (error) {
      fill(messages, notice(String((error as Error).message)));
    }
    if (!stopped) timer = window.setTimeout(() => void refresh(), REFRESH_MS);
  }
  void refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    charts.forEach((c) => c.destroy());
  };
}

function logsPanel(el: HTMLElement, id: string, running: boolean): () => void {
  const events = h("tbody");
  const logs = h("pre", { class: "logs", "data-test": "logs" });
  fill(el,
    h("h2", {}, "Lifecycle events"),
    h("table", { class: "list", "data-test": "events" }, h("thead", {}, h("tr", {}, ["Time", "Event", "By", "Why"].map((t) => h("th", {}, t)))), events),
    h("h2", {}, "Logs"), logs);
  void api.events(id).then((list) => {
    fill(events, list.map((e) => h("tr", {}, h("td", {}, new Date(e.timestamp).toLocaleString()), h("td", {}, e.type), h("td", {}, e.actor), h("td", {}, e.reason ?? ""))));
  }).catch((error) => fill(events, h("tr", {}, h("td", { colspan: 4 }, String(error.message)))));
  if (running) {
    void api.logs(id).then((body) => {
      logs.textContent = body.logs.map((l) => `${l.timestamp}  ${l.line}`).join("\n") || "No log lines.";
    }).catch((error) => (logs.textContent = String(error.message)));
  } else {
    logs.textContent = "Logs are kept while the sandbox runs.";
  }
  return () => undefined;
}
