/**
 * What can be checked without a server: option mapping and validation, error parsing,
 * serialisation checks, backoff bounds, the prefetch pace, the outcome batcher's bound, and
 * a worker facing a server that is not there.
 */

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { test } from "node:test";

import { Client, KeelError, KeelNetworkError, PermanentError, RetryIn, Worker } from "../src/index.js";
import { OutcomeBatcher } from "../src/batcher.js";
import { backoffDelay, durationMs, errorText, toJson, wireDuration, workerName } from "../src/internal.js";
import { Pace } from "../src/pace.js";
import type { OutcomeResult } from "../src/types.js";
import { deferred, memoryLogger, waitFor } from "./harness.js";

test("durations go on the wire with a unit", () => {
  assert.equal(wireDuration(10_000, "wait"), "10000ms");
  assert.equal(wireDuration(1.6, "wait"), "2ms");
  assert.equal(wireDuration("30s", "wait"), "30s");
  assert.throws(() => wireDuration(-1, "wait"), RangeError);
  assert.throws(() => wireDuration(Number.NaN, "lease"), /lease/);
  assert.equal(durationMs("1m30s"), 90_000);
  assert.equal(durationMs("500ms"), 500);
  assert.equal(durationMs(" 2h "), 7_200_000);
  assert.equal(durationMs(250), 250);
  assert.equal(durationMs("soon"), 30_000);
});

test("values that JSON cannot carry are named, not thrown", () => {
  assert.deepEqual(toJson({ a: [1, "x", null] }), { ok: true, text: '{"a":[1,"x",null]}' });
  assert.deepEqual(toJson(undefined), { ok: true, text: undefined });
  const big = toJson({ n: 1n });
  assert.equal(big.ok, false);
  assert.match(big.ok ? "" : big.error, /BigInt/);
  const cycle: Record<string, unknown> = {};
  cycle["self"] = cycle;
  const circular = toJson(cycle);
  assert.equal(circular.ok, false);
  assert.match(circular.ok ? "" : circular.error, /circular/i);
  assert.equal(toJson(() => 1).ok, false);
  assert.equal(toJson(Symbol("s")).ok, false);
});

test("a thrown value is reported as name: message", () => {
  assert.equal(errorText(new Error("boom")), "Error: boom");
  assert.equal(errorText(new TypeError("bad")), "TypeError: bad");
  assert.equal(errorText(new PermanentError("never")), "PermanentError: never");
  assert.equal(errorText(new RetryIn(5_000, "later")), "RetryIn: later");
  class QuotaError extends Error {
    override name = "QuotaError";
  }
  assert.equal(errorText(new QuotaError("over")), "QuotaError: over");
  assert.equal(errorText("plain string"), "plain string");
  assert.equal(errorText({ code: 7 }), 'thrown value: {"code":7}');
  assert.throws(() => new RetryIn(-1), RangeError);
  assert.equal(new RetryIn(1_500).ms, 1_500);
});

test("KeelError carries the problem document", () => {
  const e = new KeelError(
    "POST /v1/jobs",
    422,
    {
      type: "https://keel.dev/problems/validation",
      title: "Unprocessable Entity",
      status: 422,
      detail: "the request is invalid (2 errors)",
      request_id: "req-1",
      errors: [
        { field: "priority", message: "must be an integer between 0 (highest) and 9 (lowest), got 42" },
        { field: "max_attempts", message: "must be an integer between 1 and 1000" },
      ],
    },
    "",
  );
  assert.equal(e.name, "KeelError");
  assert.equal(e.status, 422);
  assert.equal(e.problemType, "validation");
  assert.equal(e.title, "Unprocessable Entity");
  assert.equal(e.requestId, "req-1");
  assert.deepEqual(
    e.errors.map((f) => f.field),
    ["priority", "max_attempts"],
  );
  assert.match(e.message, /^POST \/v1\/jobs answered 422 Unprocessable Entity: the request is invalid/);
  assert.match(e.message, /priority: must be/);
  assert.equal(e.isTransient, false);

  const stale = new KeelError("POST /v1/jobs/x/complete", 409, {
    type: "https://keel.dev/problems/stale-lease",
    title: "Conflict",
    status: 409,
    detail: "job x was cancelled",
  });
  assert.ok(stale.isStaleLease);

  // No problem document: a route that does not exist on an older server, or a proxy.
  const bare = new KeelError("POST /v1/queues/q/lease", 404, undefined, "");
  assert.equal(bare.type, "about:blank");
  assert.deepEqual(bare.errors, []);
  assert.equal(bare.message, "POST /v1/queues/q/lease answered 404");
  assert.ok(new KeelError("GET /v1/jobs/x", 503, undefined, "<html>busy</html>").isTransient);
});

