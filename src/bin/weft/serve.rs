//! `weft serve`: the relay, and `weft`'s safe defaults for it.

use std::path::PathBuf;

use clap::Args;
use weft::Replica;

use crate::common::{CliError, CliResult, io_err, out, replica_options};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// The address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: String,
    /// The relay's data directory (created if missing); its replica is DATA/relay.db unless
    /// --store says otherwise.
    #[arg(long, default_value = "./weft-data")]
    data: PathBuf,
    /// Where the relay's replica lives: `postgres://USER@HOST:PORT/DB` (several relay nodes may
    /// share one database; its tables are created on first start), or `sqlite:PATH`. Default:
    /// DATA/relay.db.
    #[arg(long, env = "WEFT_STORE", value_parser = parse_store)]
    store: Option<StoreUrl>,
    /// Open WebSocket sessions at most.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Serve TLS (wss://, https://) with this PEM certificate chain, leaf first (needs
    /// --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (may be the same file).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require signed tokens (see `weft token issue`), verified with the secret in this file.
    #[arg(long, env = "WEFT_AUTH_SECRET_FILE")]
    auth_secret_file: Option<PathBuf>,
    /// Serve without authentication on a non-loopback address: anyone who reaches the port
    /// reads and writes everything.
    #[arg(long, conflicts_with = "auth_secret_file")]
    insecure_no_auth: bool,
    /// Documents one connection may create per minute once its burst is spent (0: no limit).
    #[arg(long, default_value_t = 20_000)]
    creates_per_minute: u32,
    /// Documents one connection may create at once (a replica's first sync of the data set
    /// it already has), before --creates-per-minute applies.
    #[arg(long, default_value_t = 100_000)]
    create_burst: u32,
    /// Operations a document's history may hold (changes count as one more); documents
    /// received with more are refused. Loading costs the relay up to ~4 µs and ~0.5 KB per
    /// operation.
    #[arg(long, default_value_t = weft::Limits::DEFAULT.max_ops)]
    max_document_ops: u64,
    /// The collection that automerge-repo clients (ws://HOST:PORT/automerge) read and write.
    #[arg(long, default_value = "automerge", value_parser = parse_collection)]
    automerge_collection: String,
}

/// Where `--store` puts the replica.
#[derive(Clone, Debug)]
pub(crate) enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

fn parse_store(s: &str) -> Result<StoreUrl, String> {
    if let Some(path) = s.strip_prefix("sqlite:") {
        if path.is_empty() {
            return Err("sqlite: needs a path, e.g. sqlite:/var/lib/weft/relay.db".into());
        }
        return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
    }
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        weft::store::postgres::parse_url(s).map_err(|e| e.to_string())?;
        return Ok(StoreUrl::Postgres(s.to_owned()));
    }
    Err(format!(
        "{s:?} is not a store: use postgres://USER@HOST:PORT/DB or sqlite:PATH"
    ))
}

fn parse_collection(name: &str) -> Result<String, String> {
    weft::validate_collection(name)
        .map(|()| name.to_owned())
        .map_err(|e| e.to_string())
}

/// `weft serve`: binds, prints `weft relay listening on ws://ADDR` (wss:// with TLS), runs until
/// a signal.
pub(crate) fn serve(args: ServeArgs) -> CliResult {
    // Read the certificate first: a bad file is reported before the port is taken.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            weft::net::TlsConfig::from_pem_files(cert, key)
                .map_err(|e| CliError::Input(format!("TLS: {e}")))?,
        ),
        _ => None,
    };
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("starting the runtime: {e}")))?;
    runtime.block_on(async {
        // The auth decision comes before the port is taken: a refused public address is
        // never listened on, not even briefly.
        let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&args.listen)
            .await
            .map_err(|e| CliError::Input(format!("--listen {}: {e}", args.listen)))?
            .collect();
        let auth = relay_auth(&args, &resolved)?;
        let listener = tokio::net::TcpListener::bind(&resolved[..])
            .await
            .map_err(|e| CliError::Io(format!("listening on {}: {e}", args.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| CliError::Io(format!("listening on {}: {e}", args.listen)))?;
        let mut config = weft::net::RelayConfig::new(args.data.clone());
        config.auth = auth;
        config.max_connections = args.max_connections;
        config.tls = tls;
        config.creates = (args.creates_per_minute > 0).then_some(weft::CreateLimit {
            per_minute: args.creates_per_minute,
            burst: args.create_burst,
        });
        config.limits.max_ops = args.max_document_ops;
        config.automerge_collection = args.automerge_collection.clone();
        // Say "listening" only once the store is open too: a relay that cannot open its
        // database never claims to serve.
        let data = args.data.clone();
        let mut options = replica_options();
        options.limits = config.limits;
        let store = args.store.clone();
        if let Some(StoreUrl::Postgres(url)) = &store {
            // Its own connection LISTENs for the other nodes' changes.
            config.listen_postgres = Some(
                url.parse()
                    .map_err(|e| CliError::Input(format!("--store: {e}")))?,
            );
        }
        let replica = tokio::task::spawn_blocking(move || -> CliResult<Replica> {
            match store {
                Some(StoreUrl::Postgres(url)) => {
                    let pg = weft::store::postgres::parse_url(&url).map_err(weft::Error::from)?;
                    let store =
                        weft::store::postgres::PgStore::open(pg).map_err(weft::Error::from)?;
                    let shown = std::path::PathBuf::from(store.shown().to_owned());
                    let options = weft::ReplicaOptions {
                        compaction: weft::engine::CompactionPolicy::shared_store(),
                        ..options
                    };
                    eprintln!(
                        "weft: the relay's replica is in PostgreSQL at {}",
                        shown.display()
                    );
                    Ok(Replica::with_store(Box::new(store), shown, options)?)
                }
                Some(StoreUrl::Sqlite(path)) => Ok(Replica::open_with(path, options)?),
                None => {
                    std::fs::create_dir_all(&data).map_err(io_err("creating", &data))?;
                    Ok(Replica::open_with(data.join("relay.db"), options)?)
                }
            }
        })
        .await
        .map_err(|e| CliError::Io(format!("opening the relay's database: {e}")))??;
        out(&format!("weft relay listening on {scheme}://{addr}"))?;
        weft::net::run_with_replica(listener, config, replica, shutdown_signal())
            .await
            .map_err(|e| CliError::Io(e.to_string()))
    })
}

/// The relay's token key, and the safe default without one: loopback only, unless the
/// operator insists.
pub(crate) fn relay_auth(
    args: &ServeArgs,
    addrs: &[std::net::SocketAddr],
) -> CliResult<Option<weft::net::auth::TokenKey>> {
    if let Some(file) = &args.auth_secret_file {
        let key = weft::net::auth::TokenKey::from_file(file)
            .map_err(|e| CliError::Input(e.to_string()))?;
        eprintln!(
            "weft: clients need a token signed with the secret in {}",
            file.display()
        );
        return Ok(Some(key));
    }
    let listen = &args.listen;
    if !addrs.iter().all(|a| a.ip().is_loopback()) && !args.insecure_no_auth {
        return Err(CliError::Input(format!(
            "refusing to serve {listen} without authentication: anyone who reaches it could read \
             and write every document. Pass --auth-secret-file FILE (tokens: `weft token issue`), \
             listen on 127.0.0.1, or pass --insecure-no-auth if a proxy in front checks access"
        )));
    }
    eprintln!(
        "weft: WARNING: no authentication (--auth-secret-file not given): every client that \
         reaches {listen} reads and writes every document"
    );
    Ok(None)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("shutting down");
}
