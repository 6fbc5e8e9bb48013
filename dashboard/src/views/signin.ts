import { ApiError, signIn } from "../api";
import { h, notice } from "../ui";

export function signInView(why: string, done: () => void): HTMLElement {
  const key = h("input", { type: "password", name: "key", autocomplete: "off", placeholder: "e2b_…", "aria-label": "API key", required: true });
  const message = h("div", {}, why ? notice(why, "info") : null);
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h("form", {
    class: "signin",
    onsubmit: async (event: Event) => {
      event.preventDefault();
      button.disabled = true;
      message.replaceChildren();
      try {
        await signIn(key.value.trim());
        done();
      } catch (error) {
        const text = error instanceof ApiError && error.status === 401
          ? "This API key was refused: check it, or create one with `vivarium keys create`."
          : String((error as Error).message);
        message.replaceChildren(notice(text));
        button.disabled = false;
      }
    },
  },
    h("h1", {}, "vivarium"),
    h("p", {}, "Sign in with an API key. You will see your team's sandboxes, templates and keys."),
    key, button, message);
  return h("div", { class: "center" }, form);
}
