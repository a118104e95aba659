//! Counters of what the server refused or cut off, and an optional HTTP endpoint that
//! serves them in the Prometheus text format (`server.metrics_listen`).
//!
//! Why not the `metrics` facade with its Prometheus exporter: that needs one global
//! recorder per process, while tests run many servers in one process and assert on
//! each server's own counters. Here each server owns plain atomics (a relaxed add where
//! a limit is hit, nothing on the normal path), and the endpoint is a small blocking
//! HTTP responder on its own thread: it renders on request and costs nothing between
//! scrapes.

use crate::server::Shared;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        /// Monotonic counters, one per limit or cut-off (see `render` for their names).
        #[derive(Default)]
        pub struct Metrics {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        impl Metrics {
            fn render_counters(&self, out: &mut String) {
                use std::fmt::Write as _;
                $(
                    let _ = writeln!(out, "# HELP mychat_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE mychat_{} counter", stringify!($name));
                    let _ = writeln!(
                        out,
                        "mychat_{} {}",
                        stringify!($name),
                        self.$name.load(Ordering::Relaxed)
                    );
                )*
            }
        }
    };
}

counters! {
    connections_accepted_total: "Connections accepted.",
    connections_refused_max_total: "Connections refused: server.max_connections reached.",
    connections_refused_addr_total: "Connections refused: server.max_connections_per_addr reached for the source address.",
    requests_rate_limited_total: "Requests answered RATE_LIMITED by the per-connection bucket (server.requests_per_sec).",
    sends_rate_limited_total: "SEND_MESSAGE answered RATE_LIMITED by the per-user bucket (messages.sends_per_sec).",
    logins_throttled_total: "LOGIN answered RATE_LIMITED after failed attempts (auth.failed_logins_*).",
    registrations_throttled_total: "REGISTER answered RATE_LIMITED (auth.registrations_per_addr_per_min).",
    typing_rate_limited_total: "TYPING answered RATE_LIMITED (presence.typing_per_sec).",
    frame_errors_total: "Connections closed for a bad or oversized frame.",
    kicks_slow_consumer_total: "Connections closed as slow consumers (outbound bounds).",
    kicks_login_timeout_total: "Connections closed at server.login_timeout_ms.",
    kicks_idle_timeout_total: "Connections closed at server.idle_timeout_ms.",
    kicks_other_total: "Connections closed with another KICK reason (new login elsewhere, logout, shutdown).",
    unavailable_total: "Requests answered UNAVAILABLE (the store's write queue full, or shutting down).",
    internal_total: "Requests answered INTERNAL (a bug: the server log has the details).",
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of the counters and the gauges of `shared`.
    pub fn render(shared: &Shared) -> String {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(4096);
        shared.metrics.render_counters(&mut out);
        let gauges = [
            (
                "connections_open",
                "Connections open now.",
                shared.connections.load(Ordering::Relaxed) as u64,
            ),
            (
                "outbound_queued_bytes",
                "Bytes queued for clients and not yet written, all shards.",
                shared
                    .shards
                    .iter()
                    .map(|s| s.out_bytes.load(Ordering::Relaxed) as u64)
                    .sum(),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP mychat_{name} {help}");
            let _ = writeln!(out, "# TYPE mychat_{name} gauge");
            let _ = writeln!(out, "mychat_{name} {v}");
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until the process ends. One request at a time:
/// a scraper every few seconds is the whole load, and a client that stalls is cut off
/// by the socket timeouts.
pub fn serve(shared: Arc<Shared>, listener: std::net::TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut s) = stream else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let mut req = [0u8; 2048];
        let mut got = 0;
        // Read the request head (we only need its first line).
        while got < req.len() {
            match s.read(&mut req[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got += n;
                    if req[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
        let head = String::from_utf8_lossy(&req[..got]);
        let first = head.lines().next().unwrap_or("");
        let (status, body) = if first.starts_with("GET /metrics ") {
            ("200 OK", Metrics::render(&shared))
        } else {
            ("404 Not Found", "try GET /metrics\n".to_string())
        };
        let _ = write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}
