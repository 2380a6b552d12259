/**
 * The worker loop of docs/workers.md: lease ahead of the slots, heartbeat, report outcomes
 * in batches, stop gracefully.
 *
 * One `Worker` serves one or more queues with a fixed number of slots (`concurrency`). Each
 * queue has one poller that long-polls `POST /v1/queues/{queue}/lease` and keeps a small
 * local buffer of leased jobs ahead of the slots, so a slot that frees up takes its next
 * job from memory instead of waiting for a lease round trip. How far ahead it leases
 * follows the worker's pace (see pace.ts), up to the `prefetch` option, as the server's
 * own dispatchers do.
 *
 * A slot is taken when a job starts and given back as soon as the job's outcome is queued
 * for the batched report, not when the report is acknowledged: the next job runs while the
 * write is in flight. A full report queue holds the slot back (backpressure). From the
 * lease until the report is acknowledged (or the job is released, cancelled or lost), the
 * job is heartbeated, also while it waits in the buffer. So at most `concurrency` handlers
 * run at once, and the worker holds at most `concurrency + prefetch` jobs that have not
 * finished, plus the finished ones whose outcomes are being written.
 */

import { hostname } from "node:os";

import { OutcomeBatcher, isTransient } from "./batcher.js";
import type { Client } from "./client.js";
import { CancelledError, KeelError, LeaseLostError, PermanentError, RetryIn, ShutdownError } from "./errors.js";
import { backoffDelay, errorText, sleep, toJson, workerName } from "./internal.js";
import { consoleLogger, type Logger } from "./logger.js";
import { Pace } from "./pace.js";
import type { Completion, Failure, LeasedJob, OutcomeResult } from "./types.js";

/** What a handler gets besides its job's args. */
export interface JobContext<A = unknown> {
  /** The job as leased (state `running`, with its lease). */
  readonly job: LeasedJob<A>;
  readonly id: string;
  /** This attempt's number, 1-based. */
  readonly attempt: number;
  readonly queue: string;
  readonly kind: string;
  /**
   * Aborts when the handler should stop: a user cancelled the job (reason:
   * `CancelledError`), the worker lost its lease (`LeaseLostError`), or the worker is
   * stopping and the grace period ran out (`ShutdownError`). Pass it on to `fetch` and
   * other abortable calls. Whatever the handler does after it aborted is not reported.
   */
  readonly signal: AbortSignal;
}

/**
 * Runs one job. Its resolved value is the job's result and must be JSON-serialisable.
 * Throwing fails the attempt (`PermanentError` discards the job, `RetryIn` sets the delay
 * before the next attempt).
 */
// `any` by default, so a handler stored without its args' type still type-checks.
export type Handler<A = any> = (ctx: JobContext<A>, args: A) => unknown;

/** Options of {@link Worker}. */
export interface WorkerOptions {
  /** The queues to serve (queues no built-in worker of the server serves). */
  queues: string | readonly string[];
  /** Jobs run at once, 1–1000; default 10. */
  concurrency?: number;
  /**
   * Most jobs leased ahead of the free slots into a local buffer, 0–10000; default 256.
   *
   * Why: a slot that had to wait for a lease round trip after every job would spend most
   * of its time waiting on the network when jobs are short. With a buffer, a slot that
   * frees up starts its next job at once while the poller tops the buffer up in the
   * background. Within this cap the buffer follows the worker's pace (jobs started per
   * second × the lease round trip × 4, at least 1): dozens for millisecond jobs, one for
   * jobs that take seconds, so long jobs do not sit here while other workers have free
   * slots. After an idle spell, while leases come back full to slots with nothing
   * buffered, it doubles at each lease until the measured pace catches up (slow start).
   * Buffered jobs are leased (`running` on the server, attempt counted): they are
   * heartbeated, one cancelled or lost while it waits is dropped without running, and on
   * stop they are released at once without using an attempt.
   *
   * 0 turns prefetch off: the worker leases only for free slots and never holds a job it
   * has no slot for (what to choose when several workers share a queue of long jobs and
   * each job should go to whichever worker is free first).
   */
  prefetch?: number;
  /** Each lease's length, renewed by heartbeats, 5000–3600000 ms; default 30000. */
  leaseMs?: number;
  /** How often each held job (running, buffered, or reporting its outcome) is heartbeated; default `leaseMs / 3`. */
  heartbeatMs?: number;
  /** On stop, how long running jobs get to finish before they are aborted and released; default 30000. */
  graceMs?: number;
  /** The name leases are held under (`GET /v1/workers`); default `hostname:pid`. */
  workerId?: string;
  /** Outcomes finishing within this many ms of each other are reported in one request; default 5. */
  batchWindowMs?: number;
  /**
   * How long one lease request waits for work when the queue is empty, 0–30000 ms;
   * default 10000. A stop waits for an outstanding one to come back (see {@link Worker.stop}).
   */
  pollWaitMs?: number;
  /** Install SIGTERM and SIGINT handlers that stop the worker while it runs; default true. */
  handleSignals?: boolean;
  /** Where log lines go; default warnings and errors on the console, prefixed `keel:`. */
  logger?: Logger;
}

