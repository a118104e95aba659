//! `loadtest`: simulates thousands of MyChat users over the real protocol, verifies
//! every delivery (lost, duplicated, out of order per conversation), and measures
//! throughput, latency (send → delivery, hdrhistogram), logins per second, its own CPU
//! per message and, with `--server-pid`, the server's CPU and memory. With
//! `--baseline nats://HOST:PORT` the same traffic also runs through NATS core pub/sub,
//! for a bare router's figures on the same machine at the same moment.
//!
//! ```text
//! loadtest --server 127.0.0.1:7100 --scenario config/loadtest/smoke.toml [--json]
//!          [--users N] [--rate R] [--window W] [--duration S] [--mode open|closed|none]
//!          [--procs N] [--src-ips N] [--server-pid PID] [--baseline nats://127.0.0.1:4222]
//! ```
//! Code map: `scenario` (the TOML files), `setup` (users and tokens, state file,
//! groups), `wire` (setup requests), `run` (connections, pacing, verification),
//! `metrics` (/proc). Past one process's 20,000 open files, `--procs N` runs N worker
//! processes (each a share of the devices; the parent merges their reports), and
//! `--src-ips N` spreads connections over 127.0.0.2 … 127.0.0.N+1.
//!
//! Source addresses are chosen by default (`--src-ips` unset) for a loopback server:
//! one per 4,096 connections of a process. Linux picks a connecting socket's port by
//! probing the ephemeral range for a free 4-tuple, and with 19,000 connections from
//! one address to one server port most probes hit a used port: connecting took 77 %
//! of the machine's samples (`__inet_check_established`) and held idle-19k to ~4,200
//! logins/s, a figure of the harness, not the server. With five addresses it is gone.

mod metrics;
mod push;
mod run;
mod scenario;
mod setup;
mod verify;
mod wire;

use clap::Parser;
use run::{Partial, Plan, Stats, Target};
use scenario::{Mode, Scenario};
use serde_json::json;
use std::io::{BufRead, IsTerminal, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Clone, Debug)]
#[command(
    name = "loadtest",
    version,
    about = "MyChat load test: simulate users, verify deliveries, measure"
)]
struct Args {
    /// The MyChat server.
    #[arg(long, default_value = "127.0.0.1:7100")]
    server: String,
    /// Scenario file (see config/loadtest/); required unless a subcommand is given.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Append one line per acknowledged message (sender, conversation, seq, server
    /// id, client id; tab-separated) to FILE as acks arrive; `verify` checks them.
    #[arg(long)]
    ack_log: Option<PathBuf>,
    /// Print one final JSON line instead of the table.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    users: Option<usize>,
    #[arg(long)]
    devices: Option<usize>,
    /// Open loop: total messages per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Closed loop: messages in flight.
    #[arg(long)]
    window: Option<usize>,
    /// 1:1 peers per user (0 = any other user).
    #[arg(long)]
    contacts: Option<usize>,
    /// Measured seconds of traffic.
    #[arg(long)]
    duration: Option<u64>,
    /// open, closed or none.
    #[arg(long)]
    mode: Option<String>,
    /// Seconds to hold connections idle after login.
    #[arg(long)]
    idle: Option<u64>,
    /// Worker processes (each holds a share of the connections).
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Loopback source addresses (127.0.0.2 …) to spread connections over; 0 = the
    /// kernel's choice. Unset: one per 4,096 connections of a process when the server
    /// is on loopback, none otherwise.
    #[arg(long)]
    src_ips: Option<usize>,
    /// The server's process id: report its CPU and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also run the traffic through NATS core pub/sub: nats://HOST:PORT.
    #[arg(long)]
    baseline: Option<String>,
    /// Token state file (default .loadtest/<prefix>@<server>.json).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Runtime threads per process.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Connections used to register users and renew tokens.
    #[arg(long, default_value_t = 32)]
    setup_parallel: usize,
    /// Internal: run as worker N of --procs.
    #[arg(long, hide = true)]
    worker: Option<usize>,
    /// Internal: the worker's target (mychat or nats).
    #[arg(long, hide = true, default_value = "mychat")]
    target: String,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(clap::Subcommand, Clone, Debug)]
enum Sub {
    /// Check that every message of an ack log is stored with the same seq and ids.
    Verify {
        /// The ack log written by a run with --ack-log.
        #[arg(long)]
        ack_log: PathBuf,
        /// The senders' password (the scenarios' `password`).
        #[arg(long, default_value = "loadtest-pass")]
        password: String,
        /// One JSON line instead of the table.
        #[arg(long)]
        json: bool,
    },
}

