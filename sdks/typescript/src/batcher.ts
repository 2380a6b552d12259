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

interface Pending<T> {
  item: T;
  /** Whether the lease may still be held: past it, a retry could only be refused. */
  held: () => boolean;
  resolve: (result: OutcomeResult | undefined) => void;
}

/**
 * Collects items for `windowMs` after the first one arrives (or until `MAX_BATCH` are
 * waiting), then sends them together. Each submitter gets its own item's answer. A
 * request that got no answer, or a transient error, is retried with capped backoff for as
 * long as the item's lease may still be held; an item past that resolves `undefined`.
 */
export class OutcomeBatcher<T extends { id: string }> {
  readonly #pending: Pending<T>[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly route: string,
    private readonly send: (items: T[]) => Promise<OutcomeResult[]>,
    private readonly windowMs: number,
    private readonly logger: Logger,
  ) {}

  /** Queues one outcome; resolves with the server's answer to it. Never rejects. */
  submit(item: T, held: () => boolean): Promise<OutcomeResult | undefined> {
    return new Promise((resolve) => {
      this.#pending.push({ item, held, resolve });
      if (this.#pending.length >= MAX_BATCH) this.#flush();
      else this.#timer ??= setTimeout(() => this.#flush(), this.windowMs);
    });
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
