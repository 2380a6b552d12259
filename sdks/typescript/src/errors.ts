/**
 * Every error the SDK raises, and the two a handler throws to steer its job's retries.
 *
 * Callers switch on the class (`instanceof`) or, for server errors, on `KeelError.type`,
 * the stable problem URI. `detail` is for humans and may change wording between releases.
 */

import type { FieldError, JobState, Problem } from "./types.js";

/** Prefix of every problem `type` URI Keel sends. */
export const PROBLEM_TYPE_BASE = "https://keel.dev/problems/";

/**
 * The server answered with an error status. Built from its `application/problem+json`
 * body (RFC 9457); a body that is not one (a proxy's HTML page, an empty `404` from a
 * server without the route) still gives a `KeelError` with the status and the text.
 */
export class KeelError extends Error {
  override readonly name = "KeelError";
  /** The HTTP status. */
  readonly status: number;
  /** The problem type URI, e.g. `https://keel.dev/problems/validation`; `about:blank` when the body was no problem document. */
  readonly type: string;
  /** The status's reason phrase. */
  readonly title: string;
  /** What happened, for a human. */
  readonly detail: string;
  /** Every invalid field (`422`) or query parameter (`400`); empty otherwise. */
  readonly errors: FieldError[];
  /** The request id to quote in a bug report, when the server sent one. */
  readonly requestId: string | undefined;
  /** The job concerned, when the problem names one. */
  readonly jobId: string | undefined;
  /** The job's state, when it explains the problem (a result asked of a cancelled job). */
  readonly state: JobState | undefined;
  /** The request that failed, e.g. `POST /v1/jobs`. */
  readonly request: string;
  /** The problem document as received, when there was one. */
  readonly problem: Problem | undefined;

  constructor(request: string, status: number, problem: Partial<Problem> | undefined, text?: string) {
    const title = stringOr(problem?.title, "");
    const detail = stringOr(problem?.detail, text?.trim().slice(0, 500) ?? "");
    const errors = Array.isArray(problem?.errors) ? problem.errors.filter(isFieldError) : [];
    super(describe(request, status, title, detail, errors));
    this.status = status;
    this.type = stringOr(problem?.type, "about:blank");
    this.title = title;
    this.detail = detail;
    this.errors = errors;
    this.requestId = optionalString(problem?.request_id);
    this.jobId = optionalString(problem?.job_id);
    this.state = optionalString(problem?.state) as JobState | undefined;
    this.request = request;
    this.problem = problem && typeof problem.type === "string" ? (problem as Problem) : undefined;
  }

  /**
   * The last segment of `type` (`not-found`, `stale-lease`, `validation`, …): the part to
   * switch on.
   */
  get problemType(): string {
    return this.type.startsWith(PROBLEM_TYPE_BASE) ? this.type.slice(PROBLEM_TYPE_BASE.length) : this.type;
  }

  /** A `409 stale-lease`: the lease token no longer holds the job. */
  get isStaleLease(): boolean {
    return this.status === 409 && this.problemType === "stale-lease";
  }

  /**
   * Whether the same request may succeed later unchanged: the server was overloaded,
   * unavailable, timed out or rate-limited the caller.
   */
  get isTransient(): boolean {
    return this.status === 408 || this.status === 429 || this.status >= 500;
  }
}

/**
 * The request got no HTTP answer: the connection was refused or reset, the name did not
 * resolve, or the client's timeout ran out. The request may or may not have been acted on.
 */
export class KeelNetworkError extends Error {
  override readonly name = "KeelNetworkError";
  /** The request that failed, e.g. `POST /v1/jobs`. */
  readonly request: string;
  /** Whether it was the client's own timeout that ended the request. */
  readonly timedOut: boolean;

  constructor(request: string, cause: unknown, timedOut: boolean) {
    const why = timedOut ? "timed out" : `failed: ${causeMessage(cause)}`;
    super(`${request} ${why}`, { cause });
    this.request = request;
    this.timedOut = timedOut;
  }
}