test("backoff grows, is capped and is jittered", () => {
  assert.equal(backoffDelay(0, 100, 10_000, () => 0), 50);
  assert.equal(backoffDelay(0, 100, 10_000, () => 1), 100);
  assert.equal(backoffDelay(3, 100, 10_000, () => 1), 800);
  assert.equal(backoffDelay(50, 100, 10_000, () => 1), 10_000);
  assert.equal(backoffDelay(50, 100, 10_000, () => 0), 5_000);
  for (let i = 0; i < 100; i++) {
    const d = backoffDelay(i % 12, 200, 10_000);
    assert.ok(d >= 100 && d <= 10_000, String(d));
  }
});

test("worker names keep to the characters the server accepts", () => {
  assert.equal(workerName("billing-7f9c:1234"), "billing-7f9c:1234");
  assert.equal(workerName("my host/é:1"), "my-host--:1");
  assert.equal(workerName(""), "w");
  assert.equal(workerName("-host:1"), "w-host:1");
  assert.equal(workerName("x".repeat(300)).length, 255);
});

test("options are validated when the objects are made", () => {
  assert.throws(() => new Client({ url: "" }), TypeError);
  assert.throws(() => new Client({ url: "not a url" }), TypeError);
  assert.throws(() => new Client({ url: "http://127.0.0.1:1", timeoutMs: 0 }), RangeError);
  assert.equal(new Client({ url: "http://127.0.0.1:8080/" }).url, "http://127.0.0.1:8080");
  const client = new Client({ url: "http://127.0.0.1:1" });
  assert.throws(() => new Worker(client, { queues: [] }), TypeError);
  assert.throws(() => new Worker(client, { queues: "q", leaseMs: 1_000 }), /leaseMs/);
  assert.throws(() => new Worker(client, { queues: "q", concurrency: 0 }), /concurrency/);
  assert.throws(() => new Worker(client, { queues: "q", pollWaitMs: 31_000 }), /pollWaitMs/);
  assert.throws(() => new Worker(client, { queues: "q", heartbeatMs: 30_000 }), /heartbeatMs/);
  assert.throws(() => new Worker(client, { queues: "q", prefetch: -1 }), /prefetch/);
  assert.throws(() => new Worker(client, { queues: "q", prefetch: 1.5 }), /prefetch/);
  assert.throws(() => new Worker(client, { queues: "q", prefetch: 10_001 }), /prefetch/);
  assert.equal(new Worker(client, { queues: "q", prefetch: 0 }).prefetch, 0);
  const w = new Worker(client, { queues: ["a", "a", "b"], leaseMs: 6_000 });
  assert.deepEqual(w.queues, ["a", "b"]);
  assert.equal(w.heartbeatMs, 2_000);
  assert.equal(w.concurrency, 10);
  assert.equal(w.prefetch, 256);
  assert.match(w.workerId, /^[A-Za-z0-9][A-Za-z0-9_.:-]*:\d+$/);
});

test("a worker without handlers refuses to run", async () => {
  const worker = new Worker(new Client({ url: "http://127.0.0.1:1" }), { queues: "q", handleSignals: false });
  await assert.rejects(worker.run(), /no handlers/);
});

