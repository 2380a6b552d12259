/**
 * The HTTP client: enqueue and inspect jobs, and the raw calls of the worker protocol
 * (docs/workers.md) that {@link Worker} is built on.
 *
 * It uses Node's global `fetch` and keeps no state between calls beyond its options, so
 * one client can be shared by any number of callers and workers. It never retries on its
 * own: whether a retry is safe depends on the call (an enqueue without an idempotency key
 * is not), so that choice is left to the caller; the worker makes it for the protocol
 * calls.
 */

import { KeelError, KeelNetworkError, WaitTimeoutError } from "./errors.js";
import { durationMs, parseJson, sleep, toJson, wireDuration } from "./internal.js";
import {
  isTerminal,
  type Completion,
  type Duration,
  type EnqueueOptions,
  type Failure,
  type FailOptions,
  type Heartbeat,
  type Job,
  type JobResult,
  type JobSpec,
  type JobState,
  type LeasedJob,
  type LeaseOptions,
  type OutcomeResult,
  type Problem,
  type QueueInfo,
  type WaitOptions,
  type WorkerInfo,
} from "./types.js";

/** Options of {@link Client}. */
export interface ClientOptions {
  /** The server's base URL, e.g. `http://127.0.0.1:8080`. */
  url: string;
  /** An API key, sent as `Authorization: Bearer <key>` (needed when the server has `KEEL_API_KEYS`). */
  apiKey?: string;
  /**
   * How long one request may take before it is abandoned with a `KeelNetworkError`;
   * default 10000. A lease's long-poll `wait` is added on top.
   */
  timeoutMs?: number;
}

/** Options every call accepts. */
export interface RequestOptions {
  /** Abandons the request; it rejects with the signal's reason. */
  signal?: AbortSignal;
}

interface Call {
  method: "GET" | "POST";
  path: string;
  body?: unknown;
  headers?: Record<string, string>;
  /** Statuses that are answers rather than errors. */
  ok?: readonly number[];
  /** Added to the client's timeout (the lease's long poll). */
  extraTimeoutMs?: number;
  signal?: AbortSignal | undefined;
}

interface Answer {
  status: number;
  body: unknown;
  headers: Headers;
}

const DEFAULT_TIMEOUT_MS = 10_000;
const DEFAULT_WAIT_TIMEOUT_MS = 60_000;

/** A client of one Keel server. */
export class Client {
  /** The base URL, without a trailing slash. */
  readonly url: string;
  readonly timeoutMs: number;
  readonly #apiKey: string | undefined;

