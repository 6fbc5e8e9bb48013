// The team's API keys: only their prefixes are stored, so a new key is shown once.

import { api } from "../api";
import { fill, h, notice } from "../ui";
import { act, actionButton, empty } from "./common";

export function keysView(main: HTMLElement): void {
  const rows = h("tbody");
  const messages = h("div", { class: "messages" });
  const name = h("input", { placeholder: "name of the new key", "aria-label": "Key name" });
  const create: HTMLButtonElement = h("button", { class: "primary" }, "Create key");
  const created = h("div");
  create.onclick = () => void act(create, messages, async () => {
    const key = await api.createKey(name.value.trim());
    name.value = "";
    fill(created, notice(`New key "${key.name}", shown only this once:`, "info"), h("code", { class: "secret", "data-test": "new-key" }, key.key));
    await refresh();
  });
  fill(main, h("h1", {}, "API keys"), h("div", { class: "toolbar" }, name, create), created, messages,
    h("table", { class: "list", "data-test": "keys" }, h("thead", {}, h("tr", {}, ["Name", "Key", "Created", "Last used", ""].map((t) => h("th", {}, t)))), rows));

  async function refresh(): Promise<void> {
    try {
      const list = await api.keys();
      fill(rows, list.length ? list.map((k) => {
        const revoke = actionButton("Revoke", messages, () => api.revokeKey(k.id), refresh,
          { danger: true, question: `Revoke the key "${k.name}"? Programs using it are refused from now on.` });
        return h("tr", { "data-key": k.name },
          h("td", {}, k.name), h("td", {}, h("code", {}, `${k.mask.prefix}…`)),
          h("td", {}, new Date(k.createdAt).toLocaleString()),
          h("td", {}, k.lastUsed ? new Date(k.lastUsed).toLocaleString() : "never"),
          h("td", { class: "actions" }, revoke));
      }) : empty(5, "No keys."));
    } catch (error) {
      fill(rows, empty(5, String((error as Error).message)));
    }
  }
  void refresh();
}