type Outcome = { ok: true; value: unknown } | { ok: false; error: unknown };

/** Why a job will get no outcome from this worker. */
type Abandoned = "cancelled" | "lost" | "released";

/**
 * Where a held job is: `buffered` (leased, waiting for a slot), `running` (its handler
 * runs) or `reporting` (its handler returned; the outcome is being reported).
 */
type Phase = "buffered" | "running" | "reporting";

/** One leased job while this worker holds it. */
interface Run {
  readonly job: LeasedJob;
  readonly token: string;
  /** The queue whose poller leased it. */
  readonly queue: string;
  readonly controller: AbortController;
  readonly heartbeat: ReturnType<typeof setInterval>;
  /** When the lease lapses at the latest unless renewed (local clock). */
  leaseUntil: number;
  beating: boolean;
  phase: Phase;
  /** Whether it holds one of the worker's slots: from its start until its outcome is queued. */
  slot: boolean;
  abandoned: Abandoned | undefined;
  finished: boolean;
  /** Settles when its handler returned and its outcome was reported (or it was let go). */
  done: Promise<void>;
}

const MAX_KINDS = 100;
/** Most jobs one lease request may ask for (docs/workers.md, `max`). */
const MAX_LEASE = 1000;
/** Release requests sent at once when a stop gives back the buffer. */
const RELEASE_LANES = 8;

/**
 * Runs handlers for jobs of the given queues. Register handlers with {@link handle}, then
 * `await worker.run()`; it resolves after a graceful stop ({@link stop}, SIGTERM or SIGINT).
 */
export class Worker {
  readonly client: Client;
  readonly queues: readonly string[];
  readonly concurrency: number;
  /** The most jobs held ahead of the free slots (the `prefetch` option; 0: none). */
  readonly prefetch: number;
  readonly leaseMs: number;
  readonly heartbeatMs: number;
  readonly graceMs: number;
  readonly workerId: string;
  readonly batchWindowMs: number;
  readonly pollWaitMs: number;

  readonly #handleSignals: boolean;
  readonly #logger: Logger;
  readonly #handlers = new Map<string, Handler>();
  /** Every job held, buffered or not, by lease token. */
  readonly #runs = new Map<string, Run>();
  /** Leased jobs waiting for a slot, oldest first. */
  readonly #buffer: Run[] = [];
  /** How many of the buffered jobs each queue's poller leased. */
  readonly #bufferedIn = new Map<string, number>();
  readonly #pace: Pace;
  readonly #completions: OutcomeBatcher<Completion>;
  readonly #failures: OutcomeBatcher<Failure>;
  /** Aborted when a stop begins: wakes pollers waiting for room or backing off. */
  readonly #stopping = new AbortController();
  /** Aborted by a second signal: abandons the lease requests still waiting on the server. */
  readonly #hurry = new AbortController();
  /** Slots taken by jobs whose handler runs or whose outcome waits to be queued. */
  #busy = 0;
  /** Jobs asked for by lease requests in flight. */
  #asking = 0;
  /** Pollers not in a lease request, for sharing room between queues. */
  #idlePollers = 0;
  /** Resolved and replaced whenever a slot, the buffer or a run changes. */
  #changed = deferred();
  #started = false;
  #graceOver = false;
  #endGrace: () => void = () => {};
  #stopped: Promise<void> | undefined;
  #pollers: Promise<void>[] = [];
  #fatal: unknown;

