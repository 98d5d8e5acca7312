//! Change hooks (the `onUpdate` pattern) and change subscriptions.
//!
//! Events are queued under the replica's lock, so the queue is in feed order, and dispatched
//! after the lock is released, so a hook may call back into the replica. One thread dispatches
//! at a time; a writer that finds dispatch under way leaves its events to that thread. Hooks
//! therefore see every committed change exactly once, in feed order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::engine::ChangeEvent;
use crate::error::Result;
use crate::replica::Replica;

pub use crate::scope::Scope;

/// How many events a subscription buffers before it falls back to reading the durable feed.
const CHANNEL_CAPACITY: usize = 1024;

type HookFn = Arc<dyn Fn(&ChangeEvent) + Send + Sync>;

enum Sink {
    Hook(HookFn),
    Channel {
        tx: SyncSender<ChangeEvent>,
        lagged: Arc<AtomicBool>,
    },
}

struct Subscriber {
    id: u64,
    scope: Scope,
    sink: Sink,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<ChangeEvent>,
    dispatching: bool,
}

#[derive(Default)]
struct HooksInner {
    queue: Mutex<Queue>,
    subscribers: Mutex<Vec<Arc<Subscriber>>>,
    next_id: AtomicU64,
}

/// The registry of hooks and subscriptions of one replica.
#[derive(Default)]
pub(crate) struct Hooks {
    inner: Arc<HooksInner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking hook must not disable every later hook.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hooks {
    pub(crate) fn add_hook(&self, scope: Scope, f: HookFn) -> HookGuard {
        let id = self.add(scope, Sink::Hook(f));
        HookGuard {
            hooks: Arc::downgrade(&self.inner),
            id,
        }
    }

    pub(crate) fn add_channel(&self, scope: Scope) -> (ChannelGuard, Arc<AtomicBool>) {
        let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.add(
            scope,
            Sink::Channel {
                tx,
                lagged: lagged.clone(),
            },
        );
        (
            ChannelGuard {
                rx,
                _guard: HookGuard {
                    hooks: Arc::downgrade(&self.inner),
                    id,
                },
            },
            lagged,
        )
    }

    fn add(&self, scope: Scope, sink: Sink) -> u64 {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.subscribers).push(Arc::new(Subscriber { id, scope, sink }));
        id
    }

    /// Queues committed events (called under the replica lock, so in feed order).
    pub(crate) fn enqueue(&self, events: Vec<ChangeEvent>) {
        if !events.is_empty() {
            lock(&self.inner.queue).events.extend(events);
        }
    }

    /// Delivers queued events unless another thread is already doing so.
    pub(crate) fn dispatch(&self) {
        struct Reset<'a>(&'a Mutex<Queue>);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                lock(self.0).dispatching = false;
            }
        }
        loop {
            let batch: Vec<ChangeEvent> = {
                let mut queue = lock(&self.inner.queue);
                if queue.dispatching || queue.events.is_empty() {
                    return;
                }
                queue.dispatching = true;
                queue.events.drain(..).collect()
            };
            let _reset = Reset(&self.inner.queue);
            let subscribers: Vec<Arc<Subscriber>> = lock(&self.inner.subscribers).clone();
            for event in &batch {
                for sub in subscribers
                    .iter()
                    .filter(|s| s.scope.contains(&event.collection))
                {
                    match &sub.sink {
                        Sink::Hook(f) => {
                            // A panicking hook must not cost the other subscribers the rest of
                            // this batch (a gap in a "lossless" subscription), nor fail the
                            // writer whose change already committed.
                            let call = std::panic::AssertUnwindSafe(|| f(event));
                            if std::panic::catch_unwind(call).is_err() {
                                tracing::error!(seq = event.seq, "a change hook panicked");
                            }
                        }
                        Sink::Channel { tx, lagged } => match tx.try_send(event.clone()) {
                            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                            Err(TrySendError::Full(_)) => lagged.store(true, Ordering::Release),
                        },
                    }
                }
            }
        }
    }
}

/// Keeps a hook installed; dropping it removes the hook.
#[must_use = "the hook is removed when this guard is dropped"]
pub struct HookGuard {
    hooks: Weak<HooksInner>,
    id: u64,
}

impl Drop for HookGuard {
    fn drop(&mut self) {
        if let Some(hooks) = self.hooks.upgrade() {
            lock(&hooks.subscribers).retain(|s| s.id != self.id);
        }
    }
}

pub(crate) struct ChannelGuard {
    rx: Receiver<ChangeEvent>,
    _guard: HookGuard,
}

/// How often a waiting subscription checks for commits by other processes.
const EXTERNAL_POLL: Duration = Duration::from_millis(50);

/// A lossless, ordered stream of committed changes (see [`Replica::subscribe`]).
pub struct Subscription {
    replica: Replica,
    scope: Scope,
    last_seq: u64,
    channel: ChannelGuard,
    lagged: Arc<AtomicBool>,
    backlog: VecDeque<ChangeEvent>,
    catching_up: bool,
}

impl Subscription {
    pub(crate) fn new(
        replica: Replica,
        scope: Scope,
        since: u64,
        channel: ChannelGuard,
        lagged: Arc<AtomicBool>,
    ) -> Self {
        Self {
            replica,
            scope,
            last_seq: since,
            channel,
            lagged,
            backlog: VecDeque::new(),
            catching_up: true,
        }
    }

    /// The sequence number of the last event returned (or the starting point).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The next event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Result<Option<ChangeEvent>> {
        self.next_timeout(Duration::ZERO)
    }

    /// The next event, waiting at most `timeout` for one.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<ChangeEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.backlog.pop_front() {
                self.last_seq = event.seq;
                return Ok(Some(event));
            }
            if self.lagged.swap(false, Ordering::AcqRel) {
                self.catching_up = true;
            }
            if self.catching_up {
                self.fill_from_feed()?;
                if !self.backlog.is_empty() {
                    continue;
                }
                self.catching_up = false;
            }
            // Wait in slices, checking between them for commits by other processes on the
            // file (they reach the channel through the step that notices them).
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(EXTERNAL_POLL);
            match self.channel.rx.recv_timeout(wait) {
                Ok(event) if event.seq > self.last_seq => {
                    self.last_seq = event.seq;
                    return Ok(Some(event));
                }
                Ok(_) => continue, // already delivered from the durable feed
                Err(RecvTimeoutError::Timeout) => {
                    if self.replica.poll_external()? {
                        continue;
                    }
                    if Instant::now() >= deadline {
                        // A lag flagged while we waited is handled on the next call.
                        return Ok(None);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }

    fn fill_from_feed(&mut self) -> Result<()> {
        let single = match &self.scope {
            Scope::Collections(names) if names.len() == 1 => Some(names[0].clone()),
            _ => None,
        };
        let mut since = self.last_seq;
        loop {
            let page = self.replica.changes_since(since, 1000, single.as_deref())?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            since = last.seq;
            self.backlog.extend(
                page.into_iter()
                    .filter(|e| self.scope.contains(&e.collection)),
            );
            if !self.backlog.is_empty() {
                return Ok(());
            }
        }
    }
}

impl Iterator for Subscription {
    type Item = Result<ChangeEvent>;

    /// Blocks until the next event.
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_timeout(Duration::from_secs(3600)) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
