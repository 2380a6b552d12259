//! A real PgBouncer in transaction mode in front of the test Postgres server, configured as
//! a user would leave it (only the listen address, the auth and the database entry set;
//! the pool size where a test needs a given one), and a database of its own per test.
//!
//! A test database rather than a schema: a schema is chosen with the `options` startup
//! parameter, which PgBouncer refuses. The `*` database entry forwards any database name,
//! so each test's database is reached through the same PgBouncer.
//!
//! The binary is `pgbouncer` on the `PATH` or in `/usr/sbin` (Debian's package), or
//! `KEEL_PGBOUNCER`. Without it the tests skip with a notice, and fail when
//! `KEEL_REQUIRE_SERVICES=1`.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TEST_DATABASE_URL, pg_url_or_skip, services_required};

/// Env var naming the PgBouncer binary, when it is not `pgbouncer` on the `PATH` or in
/// `/usr/sbin`.
pub const PGBOUNCER: &str = "KEEL_PGBOUNCER";

/// A running PgBouncer; killed on drop.
#[derive(Debug)]
pub struct PgBouncer {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    binary: PathBuf,
    dir: tempfile::TempDir,
    /// The server URL it forwards to (the test server's), for URLs past it.
    server_url: String,
    user: String,
}

fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(PGBOUNCER) {
        return Some(path.into());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|p| p.is_file())
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode in front of the test server, with
    /// `default_pool_size` when given (PgBouncer's default, 20, otherwise). `None`, after a
    /// skip notice naming `test`, when the server or the binary is missing.
    ///
    /// # Panics
    /// When a service is missing and [`services_required`], or PgBouncer does not start.
    pub fn start(test: &str, default_pool_size: Option<usize>) -> Option<Self> {
        let server_url = pg_url_or_skip(test)?;
        let Some(binary) = binary() else {
            assert!(
                !services_required(),
                "KEEL_REQUIRE_SERVICES=1 but pgbouncer is not installed (apt install pgbouncer, or set {PGBOUNCER}): cannot run {test}"
            );
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: pgbouncer is not installed (apt install pgbouncer)"
            );
            return None;
        };
        let cfg: tokio_postgres::Config = server_url
            .parse()
            .unwrap_or_else(|e| panic!("{TEST_DATABASE_URL} is not a Postgres URL: {e}"));
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres").to_owned();
        let dir = tempfile::tempdir().expect("temp dir for pgbouncer");
        let addr = free_port();
        let pool = default_pool_size
            .map(|n| format!("default_pool_size = {n}\n"))
            .unwrap_or_default();
        std::fs::write(dir.path().join("users.txt"), format!("\"{user}\" \"\"\n"))
            .expect("write pgbouncer auth file");
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 * = host={host} port={port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {}\n\
                 pool_mode = transaction\n\
                 {pool}\
                 logfile = {}\n",
                addr.port(),
                dir.path().join("users.txt").display(),
                dir.path().join("pgbouncer.log").display(),
            ),
        )
        .expect("write pgbouncer.ini");
        if running_as_root() {
            use std::os::unix::fs::PermissionsExt as _;
            let open = |path: &std::path::Path, mode| {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
            };
            open(dir.path(), 0o755);
            open(&dir.path().join("users.txt"), 0o644);
            open(&dir.path().join("pgbouncer.ini"), 0o644);
            std::fs::write(dir.path().join("pgbouncer.log"), "").expect("create the log");
            open(&dir.path().join("pgbouncer.log"), 0o666);
        }
        let mut bouncer = Self {
            child: None,
            addr,
            binary,
            dir,
            server_url,
            user,
        };
        bouncer.resume();
        Some(bouncer)
    }

    /// A URL reaching `database` through PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{}@{}/{database}", self.user, self.addr)
    }

    /// A URL reaching `database` on the server itself, past PgBouncer (for `LISTEN`).
    pub fn direct_url(&self, database: &str) -> String {
        crate::postgres_url_with_database(&self.server_url, database)
    }

    /// Kills PgBouncer (SIGKILL: every client and server connection it held drops).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts PgBouncer again on the same address and waits until it accepts connections.
    ///
    /// # Panics
    /// When it does not start within 10 s.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "pgbouncer is already running");
        let mut command = Command::new(&self.binary);
        if running_as_root() {
            // PgBouncer refuses to run as root; the postgres package's user can read the
            // files made readable in `start`.
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(self.dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            // Its log is the logfile in its directory, shown if it fails to start.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).is_err() {
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.path().join("pgbouncer.log"))
                    .unwrap_or_default();
                panic!("pgbouncer exited with {status}:\n{log}");
            }
            assert!(Instant::now() < until, "pgbouncer did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether this process runs as root (PgBouncer will not).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A loopback address no one listens on (bound, read, released).
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr")
}

/// A database of its own on the test server, dropped (with every connection to it) on
/// drop.
#[derive(Debug)]
pub struct PgDatabase {
    /// Its name (`keel_test_<random>`).
    pub name: String,
    server_url: String,
}

impl PgDatabase {
    /// Creates a uniquely named database on the server at `server_url`.
    pub async fn create(server_url: &str) -> Self {
        let name = format!("keel_test_{}", uuid::Uuid::new_v4().simple());
        super::run_once(server_url, &format!("CREATE DATABASE {name}")).await;
        Self {
            name,
            server_url: server_url.to_owned(),
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // FORCE: PgBouncer may still hold server connections to it.
        super::run_on_drop(
            &self.server_url,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}
