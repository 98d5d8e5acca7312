//! [`Tracker`]: tracked tables kept in step continuously, on a thread of their own.
//!
//! It wakes on two things: a commit to the replica in a tracked collection (a change hook),
//! and a commit by another connection to an app's file, noticed through
//! `PRAGMA data_version` every [`POLL`] — one cheap pragma per file, never a scan of a table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{AppFile, TrackReport, by_app};
use crate::error::Result;
use crate::{Replica, Scope};

/// How often the app files' `data_version` is read.
pub const POLL: Duration = Duration::from_millis(20);

/// After a failed pass (the app's file locked for long, the replica's storage failing), the
/// next try waits this long, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Totals {
    report: TrackReport,
    passes: u64,
    last_error: Option<String>,
}

/// Runs passes over every table the replica tracks whenever the app or the replica commits,
/// until stopped or dropped. Tables tracked after it started are picked up by the next
/// tracker (restart it).
pub struct Tracker {
    stop: Arc<AtomicBool>,
    wake: mpsc::Sender<()>,
    totals: Arc<Mutex<Totals>>,
    thread: Option<JoinHandle<()>>,
}

impl Tracker {
    /// Opens every tracked app file (failing now if one cannot be opened) and starts the
    /// thread. The first pass runs at once: what the app wrote while nothing ran goes out.
    pub fn spawn(replica: &Replica) -> Result<Tracker> {
        let tracked = replica.tracked()?;
        let collections: Vec<String> = tracked.iter().map(|t| t.collection.clone()).collect();
        let mut apps = Vec::new();
        for (path, tables) in by_app(tracked) {
            apps.push(AppFile::open(&path, tables)?);
        }
        let (wake, woken) = mpsc::channel::<()>();
        let hook_wake = Mutex::new(wake.clone());
        let hook = replica.on_change(Scope::Collections(collections), move |_| {
            if let Ok(w) = hook_wake.lock() {
                let _ = w.send(());
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let totals = Arc::new(Mutex::new(Totals::default()));
        let thread = {
            let (stop, totals, replica) = (stop.clone(), totals.clone(), replica.clone());
            std::thread::Builder::new()
                .name("weft-track".into())
                .spawn(move || {
                    let _hook = hook;
                    run(&replica, apps, &woken, &stop, &totals);
                })
                .map_err(|e| crate::Error::Internal(format!("starting the tracker: {e}")))?
        };
        Ok(Tracker {
            stop,
            wake,
            totals,
            thread: Some(thread),
        })
    }

    /// What the passes did so far.
    pub fn report(&self) -> TrackReport {
        self.totals.lock().map(|t| t.report).unwrap_or_default()
    }

    /// How many passes ran.
    pub fn passes(&self) -> u64 {
        self.totals.lock().map(|t| t.passes).unwrap_or_default()
    }

    /// The last pass's error, if the last pass failed.
    pub fn last_error(&self) -> Option<String> {
        self.totals.lock().ok().and_then(|t| t.last_error.clone())
    }

    /// Stops the thread after its current pass.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    replica: &Replica,
    mut apps: Vec<AppFile>,
    woken: &mpsc::Receiver<()>,
    stop: &AtomicBool,
    totals: &Mutex<Totals>,
) {
    let mut woke = true;
    let mut backoff: Option<Duration> = None;
    while !stop.load(Ordering::SeqCst) {
        let mut failed = None;
        for app in &mut apps {
            let due = match app.changed() {
                Ok(changed) => changed || woke,
                Err(e) => {
                    failed = Some(e.to_string());
                    continue;
                }
            };
            if !due {
                continue;
            }
            match app.pass(replica) {
                Ok(report) => {
                    if let Ok(mut t) = totals.lock() {
                        t.report.add(report);
                        t.passes += 1;
                    }
                    if report != TrackReport::default() {
                        tracing::debug!(app = %app.path.display(), ?report, "tracked tables pass");
                    }
                }
                Err(e) => {
                    tracing::warn!(app = %app.path.display(), error = %e, "a tracked tables pass failed; retrying");
                    failed = Some(e.to_string());
                }
            }
        }
        if let Ok(mut t) = totals.lock() {
            t.last_error = failed.clone();
        }
        let wait = match failed {
            Some(_) => {
                let next = backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                backoff = Some(next);
                // Retry the whole pass after the wait, whatever wakes us.
                woke = true;
                next
            }
            None => {
                backoff = None;
                woke = false;
                POLL
            }
        };
        match woken.recv_timeout(wait) {
            Ok(()) => {
                woke = true;
                while woken.try_recv().is_ok() {}
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
