// The dashboard: a hash-routed single page over the public API (api.ts) and envd (envd.ts).

import "./style.css";

import { forget, savedKey } from "./api";
import { fill, h } from "./ui";
import { keysView } from "./views/keys";
import { sandboxView } from "./views/sandbox";
import { sandboxesView } from "./views/sandboxes";
import { signInView } from "./views/signin";
import { snapshotsView } from "./views/snapshots";
import { templatesView, templateView } from "./views/templates";

/** A view fills `main` and returns what stops its timers and streams when the page changes. */
export type View = (main: HTMLElement, param: string) => (() => void) | void;

const ROUTES: [RegExp, View, string][] = [
  [/^#\/sandboxes$/, sandboxesView, "sandboxes"],
  [/^#\/sandboxes\/(.+)$/, sandboxView, "sandboxes"],
  [/^#\/templates$/, templatesView, "templates"],
  [/^#\/templates\/(.+)$/, templateView, "templates"],
  [/^#\/snapshots$/, snapshotsView, "snapshots"],
  [/^#\/keys$/, keysView, "keys"],
];

const app = document.getElementById("app") as HTMLElement;
let cleanup: (() => void) | void;
let signedOutWhy = "";

function render(): void {
  cleanup?.();
  cleanup = undefined;
  if (!savedKey()) {
    fill(app, signInView(signedOutWhy, () => {
      signedOutWhy = "";
      if (!ROUTES.some(([pattern]) => pattern.test(location.hash))) location.hash = "#/sandboxes";
      render();
    }));
    return;
  }
  const route = ROUTES.find(([pattern]) => pattern.test(location.hash));
  if (!route) {
    location.hash = "#/sandboxes";
    return;
  }
  const [pattern, view, section] = route;
  let param: string;
  try {
    param = decodeURIComponent(location.hash.match(pattern)?.[1] ?? "");
  } catch {
    location.hash = "#/sandboxes"; // a hand-edited, malformed address
    return;
  }
  const main = h("main");
  const link = (name: string, title: string) =>
    h("a", { href: `#/${name}`, class: name === section ? "active" : "" }, title);
  const signOut = h("button", { class: "link", onclick: () => { forget(); render(); } }, "Sign out");
  fill(app,
    h("header", {},
      h("span", { class: "brand" }, "vivarium"),
      h("nav", {}, link("sandboxes", "Sandboxes"), link("templates", "Templates"), link("snapshots", "Snapshots"), link("keys", "API keys")),
      signOut),
    main);
  cleanup = view(main, param);
}

// Any call refused for its key (revoked meanwhile, say) signs the page out.
window.addEventListener("vivarium:signed-out", (event) => {
  if (!savedKey()) return;
  forget();
  signedOutWhy = `Signed out: ${(event as CustomEvent<string>).detail}`;
  render();
});
window.addEventListener("hashchange", render);
render();
