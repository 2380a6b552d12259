/**
 * `@keel/sdk`: a client of Keel's HTTP API and a worker that runs jobs over its worker
 * protocol (docs/workers.md).
 *
 * ```ts
 * import { Client, Worker } from "@keel/sdk";
 *
 * const client = new Client({ url: "http://127.0.0.1:8080" });
 * const job = await client.enqueue("invoice.render", { invoice: 42 }, { queue: "billing" });
 *
 * const worker = new Worker(client, { queues: ["billing"], concurrency: 8 });
 * worker.handle("invoice.render", async (ctx, args) => render(args, { signal: ctx.signal }));
 * await worker.run(); // until SIGTERM/SIGINT or worker.stop()
 * ```
 */

export { Client } from "./client.js";
export type { ClientOptions, RequestOptions } from "./client.js";
export { Worker } from "./worker.js";
export type { Handler, JobContext, WorkerOptions } from "./worker.js";
export { consoleLogger } from "./logger.js";
export type { Logger } from "./logger.js";
export {
  CancelledError,
  KeelError,
  KeelNetworkError,
  LeaseLostError,
  PermanentError,
  PROBLEM_TYPE_BASE,
  RetryIn,
  ShutdownError,
  WaitTimeoutError,
} from "./errors.js";
export { TERMINAL_STATES, isTerminal } from "./types.js";
export type {
  AttemptError,
  Backoff,
  BackoffOptions,
  Completion,
  Duration,
  EnqueueOptions,
  FailOptions,
  Failure,
  FieldError,
  Heartbeat,
  Job,
  JobResult,
  JobSpec,
  JobState,
  JsonValue,
  Lease,
  LeasedJob,
  LeaseOptions,
  OutcomeResult,
  Problem,
  QueueCounts,
  QueueInfo,
  UniqueHold,
  UniqueOptions,
  UniqueScope,
  WaitOptions,
  WorkerInfo,
} from "./types.js";