fn scenario_of(a: &Args) -> anyhow::Result<Scenario> {
    let path = a
        .scenario
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("--scenario FILE is required (or a subcommand)"))?;
    let mut s = Scenario::load(path)?;
    if let Some(u) = a.users {
        s.users = u;
    }
    if let Some(d) = a.devices {
        s.devices_per_user = d;
    }
    if let Some(r) = a.rate {
        s.traffic.rate = r;
    }
    if let Some(w) = a.window {
        s.traffic.window = w;
    }
    if let Some(c) = a.contacts {
        s.traffic.contacts = c;
    }
    if let Some(d) = a.duration {
        s.traffic.duration_secs = d;
    }
    if let Some(i) = a.idle {
        s.idle_secs = i;
    }
    if let Some(m) = &a.mode {
        s.traffic.mode = match m.as_str() {
            "open" => Mode::Open,
            "closed" => Mode::Closed,
            "none" => Mode::None,
            other => anyhow::bail!("--mode: open, closed or none, not {other:?}"),
        };
    }
    s.validate()?;
    Ok(s)
}

/// Opens `--ack-log` for appending (several worker processes may share it: each
/// write is one batch of whole lines with O_APPEND).
fn open_ack_log(a: &Args) -> anyhow::Result<Option<parking_lot::Mutex<std::fs::File>>> {
    let Some(p) = &a.ack_log else { return Ok(None) };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| anyhow::anyhow!("--ack-log {}: {e}", p.display()))?;
    Ok(Some(parking_lot::Mutex::new(f)))
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {addr}"))
}

/// Connections per source address when `--src-ips` is unset.
const CONNS_PER_SRC: usize = 4096;

