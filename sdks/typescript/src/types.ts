/**
 * The JSON shapes of Keel's HTTP API, as TypeScript interfaces.
 *
 * Objects the server returns keep the wire's snake_case names (`max_attempts`, `run_at`),
 * so a job printed, logged or compared with `curl` output reads the same everywhere.
 * Options the caller passes in are camelCase, as is usual in TypeScript, and the client
 * maps them onto the wire names.
 */

/** Any value JSON can carry. */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/**
 * A duration: whole milliseconds as a number, or a string with units the server parses
 * (`"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"1m30s"`).
 */
export type Duration = number | string;

/** Where a job is in its life (docs/job-states.md). */
export type JobState =
  | "scheduled"
  | "available"
  | "running"
  | "retryable"
  | "completed"
  | "discarded"
  | "cancelled";

/** The states a job never leaves. */
export const TERMINAL_STATES: readonly JobState[] = Object.freeze(["completed", "discarded", "cancelled"]);

/** Whether `state` is final: `completed`, `discarded` or `cancelled`. */
export function isTerminal(state: JobState): boolean {
  return TERMINAL_STATES.includes(state);
}

/** A retry delay policy, as the server reports it. */
export type Backoff =
  | { type: "exponential"; base_ms: number; cap_ms: number }
  | { type: "fixed"; delay_ms: number };

/** One failed attempt, as stored in a job's `errors`. */
export interface AttemptError {
  /** Which attempt failed (1-based). */
  attempt: number;
  /** When (RFC 3339). */
  at: string;
  /** What went wrong (at most 2 KiB). */
  message: string;
}

/** Who holds a running job and until when. */
export interface Lease {
  /**
   * The lease token: present only in the answer of a lease, to the worker that took it.
   * It proves ownership in heartbeat, complete, fail and release.
   */
  token?: string;
  /** The worker name holding the lease. */
  owner: string;
  /** When it lapses unless renewed (RFC 3339). */
  expires_at: string;
}

/** The unique key a job holds. */
export interface UniqueHold {
  /** The key as stored (for scope `period`, followed by `@` and the window's start). */
  key: string;
  /** `queued`, `active` or `period`. */
  scope: UniqueScope;
}

/** How long a unique key is held. */
export type UniqueScope = "queued" | "active" | "period";

/** A job as `GET /v1/jobs/{id}` returns it. `A` is the type of its args, `R` of its result. */
export interface Job<A = unknown, R = unknown> {
  /** Time-ordered id (UUIDv7). */
  id: string;
  queue: string;
  kind: string;
  tenant: string;
  /** The arguments, as submitted. */
  args: A;
  /** 0 (most urgent) … 9. */
  priority: number;
  state: JobState;
  /** Attempts started so far (a leased job's current attempt is already counted). */
  attempt: number;
  max_attempts: number;
  /** Per-attempt timeout, ms. */
  timeout_ms: number;
  backoff: Backoff;
  tags: string[];
  /** Earliest (next) run time (RFC 3339). */
  run_at: string;
  /** One entry per failed attempt, oldest first. */
  errors: AttemptError[];
  /** The result reported on completion, or null. */
  result: R | null;
  /** The current lease, while running. */
  lease: Lease | null;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  /** Its unique key, when it was enqueued with one. */
  unique?: UniqueHold;
  /** Its annotations, as submitted, when it was enqueued with some. */
  meta?: Record<string, unknown>;
}

/** A job as a lease hands it out: running, with the lease token that proves ownership. */
export interface LeasedJob<A = unknown> extends Job<A> {
  state: "running";
  lease: Lease & { token: string };
}

/** `GET /v1/jobs/{id}/result`. */
export interface JobResult<R = unknown> {
  id: string;
  /** `completed`, or the state of a job still on its way (then `result` is absent). */
  state: JobState;
  /** The result of a completed job (null if it completed without one). */
  result?: R | null;
}

/** The answer of a heartbeat. */
export interface Heartbeat {
  /** When the lease now lapses unless renewed again; null once the job was cancelled. */
  expires_at: string | null;
  /** A user cancelled the job: stop the handler. The job has already ended `cancelled`. */
  cancel_requested: boolean;
}

/** One invalid field of a `422` (or query parameter of a `400`). */
export interface FieldError {
  /** Path of the field, e.g. `priority` or `jobs[3].tags[0]`. */
  field: string;
  /** What is wrong with it. */
  message: string;
}

/** An RFC 9457 problem document: the body of every error response. */
export interface Problem {
  /** Stable URI naming the problem, e.g. `https://keel.dev/problems/stale-lease`. */
  type: string;
  title: string;
  status: number;
  detail?: string;
  request_id?: string;
  errors?: FieldError[];
  job_id?: string;
  state?: JobState;
}

