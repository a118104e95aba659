//! `mychat`: run the server. With no flags it uses the built-in defaults (listen on
//! 127.0.0.1:7100, data in ./data); `--config FILE` reads a TOML file (see
//! config/mychat.toml); `MYCHAT__SECTION__KEY` environment variables override both.
use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "mychat", version, about = "MyChat instant-messaging server")]
struct Args {
    /// TOML configuration file (every key optional; see config/mychat.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address, overriding server.listen.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Data directory, overriding server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = match mychat_config::Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mychat: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    if let Some(l) = args.listen {
        cfg.server.listen = l;
    }
    if let Some(d) = args.data_dir {
        cfg.server.data_dir = d;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
        .context("log.level is not a valid filter")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();

    let server = mychat::start(cfg).context("starting the server")?;
    println!("mychat listening on {}", server.local_addr());
    if let Some(t) = server.tls_addr() {
        println!("mychat listening for TLS on {t}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        anyhow::Ok(())
    })?;
    drop(rt);
    server.shutdown_blocking();
    Ok(())
}
