// The public API, as any client calls it: same origin, the signed-in key in X-API-Key.

const KEY = "vivarium.apiKey";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export interface Sandbox {
  sandboxID: string;
  templateID: string;
  alias?: string;
  startedAt: string;
  endAt: string;
  cpuCount: number;
  memoryMB: number;
  state: "running" | "paused";
  metadata: Record<string, string> | null;
  envdAccessToken?: string | null;
  domain?: string | null;
}

export interface Metric {
  timestampUnix: number;
  cpuCount: number;
  cpuUsedPct: number;
  memUsed: number;
  memTotal: number;
  diskUsed: number;
  diskTotal: number;
}

export interface LifecycleEvent {
  id: number;
  sandboxID: string;
  type: string;
  actor: string;
  reason: string | null;
  timestamp: string;
}

export interface Template {
  templateID: string;
  buildID: string;
  names: string[];
  public: boolean;
  buildStatus: string;
  cpuCount: number;
  memoryMB: number;
  createdAt: string | null;
}

export interface Build {
  buildID: string;
  status: string;
  createdAt: string;
  finishedAt: string | null;
}

export interface BuildStatus {
  status: string;
  logEntries: { timestamp: string; level: string; message: string }[];
  reason?: { message: string; step?: string };
}

export interface Snapshot {
  snapshotID: string;
  names: string[];
}

export interface ApiKey {
  id: string;
  name: string;
  mask: { prefix: string };
  createdAt: string;
  lastUsed: string | null;
}

export function savedKey(): string | null {
  return sessionStorage.getItem(KEY);
}

export function forget(): void {
  sessionStorage.removeItem(KEY);
}

/** Signs in if the API accepts the key (any team's key can list its own keys). */
export async function signIn(key: string): Promise<void> {
  await request("GET", "/api-keys", undefined, key);
  sessionStorage.setItem(KEY, key);
}

/** One API call: its response, or ApiError with the API's message. */
async function send(method: string, path: string, body?: unknown, key = savedKey()): Promise<Response> {
  const headers: Record<string, string> = { "X-API-Key": key ?? "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res: Response;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "the API cannot be reached: is `vivarium serve` running?");
  }
  if (!res.ok) {
    let message = res.statusText;
    try {
      message = (await res.json()).message ?? message;
    } catch {
      // not JSON: the status text says enough
    }
    // Only a refusal of the key signed in now signs out: a late answer to a call made with a
    // key since replaced (or none) says nothing about the current one.
    if (res.status === 401 && key && key === savedKey()) {
      window.dispatchEvent(new CustomEvent("vivarium:signed-out", { detail: message }));
    }
    throw new ApiError(res.status, message);
  }
  return res;
}

async function request<T>(method: string, path: string, body?: unknown, key = savedKey()): Promise<T> {
  const res = await send(method, path, body, key);
  return res.status === 204 ? (undefined as T) : ((await res.json()) as T);
}

export async function sandboxes(states: string[], metadata: string): Promise<Sandbox[]> {
  const all: Sandbox[] = [];
  let token = "";
  for (let page = 0; page < 20; page++) {
    const query = new URLSearchParams({ state: states.join(","), limit: "100" });
    if (metadata) query.set("metadata", metadata);
    if (token) query.set("nextToken", token);
    const res = await send("GET", `/v2/sandboxes?${query}`);
    all.push(...((await res.json()) as Sandbox[]));
    token = res.headers.get("x-next-token") ?? "";
    if (!token) break;
  }
  return all;
}

export const api = {
  sandbox: (id: string) => request<Sandbox>("GET", `/sandboxes/${enc(id)}`),
  create: (templateID: string, timeout: number) => request<Sandbox>("POST", "/sandboxes", { templateID, timeout }),
  pause: (id: string) => request<void>("POST", `/sandboxes/${enc(id)}/pause`, {}),
  resume: (id: string, timeout: number) => request<Sandbox>("POST", `/sandboxes/${enc(id)}/connect`, { timeout }),
  kill: (id: string) => request<void>("DELETE", `/sandboxes/${enc(id)}`),
  setTimeout: (id: string, timeout: number) => request<void>("POST", `/sandboxes/${enc(id)}/timeout`, { timeout }),
  latestMetrics: (ids: string[]) =>
    request<{ sandboxes: Record<string, Metric> }>("GET", `/sandboxes/metrics?sandbox_ids=${ids.map(enc).join(",")}`),
  metrics: (id: string, start: number, end: number) =>
    request<Metric[]>("GET", `/sandboxes/${enc(id)}/metrics?start=${start}&end=${end}`),
  logs: (id: string) => request<{ logs: { timestamp: string; line: string }[] }>("GET", `/sandboxes/${enc(id)}/logs`),
  events: (id: string) => request<LifecycleEvent[]>("GET", `/sandboxes/${enc(id)}/events`),
  templates: () => request<Template[]>("GET", "/templates"),
  template: (id: string) => request<Template & { builds: Build[] }>("GET", `/templates/${enc(id)}`),
  buildStatus: (id: string, build: string, offset: number) =>
    request<BuildStatus>("GET", `/templates/${enc(id)}/builds/${enc(build)}/status?logsOffset=${offset}&limit=100`),
  snapshots: () => request<Snapshot[]>("GET", "/snapshots"),
  deleteSnapshot: (id: string) => request<void>("DELETE", `/templates/${enc(id)}`),
  keys: () => request<ApiKey[]>("GET", "/api-keys"),
  createKey: (name: string) => request<ApiKey & { key: string }>("POST", "/api-keys", { name }),
  revokeKey: (id: string) => request<void>("DELETE", `/api-keys/${enc(id)}`),
};

function enc(part: string): string {
  return encodeURIComponent(part);
}