  constructor(options: ClientOptions) {
    if (typeof options?.url !== "string" || options.url.length === 0) {
      throw new TypeError("Client needs a url, e.g. new Client({ url: 'http://127.0.0.1:8080' })");
    }
    // Parsed once so a typo fails here rather than on the first call.
    const parsed = new URL(options.url);
    this.url = parsed.href.replace(/\/+$/, "");
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!Number.isFinite(this.timeoutMs) || this.timeoutMs <= 0) {
      throw new RangeError(`timeoutMs must be a positive number, got ${this.timeoutMs}`);
    }
    this.#apiKey = options.apiKey;
  }

  // ------------------------------------------------------------------------------------
  // Jobs

  /**
   * Enqueues one job (`POST /v1/jobs`). Resolves with the stored job; with a `unique` key
   * already held, with the job holding it; with an `idempotencyKey` seen before, with the
   * job that key created.
   */
  async enqueue<A = unknown>(kind: string, args?: A, options: EnqueueOptions & RequestOptions = {}): Promise<Job<A>> {
    const headers: Record<string, string> = {};
    if (options.idempotencyKey !== undefined) headers["idempotency-key"] = options.idempotencyKey;
    const answer = await this.#send({
      method: "POST",
      path: "/v1/jobs",
      body: jobBody({ ...options, kind, args }),
      headers,
      ok: [200, 201],
      signal: options.signal,
    });
    return answer.body as Job<A>;
  }

  /**
   * Enqueues 1 to 1000 jobs atomically (`POST /v1/jobs/batch`): all are stored or none.
   * Resolves with the stored jobs in the order given.
   */
  async enqueueMany(jobs: readonly JobSpec[], options: RequestOptions & { idempotencyKey?: string } = {}): Promise<Job[]> {
    const headers: Record<string, string> = {};
    if (options.idempotencyKey !== undefined) headers["idempotency-key"] = options.idempotencyKey;
    const answer = await this.#send({
      method: "POST",
      path: "/v1/jobs/batch",
      body: { jobs: jobs.map(jobBody) },
      headers,
      ok: [200, 201],
      signal: options.signal,
    });
    return (answer.body as { jobs: Job[] }).jobs;
  }

  /** Reads a job (`GET /v1/jobs/{id}`); a `404` `KeelError` when there is no such job. */
  async get<A = unknown, R = unknown>(id: string, options: RequestOptions = {}): Promise<Job<A, R>> {
    const answer = await this.#send({ method: "GET", path: `/v1/jobs/${segment(id)}`, signal: options.signal });
    return answer.body as Job<A, R>;
  }

  /**
   * Polls a job until it is `completed`, `discarded` or `cancelled` and resolves with it.
   * The pause between polls grows from 50 ms to `maxIntervalMs` (1 s), so a quick job is
   * seen quickly and a slow one costs few requests. Rejects with `WaitTimeoutError` after
   * `timeoutMs` (60 s).
   */
  async wait<A = unknown, R = unknown>(id: string, options: WaitOptions = {}): Promise<Job<A, R>> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_WAIT_TIMEOUT_MS;
    const maxInterval = options.maxIntervalMs ?? 1_000;
    const deadline = Date.now() + timeoutMs;
    let interval = 50;
    let last: JobState | undefined;
    for (;;) {
      const job = await this.get<A, R>(id, { ...(options.signal ? { signal: options.signal } : {}) });
      last = job.state;
      if (isTerminal(job.state)) return job;
      const left = deadline - Date.now();
      if (left <= 0) throw new WaitTimeoutError(id, timeoutMs, last);
      await sleep(Math.min(interval, left), options.signal);
      options.signal?.throwIfAborted();
      interval = Math.min(maxInterval, interval * 1.5);
    }
  }

  /**
   * Reads a job's result (`GET /v1/jobs/{id}/result`): `{state: "completed", result}` once
   * it completed, `{state}` without `result` while it is on its way. A discarded or
   * cancelled job has no result: a `409` `KeelError` (`job-not-completed`) whose `state`
   * says which.
   */
  async result<R = unknown>(id: string, options: RequestOptions = {}): Promise<JobResult<R>> {
    const answer = await this.#send({
      method: "GET",
      path: `/v1/jobs/${segment(id)}/result`,
      ok: [200, 202],
      signal: options.signal,
    });
    return answer.body as JobResult<R>;
  }

  /**
   * Cancels a job that has not finished (`POST /v1/jobs/{id}/cancel`). A running job's
   * lease is revoked; its worker hears of it on its next heartbeat.
   */
  async cancel(id: string, options: RequestOptions = {}): Promise<Job> {
    const answer = await this.#send({ method: "POST", path: `/v1/jobs/${segment(id)}/cancel`, signal: options.signal });
    return answer.body as Job;
  }

  // ------------------------------------------------------------------------------------
  // The worker protocol

  /**
   * Leases up to `max` jobs of `queue` (`POST /v1/queues/{queue}/lease`), waiting up to
   * `wait` for one. Each comes back `running`, its attempt counted, with the lease token
   * in `lease.token`. An empty list means the wait ran out (or the server is stopping).
   */
  async lease<A = unknown>(queue: string, options: LeaseOptions): Promise<LeasedJob<A>[]> {
    const body: Record<string, unknown> = { worker: options.worker };
    if (options.max !== undefined) body["max"] = options.max;
    if (options.wait !== undefined) body["wait"] = wireDuration(options.wait, "wait");
    if (options.lease !== undefined) body["lease"] = wireDuration(options.lease, "lease");
    if (options.kinds !== undefined) body["kinds"] = [...options.kinds];
    const answer = await this.#send({
      method: "POST",
      path: `/v1/queues/${segment(queue)}/lease`,
      body,
      extraTimeoutMs: options.wait === undefined ? 0 : durationMs(options.wait),
      signal: options.signal,
    });
    return (answer.body as { jobs: LeasedJob<A>[] }).jobs;
  }

  /**
   * Extends a lease by `lease` from now (default 30 s) (`POST /v1/jobs/{id}/heartbeat`).
   * `cancel_requested: true` means a user cancelled the job: stop its handler.
   */
  async heartbeat(id: string, token: string, lease?: Duration, options: RequestOptions = {}): Promise<Heartbeat> {
    const body: Record<string, unknown> = { token };
    if (lease !== undefined) body["lease"] = wireDuration(lease, "lease");
    const answer = await this.#send({
      method: "POST",
      path: `/v1/jobs/${segment(id)}/heartbeat`,
      body,
      signal: options.signal,
    });
    return answer.body as Heartbeat;
  }

  /**
   * Records a leased job as completed with `result` (`POST /v1/jobs/{id}/complete`).
   * A stale token is a `409` `KeelError` (`stale-lease`).
   */
  async complete(id: string, token: string, result?: unknown, options: RequestOptions = {}): Promise<Job> {
    const body: Record<string, unknown> = { token };
    if (result !== undefined) body["result"] = result;
    const answer = await this.#send({
      method: "POST",
      path: `/v1/jobs/${segment(id)}/complete`,
      body,
      signal: options.signal,
    });
    return answer.body as Job;
  }

  /**
   * Records a failed attempt (`POST /v1/jobs/{id}/fail`): the job is `retryable` while
   * attempts remain (after `retryIn`, or its backoff), otherwise, or when `permanent`,
   * `discarded`.
   */
  async fail(id: string, token: string, failure: FailOptions, options: RequestOptions = {}): Promise<Job> {
    const answer = await this.#send({
      method: "POST",
      path: `/v1/jobs/${segment(id)}/fail`,
      body: failBody({ ...failure, id, token }, false),
      signal: options.signal,
    });
    return answer.body as Job;
  }

  /**
   * Gives a leased job back unrun (`POST /v1/jobs/{id}/release`): `available` again, and
   * the attempt is not counted.
   */
  async release(id: string, token: string, options: RequestOptions = {}): Promise<Job> {
    const answer = await this.#send({
      method: "POST",
      path: `/v1/jobs/${segment(id)}/release`,
      body: { token },
      signal: options.signal,
    });
    return answer.body as Job;
  }

  /**
   * Records 1 to 1000 completions in one request (`POST /v1/jobs/complete`). Each is
   * judged alone: the answer lists one {@link OutcomeResult} per item, in order, and a
   * stale token in one does not fail the others.
   */
  async completeMany(outcomes: readonly Completion[], options: RequestOptions = {}): Promise<OutcomeResult[]> {
    const answer = await this.#send({
      method: "POST",
      path: "/v1/jobs/complete",
      body: {
        outcomes: outcomes.map((o) => (o.result === undefined ? { id: o.id, token: o.token } : { id: o.id, token: o.token, result: o.result })),
      },
      signal: options.signal,
    });
    return (answer.body as { results: OutcomeResult[] }).results;
  }

  /** Records 1 to 1000 failed attempts in one request (`POST /v1/jobs/fail`); see {@link completeMany}. */
  async failMany(outcomes: readonly Failure[], options: RequestOptions = {}): Promise<OutcomeResult[]> {
    const answer = await this.#send({
      method: "POST",
      path: "/v1/jobs/fail",
      body: { outcomes: outcomes.map((o) => failBody(o, true)) },
      signal: options.signal,
    });
    return (answer.body as { results: OutcomeResult[] }).results;
  }

  /** The external workers the server heard from in the last 5 minutes (`GET /v1/workers`). */
  async workers(options: RequestOptions = {}): Promise<WorkerInfo[]> {
    const answer = await this.#send({ method: "GET", path: "/v1/workers", signal: options.signal });
    return (answer.body as { workers: WorkerInfo[] }).workers;
  }

  /** Every queue with its job counts by state (`GET /v1/queues`). */
  async queues(options: RequestOptions = {}): Promise<QueueInfo[]> {
    const answer = await this.#send({ method: "GET", path: "/v1/queues", signal: options.signal });
    return answer.body as QueueInfo[];
  }

  /**
   * One queue with its job counts by state (`GET /v1/queues/{queue}`), without counting the
   * others: the same as its element of {@link queues}. Any valid name answers (a queue
   * nobody used has zero counts); an invalid one is a `400` `KeelError`
   * (`malformed-request`). A tenant key counts only its own jobs.
   */
  async queue(name: string, options: RequestOptions = {}): Promise<QueueInfo> {
    const answer = await this.#send({ method: "GET", path: `/v1/queues/${segment(name)}`, signal: options.signal });
    return answer.body as QueueInfo;
  }

  // ------------------------------------------------------------------------------------

  /**
   * Sends one request and reads its answer. A status outside `ok` becomes a `KeelError`;
   * no answer at all a `KeelNetworkError`; the caller's own abort rejects with its
   * signal's reason, untouched.
   */
  async #send(call: Call): Promise<Answer> {
    const what = `${call.method} ${call.path}`;
    const headers: Record<string, string> = { accept: "application/json, application/problem+json", ...call.headers };
    if (this.#apiKey !== undefined) headers["authorization"] = `Bearer ${this.#apiKey}`;
    let body: string | undefined;
    if (call.body !== undefined) {
      const json = toJson(call.body);
      if (!json.ok || json.text === undefined) {
        throw new TypeError(`${what}: the request body is not JSON-serialisable: ${json.ok ? "undefined" : json.error}`);
      }
      body = json.text;
      headers["content-type"] = "application/json";
    }
    const timeout = AbortSignal.timeout(this.timeoutMs + (call.extraTimeoutMs ?? 0));
    const signal = call.signal ? AbortSignal.any([call.signal, timeout]) : timeout;
    let response: Response;
    let text: string;
    try {
      const init: RequestInit = { method: call.method, headers, signal };
      if (body !== undefined) init.body = body;
      response = await fetch(this.url + call.path, init);
      text = await response.text();
    } catch (e) {
      if (call.signal?.aborted) throw call.signal.reason;
      throw new KeelNetworkError(what, e, timeout.aborted);
    }
    const parsed = parseJson(text);
    const ok = call.ok ?? [200];
    if (!ok.includes(response.status)) {
      const problem = typeof parsed === "object" && parsed !== null ? (parsed as Partial<Problem>) : undefined;
      throw new KeelError(what, response.status, problem, text || response.statusText);
    }
    if (parsed === undefined) {
      // A success without a JSON body is not an answer this API gives: most likely not a
      // Keel server (or a proxy's page) at this URL.
      throw new KeelError(what, response.status, undefined, `the answer is not JSON: ${text.slice(0, 200)}`);
    }
    return { status: response.status, body: parsed, headers: response.headers };
  }
}

