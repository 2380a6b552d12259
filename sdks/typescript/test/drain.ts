/**
 * Drain benchmark: enqueue N `square` jobs on a fresh queue of a running Keel, drain them
 * with one SDK worker, print jobs/s, then check every job ended `completed` on its first
 * attempt with the handler's result. Exits 1 if any did not.
 *
 *   node dist/test/drain.js --url http://127.0.0.1:8080 [--jobs 10000] [--concurrency 64]
 *                           [--queue ts-bench-<random>] [--api-key KEY] [--batch-window-ms 5]
 *                           [--prefetch 256]
 *
 * `KEEL_URL` and `KEEL_API_KEY` stand in for `--url` and `--api-key`. The queue must not be
 * served by the server itself (not in its `KEEL_QUEUES`). The clock runs from the worker's
 * start to the moment the server counts every job completed, so enqueueing is not timed.
 */

import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";

import { Client, type Job, Worker } from "../src/index.js";

const CHUNK = 1000;

const { values } = parseArgs({
  options: {
    url: { type: "string", default: process.env["KEEL_URL"] ?? "" },
    "api-key": { type: "string", default: process.env["KEEL_API_KEY"] ?? "" },
    jobs: { type: "string", default: "10000" },
    concurrency: { type: "string", default: "64" },
    queue: { type: "string", default: `ts-bench-${randomBytes(4).toString("hex")}` },
    "batch-window-ms": { type: "string", default: "5" },
    prefetch: { type: "string", default: "256" },
    help: { type: "boolean", default: false },
  },
});

if (values.help || !values.url) {
  console.error("usage: node dist/test/drain.js --url http://127.0.0.1:8080 [--jobs 10000] [--concurrency 64] [--queue NAME] [--api-key KEY] [--batch-window-ms 5] [--prefetch 256]");
  process.exit(values.help ? 0 : 2);
}

const total = positiveInt("jobs", values.jobs);
const concurrency = positiveInt("concurrency", values.concurrency);
const queue = values.queue;
const client = new Client({ url: values.url, ...(values["api-key"] ? { apiKey: values["api-key"] } : {}), timeoutMs: 30_000 });

// Enqueue, in atomic batches of 1000.
const enqueueStart = performance.now();
const ids: string[] = [];
for (let from = 0; from < total; from += CHUNK) {
  const chunk = Array.from({ length: Math.min(CHUNK, total - from) }, (_, i) => ({ kind: "square", queue, args: { n: from + i } }));
  const jobs = await client.enqueueMany(chunk);
  for (const job of jobs) ids.push(job.id);
}
const enqueueSeconds = (performance.now() - enqueueStart) / 1000;
console.log(`enqueued ${total} jobs on ${queue} in ${enqueueSeconds.toFixed(2)} s (${Math.round(total / enqueueSeconds)} jobs/s)`);

// Drain.
const worker = new Worker(client, {
  queues: [queue],
  concurrency,
  handleSignals: true,
  // The queue is full while the clock runs, so the long poll's length only decides how
  // long the final stop waits for the last (empty) lease request to come back.
  pollWaitMs: 1_000,
  batchWindowMs: positiveInt("batch-window-ms", values["batch-window-ms"], true),
  prefetch: positiveInt("prefetch", values.prefetch, true),
});
worker.handle<{ n: number }>("square", (_ctx, { n }) => ({ square: n * n }));
const drainStart = performance.now();
let failure: unknown;
const running = worker.run().catch((e: unknown) => {
  failure = e;
});
for (;;) {
  if (failure !== undefined) break;
  const counts = (await client.queues()).find((q) => q.queue === queue)?.counts;
  if (counts !== undefined && counts.completed + counts.discarded + counts.cancelled >= total) break;
  await new Promise((resolve) => setTimeout(resolve, 50));
}
const drainSeconds = (performance.now() - drainStart) / 1000;
await worker.stop();
await running;
if (failure !== undefined) {
  console.error(`the worker stopped: ${failure instanceof Error ? failure.message : String(failure)}`);
  process.exit(1);
}
console.log(
  `drained ${total} jobs with concurrency ${concurrency} (prefetch cap ${worker.prefetch}) in ${drainSeconds.toFixed(2)} s: ${Math.round(total / drainSeconds)} jobs/s`,
);

// Check every job, a few requests at a time.
const bad: string[] = [];
let next = 0;
await Promise.all(
  Array.from({ length: 16 }, async () => {
    while (next < ids.length) {
      const n = next++;
      const job: Job = await client.get(ids[n]!);
      const result = job.result as { square?: unknown } | null;
      if (job.state !== "completed" || job.attempt !== 1 || result?.square !== n * n) {
        bad.push(`job ${job.id} (n=${n}): state ${job.state}, attempt ${job.attempt}, result ${JSON.stringify(job.result)}`);
      }
    }
  }),
);
if (bad.length > 0) {
  console.error(`${bad.length} of ${total} jobs did not end completed on attempt 1 with their result:`);
  for (const line of bad.slice(0, 20)) console.error(`  ${line}`);
  process.exit(1);
}
console.log(`checked: all ${total} jobs completed on attempt 1 with result {square: n*n}`);

function positiveInt(name: string, raw: string, zeroOk = false): number {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < (zeroOk ? 0 : 1)) {
    console.error(`--${name} must be a ${zeroOk ? "non-negative" : "positive"} integer, got ${raw}`);
    process.exit(2);
  }
  return n;
}
