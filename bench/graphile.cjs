// graphile-worker's side of scripts/bench-vs-graphile: enqueue N no-op jobs over C named
// queues (graphile's per-queue serialization, like our conversations) with addJobs, then drain
// them with one worker. Prints RESULT lines in queue-bench's format.
// Env: DATABASE_URL, JOBS, CONVERSATIONS, CONCURRENCY, LOCAL_QUEUE (0 = off), GRAPHILE_DIR.
const path = require("path");
const modules = path.join(process.env.GRAPHILE_DIR, "node_modules");
const { run, makeWorkerUtils } = require(path.join(modules, "graphile-worker"));
const { Pool } = require(path.join(modules, "pg"));

const connectionString = process.env.DATABASE_URL;
const jobs = Number(process.env.JOBS || 50000);
const conversations = Number(process.env.CONVERSATIONS || 1000);
const concurrency = Number(process.env.CONCURRENCY || 10);
const localQueue = Number(process.env.LOCAL_QUEUE || 0);

function result(label, n, seconds) {
  console.log(
    `RESULT ${label} jobs=${n} seconds=${seconds.toFixed(3)} jobs_per_s=${Math.round(n / seconds)}`,
  );
}

async function main() {
  const utils = await makeWorkerUtils({ connectionString });
  await utils.migrate();
  const pool = new Pool({ connectionString, max: 2 });
  await pool.query("DELETE FROM graphile_worker._private_jobs");

  const t0 = process.hrtime.bigint();
  const chunk = 5000;
  for (let i = 0; i < jobs; i += chunk) {
    const specs = [];
    for (let j = i; j < Math.min(jobs, i + chunk); j++) {
      specs.push({ identifier: "noop", payload: { n: j }, queueName: `conv-${j % conversations}` });
    }
    await utils.addJobs(specs);
  }
  result("enqueue", jobs, Number(process.hrtime.bigint() - t0) / 1e9);

  let done = 0;
  const t1 = process.hrtime.bigint();
  const worker = {
    concurrentJobs: concurrency,
    pollInterval: 50,
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  };
  if (localQueue > 0) worker.localQueue = { size: localQueue };
  const runner = await run({
    connectionString,
    concurrency,
    noHandleSignals: true,
    pollInterval: 50,
    taskList: {
      noop: async () => {
        done++;
      },
    },
    preset: { worker },
  });
  while (done < jobs) await new Promise((r) => setTimeout(r, 2));
  // Like queue-bench: finished only when the table says so (completions are batched).
  for (;;) {
    const { rows } = await pool.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs");
    if (rows[0].n === 0) break;
    await new Promise((r) => setTimeout(r, 2));
  }
  result("drain", jobs, Number(process.hrtime.bigint() - t1) / 1e9);
  await runner.stop();
  await utils.release();
  await pool.end();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
