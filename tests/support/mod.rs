//! Shared helpers for the integration tests (`tests/it/`): running the `weft` binary with a
//! time bound, a seeded random generator, reading a child's stdout lines as events; the relay
//! harness ([`relay`]: in-process relays, `weft serve` processes, raw protocol clients), hostile
//! Automerge documents ([`hostile`]) and a store whose faults a test controls
//! ([`faulty_store`]).
#![allow(dead_code)]

pub mod faulty_store;
pub mod hostile;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "net")]
pub mod relay;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long one short CLI invocation may take before the test fails (a failure bound, not a
/// synchronization device: the result is awaited as an event).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The `weft` binary under test.
pub fn weft_bin() -> &'static str {
    env!("CARGO_BIN_EXE_weft")
}

/// A `weft` command with a clean environment for the variables the CLI reads.
pub fn weft_command() -> Command {
    let mut cmd = Command::new(weft_bin());
    cmd.env_remove("WEFT_DB").env_remove("WEFT_LOG");
    cmd
}

/// The result of one finished process.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts exit status 0 and an empty-ish stderr is not required (summaries go there).
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "expected success, got {self:#?}");
        self
    }

    /// Asserts a runtime error: status 1, nothing on stdout, `error: ...` on stderr.
    #[track_caller]
    pub fn runtime_error(self) -> Self {
        assert_eq!(self.code, Some(1), "expected exit status 1, got {self:#?}");
        assert_eq!(
            self.stdout, "",
            "a failing command must print nothing on stdout: {self:#?}"
        );
        assert!(
            self.stderr.starts_with("error: ") && self.stderr.trim_end().len() > "error: ".len(),
            "expected an `error: ...` message on stderr: {self:#?}"
        );
        self
    }

    /// Asserts a usage error: status 2, nothing on stdout, a message on stderr.
    #[track_caller]
    pub fn usage_error(self) -> Self {
        assert_eq!(self.code, Some(2), "expected exit status 2, got {self:#?}");
        assert_eq!(
            self.stdout, "",
            "a usage error must print nothing on stdout: {self:#?}"
        );
        assert!(
            self.stderr.starts_with("error:"),
            "expected a usage message on stderr: {self:#?}"
        );
        self
    }

    /// The stdout lines.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs a prepared command to completion, feeding `stdin`, bounded by [`CLI_TIMEOUT`].
pub fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn weft");
    let feeder = stdin.map(|bytes| {
        let bytes = bytes.to_vec();
        let mut pipe = child.stdin.take().expect("stdin pipe");
        std::thread::spawn(move || {
            // The child may exit early without reading everything (e.g. a usage error).
            let _ = pipe.write_all(&bytes);
        })
    });
    let (tx, rx) = mpsc::channel();
    let out = read_all(child.stdout.take().expect("stdout pipe"), tx.clone(), true);
    let err = read_all(child.stderr.take().expect("stderr pipe"), tx, false);
    let mut stdout = None;
    let mut stderr = None;
    for _ in 0..2 {
        match rx.recv_timeout(CLI_TIMEOUT) {
            Ok((true, text)) => stdout = Some(text),
            Ok((false, text)) => stderr = Some(text),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("weft did not finish within {CLI_TIMEOUT:?}: {cmd:?}");
            }
        }
    }
    // Both pipes reached EOF, so the process has exited or is exiting.
    let status = child.wait().expect("wait for weft");
    out.join().unwrap();
    err.join().unwrap();
    if let Some(f) = feeder {
        f.join().unwrap();
    }
    Output {
        code: status.code(),
        stdout: stdout.unwrap(),
        stderr: stderr.unwrap(),
    }
}

fn read_all(
    mut pipe: impl Read + Send + 'static,
    tx: mpsc::Sender<(bool, String)>,
    is_stdout: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let text = String::from_utf8(bytes).expect("weft output is UTF-8");
        let _ = tx.send((is_stdout, text));
    })
}

/// `weft --db DB ARGS...`
pub fn weft(db: &Path, args: &[&str]) -> Output {
    let mut cmd = weft_command();
    cmd.arg("--db").arg(db).args(args);
    run(cmd, None)
}

/// `weft --db DB ARGS...`, which must succeed: its stdout.
#[track_caller]
pub fn ok(db: &Path, args: &[&str]) -> String {
    weft(db, args).ok().stdout
}

/// `weft --db DB ARGS... < stdin`
pub fn weft_stdin(db: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = weft_command();
    cmd.arg("--db").arg(db).args(args);
    run(cmd, Some(stdin))
}

// ---------------------------------------------------------------------------------------------
// Reading a long-running child's stdout as events.

/// One event from a child's stdout.
#[derive(Debug)]
pub enum LineEvent {
    /// A complete line (without its newline).
    Line(String),
    /// End of output; carries a trailing partial line (no newline) if there was one.
    Eof(Option<String>),
}

/// Starts a thread that sends every complete stdout line of a child, then `Eof`.
pub fn line_reader(
    stdout: impl Read + Send + 'static,
) -> (mpsc::Receiver<LineEvent>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut buf = Vec::new();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(LineEvent::Eof(None));
                    return;
                }
                Ok(_) if buf.ends_with(b"\n") => {
                    buf.pop();
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    if tx.send(LineEvent::Line(line)).is_err() {
                        return;
                    }
                }
                Ok(_) => {
                    let _ = tx.send(LineEvent::Eof(Some(
                        String::from_utf8_lossy(&buf).into_owned(),
                    )));
                    return;
                }
            }
        }
    });
    (rx, handle)
}

/// Collects a child's stderr in the background (for failure messages).
pub fn stderr_collector(child: &mut Child) -> JoinHandle<String> {
    let mut pipe = child.stderr.take().expect("stderr pipe");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness.

/// The run's seed: `WEFT_SEED` if set, else a fresh one. Printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("WEFT_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("WEFT_SEED={text:?} is not a u64")),
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            SplitMix64::new(nanos ^ (u64::from(std::process::id()) << 32)).next_u64()
        }
    };
    // libtest shows this with the failure report (and at once with --nocapture).
    println!("{test}: WEFT_SEED={seed}");
    seed
}

/// A small deterministic generator (SplitMix64): same seed, same run.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// A string of `len` characters drawn from a mix of ASCII and multi-byte characters.
    pub fn text(&mut self, len: usize) -> String {
        const ALPHABET: &[char] = &[
            'a', 'b', 'c', 'x', 'y', 'z', '0', '7', ' ', '"', '\\', '/', 'é', 'ß', 'ж', '中', '🌍',
            '\u{301}', '\n', '\t',
        ];
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize])
            .collect()
    }
}

/// A child process that is killed and reaped when dropped, so a test that fails midway leaves
/// no process behind (a `--follow` or `--watch` child would otherwise run on).
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
