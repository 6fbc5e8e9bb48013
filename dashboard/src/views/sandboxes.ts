// The team's sandboxes, live: state, template, metadata, age, time left, CPU and memory.

import { api, type Metric, type Sandbox, sandboxes } from "../api";
import { bytes, duration, fill, h, since, until } from "../ui";
import { act, badge, DEFAULT_TIMEOUT_S, empty, lifecycleButtons } from "./common";

const REFRESH_MS = 3000;

export function sandboxesView(main: HTMLElement): () => void {
  const state = h("select", { "aria-label": "State", onchange: () => void refresh() },
    h("option", { value: "running,paused" }, "All states"),
    h("option", { value: "running" }, "Running"),
    h("option", { value: "paused" }, "Paused"));
  const metadata = h("input", { placeholder: "metadata: key=value&key2=value2", "aria-label": "Metadata filter", onchange: () => void refresh() });
  const template = h("select", { "aria-label": "Template" });
  const create = h("button", { class: "primary", onclick: () => void createOne() }, "Create sandbox");
  const messages = h("div", { class: "messages" });
  const rows = h("tbody");
  const headings = ["Sandbox", "State", "Template", "Metadata", "Age", "Time left", "CPU", "Memory", ""];
  fill(main,
    h("h1", {}, "Sandboxes"),
    h("div", { class: "toolbar" }, state, metadata, h("span", { class: "spacer" }), template, create),
    messages,
    h("table", { class: "list", "data-test": "sandboxes" },
      h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))), rows));

  let stopped = false;
  let timer = 0;
  let generation = 0; // only the newest refresh draws: an older, slower one is dropped
  async function refresh(): Promise<void> {
    clearTimeout(timer);
    const mine = ++generation;
    try {
      const list = await sandboxes(state.value.split(","), metadata.value.trim());
      list.sort((a, b) => Date.parse(b.startedAt) - Date.parse(a.startedAt));
      const running = list.filter((s) => s.state === "running").map((s) => s.sandboxID).slice(0, 100);
      const metrics = running.length ? (await api.latestMetrics(running)).sandboxes : {};
      if (stopped || mine !== generation) return;
      fill(rows, list.length ? list.map((s) => row(s, metrics[s.sandboxID])) : empty(headings.length, "No sandboxes."));
    } catch (error) {
      if (!stopped) fill(messages, h("div", { class: "notice error", role: "alert" }, String((error as Error).message)));
    }
    if (!stopped && mine === generation) timer = window.setTimeout(() => void refresh(), REFRESH_MS);
  }

  function row(s: Sandbox, m: Metric | undefined): HTMLTableRowElement {
    const id = s.sandboxID;
    const meta = Object.entries(s.metadata ?? {}).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`));
    return h("tr", { "data-sandbox": id },
      h("td", {}, h("a", { href: `#/sandboxes/${encodeURIComponent(id)}` }, id)),
      h("td", {}, badge(s.state)),
      h("td", {}, s.alias || s.templateID),
      h("td", {}, meta),
      h("td", {}, duration(since(s.startedAt))),
      h("td", {}, s.state === "running" ? duration(until(s.endAt)) : "—"),
      h("td", {}, m ? `${m.cpuUsedPct.toFixed(1)} % of ${m.cpuCount}` : "—"),
      h("td", {}, m ? `${bytes(m.memUsed)} / ${bytes(m.memTotal)}` : "—"),
      h("td", { class: "actions" }, lifecycleButtons(s, messages, refresh)));
  }

  async function createOne(): Promise<void> {
    if (!template.value) return;
    await act(create, messages, async () => {
      const made = await api.create(template.value, DEFAULT_TIMEOUT_S);
      location.hash = `#/sandboxes/${encodeURIComponent(made.sandboxID)}`;
    });
  }

  void api.templates().then((list) => {
    fill(template, list.filter((t) => t.buildStatus === "ready").map((t) => h("option", { value: t.templateID }, t.names[0] ?? t.templateID)));
  }).catch(() => undefined);
  void refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
