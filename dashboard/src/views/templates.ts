// Templates: the operator's and the team's own; a team template's builds, status and logs.

import { api, type Build } from "../api";
import { fill, h, notice } from "../ui";
import { badge, empty } from "./common";

const REFRESH_MS = 3000;
const LOG_PAGE = 100;

export function templatesView(main: HTMLElement): void {
  const rows = h("tbody");
  const headings = ["Template", "ID", "Status", "CPU", "Memory", "Created"];
  fill(main, h("h1", {}, "Templates"),
    h("p", { class: "muted" }, "Build one with the SDK's Template.build() or `vivarium template build NAME --dockerfile FILE`."),
    h("table", { class: "list", "data-test": "templates" }, h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))), rows));
  void api.templates().then((list) => {
    fill(rows, list.length ? list.map((t) => h("tr", { "data-template": t.templateID },
      h("td", {}, t.public ? t.names[0] : h("a", { href: `#/templates/${encodeURIComponent(t.templateID)}` }, t.names[0] ?? t.templateID)),
      h("td", { class: "muted" }, t.templateID),
      h("td", {}, badge(t.buildStatus)),
      h("td", {}, t.cpuCount),
      h("td", {}, `${t.memoryMB} MiB`),
      h("td", {}, t.createdAt ? new Date(t.createdAt).toLocaleString() : "")))
      : empty(headings.length, "No templates."));
  }).catch((error) => fill(rows, empty(headings.length, String(error.message))));
}

export function templateView(main: HTMLElement, id: string): () => void {
  const builds = h("tbody");
  const log = h("pre", { class: "logs", "data-test": "build-log" });
  const status = h("div");
  const heading = h("h1", {}, id);
  fill(main, h("p", {}, h("a", { href: "#/templates" }, "← Templates")), heading, status,
    h("h2", {}, "Builds"),
    h("table", { class: "list" }, h("thead", {}, h("tr", {}, ["Build", "Status", "Started", "Finished"].map((t) => h("th", {}, t)))), builds),
    h("h2", {}, "Log"), log);
  let stopped = false;
  let timer = 0;
  let selected = "";
  let shown = 0; // log lines of the selected build already shown

  async function refresh(): Promise<void> {
    try {
      const template = await api.template(id);
      fill(heading, template.names[0] ?? id);
      if (!selected && template.builds.length) select(template.builds[0].buildID);
      fill(builds, template.builds.map((b: Build) => h("tr", { class: b.buildID === selected ? "selected" : "" },
        h("td", {}, h("a", { href: "#", onclick: (e: Event) => { e.preventDefault(); select(b.buildID); } }, b.buildID)),
        h("td", {}, badge(b.status)),
        h("td", {}, new Date(b.createdAt).toLocaleString()),
        h("td", {}, b.finishedAt ? new Date(b.finishedAt).toLocaleString() : ""))));
      if (selected) await readLog();
    } catch (error) {
      fill(status, notice(String((error as Error).message)));
    }
    if (!stopped) timer = window.setTimeout(() => void refresh(), REFRESH_MS);
  }

  function select(build: string): void {
    selected = build;
    shown = 0;
    log.textContent = "";
  }

  async function readLog(): Promise<void> {
    const build = selected;
    for (;;) {
      const page = await api.buildStatus(id, build, shown);
      if (build !== selected) return; // another build was picked meanwhile
      log.textContent += page.logEntries.map((e) => `${e.timestamp}  ${e.message}\n`).join("");
      shown += page.logEntries.length;
      fill(status, badge(page.status), page.reason ? notice(`The build failed${page.reason.step ? ` at step ${page.reason.step}` : ""}: ${page.reason.message}`) : null);
      if (page.logEntries.length < LOG_PAGE) return;
    }
  }

  void refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
