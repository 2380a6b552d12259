/**
 * Test harness: a real `keel serve` child process per backend, its database, and polling
 * helpers. No mocks: every scenario runs against the server's own HTTP API.
 *
 * The binary is `KEEL_BIN`, else `$CARGO_TARGET_DIR/debug/keel`, else
 * `~/.cache/keel-target/debug/keel`. Postgres runs when `KEEL_TEST_DATABASE_URL` is set,
 * each server in a fresh schema; `KEEL_REQUIRE_SERVICES=1` turns a missing or unreachable
 * Postgres from a skip into a failure.
 */

import { type ChildProcess, execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

import type { Logger, Worker } from "../src/index.js";

/** The overall deadline of one wait for a condition: generous, for a loaded machine. */
export const DEADLINE_MS = 60_000;

/** Where the `keel` binary is, or an error saying where it was looked for. */
export function keelBinary(): string {
  const candidates: string[] = [];
  if (process.env["KEEL_BIN"]) candidates.push(process.env["KEEL_BIN"]);
  else {
    if (process.env["CARGO_TARGET_DIR"]) candidates.push(join(process.env["CARGO_TARGET_DIR"], "debug", "keel"));
    candidates.push(join(homedir(), ".cache", "keel-target", "debug", "keel"));
  }
  const found = candidates.find((c) => existsSync(c));
  if (found === undefined) {
    throw new Error(
      `no keel binary: looked for ${candidates.join(" and ")}. Build it (cargo build -p keel) or point KEEL_BIN at one.`,
    );
  }
  return found;
}

/** A database for one server, dropped afterwards. */
export interface Database {
  url: string;
  drop(): Promise<void>;
}

/** A backend the scenarios run on. */
export interface Backend {
  name: "sqlite" | "postgres";
  /** Why its tests are skipped, when they are. */
  skip?: string;
  /** Why its tests must fail before they start (a required Postgres is missing). */
  broken?: string;
  database(): Promise<Database>;
}

/** SQLite always; Postgres when `KEEL_TEST_DATABASE_URL` is set and answers. */
export async function testBackends(): Promise<Backend[]> {
  const sqlite: Backend = {
    name: "sqlite",
    async database() {
      const dir = mkdtempSync(join(tmpdir(), "keel-ts-"));
      return {
        url: `sqlite://${join(dir, "keel.db")}`,
        async drop() {
          rmSync(dir, { recursive: true, force: true });
        },
      };
    },
  };
  const base = process.env["KEEL_TEST_DATABASE_URL"];
  const required = process.env["KEEL_REQUIRE_SERVICES"] === "1";
  const postgres: Backend = {
    name: "postgres",
    async database() {
      if (!base) throw new Error("KEEL_TEST_DATABASE_URL is not set");
      const schema = `keel_ts_${randomBytes(6).toString("hex")}`;
      await psql(base, `CREATE SCHEMA ${schema}`);
      const sep = base.includes("?") ? "&" : "?";
      return {
        url: `${base}${sep}options=-csearch_path%3D${schema}`,
        async drop() {
          await psql(base, `DROP SCHEMA IF EXISTS ${schema} CASCADE`);
        },
      };
    },
  };
  let problem: string | undefined;
  if (!base) problem = "KEEL_TEST_DATABASE_URL is not set";
  else {
    try {
      await psql(base, "SELECT 1");
    } catch (e) {
      problem = `Postgres at KEEL_TEST_DATABASE_URL is unreachable: ${(e as Error).message}`;
    }
  }
  if (problem !== undefined) {
    if (required) postgres.broken = `KEEL_REQUIRE_SERVICES=1 but ${problem}`;
    else postgres.skip = problem;
  }
  return [sqlite, postgres];
}

/** Runs one SQL statement with `psql`, rejecting with its stderr. */
function psql(url: string, sql: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile("psql", [url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql], { timeout: 30_000 }, (error, _stdout, stderr) => {
      if (error) reject(new Error(`psql ${JSON.stringify(sql)} failed: ${stderr.trim() || error.message}`));
      else resolve();
    });
  });
}

/** The fields of a JSON log line (tracing puts them at the top or under `fields`). */
function logField(line: Record<string, unknown>, name: string): unknown {
  const fields = line["fields"];
  return line[name] ?? (typeof fields === "object" && fields !== null ? (fields as Record<string, unknown>)[name] : undefined);
}

type Exit = Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

/** Most log lines kept for a failure report. */
const KEPT_LINES = 200;

/** A running `keel serve`. */
export class KeelServer {
  /** `http://127.0.0.1:<port>`. */
  readonly url: string;
  readonly #child: ChildProcess;
  readonly #exit: Exit;
  readonly #lines: string[];

  private constructor(url: string, child: ChildProcess, exit: Exit, lines: string[]) {
    this.url = url;
    this.#child = child;
    this.#exit = exit;
    this.#lines = lines;
  }

