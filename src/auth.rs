//! Credentials: password hashing (argon2id, on a blocking pool), signed access tokens,
//! opaque refresh tokens, and failed-login throttling.
//!
//! Access token, base64url without padding, then `.`, then the HMAC-SHA256 of the
//! first part under the server's key:
//! ```text
//! user_id u64 | token_epoch u64 | expires_ms i64 | device_id (rest)   (big-endian)
//! ```
//! It is valid while unexpired and while the device's token epoch is unchanged (logout
//! bumps it). Refresh tokens are 32 random bytes; only their SHA-256 is stored, and each
//! is used once (rotation). Comparisons of secrets are constant-time.

use crate::ids::UserId;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

type HmacSha256 = Hmac<Sha256>;

/// argon2id with the configured cost.
#[derive(Clone)]
pub struct PasswordHasherCfg {
    params: Params,
}

impl PasswordHasherCfg {
    pub fn new(cfg: &mychat_config::AuthConfig) -> anyhow::Result<PasswordHasherCfg> {
        let params = Params::new(
            cfg.argon2_m_cost_kib,
            cfg.argon2_t_cost,
            cfg.argon2_p_cost,
            None,
        )
        .map_err(|e| anyhow::anyhow!("auth.argon2_*: {e}"))?;
        Ok(PasswordHasherCfg { params })
    }

