//! Setting users up, fast on every run but the first.
//!
//! How: the first run registers each user (argon2 on the server, slow by design) and
//! logs each device in once with the password; the tokens go to a state file
//! (`--state`, default `.loadtest/<prefix>@<server>.json`). Later runs log every device
//! in with its access token (an HMAC check and a device lookup on the server, no
//! argon2); a token close to expiry is renewed first with its refresh token (one cheap
//! write). So 19,000 users set up in seconds once they exist.

use crate::scenario::Scenario;
use crate::wire::Conn;
use mychat_proto::*;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const PLATFORMS: [Platform; 4] = [
    Platform::Desktop,
    Platform::Mobile,
    Platform::Web,
    Platform::Tablet,
];

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceState {
    pub device: String,
    pub access: String,
    pub access_exp: i64,
    pub refresh: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UserState {
    pub name: String,
    pub id: u64,
    pub devices: Vec<DeviceState>,
}

/// What workers need: users with tokens, and this run's groups.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub users: Vec<UserState>,
    /// Group ids of this run, index = group number of the scenario.
    #[serde(default)]
    pub groups: Vec<u64>,
}

pub fn default_path(s: &Scenario, server: &str) -> PathBuf {
    PathBuf::from(".loadtest").join(format!(
        "{}@{}.json",
        s.user_prefix,
        server.replace([':', '/'], "_")
    ))
}

pub fn load(path: &Path) -> State {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

pub fn save(path: &Path, st: &State) -> anyhow::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_string(st)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Makes every user and device of the scenario ready (registered, with an access token
/// valid for at least `valid_for_ms`), using `parallel` connections.
pub async fn prepare(
    addr: SocketAddr,
    s: &Scenario,
    path: &Path,
    valid_for_ms: i64,
    parallel: usize,
) -> anyhow::Result<State> {
    let mut st = load(path);
    if !still_valid(addr, s, &st).await? {
        eprintln!(
            "loadtest: the server does not know the tokens in {} (a new data directory?): setting the users up again",
            path.display()
        );
        st = State::default();
    }
    st.users
        .resize_with(s.users.max(st.users.len()), Default::default);
    for (i, u) in st.users.iter_mut().enumerate() {
        // A state file written for another scenario (another user prefix) holds other
        // users' ids and tokens: those entries start over.
        let name = format!("{}{i}", s.user_prefix);
        if u.name != name {
            *u = UserState::default();
            u.name = name;
        }
        u.devices
            .resize_with(s.devices_per_user.max(u.devices.len()), Default::default);
        for (d, dev) in u.devices.iter_mut().enumerate() {
            let device = format!("{}-{i}-{d}", s.user_prefix);
            if dev.device != device {
                *dev = Default::default();
                dev.device = device;
            }
        }
    }
    let users = Arc::new(parking_lot::Mutex::new(std::mem::take(&mut st.users)));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let (users, next, s) = (users.clone(), next.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr, None).await?;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= s.users {
                    return anyhow::Ok(());
                }
                let mut u = users.lock()[i].clone();
                ready_user(&mut conn, &s, &mut u, valid_for_ms).await?;
                users.lock()[i] = u;
            }
        }));
    }
    let mut first_err = None;
    for t in tasks {
        if let Err(e) = t.await? {
            first_err.get_or_insert(e);
        }
    }
    st.users = std::mem::take(&mut *users.lock());
    save(path, &st)?;
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(st)
}

/// Whether the server knows the state file's users: its first device's token logs in
/// (a server on a fresh data directory has other users and another key). With every
/// access token expired, the first registered user logs in by password instead: the
/// ids in the file are only kept when the server gives the same one back (else a run
/// on a new data directory, hours after the file was written, would take the file's
/// users as registered and fail to log them in).
async fn still_valid(addr: SocketAddr, s: &Scenario, st: &State) -> anyhow::Result<bool> {
    let now = now_ms();
    let unexpired = st.users.iter().find_map(|u| {
        u.devices
            .iter()
            .enumerate()
            .find(|(_, d)| !d.access.is_empty() && d.access_exp > now)
            .map(|(i, d)| (u, i, d))
    });
    let (u, login) = match unexpired {
        Some((u, d, dev)) => (
            u,
            LoginRequest {
                credential: Some(login_request::Credential::AccessToken(dev.access.clone())),
                device_id: dev.device.clone(),
                platform: PLATFORMS[d % PLATFORMS.len()] as i32,
            },
        ),
        None => {
            let Some((u, dev)) = st
                .users
                .iter()
                .find_map(|u| Some((u, u.devices.first()?)).filter(|(u, _)| u.id != 0))
            else {
                return Ok(true); // nobody registered yet: nothing to check
            };
            (
                u,
                LoginRequest {
                    credential: Some(login_request::Credential::Password(PasswordCredential {
                        username: u.name.clone(),
                        password: s.password.clone(),
                    })),
                    device_id: dev.device.clone(),
                    platform: PLATFORMS[0] as i32,
                },
            )
        }
    };
    let mut conn = Conn::open(addr, None).await?;
    match conn
        .call_patient::<_, LoginResponse>(Command::Login, &login)
        .await?
    {
        Ok(r) => Ok(r.user_id == u.id),
        Err(e) if e.code == ErrorCode::InvalidCredentials as u32 => Ok(false),
        Err(e) => anyhow::bail!("checking the state file's tokens: {e}"),
    }
}

