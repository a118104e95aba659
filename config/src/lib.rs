//! MyChat server configuration: one TOML file, every key optional with a documented
//! default (`config/mychat.toml` lists them all), every key overridable from the
//! environment as `MYCHAT__SECTION__KEY` (for example
//! `MYCHAT__SERVER__LOGIN_TIMEOUT_MS=2000`). An unknown section or key, a value of the
//! wrong type or out of range stops the start with an error naming the key.
//!
//! Flow: file text → `toml::Table` → environment overrides applied to the table →
//! typed [`Config`] (serde, `deny_unknown_fields`) → [`Config::validate`].

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why a configuration was refused. The message always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

/// How many sessions a user may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiDevice {
    /// One session per (user, platform): a new login on the same platform kicks the
    /// older one (QQ's rule). The default.
    PerPlatform,
    /// One session per user: any new login kicks the older one.
    Single,
    /// Any number of sessions, up to `auth.max_sessions_per_user` (the oldest is kicked).
    Multi,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub shards: usize,
    pub max_frame_len: u32,
    pub max_connections: usize,
    pub login_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub outbound_buffer_bytes: usize,
    pub max_inflight_per_conn: usize,
    pub shard_queue_depth: usize,
    pub shutdown_deadline_ms: u64,
    pub blocking_threads: usize,
    pub listen_backlog: u32,
    pub max_connections_per_addr: usize,
    pub outbound_total_bytes: usize,
    pub requests_per_sec: u32,
    pub request_burst: u32,
    pub socket_send_buffer_bytes: usize,
    /// Prometheus text metrics over HTTP on this address; empty: off.
    pub metrics_listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7100".parse().unwrap(),
            data_dir: PathBuf::from("data"),
            shards: 0,
            max_frame_len: 1024 * 1024 + 8,
            max_connections: 100_000,
            login_timeout_ms: 10_000,
            idle_timeout_ms: 90_000,
            heartbeat_interval_ms: 30_000,
            outbound_buffer_bytes: 4 * 1024 * 1024,
            max_inflight_per_conn: 64,
            shard_queue_depth: 1024,
            shutdown_deadline_ms: 10_000,
            blocking_threads: 4,
            listen_backlog: 4096,
            max_connections_per_addr: 1024,
            outbound_total_bytes: 256 * 1024 * 1024,
            requests_per_sec: 200,
            request_burst: 400,
            socket_send_buffer_bytes: 0,
            metrics_listen: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub min_password_len: usize,
    pub max_password_len: usize,
    pub access_token_ttl_secs: u64,
    pub refresh_token_ttl_secs: u64,
    /// Hex-encoded HMAC key (at least 32 bytes). Empty: generated once into
    /// `<data_dir>/token.key` with mode 0600.
    pub token_key: String,
    pub argon2_m_cost_kib: u32,
    pub argon2_t_cost: u32,
    pub argon2_p_cost: u32,
    pub multi_device: MultiDevice,
    pub max_sessions_per_user: usize,
    pub failed_logins_per_user: u32,
    pub failed_logins_per_addr: u32,
    pub failed_login_window_secs: u64,
    pub registrations_per_addr_per_min: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            min_password_len: 8,
            max_password_len: 128,
            access_token_ttl_secs: 3600,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            token_key: String::new(),
            argon2_m_cost_kib: 19 * 1024,
            argon2_t_cost: 2,
            argon2_p_cost: 1,
            multi_device: MultiDevice::PerPlatform,
            max_sessions_per_user: 8,
            failed_logins_per_user: 10,
            failed_logins_per_addr: 50,
            failed_login_window_secs: 300,
            registrations_per_addr_per_min: 1000,
        }
    }
}

