//! `mychat-cli` as a user runs it, against a real server on 127.0.0.1:0: register,
//! send, recv (live on two devices, then offline catch-up), history, conversations,
//! and a failure's exit code and stderr.
#[path = "../../tests/common/pki.rs"]
mod pki;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

struct Env {
    addr: String,
    home: tempfile::TempDir,
    _server: mychat::ServerHandle,
    _data: tempfile::TempDir,
}

fn server() -> Env {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = mychat_config::Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.data_dir = data.path().to_path_buf();
    cfg.server.shards = 2;
    cfg.auth.argon2_m_cost_kib = 64;
    cfg.auth.argon2_t_cost = 1;
    let h = mychat::start(cfg).unwrap();
    Env {
        addr: h.local_addr().to_string(),
        home: tempfile::tempdir().unwrap(),
        _server: h,
        _data: data,
    }
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mychat-cli"));
        c.env("MYCHAT_CLI_HOME", self.home.path())
            .arg("--server")
            .arg(&self.addr)
            .args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn the_tour() {
    let e = server();
    assert!(e
        .ok(&["register", "alice", "alice-secret"])
        .contains("registered alice"));
    e.ok(&["register", "bob", "bob-secret"]);
    // A refusal: exit 1, the error's name and message on stderr.
    let o = e.run(&["register", "alice", "alice-secret"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("CONFLICT (8): username is taken"));
    let o = e.run(&[
        "--user",
        "bob",
        "--password",
        "wrong-pass",
        "recv",
        "--wait",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("INVALID_CREDENTIALS"));

    // Bob listens on desktop and mobile; alice sends; both print it live.
    let bob = ["--user", "bob", "--password", "bob-secret"];
    let spawn_recv = |platform: &str| {
        e.cmd(
            &[
                &bob[..],
                &["--platform", platform, "recv", "--wait", "3", "--json"],
            ]
            .concat(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let d1 = spawn_recv("desktop");
    let d2 = spawn_recv("mobile");
    std::thread::sleep(Duration::from_millis(1000));
    let sent = e.ok(&[
        "--user",
        "alice",
        "--password",
        "alice-secret",
        "send",
        "bob",
        "hello bob",
    ]);
    assert!(sent.contains("seq 1"), "{sent}");
    for child in [d1, d2] {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let lines = json_lines(&String::from_utf8(o.stdout).unwrap());
        assert_eq!(lines.len(), 1, "{lines:?}");
        let m = &lines[0];
        assert_eq!(
            (
                m["from"].as_str(),
                m["to"].as_str(),
                m["text"].as_str(),
                m["seq"].as_u64()
            ),
            (Some("alice"), Some("bob"), Some("hello bob"), Some(1))
        );
        assert!(
            m["id"].as_u64().is_some()
                && m["conversation"].as_u64().is_some()
                && m["time"].as_i64().is_some()
        );
    }
    // Offline: the next recv of the same device prints only what it missed.
    e.ok(&[
        "--user",
        "alice",
        "--password",
        "alice-secret",
        "send",
        "bob",
        "while you were away",
    ]);
    let out = e.ok(&[&bob[..], &["recv", "--wait", "1", "--json"]].concat());
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["text"], "while you were away");
    assert_eq!(lines[0]["seq"], 2);
    // And nothing the time after.
    assert_eq!(
        e.ok(&[&bob[..], &["recv", "--wait", "1", "--json"]].concat()),
        ""
    );
    // History shows both.
    let h = json_lines(&e.ok(&[&bob[..], &["history", "alice", "--json"]].concat()));
    let texts: Vec<&str> = h.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["hello bob", "while you were away"]);
    let h =
        json_lines(&e.ok(&[&bob[..], &["history", "alice", "--limit", "1", "--json"]].concat()));
    assert_eq!(h.len(), 1);
    let c = json_lines(&e.ok(&[&bob[..], &["conversations", "--json"]].concat()));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0]["peer"], "alice");
    assert_eq!(c[0]["last_seq"], 2);
    // An unknown peer.
    let o = e.run(&[
        "--user",
        "alice",
        "--password",
        "alice-secret",
        "send",
        "nobody",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NOT_FOUND"));
    // The device id is kept per user and platform.
    let d = e.home.path().join("devices");
    let desktop = std::fs::read_to_string(d.join("bob@desktop")).unwrap();
    let mobile = std::fs::read_to_string(d.join("bob@mobile")).unwrap();
    assert!(desktop.starts_with("cli-desktop-") && mobile.starts_with("cli-mobile-"));
}

#[test]
fn chat_sends_lines_and_prints_replies() {
    let e = server();
    e.ok(&["register", "alice", "alice-secret"]);
    e.ok(&["register", "bob", "bob-secret"]);
    let mut chat = e
        .cmd(&[
            "--user",
            "alice",
            "--password",
            "alice-secret",
            "chat",
            "bob",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = chat.stdin.as_mut().unwrap();
        stdin.write_all(b"first line\nsecond line\n").unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    e.ok(&[
        "--user",
        "bob",
        "--password",
        "bob-secret",
        "--platform",
        "mobile",
        "send",
        "alice",
        "reply",
    ]);
    std::thread::sleep(Duration::from_millis(1000));
    drop(chat.stdin.take()); // Ctrl-D
    let o = chat.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("bob -> alice: reply"), "{out}");
    let h = json_lines(&e.ok(&[
        "--user",
        "bob",
        "--password",
        "bob-secret",
        "history",
        "alice",
        "--json",
    ]));
    let texts: Vec<&str> = h.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["first line", "second line", "reply"]);
}

#[test]
fn social_tour() {
    let e = server();
    for (u, p) in [
        ("alice", "alice-secret"),
        ("bob", "bob-secret"),
        ("carol", "carol-secret"),
        ("dave", "dave-secret"),
    ] {
        e.ok(&["register", u, p]);
    }
    let alice = ["--user", "alice", "--password", "alice-secret"];
    let bob = ["--user", "bob", "--password", "bob-secret"];
    let carol = ["--user", "carol", "--password", "carol-secret"];
    let dave = ["--user", "dave", "--password", "dave-secret"];
    let run = |who: &[&str], args: &[&str]| e.ok(&[who, args].concat());
    // alice and bob become friends.
    assert!(
        run(&alice, &["friend", "add", "bob", "--message", "hi bob"])
            .contains("friend request sent")
    );
    let reqs = json_lines(&run(&bob, &["friend", "requests", "--json"]));
    assert_eq!(
        (
            reqs[0]["user"].as_str(),
            reqs[0]["message"].as_str(),
            reqs[0]["incoming"].as_bool()
        ),
        (Some("alice"), Some("hi bob"), Some(true))
    );
    run(&bob, &["friend", "accept", "alice"]);
    let friends = json_lines(&run(&alice, &["friends", "--json"]));
    assert_eq!(friends.len(), 1);
    assert_eq!(friends[0]["username"], "bob");
    // A group of three.
    let created = json_lines(&run(
        &alice,
        &["group", "create", "trio", "bob", "carol", "--json"],
    ));
    let gid = created[0]["group_id"].as_u64().unwrap();
    assert_eq!(created[0]["members"], 3);
    let plain = run(&alice, &["group", "create", "other", "bob"]);
    assert!(plain.starts_with("group_id "), "{plain}");
    let members = json_lines(&run(
        &bob,
        &["group", "members", &gid.to_string(), "--json"],
    ));
    assert_eq!(
        members
            .iter()
            .map(|m| m["user"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["alice", "bob", "carol"]
    );
    assert_eq!(members[0]["role"], "OWNER");
    // carol catches up with everything so far, then goes offline.
    run(&carol, &["recv", "--wait", "1", "--json"]);
    // bob is online and gets the group message live.
    let live = e
        .cmd(&[&bob[..], &["recv", "--wait", "3", "--json"]].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    run(&alice, &["group", "send", &gid.to_string(), "hello trio"]);
    let o = live.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = json_lines(&String::from_utf8(o.stdout).unwrap());
    let m = got
        .iter()
        .find(|m| m["text"] == "hello trio")
        .expect("the group message, live");
    assert_eq!(
        (m["group"].as_u64(), m["from"].as_str()),
        (Some(gid), Some("alice"))
    );
    assert!(m["to"].is_null());
    // carol was offline: her next recv brings it, and only it.
    let later = json_lines(&run(&carol, &["recv", "--wait", "1", "--json"]));
    let texts: Vec<&str> = later.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["hello trio"]);
    assert_eq!(later[0]["group"].as_u64(), Some(gid));
    assert_eq!(run(&carol, &["recv", "--wait", "1", "--json"]), "");
    // System messages carry their kind.
    let hist = json_lines(&run(
        &carol,
        &["group", "history", &gid.to_string(), "--json"],
    ));
    assert_eq!(hist[0]["kind"], "SYSTEM");
    // A non-member's group send is refused.
    let o = e.run(&[&dave[..], &["group", "send", &gid.to_string(), "let me in"]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("FORBIDDEN"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A blocked user's message is refused.
    let b = json_lines(&run(&bob, &["block", "dave", "--json"]));
    assert_eq!(
        (b[0]["user"].as_str(), b[0]["blocked"].as_bool()),
        (Some("dave"), Some(true))
    );
    let o = e.run(&[&dave[..], &["send", "bob", "hello?"]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("FORBIDDEN"));
    run(&bob, &["unblock", "dave"]);
    run(&dave, &["send", "bob", "hello again"]);
    // Mute, kick, leave, recall, presence.
    run(&alice, &["group", "mute", &gid.to_string(), "carol", "60"]);
    let o = e.run(&[&carol[..], &["group", "send", &gid.to_string(), "muted?"]].concat());
    assert!(String::from_utf8_lossy(&o.stderr).contains("muted in this group until"));
    run(&alice, &["group", "invite", &gid.to_string(), "dave"]);
    run(&alice, &["group", "kick", &gid.to_string(), "dave"]);
    run(&bob, &["group", "leave", &gid.to_string()]);
    let sent = json_lines(&run(&alice, &["send", "bob", "take this back", "--json"]));
    let id = sent[0]["id"].as_u64().unwrap().to_string();
    assert!(run(&alice, &["recall", &id]).contains("recalled"));
    let h = json_lines(&run(&bob, &["history", "alice", "--json"]));
    assert!(h.iter().any(|m| m["recalled"] == true));
    let p = json_lines(&run(&alice, &["presence", "bob", "--json"]));
    assert_eq!(p[0]["status"], "offline");
    assert!(p[0]["last_seen"].as_i64().unwrap() > 0);
    run(&alice, &["friend", "remove", "bob"]);
    assert_eq!(run(&alice, &["friends", "--json"]), "");
}

/// `--tls --ca-file`: the CLI talks to the server's TLS listener (a CA and a server
/// certificate generated here); without the CA it fails with a TLS error.
#[test]
fn cli_over_tls() {
    let pki = pki::Pki::new();
    let p = |f: &str| pki.path(f);
    let data = tempfile::tempdir().unwrap();
    let mut cfg = mychat_config::Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.data_dir = data.path().to_path_buf();
    cfg.auth.argon2_m_cost_kib = 64;
    cfg.auth.argon2_t_cost = 1;
    cfg.tls.listen = "127.0.0.1:0".into();
    cfg.tls.cert_file = p("cert.pem");
    cfg.tls.key_file = p("key.pem");
    let h = mychat::start(cfg).unwrap();
    let env = Env {
        addr: h.tls_addr().unwrap().to_string(),
        home: tempfile::tempdir().unwrap(),
        _server: h,
        _data: data,
    };
    let ca_file = p("ca.pem");
    let ca_file = ca_file.to_str().unwrap();
    let tls = ["--tls", "--ca-file", ca_file, "--tls-name", "localhost"];
    let reg = |u: &str| {
        let mut a = tls.to_vec();
        a.extend(["--json", "register", u, "password-x"]);
        env.ok(&a)
    };
    reg("tina");
    reg("tom");
    let mut a = tls.to_vec();
    a.extend([
        "--user",
        "tina",
        "--password",
        "password-x",
        "send",
        "tom",
        "over tls",
    ]);
    env.ok(&a);
    let mut a = tls.to_vec();
    a.extend([
        "--json",
        "--user",
        "tom",
        "--password",
        "password-x",
        "history",
        "tina",
    ]);
    let out = env.ok(&a);
    assert!(out.contains("over tls"), "{out}");
    // Without the CA (the system bundle does not know it): refused, exit code != 0.
    let o = env.run(&[
        "--tls",
        "--tls-name",
        "localhost",
        "register",
        "xavier",
        "password-x",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tls"), "{err}");
}