  constructor(client: Client, options: WorkerOptions) {
    this.client = client;
    const queues = typeof options.queues === "string" ? [options.queues] : [...(options.queues ?? [])];
    if (queues.length === 0) throw new TypeError("Worker needs at least one queue");
    this.queues = [...new Set(queues)];
    this.concurrency = intIn("concurrency", options.concurrency ?? 10, 1, 1000);
    this.prefetch = intIn("prefetch", options.prefetch ?? 256, 0, 10_000);
    this.leaseMs = intIn("leaseMs", options.leaseMs ?? 30_000, 5_000, 3_600_000);
    this.heartbeatMs = intIn("heartbeatMs", options.heartbeatMs ?? Math.floor(this.leaseMs / 3), 1, this.leaseMs - 1);
    this.graceMs = intIn("graceMs", options.graceMs ?? 30_000, 0, Number.MAX_SAFE_INTEGER);
    this.batchWindowMs = intIn("batchWindowMs", options.batchWindowMs ?? 5, 0, 60_000);
    this.pollWaitMs = intIn("pollWaitMs", options.pollWaitMs ?? 10_000, 0, 30_000);
    // A given id is sent as is (the server names what is wrong with it); the default is
    // made to fit, since a host name may hold characters a worker id may not.
    this.workerId = options.workerId ?? workerName(`${hostname()}:${process.pid}`);
    this.#handleSignals = options.handleSignals ?? true;
    this.#logger = options.logger ?? consoleLogger();
    this.#pace = new Pace(this.prefetch);
    this.#completions = new OutcomeBatcher("POST /v1/jobs/complete", (items) => this.client.completeMany(items), this.batchWindowMs, this.#logger);
    this.#failures = new OutcomeBatcher("POST /v1/jobs/fail", (items) => this.client.failMany(items), this.batchWindowMs, this.#logger);
  }