/** A loopback port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

test("an unreachable server is a KeelNetworkError", async () => {
  const client = new Client({ url: `http://127.0.0.1:${await closedPort()}` });
  const e = await client.get("01930000-0000-7000-8000-000000000000").catch((err: unknown) => err);
  assert.ok(e instanceof KeelNetworkError, String(e));
  assert.equal(e.timedOut, false);
  assert.match(e.message, /^GET \/v1\/jobs\/\S+ failed: .*ECONNREFUSED/);
});

test("a caller's abort rejects with its own reason", async () => {
  const client = new Client({ url: `http://127.0.0.1:${await closedPort()}` });
  const controller = new AbortController();
  const reason = new Error("caller gave up");
  controller.abort(reason);
  await assert.rejects(client.get("x", { signal: controller.signal }), (e) => e === reason);
});

test("a worker whose server is down backs off, keeps going and stops cleanly", async () => {
  const { logger, lines } = memoryLogger();
  const worker = new Worker(new Client({ url: `http://127.0.0.1:${await closedPort()}` }), {
    queues: ["q"],
    handleSignals: false,
    logger,
  });
  worker.handle("noop", () => null);
  let failure: unknown;
  const run = worker.run().catch((e: unknown) => (failure = e));
  await waitFor("two failed lease attempts", () => lines.filter((l) => l.startsWith("warn leasing from q failed")).length >= 2, {
    timeoutMs: 10_000,
  });
  await worker.stop();
  await run;
  assert.equal(failure, undefined, "network errors must not end run()");
  assert.equal(worker.held, 0);
});

test("the prefetch follows the start rate and the lease round trip", () => {
  let now = 0;
  const pace = new Pace(256, () => now);
  assert.equal(pace.prefetch(), 1, "nothing measured yet: one job ahead");
  // Round trips of 10 ms, as a moving average (0.8 old + 0.2 new) from the 1 ms seed.
  pace.leased(10);
  assert.ok(Math.abs(pace.state.rtt - (0.8 * 0.001 + 0.2 * 0.01)) < 1e-12, String(pace.state.rtt));
  for (let i = 0; i < 60; i++) pace.leased(10);
  assert.ok(Math.abs(pace.state.rtt - 0.01) < 1e-6, String(pace.state.rtt));

  pace.started(100);
  assert.equal(pace.state.rate, 0, "a window shorter than 50 ms measures nothing");
  now = 100; // 100 starts in 100 ms: 1000/s, averaged half and half with the old 0
  pace.started(0);
  assert.equal(pace.state.rate, 500);
  assert.equal(pace.prefetch(), 20, "ceil(500/s × 10 ms × 4)");
  now = 150; // 100 more in 50 ms: 2000/s
  pace.started(100);
  assert.equal(pace.state.rate, 1250);
  assert.equal(pace.prefetch(), 50);
  now = 170;
  pace.started(1_000);
  assert.equal(pace.state.rate, 1250, "the window is still open");
  now = 220; // 1000 in 70 ms: far more than the cap allows
  pace.started(0);
  assert.equal(pace.prefetch(), 256);

  now = 1_220; // a quiet second replaces the average outright
  pace.started(0);
  assert.equal(pace.state.rate, 0);
  assert.equal(pace.prefetch(), 1);
  now = 1_500; // 5 starts in 280 ms: slow jobs keep one job ahead
  pace.started(5);
  assert.ok(Math.abs(pace.state.rate - 5 / 0.28) < 1e-9, String(pace.state.rate));
  assert.equal(pace.prefetch(), 1);
});

test("a prefetch cap of 0 holds nothing ahead", () => {
  let now = 0;
  const pace = new Pace(0, () => now);
  pace.leased(100);
  pace.started(10_000);
  now = 60;
  pace.started(0);
  assert.ok(pace.state.rate > 0);
  assert.equal(pace.prefetch(), 0);
});

test("full leases to starving slots double the prefetch's floor up to the cap", () => {
  const now = 0; // no window ever closes: no rate is measured, only the floor moves
  const pace = new Pace(256, () => now);
  assert.equal(pace.prefetch(), 1, "nothing measured yet");
  assert.equal(pace.state.floor, 0);
  const floors: number[] = [];
  const seen: number[] = [];
  for (let i = 0; i < 10; i++) {
    pace.answered(true, true);
    floors.push(pace.state.floor);
    seen.push(pace.prefetch());
  }
  assert.deepEqual(floors, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]);
  assert.deepEqual(seen, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]);
  assert.equal(pace.state.rate, 0);

  // A cap that is not a power of two still bounds it.
  const odd = new Pace(100, () => now);
  for (let i = 0; i < 10; i++) odd.answered(true, true);
  assert.equal(odd.state.floor, 100);
  assert.equal(odd.prefetch(), 100);
});

test("a lease that is not full, or finds the slots with work, halves the floor", () => {
  let now = 0;
  const pace = new Pace(256, () => now);
  for (let i = 0; i < 9; i++) pace.answered(true, true);
  assert.equal(pace.prefetch(), 256);
  pace.answered(true, false);
  assert.equal(pace.prefetch(), 128, "the slots had work: halve");
  pace.answered(false, true);
  assert.equal(pace.prefetch(), 64, "fewer jobs than asked: no backlog to chase");
  pace.answered(false, false);
  assert.equal(pace.prefetch(), 32);
  pace.answered(true, true);
  assert.equal(pace.prefetch(), 64, "starving again: doubles from where it was");
  for (let i = 0; i < 10; i++) pace.answered(false, false);
  assert.equal(pace.state.floor, 0);
  assert.equal(pace.prefetch(), 1, "back to the measured pace");

  // The floor is only a floor: a measured pace above it wins.
  for (let i = 0; i < 3; i++) pace.answered(true, true);
  assert.equal(pace.prefetch(), 4);
  for (let i = 0; i < 60; i++) pace.leased(10);
  pace.started(50);
  now = 50; // 50 starts in 50 ms: 1000/s, halved into the 0 average: 500/s
  pace.started(0);
  assert.equal(pace.prefetch(), 20, "ceil(500/s × 10 ms × 4) over a floor of 4");
});

test("a prefetch cap of 0 stays 0 whatever the leases answer", () => {
  const now = 0;
  const pace = new Pace(0, () => now);
  for (let i = 0; i < 5; i++) {
    pace.answered(true, true);
    assert.equal(pace.prefetch(), 0);
  }
  assert.equal(pace.state.floor, 1, "the floor is clamped to 1 even without prefetch, as in keel-core");
  pace.answered(false, true);
  assert.equal(pace.prefetch(), 0);
});

test("a full outcome batcher makes the submitter wait for an answer", async () => {
  const sent: string[][] = [];
  const calls: { resolve: (results: OutcomeResult[]) => void }[] = [];
  const called = [deferred(), deferred()];
  const batcher = new OutcomeBatcher<{ id: string }>(
    "POST /test",
    (items) => {
      sent.push(items.map((i) => i.id));
      called[calls.length]?.resolve();
      return new Promise((resolve) => calls.push({ resolve }));
    },
    0,
    memoryLogger().logger,
    2,
  );
  const held = (): boolean => true;
  const a = batcher.submit({ id: "a" }, held);
  const b = batcher.submit({ id: "b" }, held);
  await a.queued;
  await b.queued;
  const c = batcher.submit({ id: "c" }, held);
  let cQueued = false;
  void c.queued.then(() => (cQueued = true));
  await called[0]!.promise;
  assert.deepEqual(sent, [["a", "b"]]);
  assert.equal(batcher.outstanding, 2);
  assert.equal(cQueued, false, "the third outcome waits while two are unanswered");

  calls[0]!.resolve([
    { id: "a", status: 200, state: "completed" },
    { id: "b", status: 409 },
  ]);
  assert.deepEqual(await a.answer, { id: "a", status: 200, state: "completed" });
  assert.equal((await b.answer)?.status, 409);
  await c.queued;
  await called[1]!.promise;
  assert.deepEqual(sent, [["a", "b"], ["c"]]);
  calls[1]!.resolve([{ id: "c", status: 200, state: "completed" }]);
  assert.equal((await c.answer)?.status, 200);
  assert.equal(batcher.outstanding, 0);
});
