//! Counters for `/metrics`, rendered as Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The relay's counters. Shared by every connection; all updates are relaxed atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) sessions_refused: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) sync_latency: Histogram,
    /// The PostgreSQL LISTEN connection's counters (relay nodes sharing a database).
    #[cfg(feature = "postgres")]
    pub(crate) listen: std::sync::Arc<super::pg_listen::ListenCounters>,
}

/// Upper bounds (seconds) of the sync latency histogram's buckets.
const LATENCY_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A Prometheus histogram with fixed buckets: counts per bucket (not cumulative; rendering
/// accumulates), the sum in microseconds.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BOUNDS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[LATENCY_BOUNDS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Keeps `weft_connections` counting one session while alive.
pub(crate) struct ConnectionGauge<'a>(&'a Metrics);

impl<'a> ConnectionGauge<'a> {
    pub(crate) fn new(metrics: &'a Metrics) -> Self {
        metrics.connections.fetch_add(1, Relaxed);
        metrics.connections_total.fetch_add(1, Relaxed);
        ConnectionGauge(metrics)
    }
}

impl Drop for ConnectionGauge<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub(crate) fn frame_in(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn frame_out(&self, bytes: usize) {
        self.frames_out.fetch_add(1, Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
    }

    /// The Prometheus text exposition, with the document counts read from the replica.
    /// `store` is the store's own counters (`Store::counters`: name, help, value).
    pub fn render(
        &self,
        documents_stored: Option<u64>,
        documents_loaded: usize,
        store: &[(&'static str, &'static str, u64)],
    ) -> String {
        let mut out = String::with_capacity(1024);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        let get = |c: &AtomicU64| c.load(Relaxed);
        metric(
            "weft_connections",
            "gauge",
            "Open WebSocket sessions.",
            get(&self.connections),
        );
        metric(
            "weft_connections_total",
            "counter",
            "WebSocket sessions accepted.",
            get(&self.connections_total),
        );
        metric(
            "weft_connections_refused_total",
            "counter",
            "WebSocket upgrades refused at the connection limit.",
            get(&self.connections_refused),
        );
        metric(
            "weft_frames_in_total",
            "counter",
            "WebSocket messages received.",
            get(&self.frames_in),
        );
        metric(
            "weft_frames_out_total",
            "counter",
            "Protocol frames sent.",
            get(&self.frames_out),
        );
        metric(
            "weft_bytes_in_total",
            "counter",
            "Bytes of WebSocket messages received.",
            get(&self.bytes_in),
        );
        metric(
            "weft_bytes_out_total",
            "counter",
            "Bytes of protocol frames sent.",
            get(&self.bytes_out),
        );
        metric(
            "weft_protocol_errors_total",
            "counter",
            "Connections closed for bad input (malformed, oversized, text, rate, order).",
            get(&self.protocol_errors),
        );
        metric(
            "weft_sessions_refused_total",
            "counter",
            "Hellos refused: missing, forged or expired tokens, collections not granted.",
            get(&self.sessions_refused),
        );
        metric(
            "weft_rate_limited_total",
            "counter",
            "Connections closed for exceeding the frame or byte rate.",
            get(&self.rate_limited),
        );
        if let Some(docs) = documents_stored {
            metric(
                "weft_documents_stored",
                "gauge",
                "Live documents in the relay's replica.",
                docs,
            );
        }
        metric(
            "weft_documents_loaded",
            "gauge",
            "Documents held in memory (the active set; idle ones are unloaded).",
            documents_loaded as u64,
        );
        for (name, help, value) in store {
            metric(name, "counter", help, *value);
        }
        #[cfg(feature = "postgres")]
        {
            let l = &self.listen;
            metric(
                "weft_pg_listen_connected",
                "gauge",
                "1 while the LISTEN connection for other relay nodes' changes is up.",
                get(&l.connected),
            );
            metric(
                "weft_pg_notifications_total",
                "counter",
                "Change notifications received from relay nodes sharing the database.",
                get(&l.notifications),
            );
            metric(
                "weft_pg_polls_total",
                "counter",
                "Reads of the other nodes' change-feed entries prompted by notifications or reconnects.",
                get(&l.polls),
            );
            metric(
                "weft_pg_listen_reconnects_total",
                "counter",
                "Times the LISTEN connection was lost or could not be made.",
                get(&l.reconnects),
            );
        }
        self.sync_latency.render(
            &mut out,
            "weft_sync_latency_seconds",
            "Time from a session frame's arrival to its changes being committed and queued for the other peers.",
        );
        out
    }
}