/// The optional TLS listener (rustls). Off while `listen` is empty.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener; empty: no TLS listener.
    pub listen: String,
    /// PEM certificate chain (leaf first).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl TlsConfig {
    /// The TLS listener's address, when one is configured.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        if self.listen.trim().is_empty() {
            None
        } else {
            self.listen.trim().parse().ok()
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagesConfig {
    pub max_text_len: usize,
    pub max_payload_len: usize,
    pub max_client_msg_id_len: usize,
    pub recall_window_secs: u64,
    pub max_delete_ids: usize,
    pub sends_per_sec: u32,
    pub send_burst: u32,
}

impl Default for MessagesConfig {
    fn default() -> Self {
        MessagesConfig {
            max_text_len: 16 * 1024,
            max_payload_len: 64 * 1024,
            max_client_msg_id_len: 64,
            recall_window_secs: 120,
            max_delete_ids: 100,
            sends_per_sec: 50,
            send_burst: 100,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsersConfig {
    pub max_nickname_len: usize,
    pub max_avatar_len: usize,
    pub max_signature_len: usize,
    pub search_max_page: u32,
}

impl Default for UsersConfig {
    fn default() -> Self {
        UsersConfig {
            max_nickname_len: 64,
            max_avatar_len: 512,
            max_signature_len: 256,
            search_max_page: 50,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FriendsConfig {
    /// Whether users who are not friends may message each other.
    pub strangers_may_message: bool,
    pub max_request_message_len: usize,
    pub max_categories: usize,
    pub list_max_page: u32,
}

impl Default for FriendsConfig {
    fn default() -> Self {
        FriendsConfig {
            strangers_may_message: true,
            max_request_message_len: 256,
            max_categories: 50,
            list_max_page: 200,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupsConfig {
    pub max_members: u32,
    pub max_name_len: usize,
    pub members_max_page: u32,
    pub max_groups_per_user: usize,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            max_members: 2000,
            max_name_len: 64,
            members_max_page: 500,
            max_groups_per_user: 500,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    pub max_subscriptions: usize,
    pub typing_per_sec: u32,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            max_subscriptions: 500,
            typing_per_sec: 2,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    pub max_page: u32,
    pub unread_conversations: u32,
    pub unread_per_conversation: u32,
    pub history_max_page: u32,
    pub conversations_max_page: u32,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            max_page: 500,
            unread_conversations: 100,
            unread_per_conversation: 50,
            history_max_page: 200,
            conversations_max_page: 200,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// SQLite in `server.data_dir`; needs no other service.
    Embedded,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: Backend,
    pub write_queue: usize,
    pub max_batch: usize,
    pub unsynced_batches: usize,
    pub read_connections: usize,
    pub cache_mib: u32,
    pub mmap_mib: u32,
    pub stream_log_rows: usize,
    pub stream_merge_rows: usize,
    pub checkpointer_nice: i32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Embedded,
            write_queue: 16_384,
            max_batch: 1024,
            unsynced_batches: 8,
            read_connections: 4,
            cache_mib: 64,
            mmap_mib: 1024,
            stream_log_rows: 65_536,
            stream_merge_rows: 128,
            checkpointer_nice: 19,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `mychat=debug,warn` …
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// The whole validated configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub messages: MessagesConfig,
    pub users: UsersConfig,
    pub friends: FriendsConfig,
    pub groups: GroupsConfig,
    pub presence: PresenceConfig,
    pub sync: SyncConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
}

const SECTIONS: [&str; 11] = [
    "server", "tls", "auth", "messages", "users", "friends", "groups", "presence", "sync", "store",
    "log",
];

impl Config {
    /// Loads `path` (or only the defaults when `None`), applies the process
    /// environment's `MYCHAT__…` overrides, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.into(),
                source,
            })?,
            None => String::new(),
        };
        let name = path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("<defaults>"));
        Config::from_parts(&text, &name, std::env::vars())
    }

    /// Parses `text`, applies overrides from `env` (only `MYCHAT__` names count), and
    /// validates.
    pub fn from_parts(
        text: &str,
        name: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: name.into(),
                    message: e.to_string(),
                })?;
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("MYCHAT__") else {
                continue;
            };
            let parts: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            let [section, key] = &parts[..] else {
                return Err(key_err(
                    k.clone(),
                    "environment overrides are MYCHAT__SECTION__KEY",
                ));
            };
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            let toml::Value::Table(t) = entry else {
                return Err(key_err(section.clone(), "must be a table"));
            };
            t.insert(key.clone(), parse_env_value(&v));
        }
        for (section, value) in &table {
            if !SECTIONS.contains(&section.as_str()) {
                return Err(key_err(
                    section.clone(),
                    format!("unknown section (known: {})", SECTIONS.join(", ")),
                ));
            }
            let toml::Value::Table(t) = value else {
                return Err(key_err(section.clone(), "must be a table"));
            };
            // Deserialize key by key against the defaults so an error names the key.
            for (key, v) in t {
                let mut probe = toml::Table::new();
                let mut inner = toml::Table::new();
                inner.insert(key.clone(), v.clone());
                probe.insert(section.clone(), toml::Value::Table(inner));
                if let Err(e) = toml::Value::Table(probe).try_into::<Config>() {
                    let msg = e.to_string();
                    let msg = msg.lines().next().unwrap_or("invalid").to_string();
                    return Err(key_err(format!("{section}.{key}"), msg));
                }
            }
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| key_err("<config>", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range checks that the types alone do not make.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range<T: PartialOrd + std::fmt::Display + Copy>(
            key: &str,
            v: T,
            lo: T,
            hi: T,
        ) -> Result<(), ConfigError> {
            if v < lo || v > hi {
                return Err(key_err(key, format!("{v} is out of range {lo}..={hi}")));
            }
            Ok(())
        }
        let s = &self.server;
        range("server.shards", s.shards, 0, 256)?;
        range(
            "server.max_frame_len",
            s.max_frame_len,
            64,
            64 * 1024 * 1024 + 8,
        )?;
        range("server.max_connections", s.max_connections, 1, 10_000_000)?;
        range(
            "server.login_timeout_ms",
            s.login_timeout_ms,
            100,
            3_600_000,
        )?;
        range(
            "server.idle_timeout_ms",
            s.idle_timeout_ms,
            1_000,
            86_400_000,
        )?;
        range(
            "server.heartbeat_interval_ms",
            s.heartbeat_interval_ms,
            100,
            86_400_000,
        )?;
        if s.heartbeat_interval_ms >= s.idle_timeout_ms {
            return Err(key_err(
                "server.heartbeat_interval_ms",
                "must be below server.idle_timeout_ms",
            ));
        }
        range(
            "server.outbound_buffer_bytes",
            s.outbound_buffer_bytes,
            16 * 1024,
            1 << 30,
        )?;
        if s.outbound_buffer_bytes < s.max_frame_len as usize + 12 {
            return Err(key_err(
                "server.outbound_buffer_bytes",
                "must hold at least one frame of server.max_frame_len",
            ));
        }
        range(
            "server.max_inflight_per_conn",
            s.max_inflight_per_conn,
            1,
            4096,
        )?;
        range("server.shard_queue_depth", s.shard_queue_depth, 16, 1 << 20)?;
        range(
            "server.shutdown_deadline_ms",
            s.shutdown_deadline_ms,
            100,
            600_000,
        )?;
        range("server.blocking_threads", s.blocking_threads, 1, 512)?;
        range("server.listen_backlog", s.listen_backlog, 1, 65535)?;
        range(
            "server.max_connections_per_addr",
            s.max_connections_per_addr,
            1,
            10_000_000,
        )?;
        range(
            "server.outbound_total_bytes",
            s.outbound_total_bytes,
            1 << 20,
            1 << 40,
        )?;
        range("server.requests_per_sec", s.requests_per_sec, 1, 10_000_000)?;
        range("server.request_burst", s.request_burst, 1, 10_000_000)?;
        range(
            "server.socket_send_buffer_bytes",
            s.socket_send_buffer_bytes,
            0,
            1 << 30,
        )?;
        if !s.metrics_listen.trim().is_empty()
            && s.metrics_listen.trim().parse::<SocketAddr>().is_err()
        {
            return Err(key_err(
                "server.metrics_listen",
                "must be empty or an address like 127.0.0.1:9100",
            ));
        }
        let t = &self.tls;
        if !t.listen.trim().is_empty() {
            if t.listen_addr().is_none() {
                return Err(key_err(
                    "tls.listen",
                    "must be empty or an address like 0.0.0.0:7443",
                ));
            }
            if t.cert_file.as_os_str().is_empty() {
                return Err(key_err(
                    "tls.cert_file",
                    "is required when tls.listen is set",
                ));
            }
            if t.key_file.as_os_str().is_empty() {
                return Err(key_err(
                    "tls.key_file",
                    "is required when tls.listen is set",
                ));
            }
        }
        let a = &self.auth;
        range("auth.min_password_len", a.min_password_len, 1, 1024)?;
        range(
            "auth.max_password_len",
            a.max_password_len,
            a.min_password_len,
            1024,
        )?;
        range(
            "auth.access_token_ttl_secs",
            a.access_token_ttl_secs,
            1,
            365 * 86400,
        )?;
        range(
            "auth.refresh_token_ttl_secs",
            a.refresh_token_ttl_secs,
            1,
            3650 * 86400,
        )?;
        if !a.token_key.is_empty() {
            let ok = a.token_key.len() >= 64
                && a.token_key.len().is_multiple_of(2)
                && a.token_key.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(key_err(
                    "auth.token_key",
                    "must be empty or at least 64 hex digits (32 bytes)",
                ));
            }
        }
        range(
            "auth.argon2_m_cost_kib",
            a.argon2_m_cost_kib,
            8,
            4 * 1024 * 1024,
        )?;
        range("auth.argon2_t_cost", a.argon2_t_cost, 1, 100)?;
        range("auth.argon2_p_cost", a.argon2_p_cost, 1, 64)?;
        if a.argon2_m_cost_kib < 8 * a.argon2_p_cost {
            return Err(key_err(
                "auth.argon2_m_cost_kib",
                "must be at least 8 × auth.argon2_p_cost",
            ));
        }
        range(
            "auth.max_sessions_per_user",
            a.max_sessions_per_user,
            1,
            1024,
        )?;
        range(
            "auth.failed_logins_per_user",
            a.failed_logins_per_user,
            1,
            1_000_000,
        )?;
        range(
            "auth.failed_logins_per_addr",
            a.failed_logins_per_addr,
            1,
            1_000_000,
        )?;
        range(
            "auth.failed_login_window_secs",
            a.failed_login_window_secs,
            1,
            86400,
        )?;
        range(
            "auth.registrations_per_addr_per_min",
            a.registrations_per_addr_per_min,
            1,
            10_000_000,
        )?;
        let m = &self.messages;
        range("messages.max_text_len", m.max_text_len, 1, 1 << 20)?;
        range("messages.max_payload_len", m.max_payload_len, 0, 1 << 20)?;
        range(
            "messages.max_client_msg_id_len",
            m.max_client_msg_id_len,
            8,
            256,
        )?;
        if m.max_text_len + m.max_payload_len + 1024 > s.max_frame_len as usize {
            return Err(key_err(
                "server.max_frame_len",
                "must hold one message: at least messages.max_text_len + messages.max_payload_len + 1024",
            ));
        }
        range(
            "messages.recall_window_secs",
            m.recall_window_secs,
            0,
            30 * 86400,
        )?;
        range("messages.max_delete_ids", m.max_delete_ids, 1, 10_000)?;
        range("messages.sends_per_sec", m.sends_per_sec, 1, 10_000_000)?;
        range("messages.send_burst", m.send_burst, 1, 10_000_000)?;
        let u = &self.users;
        range("users.max_nickname_len", u.max_nickname_len, 1, 4096)?;
        range("users.max_avatar_len", u.max_avatar_len, 1, 65536)?;
        range("users.max_signature_len", u.max_signature_len, 1, 65536)?;
        range("users.search_max_page", u.search_max_page, 1, 10_000)?;
        let f = &self.friends;
        range(
            "friends.max_request_message_len",
            f.max_request_message_len,
            0,
            65536,
        )?;
        range("friends.max_categories", f.max_categories, 0, 10_000)?;
        range("friends.list_max_page", f.list_max_page, 1, 10_000)?;
        let g = &self.groups;
        range("groups.max_members", g.max_members, 2, 1_000_000)?;
        range("groups.max_name_len", g.max_name_len, 1, 4096)?;
        range("groups.members_max_page", g.members_max_page, 1, 100_000)?;
        range(
            "groups.max_groups_per_user",
            g.max_groups_per_user,
            1,
            1_000_000,
        )?;
        let p = &self.presence;
        range(
            "presence.max_subscriptions",
            p.max_subscriptions,
            1,
            100_000,
        )?;
        range("presence.typing_per_sec", p.typing_per_sec, 1, 1000)?;
        let y = &self.sync;
        range("sync.max_page", y.max_page, 1, 10_000)?;
        range(
            "sync.unread_conversations",
            y.unread_conversations,
            1,
            10_000,
        )?;
        range(
            "sync.unread_per_conversation",
            y.unread_per_conversation,
            1,
            10_000,
        )?;
        range("sync.history_max_page", y.history_max_page, 1, 10_000)?;
        range(
            "sync.conversations_max_page",
            y.conversations_max_page,
            1,
            10_000,
        )?;
        let st = &self.store;
        range("store.write_queue", st.write_queue, 1, 1 << 22)?;
        range("store.max_batch", st.max_batch, 1, 1 << 16)?;
        range("store.unsynced_batches", st.unsynced_batches, 1, 1024)?;
        range("store.read_connections", st.read_connections, 1, 256)?;
        range("store.cache_mib", st.cache_mib, 1, 1 << 16)?;
        range("store.mmap_mib", st.mmap_mib, 0, 1 << 20)?;
        range("store.stream_log_rows", st.stream_log_rows, 1, 1 << 24)?;
        range("store.stream_merge_rows", st.stream_merge_rows, 1, 1 << 20)?;
        range("store.checkpointer_nice", st.checkpointer_nice, 0, 19)?;
        if self.log.level.trim().is_empty() {
            return Err(key_err("log.level", "must not be empty"));
        }
        Ok(())
    }

    /// The number of shard threads to run: `server.shards`, or one per core when 0.
    pub fn shard_count(&self) -> usize {
        if self.server.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.server.shards
        }
    }
}

/// An environment value as TOML: a number, a boolean, or else a string.
fn parse_env_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = v.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(f) = v.parse::<f64>() {
        if v.contains('.') {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_parts(
            text,
            Path::new("t.toml"),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    #[test]
    fn empty_gives_defaults() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:7100".parse().unwrap());
        assert_eq!(c.server.max_frame_len, 1024 * 1024 + 8);
        assert_eq!(c.auth.multi_device, MultiDevice::PerPlatform);
    }

    #[test]
    fn shipped_file_matches_defaults() {
        let text = include_str!("../mychat.toml");
        let c = parse(text, &[]).unwrap();
        let d = Config::default();
        assert_eq!(format!("{c:?}"), format!("{d:?}"));
    }

    #[test]
    fn env_overrides_win() {
        let c = parse(
            "[server]\nlogin_timeout_ms = 5000\n",
            &[
                ("MYCHAT__SERVER__LOGIN_TIMEOUT_MS", "2000"),
                ("MYCHAT__AUTH__MULTI_DEVICE", "multi"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.login_timeout_ms, 2000);
        assert_eq!(c.auth.multi_device, MultiDevice::Multi);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("[server]\nlogin_timout_ms = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.login_timout_ms"), "{e}");
        let e = parse("[sever]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("`sever`"), "{e}");
        let e = parse("", &[("MYCHAT__SERVER__IDLE_TIMEOUT_MS", "soon")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.idle_timeout_ms"), "{e}");
        let e = parse("[server]\nshards = 100000\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.shards") && e.contains("out of range"),
            "{e}"
        );
        let e = parse("", &[("MYCHAT__NOPE", "1")]).unwrap_err().to_string();
        assert!(e.contains("MYCHAT__NOPE"), "{e}");
        let e = parse("[auth]\ntoken_key = \"abc\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.token_key"), "{e}");
        let e = parse("[server]\nlisten = \"nowhere\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.listen"), "{e}");
    }
}
