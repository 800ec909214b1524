//! The Telcoflow server.
//!
//! Start one with [`Server::start`]; it serves the control plane
//! (`/v1/agent/session-manager`), the media plane (`/v1/agent/media/{call_id}`), the HTTP API
//! (`/public/v1/...`) and the simulated phone network (`/v1/sim/phone`) on one listener. With
//! `[sip]` configured, a SIP user agent (UDP and TCP on one port) takes calls from phones and
//! trunks and dials `sip:` destinations for `call.connect`; each call's audio runs over RTP.
//!
//! Public: [`config`] (TOML configuration and the embedded development defaults) and
//! [`audio`] (sample-rate conversion). Inside, in layers from the ground up; a file imports
//! only from layers below its own:
//!
//! 1. `config`, `token`, `tls`, `audio`, `metrics`: settings, media tokens, TLS, resampling,
//!    the Prometheus metrics.
//! 2. The call as others see it: its handle and inputs (`call::handle`), its legs
//!    (`call::leg`) and the frames they carry (`call::frames`); `recording`, the recordings'
//!    files and writers.
//! 3. `registry` (sessions and calls by id, claims, limits) and `net` (the `Network`
//!    interface a call rings destinations through).
//! 4. `state`: `Shared`, what every task shares (config, connectors, registry, networks).
//! 5. The call actor (`call`: its loop, commands, mixing), and the networks that bring calls
//!    in: the simulated phones (`net::sim`) and SIP with its RTP legs (`net::sip`, on the
//!    sans-IO `telcoflow-sip`).
//! 6. `auth`, `control`, `media`, `http`: the planes that agents and HTTP clients reach; `drain`,
//!    how the server stops without dropping calls.
//!
//! `scripts/check-imports.py` checks this (its `LAYERS` list is this map).

//! `listener` (layer 1) accepts connections for the router, with the connection caps and
//! deadlines of `[limits]`.

pub mod audio;
mod auth;
mod call;
pub mod config;
mod console;
mod control;
mod drain;
mod http;
mod listener;
mod media;
mod metrics;
mod net;
mod recording;
mod registry;
mod state;
mod tls;
mod token;

pub use tls::fingerprint as certificate_fingerprint;

pub use config::{Config, ConfigError};

use axum::Router;
use axum::routing::{get, post};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Read buffer of every WebSocket the server accepts. tungstenite zero-fills the free part of
/// its read buffer before each socket read, so the default (128 KiB) cost a 128 KiB memset per
/// 20 ms audio frame; 4 KiB holds a few frames at 24 kHz and larger messages still grow it.
pub(crate) const WS_READ_BUFFER: usize = 4096;

/// `reason` cut to what a close frame holds (123 bytes), at a character boundary.
pub(crate) fn close_reason(reason: &str) -> String {
    let mut reason = reason.to_owned();
    while reason.len() > 123 {
        reason.pop();
    }
    reason
}

