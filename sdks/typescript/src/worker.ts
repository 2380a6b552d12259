/**
 * The worker loop of docs/workers.md: lease within concurrency, heartbeat, report outcomes
 * in batches, stop gracefully.
 *
 * One `Worker` serves one or more queues with a fixed number of slots. Each queue has one
 * poller that long-polls `POST /v1/queues/{queue}/lease` for as many jobs as there are free
 * slots, so the worker never holds a job it has no slot for. A slot is taken when a job is
 * leased and given back when its outcome has been acknowledged (or the job was cancelled,
 * lost or released), so the number of leases the server sees this worker hold never
 * exceeds `concurrency`.
 */

import { hostname } from "node:os";

import { OutcomeBatcher, isTransient } from "./batcher.js";
import type { Client } from "./client.js";
import { CancelledError, KeelError, LeaseLostError, PermanentError, RetryIn, ShutdownError } from "./errors.js";
import { backoffDelay, errorText, sleep, toJson, workerName } from "./internal.js";
import { consoleLogger, type Logger } from "./logger.js";
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
  /** Jobs run at once, and so at most held at once, 1–1000; default 10. */
  concurrency?: number;
  /** Each lease's length, renewed by heartbeats, 5000–3600000 ms; default 30000. */
  leaseMs?: number;
  /** How often each running job is heartbeated; default `leaseMs / 3`. */
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

/** One leased job while this worker holds it. */
interface Run {
  readonly job: LeasedJob;
  readonly token: string;
  readonly controller: AbortController;
  readonly heartbeat: ReturnType<typeof setInterval>;
  /** When the lease lapses at the latest unless renewed (local clock). */
  leaseUntil: number;
  beating: boolean;
  handlerDone: boolean;
  abandoned: Abandoned | undefined;
  finished: boolean;
  /** Settles when the job's slot is free again. */
  done: Promise<void>;
}

const MAX_KINDS = 100;

/**
 * Runs handlers for jobs of the given queues. Register handlers with {@link handle}, then
 * `await worker.run()`; it resolves after a graceful stop ({@link stop}, SIGTERM or SIGINT).
 */
/** How long a busy worker waits for half its slots before leasing (see `#reserve`). */
const GATHER_MS = 2;

export class Worker {
  readonly client: Client;
  readonly queues: readonly string[];
  readonly concurrency: number;
  readonly leaseMs: number;
  readonly heartbeatMs: number;
  readonly graceMs: number;
  readonly workerId: string;
  readonly batchWindowMs: number;
  readonly pollWaitMs: number;

  readonly #handleSignals: boolean;
  readonly #logger: Logger;
  readonly #handlers = new Map<string, Handler>();
  readonly #running = new Map<string, Run>();
  readonly #completions: OutcomeBatcher<Completion>;
  readonly #failures: OutcomeBatcher<Failure>;
  /** Aborted when a stop begins: wakes pollers waiting for a slot or backing off. */
  readonly #stopping = new AbortController();
  /** Aborted by a second signal: abandons the lease requests still waiting on the server. */
  readonly #hurry = new AbortController();
  /** Slots taken by held jobs and by lease requests in flight. */
  #taken = 0;
  /** Pollers not in a lease request, for sharing free slots between queues. */
  #idlePollers = 0;
  /** Resolved and replaced whenever a slot is freed or a run ends. */
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