/// The source addresses for `conns` connections of one process to `server`.
fn src_ips(asked: Option<usize>, server: SocketAddr, conns: usize) -> Vec<IpAddr> {
    let n = match asked {
        Some(n) => n,
        None if server.ip().is_loopback() && server.is_ipv4() && conns > CONNS_PER_SRC => {
            conns.div_ceil(CONNS_PER_SRC)
        }
        None => 0,
    };
    (0..n.min(250))
        .map(|i| IpAddr::from([127, 0, 0, 2 + i as u8]))
        .collect()
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    let r = rt.block_on(async {
        if let Some(Sub::Verify {
            ack_log,
            password,
            json,
        }) = &args.command
        {
            verify::run(&args.server, ack_log, password, *json || args.json).await
        } else if let Some(w) = args.worker {
            worker_main(args.clone(), w).await
        } else {
            parent_main(args.clone()).await
        }
    });
    match r {
        Ok(ok) => std::process::exit(if ok { 0 } else { 1 }),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Timings shared by every process of a run (they all follow the same clock).
async fn traffic_phase(
    plan: &Arc<Plan>,
    devices: Vec<run::Device>,
    stats: &Arc<Stats>,
    mut on_window: impl FnMut(bool),
) -> Partial {
    let s = &plan.scenario;
    let t = &s.traffic;
    if s.idle_secs > 0 {
        tokio::time::sleep(Duration::from_secs(s.idle_secs)).await;
    }
    let mut p = Partial::default();
    if t.mode == Mode::None {
        return p;
    }
    let devices = Arc::new(devices);
    let stop = Arc::new(AtomicBool::new(false));
    let pacer = tokio::spawn(run::pace(
        plan.clone(),
        devices.clone(),
        stats.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(t.warmup_secs)).await;
    stats.measuring.store(true, Relaxed);
    on_window(true);
    let cpu0 = run::own_cpu_us();
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(t.duration_secs)).await;
    stats.measuring.store(false, Relaxed);
    on_window(false);
    p.window_secs = w0.elapsed().as_secs_f64();
    p.cpu_us = run::own_cpu_us() - cpu0;
    stop.store(true, Relaxed);
    let _ = pacer.await;
    // Drain: until everything expected arrived (one process) or nothing moved for 2 s.
    let deadline = Instant::now() + Duration::from_secs(t.drain_secs);
    let mut last = (stats.delivered.load(Relaxed), Instant::now());
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let d = stats.delivered.load(Relaxed)
            + stats.duplicated.load(Relaxed)
            + stats.out_of_order.load(Relaxed);
        if plan.procs == 1
            && stats.delivered.load(Relaxed) >= stats.expected.load(Relaxed)
            && stats.sent.load(Relaxed) == stats.acked.load(Relaxed) + error_count(stats)
        {
            break;
        }
        if d != last.0 {
            last = (d, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) && plan.procs > 1 {
            break;
        }
    }
    stats.stopping.store(true, Relaxed);
    // Drained: devices end once their requests are answered (closing them earlier
    // would cut deliveries still on their way).
    drop(devices);
    p
}

fn error_count(stats: &Stats) -> u64 {
    stats
        .errors
        .lock()
        .iter()
        .filter(|(k, _)| !k.starts_with("loadtest"))
        .map(|(_, v)| *v)
        .sum()
}

fn finish(stats: &Stats, mut p: Partial, login_secs: f64) -> Partial {
    p.connections = stats.connections.load(Relaxed);
    p.logins = stats.logins.load(Relaxed);
    p.login_secs = login_secs;
    p.sent = stats.sent.load(Relaxed);
    p.acked = stats.acked.load(Relaxed);
    p.expected = stats.expected.load(Relaxed);
    p.delivered = stats.delivered.load(Relaxed);
    p.duplicated = stats.duplicated.load(Relaxed);
    p.out_of_order = stats.out_of_order.load(Relaxed);
    p.acked_window = stats.acked_window.load(Relaxed);
    p.delivered_window = stats.delivered_window.load(Relaxed);
    p.errors = stats.errors.lock().clone();
    p.kicks = stats.kicks.lock().clone();
    p.disconnects = stats.disconnects.lock().clone();
    p.reconnects = stats.reconnects.load(Relaxed);
    p.synced = stats.synced.load(Relaxed);
    p.stalls = stats.stalls.load(Relaxed);
    p.hist = run::hist_encode(stats.hist.lock().as_ref().unwrap());
    p
}

/// Live progress on a terminal: connections, sent/s, delivered/s, rolling p99.
fn progress(stats: Arc<Stats>) -> Option<tokio::task::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new_spinner();
        let (mut s0, mut d0) = (0, 0);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (s1, d1) = (stats.sent.load(Relaxed), stats.delivered.load(Relaxed));
            let p99 = {
                let mut r = stats.rolling.lock();
                let h = r.as_mut().unwrap();
                let v = h.value_at_quantile(0.99);
                h.reset();
                v
            };
            bar.set_message(format!(
                "conns {}  sent/s {}  delivered/s {}  p99 {:.2} ms",
                stats.connections.load(Relaxed),
                s1 - s0,
                d1 - d0,
                p99 as f64 / 1000.0
            ));
            bar.tick();
            (s0, d0) = (s1, d1);
        }
    }))
}

async fn worker_main(args: Args, w: usize) -> anyhow::Result<bool> {
    let s = scenario_of(&args)?;
    let addr = resolve(&args.server)?;
    let path = args
        .state
        .clone()
        .ok_or_else(|| anyhow::anyhow!("workers need --state"))?;
    let state = Arc::new(setup::load(&path));
    let target = if args.target == "nats" {
        Target::Nats(addr)
    } else {
        Target::MyChat(addr)
    };
    let conns = (s.users * s.devices_per_user).div_ceil(args.procs.max(1));
    let plan = Arc::new(Plan {
        src_ips: src_ips(args.src_ips, addr, conns),
        scenario: s,
        target,
        worker: w,
        procs: args.procs,
        state,
        ack_log: open_ack_log(&args)?,
    });
    let stats = Arc::new(Stats::new());
    let t0 = Instant::now();
    let devices = run::connect_all(&plan, &stats, run::rng_u64()).await?;
    let login_secs = t0.elapsed().as_secs_f64();
    println!("READY");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let p = traffic_phase(&plan, devices, &stats, |_| {}).await;
    let p = finish(&stats, p, login_secs);
    println!("{}", serde_json::to_string(&p)?);
    Ok(true)
}

/// The merged result of all processes of one run.
struct Outcome {
    partial: Partial,
    login_secs: f64,
    server: Option<serde_json::Value>,
}