/// The close frame owed to a WebSocket peer after a receive error: 1009 (Message Too Big) with
/// the limit when its frame was over the size limit (named by `limit`, e.g. the config key);
/// `None` for any other error, after which there is nothing to say.
pub(crate) fn close_for_receive_error(
    error: &axum::Error,
    limit: &str,
) -> Option<axum::extract::ws::CloseFrame> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
    let source = std::error::Error::source(error)?;
    match source.downcast_ref::<WsError>()? {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            let reason =
                format!("frame of {size} bytes is over the {max_size}-byte limit ({limit})");
            Some(axum::extract::ws::CloseFrame {
                code: axum::extract::ws::close_code::SIZE,
                reason: close_reason(&reason).into(),
            })
        }
        _ => None,
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The SIP listener could not be bound.
    #[error("cannot start SIP on {addr}: {source}")]
    SipBind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The cluster (`[cluster]`, NATS) could not be joined.
    #[error("cannot join the cluster through {nats_url}: {message}")]
    Cluster {
        /// The NATS server.
        nats_url: String,
        /// What went wrong.
        message: String,
    },
    /// The recordings' directory (`[recording] dir`) could not be opened.
    #[error("cannot open the recordings directory {dir}: {source}")]
    Recording {
        /// The directory.
        dir: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Entry point: `Server::start(config)`.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds the listener and starts serving in the background.
    pub async fn start(config: Config) -> Result<RunningServer, StartError> {
        config.validate()?;
        let cluster_registry = match &config.cluster {
            Some(cluster) => Some(
                registry::Registry::cluster(
                    cluster,
                    config.limits.max_closed_sessions_per_connector,
                )
                .await
                .map_err(|message| StartError::Cluster {
                    nats_url: cluster.nats_url.clone(),
                    message,
                })?,
            ),
            None => None,
        };
        let listener = listener::bind(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let base_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{local_addr}"));
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(metrics::Metrics::new());
        let phones = Arc::new(net::sim::Directory::default());
        let mut networks = net::Networks::default().with(phones.clone());
        let sip = match config.sip.clone() {
            Some(sip) => {
                let addr = sip.listen;
                let sip_tls = tls::sip::load(&sip, config.tls.as_ref())?;
                let bound = net::sip::bind(sip, sip_tls, &tasks, &shutdown, &metrics)
                    .await
                    .map_err(|source| StartError::SipBind { addr, source })?;
                networks = networks.with(bound.network());
                Some(bound)
            }
            None => None,
        };
        let nats_url = config.cluster.as_ref().map(|c| c.nats_url.clone());
        let recordings = match config.recording.clone() {
            Some(rc) => {
                let dir = rc.dir.clone();
                Some(Arc::new(
                    recording::Recordings::open(rc, tasks.clone())
                        .map_err(|source| StartError::Recording { dir, source })?,
                ))
            }
            None => None,
        };
        let mut shared = state::Shared::new(config, base_url.clone(), networks, tasks, shutdown);
        if let Some(registry) = cluster_registry {
            shared.registry = registry;
        }
        shared.metrics = metrics;
        shared.recordings = recordings;
        let shared = Arc::new(shared);
        let context = registry::NodeContext {
            tasks: shared.tasks.clone(),
            shutdown: shared.shutdown.clone(),
            signer: shared.signer.clone(),
            public_url: shared.public_url.clone(),
        };
        if let Err(message) = shared.registry.start(context).await {
            shared.shutdown.cancel();
            return Err(StartError::Cluster {
                nats_url: nats_url.unwrap_or_default(),
                message,
            });
        }
        let sip_tls_addr = sip.as_ref().and_then(net::sip::BoundSip::tls_local);
        let sip_addr = sip.map(|bound| bound.start(&shared));
        let shutdown = shared.shutdown.clone();
        let app = router(shared.clone(), phones);
        let running = shared.clone();
        let task = tokio::spawn(async move {
            listener::serve(
                listener,
                tls,
                app,
                &shared.config.limits,
                shared.tasks.clone(),
                shared.shutdown.clone(),
            )
            .await;
            // Connections (upgraded or not) and calls: wait for them all.
            shared.tasks.close();
            shared.tasks.wait().await;
        });
        tracing::info!(url = %base_url, "telcoflow server listening");
        Ok(RunningServer {
            local_addr,
            sip_addr,
            sip_tls_addr,
            base_url,
            shutdown,
            shared: running,
            task,
            stopped: false,
        })
    }
}

/// A server running in the background. Dropping it does not stop it; call
/// [`RunningServer::shutdown`].
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    sip_addr: Option<SocketAddr>,
    sip_tls_addr: Option<SocketAddr>,
    base_url: String,
    shutdown: CancellationToken,
    shared: Arc<state::Shared>,
    task: tokio::task::JoinHandle<()>,
    /// The task has been awaited to its end.
    stopped: bool,
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound SIP address (UDP and TCP), when `[sip]` is configured.
    pub fn sip_addr(&self) -> Option<SocketAddr> {
        self.sip_addr
    }

    /// The bound SIP over TLS address, when `[sip] tls_listen` is set.
    pub fn sip_tls_addr(&self) -> Option<SocketAddr> {
        self.sip_tls_addr
    }

    /// WebSocket base URL, e.g. `ws://127.0.0.1:8080`; SDKs take it as `base_url`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// HTTP base URL of the same listener, e.g. `http://127.0.0.1:8080`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Stops accepting, closes every connection and waits for the server task to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if !self.stopped {
            let _ = self.task.await;
        }
    }

    /// Waits until the server stops (after [`RunningServer::shutdown`] from a clone of the
    /// token, at the end of a drain, or after a fatal error). Waiting again returns at once.
    pub async fn wait(&mut self) {
        // A finished task must not be awaited again (it would panic): once is remembered.
        if !self.stopped {
            let _ = (&mut self.task).await;
            self.stopped = true;
        }
    }

    /// Starts draining (as `POST /admin/v1/drain` does): no new calls or control
    /// connections, the control connections closed (1001) so that their clients reconnect to
    /// another node, the calls left to end for up to `drain_grace_secs` (then closed); the
    /// server then stops by itself ([`RunningServer::wait`] returns). Returns the calls still
    /// running; asking again only reports.
    pub fn drain(&self) -> usize {
        drain::start(&self.shared)
    }

    /// Whether the server is draining (or has drained): a stop after a drain is the
    /// expected end, not a failure.
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

fn router(shared: Arc<state::Shared>, phones: Arc<net::sim::Directory>) -> Router {
    use telcoflow_proto::{control::CONTROL_PATH, media::MEDIA_PATH, sim::SIM_PATH};
    let prune = shared.clone();
    // Closed sessions stay listed for an hour, then are forgotten.
    shared.tasks.spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = every.tick() => prune.registry.prune_closed(3600),
                () = prune.shutdown.cancelled() => break,
            }
        }
    });
    if let Some(recordings) = shared.recordings.clone() {
        let shutdown = shared.shutdown.clone();
        // Finished recordings past `retention_days` are deleted, checked once a minute.
        shared.tasks.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        let recordings = recordings.clone();
                        let now = std::time::SystemTime::now();
                        let _ = tokio::task::spawn_blocking(move || recordings.sweep(now)).await;
                    }
                    () = shutdown.cancelled() => break,
                }
            }
        });
    }
    Router::new()
        .route(CONTROL_PATH, get(control::control_ws))
        .route(&format!("{MEDIA_PATH}/{{call_id}}"), get(media::media_ws))
        .route("/public/v1/sessions", get(http::list_sessions))
        .route("/public/v1/sessions/{id}/close", post(http::close_session))
        .route("/public/v1/calls/{id}/stats", get(http::call_stats))
        .route("/public/v1/recordings", get(http::list_recordings))
        .route(
            "/public/v1/recordings/{id}",
            get(http::recording).delete(http::delete_recording),
        )
        .route(
            "/public/v1/recordings/{id}/audio",
            get(http::recording_audio),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(http::readyz))
        .route("/admin/v1/drain", post(http::drain))
        .route("/admin/v1/sip/registrations", get(http::sip_registrations))
        .route("/metrics", get(http::metrics))
        .route("/console", get(console::index))
        .route("/console/{file}", get(console::asset))
        .route(console::LIVE_PATH, get(console::live))
        .with_state(shared.clone())
        .merge(
            Router::new()
                .route(SIM_PATH, get(http::sim_phone))
                .with_state(net::sim::SimState { shared, phones }),
        )
}
