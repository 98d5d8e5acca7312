//! What every command shares: the error type, opening the replica (for writing, or for
//! reading a file that may be read-only), output, parsing ids, JSON and sizes.

use std::io::{self, IsTerminal, Read, Write};
use std::path::PathBuf;

use serde_json::Value;
use weft::{DocumentId, Replica, StoreError, StoreMode};

/// `500MB`, `2GiB`, `4096` (bytes): decimal (kB, MB, GB) and binary (KiB, MiB, GiB) units.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a size like 500MB or 2GiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?}: the unit must be B, kB, MB, GB, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(factor)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

/// A runtime failure: printed as `error: ...`, exit status 1.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Weft(#[from] weft::Error),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Input(String),
    /// Arguments that parse but make no sense together: exit status 2, like clap's errors.
    #[error("{0}")]
    Usage(String),
    /// Whoever read our output went away (`weft changes | head`): not an error.
    #[error("output closed")]
    OutputClosed,
}

/// A failed write to stdout: a closed pipe ends the command quietly, anything else is an error.
pub(crate) fn output_err(e: io::Error) -> CliError {
    if e.kind() == io::ErrorKind::BrokenPipe {
        CliError::OutputClosed
    } else {
        CliError::Io(format!("writing output: {e}"))
    }
}

pub(crate) type CliResult<T = ()> = Result<T, CliError>;

pub(crate) fn io_err<'a>(
    what: &str,
    path: &'a std::path::Path,
) -> impl Fn(io::Error) -> CliError + 'a {
    let what = what.to_owned();
    move |e| CliError::Io(format!("{what} {}: {e}", path.display()))
}

/// `--max-db-size`, set once at start.
pub(crate) static MAX_DB_SIZE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

pub(crate) fn replica_options() -> weft::ReplicaOptions {
    weft::ReplicaOptions {
        max_size: MAX_DB_SIZE.get().copied().flatten(),
        ..weft::ReplicaOptions::default()
    }
}

/// Opens (creating if needed) the replica for a command that writes.
pub(crate) fn open(db: &std::path::Path) -> CliResult<Replica> {
    Replica::open_with(db, replica_options()).map_err(|e| match e {
        weft::Error::Store(StoreError::ReadOnly { .. }) => CliError::Io(format!(
            "{e}; it can be read (doc get, doc list, changes, export-bundle), not changed"
        )),
        e => e.into(),
    })
}

/// Opens the replica for a command that only reads: a missing file is an error (nothing is
/// created), and a file that is not writable, or in a directory that is not, is read
/// read-only.
pub(crate) fn open_read(db: &std::path::Path) -> CliResult<Replica> {
    if let Err(e) = std::fs::metadata(db)
        && e.kind() == io::ErrorKind::NotFound
    {
        return Err(CliError::Io(format!(
            "no such replica file: {}",
            db.display()
        )));
    }
    match Replica::open_with(db, replica_options()) {
        Err(weft::Error::Store(StoreError::ReadOnly { reason, .. })) => {
            tracing::debug!(db = %db.display(), %reason, "not writable: reading it read-only");
            Ok(Replica::open_read_only(db, replica_options())?)
        }
        opened => Ok(opened?),
    }
}

/// A read command's replica. Opened once and kept, unless it is a snapshot
/// (`StoreMode::Snapshot`: a file that is not writable and that no writer has open, read
/// without SQLite's locks), which shows no later commits and is therefore reopened for every
/// read; a snapshot read is repeated when the file changed while it ran (a process that may
/// write the file started to).
pub(crate) struct Reader {
    db: PathBuf,
    replica: Option<Replica>,
}

impl Reader {
    pub(crate) fn new(db: &std::path::Path) -> Self {
        Self {
            db: db.to_owned(),
            replica: None,
        }
    }

    pub(crate) fn read<T>(&mut self, read: impl Fn(&Replica) -> weft::Result<T>) -> CliResult<T> {
        let mut in_use = 0;
        let mut attempts = 0;
        while attempts < 5 {
            let before = snapshot_state(&self.db);
            let replica = match self.replica.take() {
                Some(kept) => kept,
                // A writer we cannot share the file with is at work: wait for it (a write
                // takes milliseconds; give up after 10 s of it).
                None => match open_read(&self.db) {
                    Err(CliError::Weft(weft::Error::Store(StoreError::InUse(_))))
                        if in_use < 200 =>
                    {
                        in_use += 1;
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        continue;
                    }
                    other => other?,
                },
            };
            attempts += 1;
            let result = read(&replica);
            if replica.mode() != StoreMode::Snapshot {
                self.replica = Some(replica);
                return Ok(result?);
            }
            drop(replica);
            if before.is_some() && snapshot_state(&self.db) == before {
                return Ok(result?);
            }
        }
        Err(CliError::Io(format!(
            "{} kept changing while it was read (a process writes it); try again",
            self.db.display()
        )))
    }
}

/// What a snapshot read relies on: the file stays the same (identity, size, modification time)
/// and no `-wal` appears (a writer creates one before it writes).
pub(crate) fn snapshot_state(
    db: &std::path::Path,
) -> Option<(u64, u64, std::time::SystemTime, bool)> {
    let meta = std::fs::metadata(db).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::path::Path::new(&wal).exists();
    Some((inode, meta.len(), meta.modified().ok()?, wal))
}

pub(crate) fn parse_id(text: &str) -> CliResult<DocumentId> {
    Ok(text.trim().parse()?)
}

pub(crate) fn out(line: &str) -> CliResult {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}").map_err(output_err)
}

pub(crate) fn read_json_arg(arg: Option<String>) -> CliResult<Value> {
    let text = match arg.as_deref() {
        Some("-") | None => {
            if io::stdin().is_terminal() {
                eprintln!(
                    "reading the JSON from stdin: type or paste it, then press Ctrl-D \
                     (or pass it with --json)"
                );
            }
            let mut buf = String::new();
            io::stdin()
                .read_to_string(&mut buf)
                .map_err(|e| CliError::Io(format!("reading stdin: {e}")))?;
            buf
        }
        Some(text) => text.to_owned(),
    };
    Ok(serde_json::Value::Object(
        weft::json::parse_object(&text).map_err(weft::Error::from)?,
    ))
}

pub(crate) fn parse_value(text: &str) -> CliResult<Value> {
    serde_json::from_str(text)
        .map_err(|e| CliError::Input(format!("invalid JSON value {text:?}: {e}")))
}

/// Size of the database file plus its WAL.
pub(crate) fn file_size(db: &std::path::Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [db.as_os_str().to_owned(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Writes to a temporary file in the same directory, then renames: a crash never leaves a
/// half-written bundle under the final name.
pub(crate) fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> CliResult {
    let tmp = path.with_extension("weft-tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CliError::Io(format!("writing {}: {e}", path.display()))
    })
}

pub(crate) fn heads_json(heads: &[weft::ChangeHash]) -> Value {
    Value::Array(heads.iter().map(|h| Value::String(h.to_string())).collect())
}