  /** The jobs this worker holds now. */
  get held(): number {
    return this.#running.size;
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
   * Stops gracefully: no new lease request is sent; running jobs get `graceMs` to finish
   * and report; then the rest have their `ctx.signal` aborted (`ShutdownError`) and are
   * released, back to `available` without using an attempt. Resolves when nothing is held.
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
    this.#idlePollers++;
    try {
      while (!this.#stopping.signal.aborted) {
        const slots = await this.#reserve();
        if (slots === 0) break;
        this.#idlePollers--;
        const sentAt = Date.now();
        let jobs: LeasedJob[];
        try {
          jobs = await this.client.lease(queue, {
            worker: this.workerId,
            max: slots,
            wait: this.pollWaitMs,
            lease: this.leaseMs,
            kinds,
            signal: this.#hurry.signal,
          });
        } catch (e) {
          this.#idlePollers++;
          this.#free(slots);
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
        this.#idlePollers++;
        failures = 0;
        // The server leased them somewhere between sending and now; counting from now
        // errs on the side of retrying an outcome a little longer than needed.
        const leaseUntil = Date.now() + this.leaseMs;
        const extra = jobs.splice(slots);
        this.#free(slots - jobs.length);
        // Anything past the slots asked for, or arriving after a stop began, goes back unrun.
        for (const job of extra) await this.#giveBack(job, leaseUntil, false);
        if (this.#stopping.signal.aborted) {
          for (const job of jobs) await this.#giveBack(job, leaseUntil, true);
          break;
        }
        for (const job of jobs) this.#start(job, leaseUntil);
        // An empty answer well before the wait ran out means the server is shutting down
        // (docs/workers.md, G6): back off rather than ask again at once.
        if (jobs.length === 0 && this.pollWaitMs > 0 && Date.now() - sentAt < Math.min(1_000, this.pollWaitMs / 2)) {
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
   * Waits for free slots and takes a share of them: all of them with one queue, and with
   * several an even split among the pollers not already waiting on the server, so one
   * idle queue's long poll cannot hold every slot while another queue has work.
   * Resolves 0 once a stop began.
   */
  async #reserve(): Promise<number> {
    let gatherUntil: number | undefined;
    for (;;) {
      if (this.#stopping.signal.aborted) return 0;
      const free = this.concurrency - this.#taken;
      // A busy worker waits a moment (GATHER_MS) for half its slots, so it leases in
      // batches rather than one job per round trip, as keel-client's Rust worker does.
      const want = Math.max(1, Math.floor(this.concurrency / 2));
      if (free > 0 && free < want) {
        const now = Date.now();
        gatherUntil ??= now + GATHER_MS;
        if (now < gatherUntil) {
          let timer: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            this.#changed.promise,
            new Promise<void>((resolve) => {
              timer = setTimeout(resolve, gatherUntil! - now);
            }),
          ]);
          clearTimeout(timer);
          continue;
        }
      }
      if (free > 0) {
        const share = Math.max(1, Math.floor(free / Math.max(1, this.#idlePollers)));
        this.#taken += share;
        return share;
      }
      await this.#changed.promise;
    }
  }

  #free(slots: number): void {
    if (slots <= 0) return;
    this.#taken -= slots;
    this.#notify();
  }

  #notify(): void {
    const changed = this.#changed;
    this.#changed = deferred();
    changed.resolve();
  }

  // ------------------------------------------------------------------------------------
  // Running a job

  #start(job: LeasedJob, leaseUntil: number): void {
    const controller = new AbortController();
    const run: Run = {
      job,
      token: job.lease.token,
      controller,
      heartbeat: setInterval(() => void this.#beat(run), this.heartbeatMs),
      leaseUntil,
      beating: false,
      handlerDone: false,
      abandoned: undefined,
      finished: false,
      done: Promise.resolve(),
    };
    this.#running.set(job.id, run);
    run.done = this.#execute(run);
  }

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
    run.handlerDone = true;
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
    const held = (): boolean => run.abandoned === undefined && Date.now() < run.leaseUntil;
    const base = { id: run.job.id, token: run.token };
    let failure: Failure;
    if (outcome.ok) {
      const json = toJson(outcome.value);
      if (json.ok) {
        const answer = await this.#completions.submit({ ...base, result: outcome.value }, held);
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
    const answer = await this.#failures.submit(failure, held);
    if (answer !== undefined && answer.status !== 200) this.#refused("fail", run, answer);
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

  /** Marks a job as getting no outcome from here and tells its handler to stop. */
  #abandon(run: Run, why: Abandoned, reason: Error): void {
    if (run.abandoned !== undefined) return;
    run.abandoned = why;
    clearInterval(run.heartbeat);
    run.controller.abort(reason);
  }

  #finish(run: Run): void {
    if (run.finished) return;
    run.finished = true;
    clearInterval(run.heartbeat);
    this.#running.delete(run.job.id);
    this.#free(1);
  }

  /**
   * Releases a job unrun (`/release`: the attempt is not counted), retrying transient
   * failures while the lease may still be held. `held` says whether the job holds a slot
   * to give back.
   */
  async #giveBack(job: LeasedJob, leaseUntil: number, held: boolean): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.client.release(job.id, job.lease.token);
        break;
      } catch (e) {
        if (!isTransient(e) || Date.now() >= leaseUntil) {
          this.#logger.warn?.(`could not release job ${job.id}; it is rescued when its lease lapses`, { error: errorText(e) });
          break;
        }
        await sleep(backoffDelay(attempt, 100, 2_000));
      }
    }
    if (held) this.#free(1);
  }

  // ------------------------------------------------------------------------------------
  // Stopping

  async #shutdown(): Promise<void> {
    this.#stopping.abort();
    this.#notify();
    if (!this.#started) return;
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
    while (!this.#graceOver && [...this.#running.values()].some((r) => !r.handlerDone)) {
      await Promise.race([this.#changed.promise, grace]);
    }
    this.#endGrace();
    // Past the grace period: a handler still running is told to stop, and its job goes
    // back unrun unless it already ended elsewhere (cancelled or lost).
    const overdue = [...this.#running.values()].filter((r) => !r.handlerDone);
    const toRelease = overdue.filter((r) => r.abandoned === undefined);
    if (toRelease.length > 0) {
      this.#logger.warn?.(`the ${this.graceMs} ms grace period ran out; releasing ${toRelease.length} job(s) still running`);
    }
    await Promise.all(
      overdue.map(async (run) => {
        if (run.abandoned === undefined) {
          this.#abandon(run, "released", new ShutdownError(this.graceMs));
          await this.#giveBack(run.job, run.leaseUntil, false);
        }
        this.#finish(run);
      }),
    );
    // What is left is reporting outcomes; then the lease requests still out come back.
    await Promise.all([...this.#running.values()].map((r) => r.done));
    await Promise.all(this.#pollers);
  }
}

function intIn(name: string, value: number, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`${name} must be an integer from ${min} to ${max}, got ${value}`);
  }
  return value;
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve: () => void = () => {};
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

function once(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
}