/// `rss_empty`: the server's RSS before this run touched it (for RSS per connection).
async fn run_all(
    args: &Args,
    s: &Scenario,
    target: &str,
    addr: SocketAddr,
    state_path: &PathBuf,
    state: Arc<setup::State>,
    rss_empty: Option<u64>,
) -> anyhow::Result<Outcome> {
    let pid = if target == "mychat" {
        args.server_pid
    } else {
        None
    };
    let rss_before = rss_empty;
    let watch = pid.map(metrics::RssWatch::start);
    let cpu_at = Arc::new(parking_lot::Mutex::new((
        None::<u64>,
        None::<u64>,
        Instant::now(),
        0.0f64,
    )));
    let mark = {
        let cpu_at = cpu_at.clone();
        move |start: bool| {
            let mut c = cpu_at.lock();
            if start {
                c.0 = pid.and_then(metrics::cpu_us);
                c.2 = Instant::now();
            } else {
                c.1 = pid.and_then(metrics::cpu_us);
                c.3 = c.2.elapsed().as_secs_f64();
            }
        }
    };
    let rss_connected;
    let (partial, login_secs) = if args.procs <= 1 {
        let t = if target == "nats" {
            Target::Nats(addr)
        } else {
            Target::MyChat(addr)
        };
        let plan = Arc::new(Plan {
            scenario: s.clone(),
            target: t,
            src_ips: src_ips(args.src_ips, addr, s.users * s.devices_per_user),
            worker: 0,
            procs: 1,
            state,
            ack_log: if target == "mychat" {
                open_ack_log(args)?
            } else {
                None
            },
        });
        let stats = Arc::new(Stats::new());
        let bar = if args.json {
            None
        } else {
            progress(stats.clone())
        };
        let t0 = Instant::now();
        let devices = run::connect_all(&plan, &stats, run::rng_u64()).await?;
        let login_secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_connected = pid.and_then(metrics::rss_kb);
        let p = traffic_phase(&plan, devices, &stats, mark).await;
        if let Some(b) = bar {
            b.abort();
        }
        (finish(&stats, p, login_secs), login_secs)
    } else {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for w in 0..args.procs {
            let mut c = tokio::process::Command::new(&exe);
            c.arg("--server")
                .arg(&args.server)
                .arg("--scenario")
                .arg(args.scenario.as_ref().expect("checked by scenario_of"))
                .arg("--state")
                .arg(state_path);
            c.arg("--procs")
                .arg(args.procs.to_string())
                .arg("--worker")
                .arg(w.to_string())
                .arg("--target")
                .arg(target);
            if let Some(n) = args.src_ips {
                c.arg("--src-ips").arg(n.to_string());
            }
            c.arg("--threads").arg(args.threads.to_string());
            if let Some(p) = &args.ack_log {
                c.arg("--ack-log").arg(p);
            }
            for (flag, v) in [
                ("--users", args.users.map(|v| v.to_string())),
                ("--devices", args.devices.map(|v| v.to_string())),
                ("--rate", args.rate.map(|v| v.to_string())),
                ("--window", args.window.map(|v| v.to_string())),
                ("--contacts", args.contacts.map(|v| v.to_string())),
                ("--duration", args.duration.map(|v| v.to_string())),
                ("--mode", args.mode.clone()),
                ("--idle", args.idle.map(|v| v.to_string())),
            ] {
                if let Some(v) = v {
                    c.arg(flag).arg(v);
                }
            }
            c.stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true);
            children.push(c.spawn()?);
        }
        let t0 = Instant::now();
        let mut lines = Vec::new();
        for ch in children.iter_mut() {
            let out = ch.stdout.take().unwrap();
            let mut r = tokio::io::BufReader::new(out);
            let mut l = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut r, &mut l).await?;
            anyhow::ensure!(l.trim() == "READY", "a worker failed before it was ready");
            lines.push(r);
        }
        let login_secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_connected = pid.and_then(metrics::rss_kb);
        for ch in children.iter_mut() {
            use tokio::io::AsyncWriteExt;
            ch.stdin.as_mut().unwrap().write_all(b"GO\n").await?;
        }
        // The parent keeps the same clock as the workers for the server's window.
        let t = &s.traffic;
        if t.mode != Mode::None {
            tokio::time::sleep(Duration::from_secs(s.idle_secs + t.warmup_secs)).await;
            mark(true);
            tokio::time::sleep(Duration::from_secs(t.duration_secs)).await;
            mark(false);
        }
        let mut merged = Partial::default();
        let mut hist: Option<hdrhistogram::Histogram<u64>> = None;
        for mut r in lines {
            let mut l = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut r, &mut l).await?;
            let p: Partial = serde_json::from_str(l.trim())
                .map_err(|e| anyhow::anyhow!("a worker's report: {e}"))?;
            merge(&mut merged, &p);
            if let Some(h) = run::hist_decode(&p.hist) {
                match hist.as_mut() {
                    Some(acc) => acc.add(&h).map_err(|e| anyhow::anyhow!("{e:?}"))?,
                    None => hist = Some(h),
                }
            }
        }
        for mut ch in children {
            let _ = ch.wait().await;
        }
        merged.hist = hist.map(|h| run::hist_encode(&h)).unwrap_or_default();
        (merged, login_secs)
    };
    let server = pid.map(|pid| {
        let c = cpu_at.lock();
        let cpu = match (c.0, c.1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let rss_max = watch.as_ref().map(|w| w.max_kb.load(Relaxed)).unwrap_or(0);
        let mut v = json!({ "rss_kb_max": rss_max });
        if let Some(cpu) = cpu {
            v["cpu_pct"] = json!(cpu as f64 / 1e6 / c.3.max(1e-9) * 100.0);
            v["cpu_us_per_msg"] = json!(if partial.acked_window > 0 {
                cpu as f64 / partial.acked_window as f64
            } else {
                0.0
            });
        }
        if let (Some(b), Some(a)) = (rss_before, rss_connected) {
            if partial.connections > 0 {
                v["rss_bytes_per_conn"] =
                    json!(a.saturating_sub(b) as f64 * 1024.0 / partial.connections as f64);
                v["rss_kb_before"] = json!(b);
                v["rss_kb_connected"] = json!(a);
            }
        }
        let _ = pid;
        v
    });
    drop(watch);
    Ok(Outcome {
        partial,
        login_secs,
        server,
    })
}

