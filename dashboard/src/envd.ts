// envd, the daemon in each sandbox, reached through the proxy at `<scheme>://49983-<id>.<domain>`
// (E2B's public URL shape). Its RPCs speak Connect with JSON: unary calls are plain POSTs, and
// a server stream is a POST whose response is a sequence of envelopes (a flags byte, a 4-byte
// big-endian length, then the JSON message; flag 2 marks the end of the stream).

import type { Sandbox } from "./api";

export const ENVD_PORT = 49983;
const USER = "user";

export class EnvdError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export interface Entry {
  name: string;
  type?: string;
  path: string;
  size?: string;
}

type Message = Record<string, unknown>;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export class Envd {
  readonly base: string;

  constructor(
    sandbox: Sandbox,
    private readonly token: string | null,
  ) {
    this.base = `${location.protocol}//${ENVD_PORT}-${sandbox.sandboxID}.${sandbox.domain ?? location.host}`;
  }

  private headers(contentType: string): Record<string, string> {
    const headers: Record<string, string> = {
      "Content-Type": contentType,
      "Connect-Protocol-Version": "1",
      Authorization: `Basic ${btoa(`${USER}:`)}`,
    };
    if (this.token) headers["X-Access-Token"] = this.token;
    return headers;
  }

  async unary<T = Message>(method: string, message: Message): Promise<T> {
    const res = await this.post(method, "application/json", JSON.stringify(message));
    const body = (await res.json()) as Message;
    if (!res.ok) throw new EnvdError(String(body.code ?? res.status), String(body.message ?? res.statusText));
    return body as T;
  }

  /** The messages of a server stream; throws EnvdError if it ends with an error. */
  async *stream(method: string, message: Message, signal: AbortSignal): AsyncGenerator<Message> {
    const payload = encoder.encode(JSON.stringify(message));
    const frame = new Uint8Array(5 + payload.length);
    new DataView(frame.buffer).setUint32(1, payload.length);
    frame.set(payload, 5);
    const res = await this.post(method, "application/connect+json", frame, signal, { "Keepalive-Ping-Interval": "30" });
    if (!res.ok || !res.body) {
      const text = await res.text();
      throw new EnvdError(String(res.status), text || res.statusText);
    }
    const reader = res.body.getReader();
    let buffer: Uint8Array<ArrayBuffer> = new Uint8Array(0);
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer = concat(buffer, value);
      while (buffer.length >= 5) {
        const length = new DataView(buffer.buffer, buffer.byteOffset).getUint32(1);
        if (buffer.length < 5 + length) break;
        const flags = buffer[0];
        const body = JSON.parse(decoder.decode(buffer.subarray(5, 5 + length))) as Message;
        buffer = buffer.slice(5 + length);
        if (flags & 2) {
          const error = body.error as { code?: string; message?: string } | undefined;
          if (error) throw new EnvdError(error.code ?? "unknown", error.message ?? "the stream failed");
          return;
        }
        yield body;
      }
    }
    throw new EnvdError("unavailable", "the connection to the sandbox was lost");
  }

  private async post(
    method: string,
    contentType: string,
    body: BodyInit,
    signal?: AbortSignal,
    extra: Record<string, string> = {},
  ): Promise<Response> {
    try {
      return await fetch(`${this.base}/${method}`, {
        method: "POST",
        headers: { ...this.headers(contentType), ...extra },
        body,
        signal,
      });
    } catch (error) {
      if (signal?.aborted) throw error;
      throw new EnvdError("unavailable", "the sandbox cannot be reached");
    }
  }

  // -- files -------------------------------------------------------------------------------------

  async list(path: string): Promise<Entry[]> {
    const body = await this.unary<{ entries?: Entry[] }>("filesystem.Filesystem/ListDir", { path, depth: 1 });
    return (body.entries ?? []).sort(
      (a, b) => Number(b.type === "FILE_TYPE_DIRECTORY") - Number(a.type === "FILE_TYPE_DIRECTORY") || a.name.localeCompare(b.name),
    );
  }

  makeDir(path: string): Promise<Message> {
    return this.unary("filesystem.Filesystem/MakeDir", { path });
  }

  remove(path: string): Promise<Message> {
    return this.unary("filesystem.Filesystem/Remove", { path });
  }

  /** A file's first `limit` bytes as text. */
  async readText(path: string, limit: number): Promise<{ text: string; truncated: boolean }> {
    const res = await fetch(await this.fileUrl(path, "read"));
    if (!res.ok || !res.body) throw new EnvdError(String(res.status), await errorText(res));
    // Read no more than the limit, then drop the connection: a large file is not fetched whole.
    const reader = res.body.getReader();
    let data: Uint8Array<ArrayBuffer> = new Uint8Array(0);
    while (data.length <= limit) {
      const { done, value } = await reader.read();
      if (done) return { text: decoder.decode(data), truncated: false };
      data = concat(data, value);
    }
    await reader.cancel();
    return { text: decoder.decode(data.subarray(0, limit)), truncated: true };
  }

  /**
   * Uploads a file from the browser's disk: the browser streams the body from the file, the
   * proxy and envd pass it on to the sandbox's disk as it comes, so nothing holds it whole.
   */
  async upload(path: string, file: File, onProgress: (sent: number) => void): Promise<void> {
    const url = await this.fileUrl(path, "write");
    await new Promise<void>((resolve, reject) => {
      // XMLHttpRequest rather than fetch: it reports upload progress.
      const xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      xhr.upload.onprogress = (e) => onProgress(e.loaded);
      xhr.onload = () => (xhr.status < 300 ? resolve() : reject(new EnvdError(String(xhr.status), xhr.responseText || xhr.statusText)));
      xhr.onerror = () => reject(new EnvdError("unavailable", "the upload was cut off"));
      const form = new FormData();
      form.append("file", file, path);
      xhr.send(form);
    });
  }

  /**
   * A pre-signed `/files` URL (as the client's download_url()): a plain link then downloads to
   * disk without the page holding the file, and it carries no token, only a signature of it.
   */
  async fileUrl(path: string, operation: "read" | "write", validForS = 300): Promise<string> {
    const query = new URLSearchParams({ path, username: USER });
    if (this.token) {
      const expiration = String(Math.floor(Date.now() / 1000) + validForS);
      const raw = `${path}:${operation}:${USER}:${this.token}:${expiration}`;
      const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(raw)));
      query.set("signature", `v1_${toBase64(digest).replace(/=+$/, "")}`);
      query.set("signature_expiration", expiration);
    }
    return `${this.base}/files?${query}`;
  }
}

async function errorText(res: Response): Promise<string> {
  try {
    return ((await res.json()) as Message).message as string;
  } catch {
    return res.statusText;
  }
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

export function toBase64(data: Uint8Array): string {
  let binary = "";
  for (let i = 0; i < data.length; i += 0x8000) binary += String.fromCharCode(...data.subarray(i, i + 0x8000));
  return btoa(binary);
}

export function fromBase64(text: string): Uint8Array {
  const binary = atob(text);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

export { encoder };
