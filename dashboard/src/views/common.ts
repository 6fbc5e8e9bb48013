// What several views share: running an action from a button, and state badges.

import { ApiError } from "../api";
import { h, notice } from "../ui";

// Subjects (a sandbox id, say) with an action under way: lists redrawn meanwhile draw their
// buttons disabled, so a second click cannot send a second pause or kill.
const busy = new Set<string>();

export function isBusy(subject: string): boolean {
  return busy.has(subject);
}

/** Runs `action` with its button disabled; a failure is shown in `messages`. */
export async function act(
  button: HTMLButtonElement,
  messages: HTMLElement,
  action: () => Promise<unknown>,
  subject = "",
): Promise<boolean> {
  if (subject && busy.has(subject)) return false;
  if (subject) busy.add(subject);
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
    if (subject) busy.delete(subject);
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
