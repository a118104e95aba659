//! `loadtest verify --ack-log FILE`: checks that every acknowledged message in an ack
//! log (written by a run with `--ack-log`) is stored on the server with the same seq,
//! server id and client id. It logs in as each sender (password login, a device of its
//! own), pages each logged conversation's history, and compares. Exit status 0 when all
//! are found; 1 naming what is missing.

use mychat_client::proto as pb;
use mychat_client::Client;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// One line of the ack log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub sender: String,
    pub conversation: u64,
    pub seq: u64,
    pub message_id: u64,
    pub client_msg_id: String,
}

impl Ack {
    /// `sender \t conversation \t seq \t message_id \t client_msg_id`.
    pub fn parse(line: &str) -> Option<Ack> {
        let mut f = line.split('\t');
        let a = Ack {
            sender: f.next()?.to_string(),
            conversation: f.next()?.parse().ok()?,
            seq: f.next()?.parse().ok()?,
            message_id: f.next()?.parse().ok()?,
            client_msg_id: f.next()?.to_string(),
        };
        if f.next().is_some() || a.sender.is_empty() {
            return None;
        }
        Some(a)
    }
}

/// Reads an ack log. A torn last line (the writer died mid-line) is skipped and
/// counted; any other bad line is an error.
pub fn read_log(path: &Path) -> anyhow::Result<(Vec<Ack>, usize)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--ack-log {}: {e}", path.display()))?;
    let mut acks = Vec::new();
    let mut torn = 0;
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        match Ack::parse(line) {
            Some(a) => acks.push(a),
            None if i == lines.len() - 1 => torn += 1,
            None => anyhow::bail!("{}:{}: not an ack line: {line:?}", path.display(), i + 1),
        }
    }
    Ok((acks, torn))
}

/// What one sender's check found.
#[derive(Default)]
struct Found {
    checked: usize,
    missing: Vec<String>,
    error: Option<String>,
}

async fn check_sender(addr: String, sender: String, password: String, acks: Vec<Ack>) -> Found {
    let mut out = Found::default();
    let r: anyhow::Result<()> = async {
        let c = Client::connect(&addr).await?;
        c.login_password(&sender, &password, "loadtest-verify", pb::Platform::Web)
            .await?;
        let mut by_conv: BTreeMap<u64, Vec<&Ack>> = BTreeMap::new();
        for a in &acks {
            by_conv.entry(a.conversation).or_default().push(a);
        }
        for (conv, want) in by_conv {
            let low = want.iter().map(|a| a.seq).min().unwrap_or(1);
            // seq → (server id, client id), newest pages first down to the lowest logged.
            let mut stored: HashMap<u64, (u64, String)> = HashMap::new();
            let mut before = 0;
            loop {
                let h = c
                    .history(pb::HistoryRequest {
                        conversation_id: conv,
                        before_seq: before,
                        limit: 200,
                        ..Default::default()
                    })
                    .await?;
                for m in &h.messages {
                    stored.insert(m.seq, (m.id, m.client_msg_id.clone()));
                }
                let Some(first) = h.messages.first() else { break };
                if !h.has_more || first.seq <= low {
                    break;
                }
                before = first.seq;
            }
            for a in want {
                out.checked += 1;
                match stored.get(&a.seq) {
                    Some((id, cid)) if *id == a.message_id && *cid == a.client_msg_id => {}
                    Some((id, cid)) => out.missing.push(format!(
                        "{sender} conversation {conv} seq {}: logged id {} client {}, stored id {id} client {cid}",
                        a.seq, a.message_id, a.client_msg_id
                    )),
                    None => out.missing.push(format!(
                        "{sender} conversation {conv} seq {} (id {}, client {}): not stored",
                        a.seq, a.message_id, a.client_msg_id
                    )),
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        out.error = Some(format!("{sender}: {e}"));
    }
    out
}

/// Runs the check; prints a table or one JSON line; Ok(true) when every ack is found.
pub async fn run(addr: &str, log: &Path, password: &str, json_out: bool) -> anyhow::Result<bool> {
    let (acks, torn) = read_log(log)?;
    let mut by_sender: BTreeMap<String, Vec<Ack>> = BTreeMap::new();
    for a in acks.iter() {
        by_sender
            .entry(a.sender.clone())
            .or_default()
            .push(a.clone());
    }
    let senders = by_sender.len();
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for (sender, list) in by_sender {
        let permit = gate.clone().acquire_owned().await?;
        let (addr, password) = (addr.to_string(), password.to_string());
        tasks.push(tokio::spawn(async move {
            let f = check_sender(addr, sender, password, list).await;
            drop(permit);
            f
        }));
    }
    let (mut checked, mut missing, mut errors) = (0usize, Vec::new(), Vec::new());
    for t in tasks {
        let f = t.await?;
        checked += f.checked;
        missing.extend(f.missing);
        errors.extend(f.error);
    }
    let ok = missing.is_empty() && errors.is_empty() && checked == acks.len();
    if json_out {
        println!(
            "{}",
            json!({
                "acks": acks.len(),
                "senders": senders,
                "checked": checked,
                "found": checked - missing.len(),
                "missing": missing.len(),
                "torn_lines": torn,
                "errors": errors,
                "missing_examples": missing.iter().take(20).collect::<Vec<_>>(),
                "ok": ok,
            })
        );
    } else {
        println!(
            "verify {}\n  acks {}  senders {}  checked {}  missing {}  torn lines {}",
            log.display(),
            acks.len(),
            senders,
            checked,
            missing.len(),
            torn
        );
        for e in &errors {
            println!("  error: {e}");
        }
    }
    for m in missing.iter().take(50) {
        eprintln!("missing: {m}");
    }
    if missing.len() > 50 {
        eprintln!("… and {} more missing", missing.len() - 50);
    }
    if !json_out {
        println!(
            "{}",
            if ok {
                "PASS: every acknowledged message is stored"
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

    #[test]
    fn ack_lines_parse_and_torn_tail_is_skipped() {
        let a = Ack::parse("lt1\t7\t3\t99\tabc-1").unwrap();
        assert_eq!(
            a,
            Ack {
                sender: "lt1".into(),
                conversation: 7,
                seq: 3,
                message_id: 99,
                client_msg_id: "abc-1".into()
            }
        );
        assert!(Ack::parse("lt1\t7\t3").is_none());
        assert!(Ack::parse("lt1\tx\t3\t99\tc").is_none());
        let dir = std::env::temp_dir().join(format!("ackt-{}", std::process::id()));
        std::fs::write(&dir, "lt1\t7\t3\t99\tc1\nlt2\t8\t1\t100\tc2\nlt3\t9\t").unwrap();
        let (acks, torn) = read_log(&dir).unwrap();
        assert_eq!((acks.len(), torn), (2, 1));
        std::fs::write(&dir, "garbage\nlt2\t8\t1\t100\tc2\n").unwrap();
        assert!(read_log(&dir).is_err());
        let _ = std::fs::remove_file(&dir);
    }
}
