//! PostgreSQL for the tests: the server the test command started (`WEFT_TEST_PG`, see
//! scripts/test.sh), a fresh database per test, and private clusters for tests that stop
//! their server.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use weft::store::postgres::{PgStore, parse_url};
use weft::{Replica, ReplicaOptions};

/// The server's URL (its `postgres` database).
pub fn server() -> String {
    std::env::var("WEFT_TEST_PG").unwrap_or_else(|_| {
        panic!(
            "WEFT_TEST_PG is not set: these tests need a PostgreSQL server. The test command \
             (bash scripts/test.sh) starts one; by hand: \
             export WEFT_TEST_PG=$(scripts/pg.sh start /tmp/weft-pg)"
        )
    })
}

/// A new, empty database on the server; its URL.
pub fn fresh_database() -> String {
    fresh_database_on(&server())
}

/// A new, empty database on the server at `url`; its URL.
pub fn fresh_database_on(url: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "weft_test_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        u32::from_le_bytes(weft::id::os_random().unwrap())
    );
    let url = url.to_owned();
    let created = name.clone();
    // The synchronous client runs its own runtime: never inside a test's async context.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .batch_execute(&format!("CREATE DATABASE {created}"))
            .unwrap();
        let config: postgres::Config = url.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        format!(
            "postgres://{}@{host}:{}/{created}",
            config.get_user().unwrap_or("postgres"),
            config.get_ports()[0]
        )
    })
    .join()
    .unwrap()
}

/// A replica stored in the database at `url` (opened on a thread of its own: the
/// synchronous PostgreSQL client must not run inside a test's runtime).
pub fn replica(url: &str, options: ReplicaOptions) -> Replica {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let store = PgStore::open(parse_url(&url).unwrap()).unwrap();
        Replica::with_store(Box::new(store), url.into(), options).unwrap()
    })
    .join()
    .unwrap()
}

/// Runs `f` on a thread of its own (for calls that reach a PostgreSQL-backed replica's store
/// from async test code).
pub fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap()
}

/// A private cluster (initdb + pg_ctl through scripts/pg.sh), for tests that stop or kill the
/// server; stopped when dropped.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
}

fn pg_sh(args: &[&str], dir: &Path) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(args[0])
        .arg(dir)
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/pg.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("weft-pg")
            .tempdir()
            .unwrap();
        let url = pg_sh(&["start"], dir.path());
        Cluster { dir, url }
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) {
        pg_sh(&["stop"], self.dir.path());
    }

    /// Starts it again on the same port.
    pub fn restart(&self) {
        let port = std::fs::read_to_string(self.dir.path().join("port")).unwrap();
        pg_sh(&["start", port.trim()], self.dir.path());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}