  /**
   * Registers the handler of a job kind. Only kinds with a handler are leased (the lease's
   * `kinds` filter), so jobs of other kinds stay for other workers. Call before {@link run}.
   */
  handle<A = unknown>(kind: string, handler: Handler<A>): this {
    if (this.#started) throw new Error("register handlers before run(): the lease filter is fixed when the worker starts");
    if (typeof handler !== "function") throw new TypeError(`the handler of ${kind} must be a function`);
    this.#handlers.set(kind, handler as Handler);
    return this;
  }

  /**
   * The jobs this worker holds leases on now: running, buffered waiting for a slot, or
   * finished with their outcome not yet acknowledged.
   */
  get held(): number {
    return this.#runs.size;
  }

  /**
   * Runs until stopped, then resolves once every job held was finished, reported or
   * released. Rejects, after stopping the same way, if the server refuses the worker's
   * lease requests for a reason retrying cannot fix (a queue the server serves itself, a
   * bad option, a missing route or API key).
   */
  async run(): Promise<void> {
    if (this.#started) throw new Error("this Worker has already run; create a new one");
    if (this.#handlers.size === 0) throw new Error("no handlers: register one with worker.handle(kind, fn) before run()");
    if (this.#handlers.size > MAX_KINDS) throw new Error(`a worker leases at most ${MAX_KINDS} kinds; split them across workers`);
    this.#started = true;
    const kinds = [...this.#handlers.keys()];
    const onSignal = (signal: NodeJS.Signals): void => {
      if (!this.#stopping.signal.aborted) {
        this.#logger.info?.(`${signal}: stopping; running jobs get ${this.graceMs} ms (send it again to skip the grace period)`);
        void this.stop();
      } else {
        this.#logger.warn?.(
          `${signal} again: ending the grace period and abandoning waiting lease requests now ` +
            "(a job handed to one at this very moment is rescued when its lease lapses)",
        );
        this.#endGrace();
        this.#hurry.abort();
      }
    };
    if (this.#handleSignals) {
      process.on("SIGTERM", onSignal);
      process.on("SIGINT", onSignal);
    }
    try {
      this.#pollers = this.queues.map((queue) => this.#poll(queue, kinds));
      if (!this.#stopping.signal.aborted) await once(this.#stopping.signal);
      await this.stop();
    } finally {
      if (this.#handleSignals) {
        process.off("SIGTERM", onSignal);
        process.off("SIGINT", onSignal);
      }
    }
    if (this.#fatal !== undefined) throw this.#fatal;
  }

  /**
   * Stops gracefully: no new lease request is sent; buffered jobs no slot started are
   * released at once; running jobs get `graceMs` to finish and report; then the rest have
   * their `ctx.signal` aborted (`ShutdownError`) and are released. Released jobs are back
   * to `available` without using an attempt. Resolves when nothing is held.
   *
   * A lease request already waiting on the server is not abandoned, because jobs it
   * answered with after being abandoned would be stranded until their leases lapsed and
   * would lose an attempt. It comes back within `pollWaitMs` and anything it brings is
   * released at once, so an idle worker can take up to `pollWaitMs` to stop. A second
   * SIGTERM/SIGINT skips both waits: the grace period ends and waiting lease requests are
   * abandoned.
   */
  stop(): Promise<void> {
    this.#stopped ??= this.#shutdown();
    return this.#stopped;
  }

  // ------------------------------------------------------------------------------------
  // Leasing

  async #poll(queue: string, kinds: string[]): Promise<void> {
    let failures = 0;
    let quickEmpties = 0;
    // Whether the queue may have more work at once: the last lease came back full. While
    // it did not, the buffer is not topped up; the poller long-polls once it is empty.
    let more = true;
    this.#idlePollers++;
    try {
      while (!this.#stopping.signal.aborted) {
        const max = await this.#reserve(queue, more);
        if (max === 0) break;
        // With jobs of this queue buffered, the lease tops the buffer up and must not wait
        // on the server; with none, it is the long poll that waits for work.
        const wait = this.#bufferedFrom(queue) === 0 ? this.pollWaitMs : 0;
        this.#idlePollers--;
        const sentAt = performance.now();
        let jobs: LeasedJob[];
        try {
          jobs = await this.client.lease(queue, {
            worker: this.workerId,
            max,
            wait,
            lease: this.leaseMs,
            kinds,
            signal: this.#hurry.signal,
          });
        } catch (e) {
          this.#idlePollers++;
          this.#asking -= max;
          this.#notify();
          if (this.#hurry.signal.aborted) break;
          if (!isTransient(e)) {
            this.#logger.error?.(`leasing from ${queue} was refused; the worker stops`, { error: errorText(e) });
            this.#fatal ??= e;
            void this.stop();
            break;
          }
          const delay = backoffDelay(failures++, 200, 10_000);
          this.#logger.warn?.(`leasing from ${queue} failed; retrying in ${Math.round(delay)} ms`, { error: errorText(e) });
          await sleep(delay, this.#stopping.signal);
          continue;
        }
        const tookMs = performance.now() - sentAt;
        this.#idlePollers++;
        this.#asking -= max;
        failures = 0;
        more = jobs.length >= max;
        // A full answer, or one to a request that did not wait, measured a round trip; a
        // short answer to a long poll may have waited on the server for work.
        if (more || wait === 0) this.#pace.leased(tookMs);
        // Slow start after an idle spell, as the server's dispatchers do: full relative to
        // what this lease asked for; starving judged now, before its jobs are buffered, over
        // the whole worker (the pace, the buffer and the slots are shared by its pollers).
        this.#pace.answered(more, this.#buffer.length === 0 && this.#busy < this.concurrency);
        // The server leased them somewhere between sending and now; counting from now
        // errs on the side of retrying an outcome a little longer than needed.
        const leaseUntil = Date.now() + this.leaseMs;
        // Anything past the jobs asked for, or arriving after a stop began, goes back unrun.
        const extra = jobs.splice(max);
        if (this.#stopping.signal.aborted) {
          await this.#giveBackAll([...jobs, ...extra], leaseUntil);
          break;
        }
        for (const job of jobs) this.#hold(queue, job, leaseUntil);
        this.#startBuffered();
        this.#notify();
        await this.#giveBackAll(extra, leaseUntil);
        // An empty answer well before the wait ran out means the server is shutting down
        // (docs/workers.md, G6): back off rather than ask again at once.
        if (jobs.length === 0 && wait > 0 && tookMs < Math.min(1_000, wait / 2)) {
          await sleep(backoffDelay(quickEmpties++, 200, 5_000), this.#stopping.signal);
        } else {
          quickEmpties = 0;
        }
      }
    } finally {
      this.#idlePollers--;
    }
  }

  /**
   * Waits until `queue`'s poller should lease, and reserves what it asks for: the room left
   * in `concurrency + prefetch` after the busy slots, the buffer and the other lease
   * requests in flight. It leases when its queue has nothing buffered (a slot is idle, or
   * will be when the next one frees up), or, while the last lease came back full
   * (`more`), when half the prefetch was taken, so a busy worker does not lease one job
   * per finished job while the rest of the buffer still covers the round trip. With several queues the room is split evenly among the
   * pollers not already waiting on the server. Resolves 0 once a stop began.
   */
  async #reserve(queue: string, more: boolean): Promise<number> {
    for (;;) {
      if (this.#stopping.signal.aborted) return 0;
      this.#pace.started(0);
      const capacity = this.concurrency + this.#pace.prefetch();
      const room = capacity - this.#busy - this.#buffer.length - this.#asking;
      const empty = this.#bufferedFrom(queue) === 0;
      if (room > 0 && (empty || (more && room >= Math.max(1, Math.floor((capacity - this.concurrency) / 2))))) {
        const share = Math.min(MAX_LEASE, Math.max(1, Math.floor(room / Math.max(1, this.#idlePollers))));
        this.#asking += share;
        return share;
      }
      await this.#changed.promise;
    }
  }

  #bufferedFrom(queue: string): number {
    return this.#bufferedIn.get(queue) ?? 0;
  }

  #notify(): void {
    const changed = this.#changed;
    this.#changed = deferred();
    changed.resolve();
  }

  // ------------------------------------------------------------------------------------
  // The buffer and the slots

  /** Takes a freshly leased job into the buffer; its heartbeat starts now. */
  #hold(queue: string, job: LeasedJob, leaseUntil: number): void {
    const run: Run = {
      job,
      token: job.lease.token,
      queue,
      controller: new AbortController(),
      heartbeat: setInterval(() => void this.#beat(run), this.heartbeatMs),
      leaseUntil,
      beating: false,
      phase: "buffered",
      slot: false,
      abandoned: undefined,
      finished: false,
      done: Promise.resolve(),
    };
    this.#runs.set(run.token, run);
    this.#buffer.push(run);
    this.#bufferedIn.set(queue, this.#bufferedFrom(queue) + 1);
  }

  /** Starts buffered jobs, oldest first, on the free slots (none once a stop began). */
  #startBuffered(): void {
    if (this.#stopping.signal.aborted) return;
    let started = 0;
    while (this.#busy < this.concurrency) {
      const run = this.#buffer.shift();
      if (run === undefined) break;
      this.#bufferedIn.set(run.queue, this.#bufferedFrom(run.queue) - 1);
      run.phase = "running";
      run.slot = true;
      this.#busy++;
      started++;
      run.done = this.#execute(run);
    }
    if (started > 0) {
      this.#pace.started(started);
      this.#notify();
    }
  }

  /** Takes a job out of the buffer without starting it. */
  #unbuffer(run: Run): void {
    const at = this.#buffer.indexOf(run);
    if (at < 0) return;
    this.#buffer.splice(at, 1);
    this.#bufferedIn.set(run.queue, this.#bufferedFrom(run.queue) - 1);
  }

  /** Gives a job's slot back, and hands it to the next buffered job. */
  #freeSlot(run: Run): void {
    if (!run.slot) return;
    run.slot = false;
    this.#busy--;
    this.#startBuffered();
    this.#notify();
  }

  // ------------------------------------------------------------------------------------
  // Running a job

  async #execute(run: Run): Promise<void> {
    const { job } = run;
    const handler = this.#handlers.get(job.kind);
    let outcome: Outcome;
    if (handler === undefined) {
      // Only possible if the server ignored the kinds filter; fail rather than hold it.
      outcome = { ok: false, error: new Error(`worker ${this.workerId} has no handler for kind ${job.kind}`) };
    } else {
      const ctx: JobContext = {
        job,
        id: job.id,
        attempt: job.attempt,
        queue: job.queue,
        kind: job.kind,
        signal: run.controller.signal,
      };
      try {
        outcome = { ok: true, value: await handler(ctx, job.args) };
      } catch (error) {
        outcome = { ok: false, error };
      }
    }
    run.phase = "reporting";
    this.#notify();
    try {
      if (run.abandoned === undefined) await this.#report(run, outcome);
    } catch (e) {
      this.#logger.error?.(`reporting job ${job.id} failed`, { error: errorText(e) });
    } finally {
      this.#finish(run);
    }
  }

  /** Sends a finished job's outcome and deals with a refusal. */
  async #report(run: Run, outcome: Outcome): Promise<void> {
    const base = { id: run.job.id, token: run.token };
    let failure: Failure;
    if (outcome.ok) {
      const json = toJson(outcome.value);
      if (json.ok) {
        const answer = await this.#submit(this.#completions, { ...base, result: outcome.value }, run);
        if (answer === undefined || answer.status === 200) return;
        if (answer.status !== 413 && answer.status !== 422) return this.#refused("complete", run, answer);
        // The server cannot store this result (too large, too deep, a lone surrogate): a
        // failed attempt says so where the job's owner will look, instead of a lapsed lease.
        failure = { ...base, error: `the server refused the handler's result: ${answer.problem?.detail ?? `status ${answer.status}`}` };
      } else {
        failure = { ...base, error: `TypeError: the handler's result is not JSON-serialisable: ${json.error}` };
      }
    } else {
      const e = outcome.error;
      failure = { ...base, error: errorText(e) };
      if (e instanceof PermanentError) failure.permanent = true;
      if (e instanceof RetryIn) failure.retryIn = e.ms;
    }
    const answer = await this.#submit(this.#failures, failure, run);
    if (answer !== undefined && answer.status !== 200) this.#refused("fail", run, answer);
  }

  /**
   * Hands one outcome to its batcher and resolves with the server's answer. The slot is
   * given back as soon as the batcher took the outcome, so the next job runs while this
   * one's write is in flight; the run (and its heartbeat) lasts until the answer.
   */
  async #submit<T extends { id: string }>(batcher: OutcomeBatcher<T>, item: T, run: Run): Promise<OutcomeResult | undefined> {
    const { queued, answer } = batcher.submit(item, () => run.abandoned === undefined && Date.now() < run.leaseUntil);
    await queued;
    this.#freeSlot(run);
    return answer;
  }

  #refused(what: string, run: Run, answer: OutcomeResult): void {
    const detail = answer.problem?.detail ?? `status ${answer.status}`;
    if (answer.status === 409) {
      // The job was cancelled, or its lease lapsed and another run owns it now (G2).
      this.#logger.warn?.(`the ${what} of job ${run.job.id} was refused as stale: ${detail}`);
    } else {
      this.#logger.error?.(`the ${what} of job ${run.job.id} was refused (${answer.status}): ${detail}`);
    }
  }

  async #beat(run: Run): Promise<void> {
    if (run.beating || run.finished || run.abandoned !== undefined) return;
    run.beating = true;
    try {
      const beat = await this.client.heartbeat(run.job.id, run.token, this.leaseMs);
      if (beat.cancel_requested) {
        this.#abandon(run, "cancelled", new CancelledError(run.job.id));
      } else {
        run.leaseUntil = Date.now() + this.leaseMs;
      }
    } catch (e) {
      if (e instanceof KeelError && (e.status === 409 || e.status === 404)) {
        this.#logger.warn?.(`job ${run.job.id} is no longer held by this worker: ${e.detail}`);
        this.#abandon(run, "lost", new LeaseLostError(run.job.id, e.detail));
      } else {
        this.#logger.warn?.(`heartbeat of job ${run.job.id} failed; trying again in ${this.heartbeatMs} ms`, { error: errorText(e) });
      }
    } finally {
      run.beating = false;
    }
  }

  /**
   * Marks a job as getting no outcome from here and tells its handler to stop. A buffered
   * job that was cancelled or lost is dropped without running: the server already ended
   * its lease.
   */
  #abandon(run: Run, why: Abandoned, reason: Error): void {
    if (run.abandoned !== undefined) return;
    run.abandoned = why;
    clearInterval(run.heartbeat);
    run.controller.abort(reason);
    if (run.phase === "buffered" && why !== "released") {
      this.#logger.info?.(`buffered job ${run.job.id} was ${why === "cancelled" ? "cancelled" : "lost"} before it started; dropped`);
      this.#finish(run);
    }
  }

  /** Lets go of a job: no longer held, heartbeated or buffered, and its slot (if any) free. */
  #finish(run: Run): void {
    if (run.finished) return;
    run.finished = true;
    clearInterval(run.heartbeat);
    this.#runs.delete(run.token);
    if (run.phase === "buffered") this.#unbuffer(run);
    this.#freeSlot(run);
    this.#notify();
  }

  /**
   * Releases a job unrun (`/release`: the attempt is not counted), retrying transient
   * failures while the lease may still be held.
   */
  async #giveBack(job: LeasedJob, leaseUntil: number): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.client.release(job.id, job.lease.token);
        return;
      } catch (e) {
        if (!isTransient(e) || Date.now() >= leaseUntil) {
          this.#logger.warn?.(`could not release job ${job.id}; it is rescued when its lease lapses`, { error: errorText(e) });
          return;
        }
        await sleep(backoffDelay(attempt, 100, 2_000));
      }
    }
  }

  /** Releases jobs unrun, a few requests at a time. */
  async #giveBackAll(jobs: readonly LeasedJob[], leaseUntil: number): Promise<void> {
    await inLanes(jobs, RELEASE_LANES, (job) => this.#giveBack(job, leaseUntil));
  }

  // ------------------------------------------------------------------------------------
  // Stopping

  async #shutdown(): Promise<void> {
    this.#stopping.abort();
    this.#notify();
    if (!this.#started) return;
    // Jobs no slot started go back first, at once: another worker can run them while
    // this one's running jobs finish, and no attempt is used.
    const unstarted = this.#buffer.splice(0);
    this.#bufferedIn.clear();
    for (const run of unstarted) this.#abandon(run, "released", new ShutdownError(this.graceMs));
    const releasing = inLanes(unstarted, RELEASE_LANES, async (run) => {
      await this.#giveBack(run.job, run.leaseUntil);
      this.#finish(run);
    });
    const grace = new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, this.graceMs);
      this.#endGrace = () => {
        clearTimeout(timer);
        resolve();
      };
    }).then(() => {
      this.#graceOver = true;
      this.#notify();
    });
    // Running handlers get the grace period.
    while (!this.#graceOver && [...this.#runs.values()].some((r) => r.phase === "running")) {
      await Promise.race([this.#changed.promise, grace]);
    }
    this.#endGrace();
    // Past the grace period: a handler still running is told to stop, and its job goes
    // back unrun unless it already ended elsewhere (cancelled or lost).
    const overdue = [...this.#runs.values()].filter((r) => r.phase === "running");
    const toRelease = overdue.filter((r) => r.abandoned === undefined);
    if (toRelease.length > 0) {
      this.#logger.warn?.(`the ${this.graceMs} ms grace period ran out; releasing ${toRelease.length} job(s) still running`);
    }
    await Promise.all(
      overdue.map(async (run) => {
        if (run.abandoned === undefined) {
          this.#abandon(run, "released", new ShutdownError(this.graceMs));
          await this.#giveBack(run.job, run.leaseUntil);
        }
        this.#finish(run);
      }),
    );
    // What is left is reporting outcomes; then the lease requests still out come back.
    await releasing;
    await Promise.all([...this.#runs.values()].map((r) => r.done));
    await Promise.all(this.#pollers);
  }
}

function intIn(name: string, value: number, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer from ${min} to ${max}, got ${value}`);
  }
  return value;
}

/** Calls `fn` on every item, at most `lanes` calls at a time, in order. */
async function inLanes<T>(items: readonly T[], lanes: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const lane = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(lanes, items.length) }, lane));
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve: () => void = () => {};
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

function once(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
}
