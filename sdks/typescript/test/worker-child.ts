/**
 * A worker in a process of its own, for the test that stops one with SIGTERM the way an
 * orchestrator does. Not a test itself: test/scenarios.test.ts spawns it.
 *
 * Env: KEEL_URL (the server), KEEL_QUEUE (the queue to serve), KEEL_GRACE_MS.
 * Kinds: `slow` sleeps 1 s and completes; `stubborn` waits for its signal and throws the
 * reason. Prints one JSON line per event on stdout (`started`, `aborted`, `stopped`).
 */

import { Client, Worker } from "../src/index.js";

const url = process.env["KEEL_URL"];
const queue = process.env["KEEL_QUEUE"];
if (!url || !queue) {
  console.error("worker-child needs KEEL_URL and KEEL_QUEUE");
  process.exit(2);
}

const say = (event: Record<string, unknown>): void => {
  process.stdout.write(`${JSON.stringify(event)}\n`);
};

const worker = new Worker(new Client({ url }), {
  queues: [queue],
  concurrency: 8,
  graceMs: Number(process.env["KEEL_GRACE_MS"] ?? 3000),
  workerId: `ts-child-${process.pid}`,
});

worker.handle("slow", async (ctx) => {
  say({ event: "started", id: ctx.id, kind: ctx.kind });
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  return { slept: 1_000 };
});

worker.handle("stubborn", async (ctx) => {
  say({ event: "started", id: ctx.id, kind: ctx.kind });
  const reason = await new Promise<unknown>((resolve) =>
    ctx.signal.addEventListener("abort", () => resolve(ctx.signal.reason), { once: true }),
  );
  say({ event: "aborted", id: ctx.id, reason: reason instanceof Error ? reason.name : String(reason) });
  throw reason;
});

try {
  await worker.run();
  say({ event: "stopped" });
} catch (e) {
  console.error(`worker-child: run() failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
}
