//! Real Postgres for tests and benchmarks.
//!
//! [`TestDb::new`] gives each test its own freshly migrated database. The server is the one at
//! `DATABASE_URL` when set (the role needs CREATEDB); otherwise a throwaway cluster is created
//! with `initdb` and started with `pg_ctl` on a free port, once per process, and a small reaper
//! process stops it and deletes its directory when the process exits. As root (CI containers),
//! `initdb` refuses to run, so the cluster runs as the `postgres` user in a directory under /tmp.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::error::{Error, Result};

/// Durability of a throwaway cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Postgres defaults (fsync on): for benchmarks.
    Default,
    /// fsync and synchronous_commit off: faster tests; a crash of the test machine loses data,
    /// which does not matter for a throwaway cluster.
    Fast,
}

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    pub url: String,
    pub dir: PathBuf,
    bin: PathBuf,
    data: PathBuf,
    opts: String,
    as_root: bool,
}

/// How [`Cluster::stop`] stops the server (`pg_ctl -m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Roll back open transactions, disconnect clients, checkpoint.
    Fast,
    /// Quit at once, no checkpoint: recovery replays the WAL on start, like after a crash.
    Immediate,
}

impl Cluster {
    /// Stop the server (the fault tests' database outage).
    pub fn stop(&self, mode: StopMode) -> Result<()> {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        run(pg_command(&self.bin, "pg_ctl", self.as_root)
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", mode, "-w", "stop"]))
    }

    /// Start it again on the same port with the same settings.
    pub fn start(&self) -> Result<()> {
        run(pg_command(&self.bin, "pg_ctl", self.as_root)
            .args(["-D"])
            .arg(&self.data)
            .args(["-o", &self.opts, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "start"]))
    }
}

/// Start a throwaway cluster. It is stopped and removed when this process exits.
pub fn start_cluster(durability: Durability) -> Result<Cluster> {
    let bin = pg_bin_dir()?;
    let as_root = is_root();
    let base = std::env::temp_dir().join(format!(
        "wa-pg-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&base)
        .map_err(|e| Error::TestCluster(format!("creating {}: {e}", base.display())))?;
    let data = base.join("data");
    if as_root {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&base))?;
    }
    let port = free_port()?;
    run(pg_command(&bin, "initdb", as_root)
        .args(["-D"])
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]))?;
    let mut opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB",
        base.display()
    );
    if durability == Durability::Fast {
        opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
    }
    // Extra server options for profiling runs, e.g. `-c shared_preload_libraries=pg_stat_statements`.
    if let Ok(extra) = std::env::var("TEST_PG_OPTIONS") {
        opts.push(' ');
        opts.push_str(&extra);
    }
    run(pg_command(&bin, "pg_ctl", as_root)
        .args(["-D"])
        .arg(&data)
        .args(["-o", &opts, "-l"])
        .arg(base.join("log"))
        .args(["-w", "start"]))?;
    spawn_reaper(&bin, &base, &data, as_root)?;
    Ok(Cluster {
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        dir: base,
        bin,
        data,
        opts,
        as_root,
    })
}

/// Stops the cluster once the test process is gone (statics have no destructor).
fn spawn_reaper(bin: &Path, base: &Path, data: &Path, as_root: bool) -> Result<()> {
    let pg_ctl = bin.join("pg_ctl");
    let stop = if as_root {
        format!(
            "runuser -u postgres -- {} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    } else {
        format!(
            "{} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {base}",
        pid = std::process::id(),
        base = base.display()
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::TestCluster(format!("spawning the cluster reaper: {e}")))?;
    Ok(())
}

fn pg_command(bin: &Path, tool: &str, as_root: bool) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::TestCluster(format!("running {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::TestCluster(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::TestCluster(format!("finding a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::TestCluster(e.to_string()))
}

/// Where `initdb` and `pg_ctl` live: `PG_BIN`, `$PATH`, or Debian's `/usr/lib/postgresql/N/bin`.
pub fn pg_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .ok_or_else(|| {
            Error::TestCluster(
                "initdb/pg_ctl not found: install PostgreSQL or set DATABASE_URL".into(),
            )
        })
}

/// The server URL tests use: `DATABASE_URL`, or a throwaway cluster started once per process.
pub fn server_url() -> Result<String> {
    static URL: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => start_cluster(Durability::Fast)
            .map(|c| c.url)
            .map_err(|e| e.to_string()),
    })
    .clone()
    .map_err(Error::TestCluster)
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    /// A test that holds a database fails when it outlives its deadline.
    _deadline: Option<Deadline>,
}

