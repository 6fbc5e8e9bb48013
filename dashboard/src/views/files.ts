// A file browser over envd: list, open a text file, upload, download, new folder, delete.

import { type Entry, type Envd } from "../envd";
import { bytes, fill, h, notice } from "../ui";

const SHOWN_BYTES = 1 << 20; // a text file is shown up to this size; download the rest
const HOME = "/home/user";

export function filesPanel(el: HTMLElement, envd: Envd): () => void {
  let cwd = HOME;
  const where = h("input", { class: "path", "aria-label": "Folder", value: cwd, onchange: () => void open(where.value.trim() || "/") });
  const up = h("button", { onclick: () => void open(parent(cwd)) }, "Up");
  const folder = h("input", { placeholder: "new folder name", "aria-label": "New folder name" });
  const makeDir = h("button", { onclick: () => void newFolder() }, "Create folder");
  const upload = h("input", { type: "file", "aria-label": "Upload a file", multiple: true, onchange: () => void sendFiles() });
  const progress = h("span", { class: "muted", "data-test": "upload-progress" });
  const messages = h("div", { class: "messages" });
  const rows = h("tbody");
  const viewer = h("div", { class: "viewer" });
  fill(el,
    h("div", { class: "toolbar" }, up, where, h("span", { class: "spacer" }), folder, makeDir, h("label", { class: "upload" }, "Upload ", upload), progress),
    messages,
    h("table", { class: "list", "data-test": "files" }, h("thead", {}, h("tr", {}, ["Name", "Size", ""].map((t) => h("th", {}, t)))), rows),
    viewer);

  async function open(path: string): Promise<void> {
    messages.replaceChildren();
    try {
      const entries = await envd.list(path);
      cwd = path;
      where.value = path;
      fill(rows, entries.length ? entries.map(row) : h("tr", {}, h("td", { colspan: 3, class: "empty" }, "Empty folder.")));
    } catch (error) {
      fill(messages, notice(`${path}: ${(error as Error).message}`));
    }
  }

  function row(entry: Entry): HTMLTableRowElement {
    const isDir = entry.type === "FILE_TYPE_DIRECTORY";
    const name = h("a", { href: "#", "data-name": entry.name, onclick: (e: Event) => {
      e.preventDefault();
      void (isDir ? open(entry.path) : show(entry));
    } }, isDir ? `${entry.name}/` : entry.name);
    const download = isDir ? null : h("button", { onclick: () => void downloadFile(entry) }, "Download");
    const remove = h("button", { class: "danger", onclick: () => void removeEntry(entry) }, "Delete");
    return h("tr", { "data-entry": entry.name }, h("td", {}, name), h("td", {}, isDir ? "" : bytes(Number(entry.size ?? 0))), h("td", { class: "actions" }, download, remove));
  }

  async function show(entry: Entry): Promise<void> {
    try {
      const { text, truncated } = await envd.readText(entry.path, SHOWN_BYTES);
      fill(viewer, h("h3", {}, entry.path), truncated ? notice(`Only the first ${bytes(SHOWN_BYTES)} are shown: download the file for the rest.`, "info") : null, h("pre", { "data-test": "file-text" }, text));
    } catch (error) {
      fill(viewer, notice(`${entry.path}: ${(error as Error).message}`));
    }
  }

  async function downloadFile(entry: Entry): Promise<void> {
    // A signed link: the browser saves it to disk as it arrives. Asked once first (and the
    // answer dropped unread), so that an error is shown here instead of replacing the page.
    const url = await envd.fileUrl(entry.path, "read");
    try {
      const check = await fetch(url);
      await check.body?.cancel();
      if (!check.ok) throw new Error(`HTTP ${check.status}`);
    } catch (error) {
      fill(messages, notice(`${entry.path} cannot be downloaded: ${(error as Error).message}`));
      return;
    }
    const link = h("a", { href: url, download: entry.name });
    document.body.append(link);
    link.click();
    link.remove();
  }

  async function removeEntry(entry: Entry): Promise<void> {
    if (!confirm(`Delete ${entry.path}?`)) return;
    try {
      await envd.remove(entry.path);
    } catch (error) {
      fill(messages, notice(`${entry.path}: ${(error as Error).message}`));
    }
    await open(cwd);
  }

  async function newFolder(): Promise<void> {
    const name = folder.value.trim();
    if (!name || name.includes("/")) {
      fill(messages, notice("A folder name is required, without '/'."));
      return;
    }
    try {
      await envd.makeDir(join(cwd, name));
      folder.value = "";
    } catch (error) {
      fill(messages, notice(`${name}: ${(error as Error).message}`));
    }
    await open(cwd);
  }

  async function sendFiles(): Promise<void> {
    for (const file of Array.from(upload.files ?? [])) {
      const path = join(cwd, file.name);
      try {
        await envd.upload(path, file, (sent) => (progress.textContent = `${file.name}: ${bytes(sent)} of ${bytes(file.size)}`));
        progress.textContent = `${file.name}: uploaded`;
      } catch (error) {
        fill(messages, notice(`${file.name}: ${(error as Error).message}`));
      }
    }
    upload.value = "";
    await open(cwd);
  }

  void open(cwd);
  return () => undefined;
}

function parent(path: string): string {
  const trimmed = path.replace(/\/+$/, "");
  return trimmed.slice(0, trimmed.lastIndexOf("/")) || "/";
}

function join(dir: string, name: string): string {
  return `${dir.replace(/\/+$/, "")}/${name}`;
}