/** The answer to one outcome of `POST /v1/jobs/complete` or `POST /v1/jobs/fail`. */
export interface OutcomeResult {
  id: string;
  /** What the single-outcome route would have answered: 200, or the error's status. */
  status: number;
  /** On success, the job's state now (`completed`, `retryable` or `discarded`). */
  state?: JobState;
  /** On success, the job, when the server includes it. */
  job?: Job;
  /** On failure, why. */
  problem?: Problem;
}

/** One external worker, as `GET /v1/workers` shows it. */
export interface WorkerInfo {
  /** The name it leases under. */
  id: string;
  tenant: string;
  /** Queues it leased from. */
  queues: string[];
  /** Its latest lease or heartbeat (RFC 3339). */
  last_seen: string;
  /** Running jobs whose lease it holds. */
  jobs_held: number;
}

/** Job counts of one queue, by state. */
export type QueueCounts = Record<JobState, number>;

/** One queue, as `GET /v1/queues` (and `GET /v1/queues/{queue}`) shows it. */
export interface QueueInfo {
  queue: string;
  /** Whether leasing from it is paused. */
  paused: boolean;
  /** Its jobs by state. */
  counts: QueueCounts;
}

/** A uniqueness constraint on a new job. */
export interface UniqueOptions {
  /** The key, scoped to the tenant. */
  key: string;
  /** `queued` (until the job first starts), `active` (until it finishes) or `period`. */
  scope: UniqueScope;
  /** The window of scope `period` (default 60 s). */
  period?: Duration;
}

/** A retry delay policy for a new job. */
export type BackoffOptions =
  | { type: "exponential"; baseMs: number; capMs: number }
  | { type: "fixed"; delayMs: number };

/** Options of {@link Client.enqueue}. Every one left out takes the server's default. */
export interface EnqueueOptions {
  /** Queue to run in; default `default`. */
  queue?: string;
  /** 0 (most urgent) … 9; default 4. */
  priority?: number;
  /** Attempts before the job is discarded, 1…1000; default 25. */
  maxAttempts?: number;
  /** Per-attempt timeout in milliseconds; default 60000. */
  timeoutMs?: number;
  /** Earliest run time. */
  runAt?: Date | string;
  /** Run no earlier than this many milliseconds after `runAt`, or after now without it. */
  delayMs?: number;
  /** Labels. */
  tags?: string[];
  /**
   * Annotations (a trace id, say): a JSON object of at most 16 KiB, stored and returned as
   * given and never read by Keel.
   */
  meta?: Record<string, unknown>;
  /** At most one such job at a time: another holding the key is returned instead. */
  unique?: UniqueOptions;
  /** Retry delay policy; default exponential with full jitter (1 s base, 1 h cap). */
  backoff?: BackoffOptions;
  /** Tenant; defaults to the API key's. */
  tenant?: string;
  /**
   * Sent as the `Idempotency-Key` header: a retried enqueue with the same key returns the
   * original job instead of creating a second one.
   */
  idempotencyKey?: string;
}

/** One job of {@link Client.enqueueMany}. */
export interface JobSpec extends Omit<EnqueueOptions, "idempotencyKey"> {
  kind: string;
  args?: unknown;
}

/** Options of {@link Client.lease}. */
export interface LeaseOptions {
  /** Who holds the leases: `[A-Za-z0-9_.:-]`, 1–255 bytes. */
  worker: string;
  /** At most this many jobs, 1–1000 (the worker's free slots); default 1. */
  max?: number;
  /** How long to wait for a job when none is available, up to 30 s; default 0. */
  wait?: Duration;
  /** How long each lease lasts unless renewed, 5 s–1 h; default 30 s. */
  lease?: Duration;
  /** Take only jobs of these kinds (1–100 names); default every kind. */
  kinds?: readonly string[];
  /** Abandons the request. */
  signal?: AbortSignal;
}

/** Options of {@link Client.fail}. */
export interface FailOptions {
  /** What went wrong; stored in the job's `errors` (truncated to 2 KiB). */
  error: string;
  /** The error will not go away by retrying: discard the job now. */
  permanent?: boolean;
  /** Run again after this long instead of after the job's backoff. */
  retryIn?: Duration;
}

/** One item of {@link Client.completeMany}. */
export interface Completion {
  id: string;
  token: string;
  /** Any JSON-serialisable value; absent means null. */
  result?: unknown;
}

/** One item of {@link Client.failMany}. */
export interface Failure extends FailOptions {
  id: string;
  token: string;
}

/** Options of {@link Client.wait}. */
export interface WaitOptions {
  /** Give up after this long with a `WaitTimeoutError`; default 60000. */
  timeoutMs?: number;
  /** The longest pause between two polls; default 1000. */
  maxIntervalMs?: number;
  /** Abandons the wait. */
  signal?: AbortSignal;
}
