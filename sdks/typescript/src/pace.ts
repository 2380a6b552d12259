/**
 * How far ahead a worker leases: enough jobs to keep its slots busy through the next lease
 * round trip, and no more. Not exported from the package.
 *
 * A fixed buffer is wrong one way or the other: short jobs drain a small one long before
 * the next lease answers (slots idle on the network), and long jobs sit in a large one for
 * minutes while other workers have free slots. So the buffer follows what the slots
 * consume, as the server's own dispatchers do: jobs started per second × the lease round
 * trip, with a margin of {@link Pace.MARGIN}, between one job and the configured cap.
 * Short jobs on 20 slots buffer dozens; ten-second jobs buffer one.
 *
 * The rate is measured over windows of {@link Pace.WINDOW_MS}, so after an idle spell it
 * lags a burst by several windows, and slots starve meanwhile. So while leases come back
 * full to slots that have run out of work (nothing buffered, a slot free), a floor under
 * the prefetch doubles at each lease (as TCP's slow start doubles its window), reaching
 * the cap in a few round trips; once the slots have work when a lease answers, or a lease
 * brings fewer jobs than asked, it halves. The same rule as the server's dispatchers and
 * the Rust SDK worker (`keel_core::pace::Pace`).
 */

/** The pace's memory, for tests and log lines. */
export interface PaceState {
  /** Jobs started per second (moving average). */
  readonly rate: number;
  /** A lease's round trip in seconds (moving average). */
  readonly rtt: number;
  /** The slow-start floor under the prefetch (see the module docs). */
  readonly floor: number;
}

export class Pace {
  /** Round trips' worth of jobs kept buffered. */
  static readonly MARGIN = 4;
  /** Shortest window over which the start rate is measured, ms. */
  static readonly WINDOW_MS = 50;
  /**
   * A window at least this long replaces the average outright, ms: a worker that went
   * idle should not keep a large buffer for its next burst's first leases.
   */
  static readonly RESET_MS = 4 * Pace.WINDOW_MS;

  readonly #cap: number;
  readonly #now: () => number;
  /** Jobs started since `#since`. */
  #count = 0;
  #since: number;
  #rate = 0;
  /** Seeded at 1 ms, so the first leases ask for one job ahead until a round trip is measured. */
  #rtt = 0.001;
  /** The slow-start floor (see the module docs): 0 until starving slots get full leases. */
  #floor = 0;

  /**
   * `cap` is the most jobs ever held ahead (0: none); `now` is a clock in milliseconds,
   * monotonic (`performance.now` by default), so tests can drive it.
   */
  constructor(cap: number, now: () => number = () => performance.now()) {
    this.#cap = cap;
    this.#now = now;
    this.#since = now();
  }

  /**
   * Counts `n` jobs started now (0 just lets a quiet window close, so an idle worker's
   * rate decays before its next lease).
   */
  started(n: number): void {
    this.#count += n;
    const now = this.#now();
    const elapsed = now - this.#since;
    if (elapsed < Pace.WINDOW_MS) return;
    const current = this.#count / (elapsed / 1000);
    const keep = elapsed >= Pace.RESET_MS ? 0 : 0.5;
    this.#rate = keep * this.#rate + (1 - keep) * current;
    this.#count = 0;
    this.#since = now;
  }

  /**
   * Records one lease call's round trip, in ms. Only calls that did not wait on the server
   * for work measure the network and the store; a long poll's wait would read as a slow
   * round trip.
   */
  leased(tookMs: number): void {
    this.#rtt = 0.8 * this.#rtt + 0.2 * (Math.max(0, tookMs) / 1000);
  }

  /**
   * Records how a lease answered: `full` when it brought every job it asked for (more may
   * be waiting), `starving` when the slots had run out of buffered work by then (nothing
   * buffered, a slot free). Both: the slow-start floor doubles, from 1 up to the cap.
   * Otherwise it halves.
   */
  answered(full: boolean, starving: boolean): void {
    this.#floor = full && starving ? Math.min(Math.max(1, this.#cap), Math.max(1, this.#floor * 2)) : Math.floor(this.#floor / 2);
  }

  /**
   * Jobs to hold beyond the slots right now: `clamp(max(ceil(rate × rtt × MARGIN), floor), 1, cap)`,
   * or 0 when the cap is 0.
   */
  prefetch(): number {
    if (this.#cap === 0) return 0;
    const want = Math.ceil(this.#rate * this.#rtt * Pace.MARGIN);
    return Math.min(this.#cap, Math.max(1, want, this.#floor));
  }

  get state(): PaceState {
    return { rate: this.#rate, rtt: this.#rtt, floor: this.#floor };
  }
}
