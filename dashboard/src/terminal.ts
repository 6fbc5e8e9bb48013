// A shell in the sandbox in xterm.js, over envd's PTY: Process/Start with `pty` streams the
// output, SendInput carries keystrokes and Update the size, as the client's `pty` module does.

import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import "@xterm/xterm/css/xterm.css";

import { type Envd, EnvdError, encoder, fromBase64, toBase64 } from "./envd";

const START_ATTEMPTS = 3; // the shell's start, tried again while nothing has started

export interface Shell {
  close(): void;
}

/** Starts `bash -i -l` in a PTY shown in `el`; `onEnd` gets why the stream stopped. */
export function openShell(el: HTMLElement, envd: Envd, onEnd: (reason: { exited: boolean; error?: string }) => void): Shell {
  const term = new Terminal({
    cursorBlink: true,
    fontSize: 13,
    fontFamily: "ui-monospace, Menlo, Consolas, monospace",
    theme: { background: "#000000" },
    scrollback: 5000,
    // Links printed by the sandbox (OSC 8) open only if they are web addresses, in a new tab.
    linkHandler: {
      activate: (_event, uri) => {
        if (/^https?:\/\//i.test(uri)) window.open(uri, "_blank", "noopener,noreferrer");
      },
    },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  const abort = new AbortController();
  let pid: number | null = null;
  let closed = false;

  // Keystrokes go out one request at a time, in order; those typed meanwhile are sent together.
  let pending = "";
  let sending = false;
  async function flush(): Promise<void> {
    if (sending || pid === null || !pending) return;
    sending = true;
    try {
      while (pending && !closed) {
        const data = pending;
        pending = "";
        await envd.unary("process.Process/SendInput", { process: { pid }, input: { pty: toBase64(encoder.encode(data)) } });
      }
    } catch {
      // the stream's end says what happened
    } finally {
      sending = false;
    }
  }
  term.onData((data) => {
    pending += data;
    void flush();
  });

  let resizeTimer = 0;
  const observer = new ResizeObserver(() => {
    clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(() => {
      if (closed) return;
      fit.fit();
      if (pid !== null) {
        void envd
          .unary("process.Process/Update", { process: { pid }, pty: { size: { cols: term.cols, rows: term.rows } } })
          .catch(() => undefined);
      }
    }, 100);
  });
  observer.observe(el);

  const start = {
    process: {
      cmd: "/bin/bash",
      args: ["-i", "-l"],
      envs: { TERM: "xterm-256color", LANG: "C.UTF-8", LC_ALL: "C.UTF-8", COLORTERM: "truecolor" },
    },
    pty: { size: { cols: term.cols, rows: term.rows } },
  };
  void (async () => {
    for (let attempt = 1; ; attempt++) {
      try {
        for await (const message of envd.stream("process.Process/Start", start, abort.signal)) {
          const event = message.event as Record<string, Record<string, unknown>> | undefined;
          if (event?.start) {
            pid = Number(event.start.pid);
            term.focus();
            void flush();
          } else if (event?.data?.pty) {
            term.write(fromBase64(String(event.data.pty)));
          } else if (event?.end) {
            finish({ exited: true });
            return;
          }
        }
        finish({ exited: false, error: "the terminal's stream ended" });
        return;
      } catch (error) {
        // A sandbox resumed a moment ago may drop the first connection: nothing started
        // yet, so starting again loses nothing.
        if (!closed && pid === null && attempt < START_ATTEMPTS) {
          await new Promise((resolve) => setTimeout(resolve, 1000));
          continue;
        }
        if (!closed) finish({ exited: false, error: error instanceof EnvdError ? error.message : String(error) });
        return;
      }
    }
  })();

  function finish(reason: { exited: boolean; error?: string }): void {
    if (closed) return;
    closed = true;
    observer.disconnect();
    term.options.disableStdin = true;
    onEnd(reason);
  }

  return {
    close() {
      closed = true;
      abort.abort();
      observer.disconnect();
      if (pid !== null) {
        void envd.unary("process.Process/SendSignal", { process: { pid }, signal: "SIGNAL_SIGKILL" }).catch(() => undefined);
      }
      term.dispose();
    },
  };
}
