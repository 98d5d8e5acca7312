//! Replicas that cannot be written (issue 11, item 4): read commands (`doc get`, `doc list`,
//! `changes`, `export-bundle`) read them, write commands say the file is read-only, and a read
//! of a missing file is an error that creates nothing.
//!
//! How a file is made read-only matters, because root ignores permission bits: as root the
//! tests use `chattr +i` (which binds root too) and also run the reader as `nobody` (through
//! `setpriv`) against `chmod`ed files; as another user they `chmod` and read as themselves.
//! A mechanism that is not available here is skipped with a note on stderr, never passed
//! silently: `available_mechanisms` must find at least one.

use crate::support;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use support::{CLI_TIMEOUT, LineEvent, Output, weft, weft_bin};
use weft::{Error, Replica, ReplicaOptions, StoreError, StoreMode};

/// The user that reads as `nobody` when the tests run as root.
const NOBODY: &str = "65534";

/// How a file or directory is made read-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mechanism {
    /// `chattr +i`: nobody, root included, may change it (tests run as root).
    Immutable,
    /// `chmod a-w`, read by a user the permissions bind: `nobody` when the tests run as root,
    /// else the test's own user.
    Permissions,
}

/// What is made read-only.
#[derive(Clone, Copy, Debug)]
enum Target {
    File,
    Directory,
    Both,
}

fn is_root() -> bool {
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid() == 0
}

/// A command run as the reader of `mechanism`.
fn reader_command(mechanism: Mechanism) -> Command {
    let mut cmd = if mechanism == Mechanism::Permissions && is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .arg(weft_bin());
        cmd
    } else {
        Command::new(weft_bin())
    };
    cmd.env_remove("WEFT_DB").env_remove("WEFT_LOG");
    cmd
}

/// `weft --db DB ARGS...` as the reader.
fn read_as(mechanism: Mechanism, db: &Path, args: &[&str]) -> Output {
    let mut cmd = reader_command(mechanism);
    cmd.arg("--db").arg(db).args(args);
    support::run(cmd, None)
}

/// The mechanisms that work here.
fn available_mechanisms() -> Vec<Mechanism> {
    let mut found = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    std::fs::write(&probe, "x").unwrap();
    if is_root() {
        match Command::new("chattr").arg("+i").arg(&probe).status() {
            Ok(s) if s.success() => {
                let _ = Command::new("chattr").arg("-i").arg(&probe).status();
                found.push(Mechanism::Immutable);
            }
            _ => eprintln!("note: chattr +i does not work here: skipping the immutable cases"),
        }
        // The reader must be able to run the binary as nobody.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let runs = reader_command(Mechanism::Permissions)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if runs {
            found.push(Mechanism::Permissions);
        } else {
            eprintln!(
                "note: cannot run {} as nobody (setpriv missing, or the binary is not \
                 reachable for other users): skipping the permission cases",
                weft_bin()
            );
        }
    } else {
        found.push(Mechanism::Permissions);
    }
    assert!(
        !found.is_empty(),
        "no way to make a file read-only here: the read-only tests would test nothing"
    );
    found
}

/// Makes `path` read-only until dropped.
struct ReadOnly {
    path: PathBuf,
    mechanism: Mechanism,
    mode: u32,
}

impl ReadOnly {
    fn new(path: &Path, mechanism: Mechanism) -> Self {
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        match mechanism {
            Mechanism::Immutable => {
                let status = Command::new("chattr").arg("+i").arg(path).status().unwrap();
                assert!(status.success(), "chattr +i {path:?}");
            }
            Mechanism::Permissions => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o555))
                    .unwrap();
            }
        }
        ReadOnly {
            path: path.to_owned(),
            mechanism,
            mode,
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        // Always undone, or the temporary directory could not be removed.
        match self.mechanism {
            Mechanism::Immutable => {
                let _ = Command::new("chattr").arg("-i").arg(&self.path).status();
            }
            Mechanism::Permissions => {
                let _ = std::fs::set_permissions(
                    &self.path,
                    std::fs::Permissions::from_mode(self.mode),
                );
            }
        }
    }
}

fn make_read_only(db: &Path, target: Target, mechanism: Mechanism) -> Vec<ReadOnly> {
    let dir = db.parent().unwrap();
    match target {
        Target::File => vec![ReadOnly::new(db, mechanism)],
        Target::Directory => vec![ReadOnly::new(dir, mechanism)],
        // The file first: with the directory immutable, its entries cannot change either.
        Target::Both => vec![ReadOnly::new(db, mechanism), ReadOnly::new(dir, mechanism)],
    }
}

