//! Change notifications between relay nodes that share one PostgreSQL database.
//!
//! A node's store sends `NOTIFY weft_changes` with every commit that wrote (ids only, see
//! `store::postgres`). This task keeps a connection of its own that `LISTEN`s, and turns each
//! notification (a burst coalesced into one) into `Replica::poll_external`: the step that
//! reads the other nodes' feed entries, drops the stale documents and pushes the changes to
//! this node's live sessions. When the connection drops, it connects again with backoff and
//! polls once connected: whatever was committed meanwhile comes from the change feed, so a
//! missed notification delays a change, never loses it (the relay also polls every second).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::Replica;
use crate::store::postgres::CHANNEL;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ListenCounters {
    pub(crate) notifications: AtomicU64,
    pub(crate) polls: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    /// 1 while the LISTEN connection is up.
    pub(crate) connected: AtomicU64,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Listens until `stop` turns true.
pub(crate) async fn run(
    config: tokio_postgres::Config,
    replica: Replica,
    counters: Arc<ListenCounters>,
    mut stop: watch::Receiver<bool>,
) {
    let stop = &mut stop;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let outcome = listen(&config, &replica, &counters, stop).await;
        counters.connected.store(0, Relaxed);
        match outcome {
            Ok(()) => return,
            Err(e) => {
                counters.reconnects.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "the LISTEN connection to PostgreSQL failed");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(stop) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: `Ok` when stopped, `Err` when it failed.
async fn listen(
    config: &tokio_postgres::Config,
    replica: &Replica,
    counters: &ListenCounters,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut notified) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    counters.connected.store(1, Relaxed);
    tracing::info!("listening for other relay nodes' changes");
    // Whatever was committed before LISTEN took effect.
    poll(replica, counters).await;
    loop {
        tokio::select! {
            got = notified.recv() => match got {
                Some(()) => {
                    counters.notifications.fetch_add(1, Relaxed);
                    // A burst of notifications is one poll.
                    while notified.try_recv().is_ok() {
                        counters.notifications.fetch_add(1, Relaxed);
                    }
                    poll(replica, counters).await;
                }
                None => {
                    drop(client);
                    return match driver.await {
                        Ok(Err(e)) => Err(e),
                        _ => Ok(()),
                    };
                }
            },
            () = stopped(stop) => {
                driver.abort();
                return Ok(());
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn poll(replica: &Replica, counters: &ListenCounters) {
    counters.polls.fetch_add(1, Relaxed);
    let r = replica.clone();
    let polled = tokio::task::spawn_blocking(move || r.poll_external()).await;
    if let Ok(Err(e)) = polled {
        tracing::warn!(error = %e, "reading the other nodes' changes failed");
    }
}
