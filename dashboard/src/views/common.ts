// What several views share: running an action from a button, a sandbox's lifecycle buttons,
// and state badges.

import { api, ApiError, type Sandbox } from "../api";
import { h, notice, until } from "../ui";

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

/**
 * A button whose action runs after the user confirms `question` (none: at once), then `after`.
 * `subject` is what the action is about (see `busy`).
 */
export function actionButton(
  label: string,
  messages: HTMLElement,
  action: () => Promise<unknown>,
  after: () => unknown,
  { question = "", subject = "", danger = false } = {},
): HTMLButtonElement {
  const b: HTMLButtonElement = h("button", { class: danger ? "danger" : "", "data-action": label.toLowerCase(), disabled: isBusy(subject) }, label);
  b.onclick = () => {
    if (question && !confirm(question)) return;
    void act(b, messages, action, subject).then(after);
  };
  return b;
}

/** Pause or resume, +5 min and kill, as the list and the sandbox's page both show them. */
export function lifecycleButtons(s: Sandbox, messages: HTMLElement, after: () => unknown): (HTMLButtonElement | null)[] {
  const id = s.sandboxID;
  const running = s.state === "running";
  return [
    running
      ? actionButton("Pause", messages, () => api.pause(id), after, { subject: id })
      : actionButton("Resume", messages, () => api.resume(id, DEFAULT_TIMEOUT_S), after, { subject: id }),
    running
      ? actionButton(`+${EXTEND_S / 60} min`, messages, () => api.setTimeout(id, (Math.max(0, until(s.endAt)) + EXTEND_S) | 0), after, { subject: id })
      : null,
    actionButton("Kill", messages, () => api.kill(id), after, { subject: id, danger: true, question: `Kill ${id}? Its memory and files are lost.` }),
  ];
}

export function badge(state: string): HTMLElement {
  return h("span", { class: `badge ${state}` }, state);
}

export function empty(columns: number, text: string): HTMLTableRowElement {
  return h("tr", {}, h("td", { colspan: columns, class: "empty" }, text));
}

export const EXTEND_S = 300;
export const DEFAULT_TIMEOUT_S = 900;