    fn argon(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// PHC string of `password`. CPU-heavy: call from a blocking pool.
    pub fn hash(&self, password: &str) -> Result<String, String> {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
        self.argon()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    }

    /// Whether `password` matches the PHC string (its own parameters are used).
    /// CPU-heavy: call from a blocking pool.
    pub fn verify(&self, password: &str, phc: &str) -> bool {
        match PasswordHash::new(phc) {
            Ok(h) => self
                .argon()
                .verify_password(password.as_bytes(), &h)
                .is_ok(),
            Err(_) => false,
        }
    }
}

/// The HMAC key for access tokens.
pub struct TokenKey {
    key: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessClaims {
    pub user: UserId,
    pub epoch: u64,
    pub expires_ms: i64,
    pub device_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Invalid,
    Expired,
}

impl TokenKey {
    /// From `auth.token_key` (hex), or else from `<data_dir>/token.key`, generated
    /// there once with mode 0600.
    pub fn load(hex_key: &str, data_dir: &Path) -> anyhow::Result<TokenKey> {
        if !hex_key.is_empty() {
            return Ok(TokenKey {
                key: from_hex(hex_key).ok_or_else(|| anyhow::anyhow!("auth.token_key: not hex"))?,
            });
        }
        let path = data_dir.join("token.key");
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let key = from_hex(s.trim()).filter(|k| k.len() >= 32);
                key.map(|key| TokenKey { key }).ok_or_else(|| {
                    anyhow::anyhow!("{} is not a hex key of 32+ bytes", path.display())
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let mut key = vec![0u8; 32];
                rand::rng().fill_bytes(&mut key);
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                f.write_all(hex.as_bytes())?;
                f.sync_all()?;
                Ok(TokenKey { key })
            }
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length")
    }

    pub fn sign(&self, c: &AccessClaims) -> String {
        let mut payload = Vec::with_capacity(24 + c.device_id.len());
        payload.extend_from_slice(&c.user.0.to_be_bytes());
        payload.extend_from_slice(&c.epoch.to_be_bytes());
        payload.extend_from_slice(&c.expires_ms.to_be_bytes());
        payload.extend_from_slice(c.device_id.as_bytes());
        let mut m = self.mac();
        m.update(&payload);
        let tag = m.finalize().into_bytes();
        format!("{}.{}", B64.encode(&payload), B64.encode(tag))
    }

    pub fn verify(&self, token: &str, now_ms: i64) -> Result<AccessClaims, TokenError> {
        let (p, t) = token.split_once('.').ok_or(TokenError::Invalid)?;
        if p.len() > 512 || t.len() > 64 {
            return Err(TokenError::Invalid);
        }
        let payload = B64.decode(p).map_err(|_| TokenError::Invalid)?;
        let tag = B64.decode(t).map_err(|_| TokenError::Invalid)?;
        let mut m = self.mac();
        m.update(&payload);
        // Constant-time comparison.
        m.verify_slice(&tag).map_err(|_| TokenError::Invalid)?;
        if payload.len() < 24 {
            return Err(TokenError::Invalid);
        }
        let u = u64::from_be_bytes(payload[0..8].try_into().unwrap());
        let epoch = u64::from_be_bytes(payload[8..16].try_into().unwrap());
        let expires_ms = i64::from_be_bytes(payload[16..24].try_into().unwrap());
        let device_id =
            String::from_utf8(payload[24..].to_vec()).map_err(|_| TokenError::Invalid)?;
        if expires_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(AccessClaims {
            user: UserId(u),
            epoch,
            expires_ms,
            device_id,
        })
    }
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A new refresh token and the SHA-256 that is stored for it.
pub fn new_refresh_token() -> (String, [u8; 32]) {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token = B64.encode(raw);
    let hash = refresh_hash(&token);
    (token, hash)
}

pub fn refresh_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Counts failures per key within a window; refuses once a key reaches its limit.
/// Bounded: when it holds too many keys, expired windows are pruned, and if that is
/// not enough the oldest half is dropped.
pub struct Throttle {
    window: Duration,
    max_keys: usize,
    map: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Throttle {
    pub fn new(window: Duration, max_keys: usize) -> Throttle {
        Throttle {
            window,
            max_keys,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` is at or past `limit` failures in the current window.
    pub fn blocked(&self, key: &str, limit: u32) -> bool {
        let map = self.map.lock();
        matches!(map.get(key), Some((n, since)) if *n >= limit && since.elapsed() < self.window)
    }

    /// Records one event for `key`; returns the count in the current window.
    pub fn hit(&self, key: &str) -> u32 {
        let mut map = self.map.lock();
        if map.len() >= self.max_keys && !map.contains_key(key) {
            let w = self.window;
            map.retain(|_, (_, since)| since.elapsed() < w);
            if map.len() >= self.max_keys {
                let mut ages: Vec<Instant> = map.values().map(|(_, s)| *s).collect();
                ages.sort();
                let cut = ages[ages.len() / 2];
                map.retain(|_, (_, s)| *s > cut);
            }
        }
        let e = map.entry(key.to_string()).or_insert((0, Instant::now()));
        if e.1.elapsed() >= self.window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
        e.0
    }

    pub fn clear(&self, key: &str) {
        self.map.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_token_round_trip_and_tamper() {
        let k = TokenKey { key: vec![7; 32] };
        let c = AccessClaims {
            user: UserId(42),
            epoch: 3,
            expires_ms: 2_000,
            device_id: "dev-1".into(),
        };
        let t = k.sign(&c);
        assert_eq!(k.verify(&t, 1_000), Ok(c.clone()));
        assert_eq!(k.verify(&t, 2_000), Err(TokenError::Expired));
        let mut bad = t.clone().into_bytes();
        bad[3] ^= 1;
        assert_eq!(
            k.verify(std::str::from_utf8(&bad).unwrap(), 1_000),
            Err(TokenError::Invalid)
        );
        let other = TokenKey { key: vec![8; 32] };
        assert_eq!(other.verify(&t, 1_000), Err(TokenError::Invalid));
        assert_eq!(k.verify("garbage", 1_000), Err(TokenError::Invalid));
    }

    #[test]
    fn generated_key_is_owner_only_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = TokenKey::load("", dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("token.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = TokenKey::load("", dir.path()).unwrap();
        assert_eq!(a.key, b.key);
    }

    #[test]
    fn password_hash_verifies() {
        let cfg = mychat_config::AuthConfig {
            argon2_m_cost_kib: 64,
            argon2_t_cost: 1,
            ..Default::default()
        };
        let h = PasswordHasherCfg::new(&cfg).unwrap();
        let phc = h.hash("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(h.verify("correct horse", &phc));
        assert!(!h.verify("wrong horse", &phc));
        assert!(!h.verify("x", "not a phc"));
    }

    #[test]
    fn throttle_counts_and_bounds() {
        let t = Throttle::new(Duration::from_secs(60), 4);
        assert!(!t.blocked("a", 2));
        t.hit("a");
        t.hit("a");
        assert!(t.blocked("a", 2));
        t.clear("a");
        assert!(!t.blocked("a", 2));
        for k in ["b", "c", "d", "e", "f", "g"] {
            t.hit(k);
        }
        assert!(t.map.lock().len() <= 4);
    }
}
