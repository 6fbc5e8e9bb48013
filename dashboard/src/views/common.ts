// What several views share: running an action from a button, and state badges.

import { ApiError } from "../api";
import { h, notice } from "../ui";

/** Runs `action` with its button disabled; a failure is shown in `messages`. */
export async function act(button: HTMLButtonElement, messages: HTMLElement, action: () => Promise<unknown>): Promise<boolean> {
  button.disabled = true;
  messages.replaceChildren();
  try {
    await action();
    return true;
  } catch (error) {
    const text = error instanceof ApiError ? `${error.message} (HTTP ${error.status})` : String((error as Error).message);
    messages.replaceChildren(notice(text));
    return false;
  } finally {
    button.disabled = false;
  }
}

export function badge(state: string): HTMLElement {
  return h("span", { class: `badge ${state}` }, state);
}

export function empty(columns: number, text: string): HTMLTableRowElement {
  return h("tr", {}, h("td", { colspan: columns, class: "empty" }, text));
}

export const EXTEND_S = 300;
export const DEFAULT_TIMEOUT_S = 900;