fn merge(acc: &mut Partial, p: &Partial) {
    acc.connections += p.connections;
    acc.logins += p.logins;
    acc.login_secs = acc.login_secs.max(p.login_secs);
    acc.sent += p.sent;
    acc.acked += p.acked;
    acc.expected += p.expected;
    acc.delivered += p.delivered;
    acc.duplicated += p.duplicated;
    acc.out_of_order += p.out_of_order;
    acc.acked_window += p.acked_window;
    acc.delivered_window += p.delivered_window;
    acc.window_secs = acc.window_secs.max(p.window_secs);
    acc.cpu_us += p.cpu_us;
    for (k, v) in &p.errors {
        *acc.errors.entry(k.clone()).or_default() += v;
    }
    for (k, v) in &p.kicks {
        *acc.kicks.entry(k.clone()).or_default() += v;
    }
    for (k, v) in &p.disconnects {
        *acc.disconnects.entry(k.clone()).or_default() += v;
    }
    acc.reconnects += p.reconnects;
    acc.synced += p.synced;
    acc.stalls += p.stalls;
}

fn summary(s: &Scenario, o: &Outcome) -> serde_json::Value {
    let p = &o.partial;
    let h = run::hist_decode(&p.hist).unwrap_or_else(|| hdrhistogram::Histogram::new(3).unwrap());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let lost = p.expected.saturating_sub(p.delivered);
    let w = p.window_secs.max(1e-9);
    let mut v = json!({
        "scenario": s.name,
        "connections": p.connections,
        "sent": p.sent,
        "acked": p.acked,
        "expected": p.expected,
        "delivered": p.delivered,
        "lost": lost,
        "duplicated": p.duplicated,
        "out_of_order": p.out_of_order,
        "msgs_per_sec": p.acked_window as f64 / w,
        "deliveries_per_sec": p.delivered_window as f64 / w,
        "latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0 },
        "login_per_sec": if o.login_secs > 0.0 { p.logins as f64 / o.login_secs } else { 0.0 },
        "errors": p.errors,
        "loadtest_cpu_us_per_msg": if p.acked_window > 0 { p.cpu_us as f64 / p.acked_window as f64 } else { 0.0 },
    });
    if s.faults.reconnect {
        v["faults"] = json!({
            "stalled_devices": p.stalls,
            "kicked": p.kicks,
            "disconnected": p.disconnects,
            "reconnects": p.reconnects,
            "synced": p.synced,
        });
    }
    if let Some(srv) = &o.server {
        v["server"] = srv.clone();
    }
    v
}