/** {@link Client.wait} gave up before the job reached a terminal state. */
export class WaitTimeoutError extends Error {
  override readonly name = "WaitTimeoutError";
  /** The job waited for. */
  readonly jobId: string;
  /** Its state when the wait gave up. */
  readonly lastState: JobState | undefined;

  constructor(jobId: string, timeoutMs: number, lastState: JobState | undefined) {
    super(`job ${jobId} did not finish within ${timeoutMs} ms (last state: ${lastState ?? "unknown"})`);
    this.jobId = jobId;
    this.lastState = lastState;
  }
}

/**
 * The reason of a handler's `ctx.signal` when a user cancelled the job: the server said so
 * on a heartbeat. The job has already ended `cancelled`; whatever the handler returns is
 * not reported.
 */
export class CancelledError extends Error {
  override readonly name = "CancelledError";
  readonly jobId: string;

  constructor(jobId: string) {
    super(`job ${jobId} was cancelled`);
    this.jobId = jobId;
  }
}

/**
 * The reason of a handler's `ctx.signal` when the worker lost the job's lease (it lapsed
 * and the job was rescued, or it was leased again): another run may already own the job,
 * so this run's outcome would be refused.
 */
export class LeaseLostError extends Error {
  override readonly name = "LeaseLostError";
  readonly jobId: string;

  constructor(jobId: string, detail: string) {
    super(`lost the lease of job ${jobId}: ${detail}`);
    this.jobId = jobId;
  }
}

/**
 * The reason of a handler's `ctx.signal` when the worker is stopping and the grace period
 * ran out. The job is released (back to `available`, the attempt not counted), so another
 * worker runs it again from the start.
 */
export class ShutdownError extends Error {
  override readonly name = "ShutdownError";

  constructor(graceMs: number) {
    super(`the worker is stopping and the ${graceMs} ms grace period ran out; the job is released`);
  }
}

/**
 * Thrown by a handler: the error will not go away by retrying, so the job is discarded
 * now whatever attempts remain.
 */
export class PermanentError extends Error {
  override readonly name: string = "PermanentError";

  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
  }
}

/**
 * Thrown by a handler: fail this attempt and run the job again after `ms` milliseconds
 * instead of after its backoff (for example when an upstream says `Retry-After`). Once no
 * attempts remain the job is discarded as usual.
 */
export class RetryIn extends Error {
  override readonly name: string = "RetryIn";
  /** The delay before the next attempt, in milliseconds. */
  readonly ms: number;

  constructor(ms: number, message = `retry in ${ms} ms`, options?: ErrorOptions) {
    super(message, options);
    if (!Number.isFinite(ms) || ms < 0) {
      throw new RangeError(`RetryIn needs a finite, non-negative delay in ms, got ${ms}`);
    }
    this.ms = ms;
  }
}

function describe(request: string, status: number, title: string, detail: string, errors: FieldError[]): string {
  let msg = `${request} answered ${status}${title ? ` ${title}` : ""}`;
  if (detail) msg += `: ${detail}`;
  if (errors.length > 0) msg += ` [${errors.map((e) => `${e.field}: ${e.message}`).join("; ")}]`;
  return msg;
}

function stringOr(value: unknown, fallback: string): string {
  return typeof value === "string" ? value : fallback;
}

function optionalString(value: unknown): string | undefined {
  return typeof value === "string" ? value : undefined;
}

function isFieldError(value: unknown): value is FieldError {
  return (
    typeof value === "object" &&
    value !== null &&
    typeof (value as FieldError).field === "string" &&
    typeof (value as FieldError).message === "string"
  );
}

/** The innermost useful message of a fetch failure (`fetch failed` hides the real cause). */
function causeMessage(cause: unknown): string {
  let e: unknown = cause;
  let msg = "unknown error";
  for (let depth = 0; depth < 5 && e instanceof Error; depth++) {
    msg = e.message || e.name;
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && !msg.includes(code)) msg = `${msg} (${code})`;
    e = e.cause;
  }
  return msg;
}