/** The wire body of one job (camelCase options onto the snake_case fields of job_in.rs). */
function jobBody(spec: JobSpec): Record<string, unknown> {
  const body: Record<string, unknown> = { kind: spec.kind };
  if (spec.args !== undefined) body["args"] = spec.args;
  if (spec.queue !== undefined) body["queue"] = spec.queue;
  if (spec.tenant !== undefined) body["tenant"] = spec.tenant;
  if (spec.priority !== undefined) body["priority"] = spec.priority;
  if (spec.maxAttempts !== undefined) body["max_attempts"] = spec.maxAttempts;
  if (spec.timeoutMs !== undefined) body["timeout_ms"] = spec.timeoutMs;
  if (spec.runAt !== undefined) body["run_at"] = spec.runAt instanceof Date ? spec.runAt.toISOString() : spec.runAt;
  if (spec.delayMs !== undefined) body["delay_ms"] = spec.delayMs;
  if (spec.tags !== undefined) body["tags"] = spec.tags;
  if (spec.meta !== undefined) body["meta"] = spec.meta;
  if (spec.unique !== undefined) {
    const unique: Record<string, unknown> = { key: spec.unique.key, scope: spec.unique.scope };
    if (spec.unique.period !== undefined) unique["period"] = wireDuration(spec.unique.period, "unique.period");
    body["unique"] = unique;
  }
  if (spec.backoff !== undefined) {
    const b = spec.backoff;
    body["backoff"] = b.type === "fixed" ? { type: "fixed", delay_ms: b.delayMs } : { type: b.type, base_ms: b.baseMs, cap_ms: b.capMs };
  }
  return body;
}

/** The wire body of one failure; `withId` for the items of the batch route. */
function failBody(f: Failure, withId: boolean): Record<string, unknown> {
  const body: Record<string, unknown> = withId ? { id: f.id, token: f.token, error: f.error } : { token: f.token, error: f.error };
  if (f.permanent !== undefined) body["permanent"] = f.permanent;
  if (f.retryIn !== undefined) body["retry_in"] = wireDuration(f.retryIn, "retryIn");
  return body;
}

/** A path segment: ids and queue names are plain, but a stray `/` must not change the route. */
function segment(value: string): string {
  return encodeURIComponent(value);
}
