/**
 * Groups the outcomes that finish close together into one batched request
 * (`POST /v1/jobs/complete` or `/v1/jobs/fail`), the way the server's own workers group
 * their writes: one round trip and one group commit instead of one per job.
 */

import { KeelError, KeelNetworkError } from "./errors.js";
import { backoffDelay, sleep } from "./internal.js";
import type { Logger } from "./logger.js";
import type { OutcomeResult } from "./types.js";

/** Most outcomes the server takes in one request. */
export const MAX_BATCH = 1000;

/** Most outcomes one batcher holds unacknowledged (waiting for the window, or sent) by default. */
export const MAX_OUTSTANDING = MAX_BATCH;

interface Pending<T> {
  item: T;
  /** Whether the lease may still be held: past it, a retry could only be refused. */
  held: () => boolean;
  resolve: (result: OutcomeResult | undefined) => void;
}

/** An outcome handed to {@link OutcomeBatcher.submit}. */
export interface Submitted {
  /**
   * Resolves once the batcher took the item: at once while it holds fewer than its limit,
   * otherwise when an earlier item's answer made room (backpressure). Never rejects.
   */
  queued: Promise<void>;
  /** The server's answer to this item, or `undefined` once its lease lapsed. Never rejects. */
  answer: Promise<OutcomeResult | undefined>;
}

/**
 * Collects items for `windowMs` after the first one arrives (or until `MAX_BATCH` are
 * waiting), then sends them together. Each submitter gets its own item's answer. A
 * request that got no answer, or a transient error, is retried with capped backoff for as
 * long as the item's lease may still be held; an item past that resolves `undefined`.
 *
 * It holds at most `limit` items between taking them and their answer. Past that, items
 * wait to be taken, in order: a worker whose writes fall behind stops freeing slots (and so
 * stops leasing) instead of piling up finished jobs whose leases it must keep alive.
 */
export class OutcomeBatcher<T extends { id: string }> {
  readonly #pending: Pending<T>[] = [];
  /** Items waiting for room, oldest first; each is taken by calling it. */
  readonly #waiting: (() => void)[] = [];
  /** Items taken and not yet answered. */
  #outstanding = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly route: string,
    private readonly send: (items: T[]) => Promise<OutcomeResult[]>,
    private readonly windowMs: number,
    private readonly logger: Logger,
    private readonly limit: number = MAX_OUTSTANDING,
  ) {}

  /** Items taken and not yet answered. */
  get outstanding(): number {
    return this.#outstanding;
  }

  /** Submits one outcome; see {@link Submitted}. */
  submit(item: T, held: () => boolean): Submitted {
    let taken!: () => void;
    const queued = new Promise<void>((resolve) => (taken = resolve));
    const answer = new Promise<OutcomeResult | undefined>((resolve) => {
      const take = (): void => {
        this.#outstanding++;
        let answered = false;
        const done = (result: OutcomeResult | undefined): void => {
          if (answered) return;
          answered = true;
          this.#outstanding--;
          this.#waiting.shift()?.();
          resolve(result);
        };
        this.#pending.push({ item, held, resolve: done });
        if (this.#pending.length >= MAX_BATCH) this.#flush();
        else this.#timer ??= setTimeout(() => this.#flush(), this.windowMs);
        taken();
      };
      if (this.#outstanding < this.limit && this.#waiting.length === 0) take();
      else this.#waiting.push(take);
    });
    return { queued, answer };
  }

  #flush(): void {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    while (this.#pending.length > 0) {
      void this.#deliver(this.#pending.splice(0, MAX_BATCH), 0);
    }
  }

  async #deliver(batch: Pending<T>[], attempt: number): Promise<void> {
    let results: OutcomeResult[];
    try {
      results = await this.send(batch.map((p) => p.item));
    } catch (e) {
      if (isTransient(e)) {
        const kept = batch.filter((p) => {
          if (p.held()) return true;
          this.logger.warn?.(`gave up reporting job ${p.item.id} to ${this.route}: its lease has lapsed, so the job will be rescued and run again`, { error: String(e) });
          p.resolve(undefined);
          return false;
        });
        if (kept.length === 0) return;
        const delay = backoffDelay(attempt, 100, 5_000);
        this.logger.warn?.(`${this.route} failed; retrying ${kept.length} outcome(s) in ${Math.round(delay)} ms`, { error: String(e) });
        await sleep(delay);
        return this.#deliver(kept, attempt + 1);
      }
      if (e instanceof KeelError && e.status === 422 && batch.length > 1) {
        // One malformed item refuses the whole request; judged alone, the others pass.
        await Promise.all(batch.map((p) => this.#deliver([p], 0)));
        return;
      }
      for (const p of batch) p.resolve(refusal(p.item.id, e));
      return;
    }
    batch.forEach((p, i) => {
      p.resolve(results[i] ?? refusal(p.item.id, new Error("the server sent no answer for this outcome")));
    });
  }
}

/** Worth retrying unchanged: no answer, or an overloaded, unavailable or timed-out server. */
export function isTransient(e: unknown): boolean {
  return e instanceof KeelNetworkError || (e instanceof KeelError && e.isTransient);
}

/** An item's answer when the request as a whole failed. */
function refusal(id: string, e: unknown): OutcomeResult {
  if (e instanceof KeelError) {
    return {
      id,
      status: e.status,
      problem: e.problem ?? { type: e.type, title: e.title, status: e.status, detail: e.detail },
    };
  }
  const detail = e instanceof Error ? e.message : String(e);
  return { id, status: 0, problem: { type: "about:blank", title: "", status: 0, detail } };
}
