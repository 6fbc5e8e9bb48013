// The team's snapshots: start sandboxes from them with Sandbox.create(<id or name>).

import { api } from "../api";
import { fill, h } from "../ui";
import { actionButton, empty } from "./common";

export function snapshotsView(main: HTMLElement): void {
  const rows = h("tbody");
  const messages = h("div", { class: "messages" });
  fill(main, h("h1", {}, "Snapshots"),
    h("p", { class: "muted" }, "Taken with create_snapshot(); Sandbox.create(<snapshot id or name>) starts a sandbox from one."),
    messages,
    h("table", { class: "list", "data-test": "snapshots" }, h("thead", {}, h("tr", {}, ["Snapshot", "Names", ""].map((t) => h("th", {}, t)))), rows));
  async function refresh(): Promise<void> {
    try {
      const list = await api.snapshots();
      fill(rows, list.length ? list.map((s) => {
        const remove = actionButton("Delete", messages, () => api.deleteSnapshot(s.snapshotID), refresh,
          { danger: true, question: `Delete snapshot ${s.snapshotID}?` });
        return h("tr", { "data-snapshot": s.snapshotID }, h("td", {}, s.snapshotID), h("td", {}, s.names.join(", ")), h("td", { class: "actions" }, remove));
      }) : empty(3, "No snapshots."));
    } catch (error) {
      fill(rows, empty(3, String((error as Error).message)));
    }
  }
  void refresh();
}