async fn ready_user(
    conn: &mut Conn,
    s: &Scenario,
    u: &mut UserState,
    valid_for_ms: i64,
) -> anyhow::Result<()> {
    let now = now_ms();
    if u.id == 0 {
        match conn
            .call_patient::<_, RegisterResponse>(
                Command::Register,
                &RegisterRequest {
                    username: u.name.clone(),
                    password: s.password.clone(),
                },
            )
            .await?
        {
            Ok(r) => u.id = r.user_id,
            Err(e) if e.code == ErrorCode::Conflict as u32 => {} // registered by an earlier run
            Err(e) => anyhow::bail!("registering {}: {e}", u.name),
        }
    }
    for (d, dev) in u.devices.iter_mut().enumerate().take(s.devices_per_user) {
        if !dev.access.is_empty() && dev.access_exp > now + valid_for_ms {
            continue;
        }
        if !dev.refresh.is_empty() {
            if let Ok(t) = conn
                .call_patient::<_, RefreshResponse>(
                    Command::Refresh,
                    &RefreshRequest {
                        refresh_token: dev.refresh.clone(),
                    },
                )
                .await?
            {
                let t = t.tokens.unwrap_or_default();
                dev.access = t.access_token;
                dev.access_exp = t.access_expires_ms;
                dev.refresh = t.refresh_token;
                if dev.access_exp > now + valid_for_ms {
                    continue;
                }
            }
        }
        // First time (or tokens lost): the password, once.
        let login = LoginRequest {
            credential: Some(login_request::Credential::Password(PasswordCredential {
                username: u.name.clone(),
                password: s.password.clone(),
            })),
            device_id: dev.device.clone(),
            platform: PLATFORMS[d] as i32,
        };
        let r = match conn
            .call_patient::<_, LoginResponse>(Command::Login, &login)
            .await?
        {
            Ok(r) => r,
            Err(e) => anyhow::bail!("logging {} in: {e}", u.name),
        };
        u.id = r.user_id;
        let t = r.tokens.unwrap_or_default();
        dev.access = t.access_token;
        dev.access_exp = t.access_expires_ms;
        dev.refresh = t.refresh_token;
        anyhow::ensure!(
            dev.access_exp > now + valid_for_ms,
            "the server's access tokens expire too soon for this run"
        );
        // The next LOGIN on this connection replaces this session.
    }
    Ok(())
}

/// Creates the scenario's groups for this run (each by its first member).
pub async fn create_groups(addr: SocketAddr, s: &Scenario, st: &mut State) -> anyhow::Result<()> {
    st.groups.clear();
    for g in 0..s.traffic.groups {
        let members = s.group_members(g);
        let owner = &st.users[members[0]];
        let mut conn = Conn::open(addr, None).await?;
        let login = LoginRequest {
            credential: Some(login_request::Credential::AccessToken(
                owner.devices[0].access.clone(),
            )),
            device_id: owner.devices[0].device.clone(),
            platform: PLATFORMS[0] as i32,
        };
        if let Err(e) = conn
            .call_patient::<_, LoginResponse>(Command::Login, &login)
            .await?
        {
            anyhow::bail!("logging {} in to create a group: {e}", owner.name);
        }
        let req = GroupCreateRequest {
            name: format!("{} group {g}", s.name),
            member_ids: members[1..].iter().map(|m| st.users[*m].id).collect(),
            join_policy: JoinPolicy::Approval as i32,
        };
        match conn
            .call_patient::<_, GroupCreateResponse>(Command::GroupCreate, &req)
            .await?
        {
            Ok(r) => st.groups.push(r.group.map(|g| g.id).unwrap_or(0)),
            Err(e) => anyhow::bail!("creating group {g}: {e}"),
        }
    }
    Ok(())
}