/// How long a test may run before [`Deadline`] fails it: `TEST_DEADLINE_SECONDS`, or 300 s (the
/// slowest test takes about a minute on 2 busy cores).
pub fn test_deadline() -> std::time::Duration {
    std::env::var("TEST_DEADLINE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_secs)
        .unwrap_or(std::time::Duration::from_secs(300))
}

/// Fails the test run if the test that armed it is still running after its limit: a hung test
/// (a wait without a timeout, a deadlock) fails CI with its name instead of stalling it. Disarmed
/// when dropped. The test harness cannot cancel one test, so it ends the process.
#[derive(Debug)]
pub struct Deadline {
    _disarm: std::sync::mpsc::Sender<()>,
}

/// Arm a [`Deadline`] for the current test (libtest names the thread after the test).
pub fn deadline(limit: std::time::Duration) -> Deadline {
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let (disarm, armed) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(limit) {
            eprintln!("test {test} is still running after {limit:?}: failing the run");
            std::process::exit(101);
        }
    });
    Deadline { _disarm: disarm }
}

impl TestDb {
    /// A fresh database for one test, which fails if it runs past [`test_deadline`].
    pub async fn new() -> Result<Self> {
        Self::with_pool_size(20).await
    }

    pub async fn with_pool_size(max_connections: u32) -> Result<Self> {
        let mut db = Self::unbounded(max_connections).await?;
        db._deadline = Some(deadline(test_deadline()));
        Ok(db)
    }

    /// A fresh database without a deadline (benchmarks).
    pub async fn unbounded(max_connections: u32) -> Result<Self> {
        let server = server_url()?;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin: PgConnectOptions = server
            .parse()
            .map_err(|e: sqlx::Error| Error::TestCluster(e.to_string()))?;
        let mut conn = admin
            .connect()
            .await
            .map_err(|source| Error::Connect { source })?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|e| Error::TestCluster(format!("creating database {name}: {e}")))?;
        let _ = conn.close().await;
        let opts = admin.database(&name);
        let pool = crate::pool_options(max_connections)
            .connect_with(crate::session_settings(opts.clone()))
            .await
            .map_err(|source| Error::Connect { source })?;
        crate::MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| Error::Migrate { source })?;
        let url = opts.to_url_lossy().to_string();
        Ok(Self {
            pool,
            url,
            _deadline: None,
        })
    }
}

/// Poll an async condition until it holds, panicking with `what` after `timeout`: tests wait on
/// conditions, never on fixed sleeps.
pub async fn eventually<F, Fut>(what: &str, timeout: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `n` outbound messages of account `a` (created if missing) to distinct recipients, already
/// sent: claimed under a fresh epoch and completed with provider ids `wamid.<row id>`. For
/// status-webhook tests.
pub async fn sent_outbound_rows(pool: &PgPool, n: usize) -> Result<Vec<i64>> {
    crate::fence::upsert_account(pool, "a", "1", "p", "bye", &[]).await?;
    let epoch = crate::fence::bump(pool, "a", "me").await?;
    let messages: Vec<crate::outbound::NewOutbound> = (0..n)
        .map(|i| crate::outbound::NewOutbound {
            account_id: "a".into(),
            conversation_id: None,
            job_id: None,
            recipient: format!("u{i}"),
            message: serde_json::json!({"type": "text", "text": {"body": "hi"}}),
            sent_by_agent: true,
            sent_by_member: None,
            max_attempts: Some(3),
        })
        .collect();
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| Error::TestCluster(e.to_string()))?;
    let ids = crate::outbound::enqueue(&mut conn, &messages).await?;
    drop(conn);
    let claimed = crate::outbound::claim_fenced(pool, "a", epoch, n as i64, "me").await?;
    if claimed.len() != ids.len() {
        return Err(Error::TestCluster(format!(
            "claimed {} of {} rows",
            claimed.len(),
            ids.len()
        )));
    }
    for id in &ids {
        crate::outbound::complete_fenced(pool, *id, epoch, &format!("wamid.{id}")).await?;
    }
    Ok(ids)
}

