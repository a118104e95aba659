//! A minimal request/response connection over the real protocol (codec + proto), for
//! setup work (registration, tokens, groups). The traffic itself runs on the leaner
//! per-connection loop in `run.rs`.

use bytes::BytesMut;
use mychat_codec::{Frame, FrameCodec, Header};
use mychat_proto::{Command, ErrorCode};
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Decoder;

/// A request refused by the server: its PROTOCOL.md code and message.
#[derive(Debug, Clone)]
pub struct Refused {
    pub code: u32,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = ErrorCode::from_u32(self.code)
            .map(|c| c.name())
            .unwrap_or("UNKNOWN");
        write!(f, "{name}: {}", self.message)
    }
}

pub fn code_name(code: u32) -> String {
    ErrorCode::from_u32(code)
        .map(|c| c.name().to_string())
        .unwrap_or_else(|| format!("CODE_{code}"))
}

/// Connects, from `src` when given (to use several loopback source addresses past the
/// ephemeral port range of one).
pub async fn connect(addr: SocketAddr, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    // With a source address, connect() may find no port free for the 4-tuple on its
    // probe while an earlier run's sockets linger in TIME_WAIT (seen: 5 in 19,000);
    // a new socket probes from another offset.
    retrying_addr_not_available(src.is_some(), || connect_once(addr, src)).await
}

/// Runs `attempt` again, up to 4 more times, while it fails with AddrNotAvailable and
/// a source address was given (`with_src`); any other outcome is returned at once.
async fn retrying_addr_not_available<T, F, Fut>(
    with_src: bool,
    mut attempt: F,
) -> std::io::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(e) if with_src && e.kind() == std::io::ErrorKind::AddrNotAvailable && tries < 4 => {
                tries += 1;
            }
            r => return r,
        }
    }
}

async fn connect_once(addr: SocketAddr, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src {
        // The port is left to connect(), which picks one free for this 4-tuple; a
        // bind() with port 0 would pick one free on the address for any peer,
        // searching every bound socket (inet_bind2_bucket_find took 40 % of the
        // machine at 19,000 connections).
        bind_address_no_port(&sock)?;
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn bind_address_no_port(sock: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, an int option of the documented size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub struct Conn {
    pub stream: TcpStream,
    rbuf: BytesMut,
    codec: FrameCodec,
    seq: u32,
}

impl Conn {
    pub async fn open(addr: SocketAddr, src: Option<IpAddr>) -> anyhow::Result<Conn> {
        Ok(Conn {
            stream: connect(addr, src).await?,
            rbuf: BytesMut::with_capacity(4096),
            codec: FrameCodec::new(u32::MAX),
            seq: 0,
        })
    }

    async fn next_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(f) = self.codec.decode(&mut self.rbuf)? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                anyhow::bail!("the server closed the connection");
            }
        }
    }

    /// One request; pushes that arrive meanwhile are skipped.
    pub async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        cmd: Command,
        req: &Req,
    ) -> anyhow::Result<Result<Resp, Refused>> {
        self.seq += 1;
        let mut out = BytesMut::new();
        mychat_codec::encode_frame(
            Header::request(cmd.id(), self.seq),
            &req.encode_to_vec(),
            &mut out,
        );
        self.stream.write_all(&out).await?;
        loop {
            let f = self.next_frame().await?;
            if !f.header.is_response() || f.header.seq != self.seq {
                continue;
            }
            if f.header.is_error() {
                let e = mychat_proto::Error::decode(f.body)?;
                return Ok(Err(Refused {
                    code: e.code,
                    message: e.message,
                }));
            }
            return Ok(Ok(Resp::decode(f.body)?));
        }
    }

    /// `call`, but a RATE_LIMITED answer is waited out (backing off from 50 ms to 2 s,
    /// for `PATIENCE` at most), as a client that is told to slow down does: setting up
    /// thousands of users outruns a server's default per-connection and per-address
    /// limits, and the setup should slow to them rather than fail.
    pub async fn call_patient<Req: prost::Message, Resp: prost::Message + Default>(
        &mut self,
        cmd: Command,
        req: &Req,
    ) -> anyhow::Result<Result<Resp, Refused>> {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            let r = self.call(cmd, req).await?;
            match &r {
                Err(e)
                    if e.code == mychat_proto::ErrorCode::RateLimited as u32
                        && started.elapsed() < PATIENCE =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
                _ => return Ok(r),
            }
        }
    }
}

/// How long `call_patient` keeps retrying a rate-limited request.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

use prost::Message as _;

#[cfg(test)]
mod tests {
    use super::retrying_addr_not_available;
    use std::io::{Error, ErrorKind};

    /// Attempts that fail with `errors` in turn, then succeed; returns the outcome and
    /// how many attempts ran.
    async fn run(with_src: bool, errors: &[ErrorKind]) -> (std::io::Result<u32>, usize) {
        let mut n = 0;
        let r = retrying_addr_not_available(with_src, || {
            n += 1;
            let out = match errors.get(n - 1) {
                Some(k) => Err(Error::from(*k)),
                None => Ok(n as u32),
            };
            async move { out }
        })
        .await;
        (r, n)
    }

    #[tokio::test]
    async fn addr_not_available_is_retried_four_times_with_a_source_address() {
        let busy = ErrorKind::AddrNotAvailable;
        // Four failures, then the fifth attempt connects.
        let (r, n) = run(true, &[busy; 4]).await;
        assert_eq!((r.unwrap(), n), (5, 5));
        // A fifth failure is returned.
        let (r, n) = run(true, &[busy; 5]).await;
        assert_eq!((r.unwrap_err().kind(), n), (busy, 5));
        // Without a source address the kernel picked the port: no retry.
        let (r, n) = run(false, &[busy]).await;
        assert_eq!((r.unwrap_err().kind(), n), (busy, 1));
        // Other errors are not retried.
        let (r, n) = run(true, &[ErrorKind::ConnectionRefused]).await;
        assert_eq!(
            (r.unwrap_err().kind(), n),
            (ErrorKind::ConnectionRefused, 1)
        );
    }
}