fn passed(s: &Scenario, v: &serde_json::Value) -> bool {
    let real_errors: u64 = v["errors"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.starts_with("loadtest"))
                .map(|(_, n)| n.as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    (v["lost"] == 0 || !s.faults.check_deliveries)
        && v["duplicated"] == 0
        && v["out_of_order"] == 0
        && real_errors == 0
}

fn table(v: &serde_json::Value) -> String {
    let l = &v["latency_ms"];
    let mut t = format!(
        "scenario {}\n  connections   {}\n  sent/acked    {} / {}\n  delivered     {} of {} expected\n  lost {}  duplicated {}  out of order {}\n  msgs/s        {:.0}   deliveries/s {:.0}\n  latency ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}\n  logins/s      {:.0}\n  loadtest CPU  {:.1} us/msg\n  errors        {}\n",
        v["scenario"].as_str().unwrap_or(""),
        v["connections"], v["sent"], v["acked"], v["delivered"], v["expected"], v["lost"], v["duplicated"], v["out_of_order"],
        v["msgs_per_sec"].as_f64().unwrap_or(0.0), v["deliveries_per_sec"].as_f64().unwrap_or(0.0),
        l["p50"].as_f64().unwrap_or(0.0), l["p90"].as_f64().unwrap_or(0.0), l["p99"].as_f64().unwrap_or(0.0), l["p999"].as_f64().unwrap_or(0.0), l["max"].as_f64().unwrap_or(0.0),
        v["login_per_sec"].as_f64().unwrap_or(0.0), v["loadtest_cpu_us_per_msg"].as_f64().unwrap_or(0.0), v["errors"],
    );
    if let Some(f) = v.get("faults") {
        t.push_str(&format!("  faults        {f}\n"));
    }
    if let Some(s) = v.get("server") {
        t.push_str(&format!("  server        {s}\n"));
    }
    t
}

async fn parent_main(args: Args) -> anyhow::Result<bool> {
    let s = scenario_of(&args)?;
    let addr = resolve(&args.server)?;
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| setup::default_path(&s, &args.server));
    let t = &s.traffic;
    let run_ms =
        ((s.idle_secs + t.warmup_secs + t.duration_secs + t.drain_secs) * 1000 + 600_000) as i64;
    let rss_empty = args.server_pid.and_then(metrics::rss_kb);
    let t0 = Instant::now();
    let mut state = setup::prepare(addr, &s, &state_path, run_ms, args.setup_parallel).await?;
    setup::create_groups(addr, &s, &mut state).await?;
    setup::save(&state_path, &state)?;
    let setup_secs = t0.elapsed().as_secs_f64();
    if !args.json {
        eprintln!(
            "loadtest: {} users ready in {:.1} s (state {})",
            s.users,
            t0.elapsed().as_secs_f64(),
            state_path.display()
        );
    }
    let state = Arc::new(state);
    let o = run_all(
        &args,
        &s,
        "mychat",
        addr,
        &state_path,
        state.clone(),
        rss_empty,
    )
    .await?;
    let mut v = summary(&s, &o);
    // Users registered (first run) or token-checked, and the run's groups created.
    v["setup_secs"] = json!(setup_secs);
    let ok = passed(&s, &v);
    if let Some(b) = &args.baseline {
        let nats = resolve(b.strip_prefix("nats://").unwrap_or(b))?;
        let ob = run_all(&args, &s, "nats", nats, &state_path, state, None).await?;
        let mut bv = summary(&s, &ob);
        bv["target"] = json!(b);
        v["baseline"] = bv;
    }
    if args.json {
        println!("{v}");
    } else {
        print!("{}", table(&v));
        if let Some(b) = v.get("baseline") {
            print!("baseline (NATS)\n{}", table(b));
        }
        println!(
            "{}",
            if ok {
                "PASS: nothing lost, duplicated or out of order"
            } else {
                "FAIL"
            }
        );
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unset, a loopback server gets one source address per 4,096 connections of a
    /// process; other servers, and an explicit count, get exactly what was asked.
    #[test]
    fn source_addresses_follow_the_connection_count() {
        let lo: SocketAddr = "127.0.0.1:7100".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:7100".parse().unwrap();
        let ips = src_ips(None, lo, 19_000);
        assert_eq!(
            ips,
            (2..=6u8)
                .map(|i| IpAddr::from([127, 0, 0, i]))
                .collect::<Vec<_>>()
        );
        assert!(src_ips(None, lo, 4096).is_empty());
        assert_eq!(src_ips(None, lo, 4097).len(), 2);
        assert!(src_ips(None, remote, 19_000).is_empty());
        assert!(src_ips(Some(0), lo, 19_000).is_empty());
        assert_eq!(src_ips(Some(3), remote, 10).len(), 3);
    }
}