/// The tables and indexes the generic plan of `sql` reads in full, planned as a pooled session
/// plans it (`force_generic_plan`): prepared untyped (Postgres infers the parameter types),
/// explained with every argument NULL (a generic plan does not depend on the values). A full
/// read is a sequential scan, or an index scan with no index condition (every entry, for its
/// order or its partial predicate). On a fresh install's empty tables such a plan is kept as
/// the tables grow, so a hot statement must come out with none.
pub async fn generic_plan_full_scans(
    conn: &mut sqlx::PgConnection,
    sql: &str,
) -> Result<Vec<String>> {
    Ok(generic_plan_nodes(conn, sql)
        .await?
        .iter()
        .filter_map(|n| match plan_field(n, "Node Type") {
            "Seq Scan" => Some(plan_field(n, "Relation Name").to_string()),
            "Index Scan" | "Index Only Scan" | "Bitmap Index Scan"
                if plan_field(n, "Index Cond").is_empty() =>
            {
                Some(plan_field(n, "Index Name").to_string())
            }
            _ => None,
        })
        .collect())
}

/// For each of `statements` whose generic plan reads a table or index in full
/// ([`generic_plan_full_scans`]), its first line and what it scans; empty when none does.
pub async fn statements_with_full_scans(
    conn: &mut sqlx::PgConnection,
    statements: &[&str],
) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for sql in statements {
        let scans = generic_plan_full_scans(conn, sql).await?;
        if !scans.is_empty() {
            let head = sql.lines().next().unwrap_or_default();
            found.push(format!("{head}: scans {scans:?} in full"));
        }
    }
    Ok(found)
}

/// Every node of the generic plan of `sql` (see [`generic_plan_full_scans`]), children first.
pub async fn generic_plan_nodes(
    conn: &mut sqlx::PgConnection,
    sql: &str,
) -> Result<Vec<serde_json::Value>> {
    use crate::error::StepExt;
    let prepare = format!("SET plan_cache_mode = force_generic_plan; PREPARE s AS {sql}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
        .execute(&mut *conn)
        .await
        .step("preparing the statement")?;
    let params: i32 = sqlx::query_scalar(
        "SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = 's'",
    )
    .fetch_one(&mut *conn)
    .await
    .step("counting its parameters")?;
    let args = vec!["NULL"; params as usize].join(", ");
    let explain = format!("EXPLAIN (FORMAT JSON) EXECUTE s({args})");
    let plan: std::result::Result<serde_json::Value, sqlx::Error> =
        match sqlx::raw_sql(sqlx::AssertSqlSafe(explain))
            .fetch_one(&mut *conn)
            .await
        {
            Ok(row) => sqlx::Row::try_get(&row, 0),
            Err(e) => Err(e),
        };
    sqlx::raw_sql("DEALLOCATE s; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .step("deallocating it")?;
    let plan = plan.step("explaining its generic plan")?;
    fn walk(node: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        for child in node
            .get("Plans")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            walk(child, out);
        }
        out.push(node.clone());
    }
    let mut nodes = Vec::new();
    walk(&plan[0]["Plan"], &mut nodes);
    Ok(nodes)
}

/// A plan node's string field, or "".
pub fn plan_field<'a>(node: &'a serde_json::Value, name: &str) -> &'a str {
    node.get(name).and_then(|v| v.as_str()).unwrap_or_default()
}