/// As root, the file is root's: the reader (nobody) may write it only if everyone may, which
/// a directory-only case needs (else it would be the file's permissions that stop it).
fn reader_may_write(db: &Path, mechanism: Mechanism) {
    if mechanism == Mechanism::Permissions && is_root() {
        std::fs::set_permissions(db, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
}

/// A directory other users can enter (tempfile makes them 0700).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The names in a directory.
fn listing(dir: &Path) -> BTreeSet<OsString> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect()
}

fn id_of(out: &Output) -> String {
    out.stdout.trim().to_owned()
}

/// A replica with history: two documents in two collections, an update, a delete. Returns
/// (a live id, the heads of its first version).
fn populate(db: &Path) -> (String, String) {
    let a = id_of(
        &weft(
            db,
            &["doc", "create", "-c", "todos", "--json", r#"{"t":"one"}"#],
        )
        .ok(),
    );
    let meta: Value =
        serde_json::from_str(&weft(db, &["doc", "get", &a, "--meta"]).ok().stdout).unwrap();
    let first = meta["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(",");
    weft(db, &["doc", "update", &a, "--merge", r#"{"done":true}"#]).ok();
    let b = id_of(
        &weft(
            db,
            &["doc", "create", "-c", "notes", "--json", r#"{"n":2}"#],
        )
        .ok(),
    );
    weft(db, &["doc", "delete", &b]).ok();
    (a, first)
}

/// The read commands, and what each printed on the writable file.
fn reads(id: &str, first: &str) -> Vec<Vec<String>> {
    [
        vec!["doc", "get", id],
        vec!["doc", "get", id, "--meta"],
        vec!["doc", "get", id, "--at", first],
        vec!["doc", "list", "--json"],
        vec!["doc", "list", "-c", "todos", "--where", "done = true"],
        vec!["changes"],
        vec!["changes", "--since", "2", "--collection", "notes"],
    ]
    .into_iter()
    .map(|a| a.into_iter().map(str::to_owned).collect())
    .collect()
}

#[test]
fn read_only_replicas_are_read_and_not_written() {
    for mechanism in available_mechanisms() {
        for target in [Target::File, Target::Directory, Target::Both] {
            read_only_case(mechanism, target);
        }
    }
}

fn read_only_case(mechanism: Mechanism, target: Target) {
    let case = format!("{mechanism:?}, {target:?} read-only");
    let dir = open_dir();
    let db = dir.path().join("r.db");
    let (id, first) = populate(&db);
    reader_may_write(&db, mechanism);
    let out_dir = open_dir();
    std::fs::set_permissions(out_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let bundle = out_dir.path().join("ro.bundle");
    let input = out_dir.path().join("in.ndjson");
    std::fs::write(&input, "{\"x\":1}\n").unwrap();
    let reads = reads(&id, &first);
    // What the reads print while the file is writable, and the bundle it exports.
    let expected: Vec<String> = reads
        .iter()
        .map(|args| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            weft(&db, &args).ok().stdout
        })
        .collect();
    let writable_bundle = out_dir.path().join("rw.bundle");
    weft(&db, &["export-bundle", writable_bundle.to_str().unwrap()]).ok();

    let bytes = std::fs::read(&db).unwrap();
    let files = listing(dir.path());
    {
        let _locks = make_read_only(&db, target, mechanism);
        for (args, want) in reads.iter().zip(&expected) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let got = read_as(mechanism, &db, &args).ok();
            assert_eq!(&got.stdout, want, "{case}: weft {args:?}");
        }
        let out = read_as(mechanism, &db, &["export-bundle", bundle.to_str().unwrap()]).ok();
        assert!(
            out.stderr.contains("exported 2 documents"),
            "{case}: {out:#?}"
        );
        assert_eq!(
            std::fs::read(&bundle).unwrap(),
            std::fs::read(&writable_bundle).unwrap(),
            "{case}: the same bundle as from the writable file"
        );
        // Every write command says the file is read-only, and what can still be done.
        let writes: &[&[&str]] = &[
            &["doc", "create", "--json", "{}"],
            &["doc", "update", &id, "--merge", r#"{"x":1}"#],
            &["doc", "delete", &id],
            &["import", input.to_str().unwrap()],
            &["import-bundle", bundle.to_str().unwrap()],
            &["compact"],
        ];
        for args in writes {
            let e = read_as(mechanism, &db, args).runtime_error();
            assert!(
                e.stderr.contains(&format!("{} is read-only", db.display()))
                    && e.stderr.contains("can be read"),
                "{case}: weft {args:?} must say the file is read-only: {e:#?}"
            );
        }
        // Neither the reads nor the refused writes changed anything or left files behind.
        assert_eq!(
            std::fs::read(&db).unwrap(),
            bytes,
            "{case}: the file changed"
        );
        assert_eq!(
            listing(dir.path()),
            files,
            "{case}: files appeared next to it"
        );
    }
    // Writable again: the owner writes as before (nothing a reader left gets in the way).
    weft(&db, &["doc", "create", "--json", r#"{"after":true}"#]).ok();
    assert_eq!(
        weft(&db, &["doc", "list", "--json"])
            .ok()
            .stdout
            .lines()
            .count(),
        2,
        "{case}"
    );
}

/// `changes --follow` on a file the follower may not write still prints every commit of a
/// writer that may, whether that writer had the file open first (SQLite shares it through
/// `-wal` and `-shm`) or starts after (the follower reads a snapshot, which it reopens).
#[test]
fn changes_follow_on_a_read_only_file() {
    if !available_mechanisms().contains(&Mechanism::Permissions) {
        eprintln!("note: changes_follow_on_a_read_only_file needs the permission mechanism");
        return;
    }
    for target in [Target::File, Target::Directory] {
        // A writer that opened the file before it was made read-only keeps writing.
        let dir = open_dir();
        let db = dir.path().join("f.db");
        let writer = Replica::open(&db).unwrap();
        writer.create("c", json!({"n": 1})).unwrap();
        reader_may_write(&db, Mechanism::Permissions);
        let _locks = make_read_only(&db, target, Mechanism::Permissions);
        follow(&db, &format!("writer first, {target:?}"), 1, || {
            for n in 2..=4 {
                writer.create("c", json!({"n": n})).unwrap();
            }
        });
        drop(writer);

        // A writer that appears while the follower runs: only root may write a file that is
        // read-only for others.
        if is_root() {
            let dir = open_dir();
            let db = dir.path().join("g.db");
            weft(&db, &["doc", "create", "-c", "c", "--json", r#"{"n":1}"#]).ok();
            reader_may_write(&db, Mechanism::Permissions);
            let _locks = make_read_only(&db, target, Mechanism::Permissions);
            follow(&db, &format!("writer later, {target:?}"), 1, || {
                for n in 2..=4 {
                    weft(
                        &db,
                        &[
                            "doc",
                            "create",
                            "-c",
                            "c",
                            "--json",
                            &format!(r#"{{"n":{n}}}"#),
                        ],
                    )
                    .ok();
                }
            });
        } else {
            eprintln!(
                "note: a writer that starts later needs root (only root writes a file read-only to others)"
            );
        }
    }
}

/// Runs `changes --follow` as the reader, waits for `initial` lines, calls `write` (which
/// must add three changes), and checks the follower prints them, in order.
fn follow(db: &Path, case: &str, initial: u64, write: impl FnOnce()) {
    let mut cmd = reader_command(Mechanism::Permissions);
    cmd.arg("--db")
        .arg(db)
        .args(["changes", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let errors = support::stderr_collector(&mut child);
    let (lines, reader) = support::line_reader(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    let expect = |seen: &mut Vec<u64>, until: u64, child: &mut std::process::Child| {
        while seen.len() < until as usize {
            match lines.recv_timeout(CLI_TIMEOUT) {
                Ok(LineEvent::Line(line)) => {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    seen.push(v["seq"].as_u64().unwrap());
                }
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{case}: the follower stopped or stalled ({other:?}) after {seen:?}");
                }
            }
        }
    };
    expect(&mut seen, initial, &mut child);
    write();
    expect(&mut seen, initial + 3, &mut child);
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let errors = errors.join().unwrap();
    assert_eq!(
        seen,
        (1..=initial + 3).collect::<Vec<_>>(),
        "{case}: {errors}"
    );
    assert!(errors.is_empty(), "{case}: {errors}");
}

#[test]
fn read_commands_never_create_a_replica() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("missing.db");
    let bundle = dir.path().join("x.bundle");
    let id = weft::DocumentId::from_bytes([0x5a; 16]).to_string();
    let reads: &[&[&str]] = &[
        &["doc", "get", &id],
        &["doc", "list"],
        &["changes"],
        &["changes", "--follow"],
        &["export-bundle", bundle.to_str().unwrap()],
    ];
    for args in reads {
        let e = weft(&db, args).runtime_error();
        assert_eq!(
            e.stderr,
            format!("error: no such replica file: {}\n", db.display()),
            "weft {args:?}"
        );
        assert!(
            listing(dir.path()).is_empty(),
            "weft {args:?} created {:?}",
            listing(dir.path())
        );
    }
    // Nor in a directory that does not exist.
    let nested = dir.path().join("no/such/dir/x.db");
    let e = weft(&nested, &["doc", "list"]).runtime_error();
    assert!(e.stderr.contains("no such replica file"), "{e:#?}");
    // Write commands create it, as before.
    weft(&db, &["doc", "create", "--json", "{}"]).ok();
    assert!(db.exists());
    assert_eq!(weft(&db, &["doc", "list"]).ok().stdout.lines().count(), 1);
}

/// A file written by an older weft needs its schema upgraded, which is a write: reading it
/// read-only says so instead of failing on a missing table later.
#[test]
fn read_only_needs_the_current_schema() {
    let mechanism = available_mechanisms()[0];
    let dir = open_dir();
    let db = dir.path().join("old.db");
    weft(&db, &["doc", "create", "--json", r#"{"old":true}"#]).ok();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("DROP TABLE sync_states; PRAGMA user_version = 1;")
            .unwrap();
    }
    {
        let _locks = make_read_only(&db, Target::File, mechanism);
        let e = read_as(mechanism, &db, &["doc", "list"]).runtime_error();
        assert!(
            e.stderr.contains("schema version 1") && e.stderr.contains("write access"),
            "{e:#?}"
        );
    }
    // Writable, a read upgrades it as before.
    assert!(weft(&db, &["doc", "list"]).ok().stdout.contains("old"));
}

/// The library side: `open` refuses a read-only file with `ReadOnly`, `open_read_only`
/// reads it, refuses writes, and never creates a file.
#[test]
fn library_read_only_opening() {
    let dir = open_dir();
    let missing = dir.path().join("none.db");
    assert!(matches!(
        Replica::open_read_only(&missing, ReplicaOptions::default()),
        Err(Error::Store(StoreError::Missing { .. }))
    ));
    assert!(!missing.exists());

    let path = dir.path().join("lib.db");
    let id = {
        let r = Replica::open(&path).unwrap();
        r.create("c", json!({"a": 1})).unwrap()
    };
    // Writable, read-only opening still shares the file with writers: it sees their commits.
    let reader = Replica::open_read_only(&path, ReplicaOptions::default()).unwrap();
    assert_eq!(reader.mode(), StoreMode::ReadOnly);
    let writer = Replica::open(&path).unwrap();
    let later = writer.create("c", json!({"b": 2})).unwrap();
    assert_eq!(reader.get(&later).unwrap().body, json!({"b": 2}));
    let err = reader.create("c", json!({})).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_eq!(reader.get(&id).unwrap().body, json!({"a": 1}));
    drop((reader, writer));

    if available_mechanisms().contains(&Mechanism::Immutable) {
        let _locks = make_read_only(&path, Target::File, Mechanism::Immutable);
        match Replica::open(&path) {
            Err(Error::Store(StoreError::ReadOnly { reason, .. })) => {
                assert!(reason.contains("not writable"), "{reason}")
            }
            Err(other) => panic!("expected ReadOnly, got {other:?}"),
            Ok(_) => panic!("opened an immutable file for writing"),
        }
        let reader = Replica::open_read_only(&path, ReplicaOptions::default()).unwrap();
        // Nobody can write it, and nobody has it open: a snapshot, created without a file.
        assert_eq!(reader.mode(), StoreMode::Snapshot);
        assert_eq!(reader.list("c").unwrap().len(), 2);
        assert!(matches!(
            reader.delete(&id),
            Err(Error::Store(StoreError::CommitFailed(cause)))
                if matches!(*cause, StoreError::ReadOnly { .. })
        ));
    }
}
