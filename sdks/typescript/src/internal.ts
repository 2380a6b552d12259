/**
 * Small helpers shared by the client and the worker. Not exported from the package: their
 * signatures may change.
 */

import type { Duration } from "./types.js";

/**
 * A duration as the server reads it. Numbers are milliseconds and are sent as `"<n>ms"`
 * rather than as bare integers, so a log line of the request says its unit; strings
 * (`"30s"`) go through untouched for the server to judge.
 */
export function wireDuration(value: Duration, name: string): string {
  if (typeof value === "string") return value;
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
    throw new RangeError(`${name} must be a finite, non-negative number of milliseconds or a duration string, got ${String(value)}`);
  }
  return `${Math.round(value)}ms`;
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/**
 * A duration in milliseconds, for the client's own timeout arithmetic. Strings are read
 * with the server's units; one it cannot read counts as 30 s (the longest wait), and the
 * server reports it as a `422`.
 */
export function durationMs(value: Duration): number {
  if (typeof value === "number") return value;
  const text = value.trim();
  if (!/^(\d+(ms|s|m|h|d))+$/.test(text)) return 30_000;
  let total = 0;
  for (const [, n, unit] of text.matchAll(/(\d+)(ms|s|m|h|d)/g)) total += Number(n) * (UNIT_MS[unit ?? "s"] ?? 1_000);
  return total;
}

/** The outcome of {@link toJson}. */
export type JsonText = { ok: true; text: string | undefined } | { ok: false; error: string };

/**
 * Serialises `value` as JSON, saying why when it cannot be: a `BigInt`, a cycle, a
 * `toJSON` that throws, or a function or symbol where a value should be. `undefined`
 * gives `text: undefined` (the field is left out, which the server reads as null).
 */
export function toJson(value: unknown): JsonText {
  if (typeof value === "function" || typeof value === "symbol") {
    return { ok: false, error: `a ${typeof value} is not JSON` };
  }
  try {
    return { ok: true, text: JSON.stringify(value) };
  } catch (e) {
    return { ok: false, error: e instanceof Error ? e.message : String(e) };
  }
}

/**
 * Resolves after `ms`, or early (without rejecting) when `signal` aborts: the loops that
 * sleep between retries check their own stop flag after it.
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, Math.max(0, ms));
    signal?.addEventListener("abort", done, { once: true });
  });
}

/**
 * Capped exponential backoff with jitter: attempt 0 waits about `baseMs`, each later one
 * twice as long up to `capMs`. The delay is drawn from [d/2, d] ("equal jitter"), so
 * workers that failed together do not retry together, yet none retries at once.
 */
export function backoffDelay(attempt: number, baseMs: number, capMs: number, random: () => number = Math.random): number {
  const exp = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return exp / 2 + random() * (exp / 2);
}

/** Reads a body as JSON, or `undefined` when it is empty or not JSON. */
export function parseJson(text: string): unknown {
  if (text.length === 0) return undefined;
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return undefined;
  }
}

/** The message a thrown value is reported with: `${name}: ${message}`. */
export function errorText(e: unknown): string {
  if (e instanceof Error) {
    const name = e.name || "Error";
    return e.message ? `${name}: ${e.message}` : name;
  }
  if (typeof e === "string") return e;
  const json = toJson(e);
  return json.ok && json.text !== undefined ? `thrown value: ${json.text}` : `thrown value: ${String(e)}`;
}

/**
 * A worker name the server accepts: `[A-Za-z0-9_.:-]`, 1–255 bytes, starting with a letter
 * or digit. Other characters of a host name become `-`.
 */
export function workerName(raw: string): string {
  const cleaned = raw.replace(/[^A-Za-z0-9_.:-]/g, "-");
  const named = /^[A-Za-z0-9]/.test(cleaned) ? cleaned : `w${cleaned}`;
  return named.slice(0, 255);
}