  /**
   * Starts `keel serve` on an ephemeral loopback port with its own database and waits for
   * its "keel is serving" log line, whose `addr` is the API address.
   */
  static async start(databaseUrl: string, env: Record<string, string> = {}): Promise<KeelServer> {
    const bin = keelBinary();
    const childEnv: Record<string, string> = {};
    // The caller's own KEEL_* settings would change what is under test.
    for (const [k, v] of Object.entries(process.env)) {
      if (v !== undefined && !k.startsWith("KEEL_")) childEnv[k] = v;
    }
    Object.assign(childEnv, {
      KEEL_DATABASE_URL: databaseUrl,
      KEEL_ADDR: "127.0.0.1:0",
      KEEL_ADMIN_ADDR: "off",
      KEEL_GRPC_ADDR: "off",
      KEEL_LOG_FORMAT: "json",
      KEEL_LOG_LEVEL: "warn,keel::app=info",
      KEEL_MAINTENANCE_INTERVAL: "200ms",
      KEEL_QUEUES: "default:4",
      ...env,
    });
    const child = spawn(bin, ["serve"], { env: childEnv, stdio: ["ignore", "pipe", "pipe"] });
    const lines: string[] = [];
    const keep = (line: string): void => {
      lines.push(line);
      if (lines.length > KEPT_LINES) lines.shift();
    };
    const exit: Exit = new Promise((resolve) => {
      child.once("exit", (code, signal) => resolve({ code, signal }));
      child.once("error", () => resolve({ code: null, signal: null }));
    });
    createInterface({ input: child.stderr! }).on("line", keep);
    const addr = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`keel serve did not announce its address within ${DEADLINE_MS} ms:\n${lines.join("\n")}`));
      }, DEADLINE_MS);
      child.once("error", (e) => {
        clearTimeout(timer);
        reject(new Error(`could not start ${bin}: ${e.message}`));
      });
      void exit.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`keel serve exited (code ${code}, signal ${signal}) before serving:\n${lines.join("\n")}`));
      });
      createInterface({ input: child.stdout! }).on("line", (line) => {
        keep(line);
        let parsed: unknown;
        try {
          parsed = JSON.parse(line);
        } catch {
          return;
        }
        if (typeof parsed !== "object" || parsed === null) return;
        const record = parsed as Record<string, unknown>;
        const addr = logField(record, "addr");
        if (logField(record, "message") === "keel is serving" && typeof addr === "string") {
          clearTimeout(timer);
          resolve(addr);
        }
      });
    });
    return new KeelServer(`http://${addr}`, child, exit, lines);
  }

  /** SIGTERM, then the exit code (SIGKILL and `null` if it is not gone within the deadline). */
  async stop(): Promise<number | null> {
    if (this.#child.exitCode === null && this.#child.signalCode === null) this.#child.kill("SIGTERM");
    const timer = setTimeout(() => this.#child.kill("SIGKILL"), DEADLINE_MS);
    const { code } = await this.#exit;
    clearTimeout(timer);
    return code;
  }

  /** The last log lines, for a failure message. */
  logTail(): string {
    return this.#lines.slice(-40).join("\n");
  }
}

/**
 * Polls `check` until it returns a value other than `undefined`/`false`, and returns it.
 * Fails after `timeoutMs` with `what` in the message, and at once if `failFast` reports a
 * failure (a worker whose run() rejected will never make the condition true).
 */
export async function waitFor<T>(
  what: string,
  check: () => Promise<T | undefined | false> | T | undefined | false,
  options: { timeoutMs?: number; intervalMs?: number; failFast?: () => unknown } = {},
): Promise<T> {
  const deadline = Date.now() + (options.timeoutMs ?? DEADLINE_MS);
  const interval = options.intervalMs ?? 100;
  let lastError: unknown;
  for (;;) {
    const failure = options.failFast?.();
    if (failure !== undefined) throw failure;
    try {
      const value = await check();
      if (value !== undefined && value !== false) return value;
    } catch (e) {
      lastError = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}${lastError ? ` (last error: ${(lastError as Error).message})` : ""}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** A worker running in the background; `failure()` is its run()'s rejection, if any. */
export interface Running {
  done: Promise<void>;
  failure(): unknown;
}

export function runInBackground(worker: Worker): Running {
  let failure: unknown;
  const done = worker.run().catch((e: unknown) => {
    failure = e ?? new Error("worker.run() rejected");
  });
  return { done, failure: () => failure };
}

/** A resolvable promise, for handlers that signal the test. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** A logger that keeps every line, so tests can show them when they fail. */
export function memoryLogger(): { lines: string[]; logger: Required<Logger> } {
  const lines: string[] = [];
  const at = (level: string) => (message: string, meta?: Record<string, unknown>) => {
    lines.push(`${level} ${message}${meta ? ` ${JSON.stringify(meta)}` : ""}`);
  };
  return { lines, logger: { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") } };
}

/** Waits for `promise` like {@link waitFor}: bounded by the deadline and failing fast. */
export async function within<T>(what: string, promise: Promise<T>, failFast?: () => unknown): Promise<T> {
  let outcome: { ok: true; value: T } | { ok: false; error: unknown } | undefined;
  promise.then(
    (value) => (outcome = { ok: true, value }),
    (error: unknown) => (outcome = { ok: false, error }),
  );
  await waitFor(what, () => outcome !== undefined, { intervalMs: 20, ...(failFast ? { failFast } : {}) });
  if (!outcome!.ok) throw outcome!.error;
  return outcome!.value;
}

/** Resolves with the signal's reason once it aborts. */
export function aborted(signal: AbortSignal): Promise<unknown> {
  if (signal.aborted) return Promise.resolve(signal.reason);
  return new Promise((resolve) => signal.addEventListener("abort", () => resolve(signal.reason), { once: true }));
}
