//! upgate: a multi-tenant upload gateway in front of object storage.
//!
//! Clients create an upload session, register files, send parts (proxied or straight to S3
//! with presigned URLs), complete each file and finalize the session. Session state lives in
//! a [`store::SessionStore`] (Redis with Lua scripts, or in memory); bytes go to an
//! [`storage::ObjectStore`] (S3 multipart uploads, or the local filesystem).
//!
//! The binary is a thin wrapper around [`run`]; tests start real servers on port 0 with it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), upgate::StartError> {
//! let config = upgate::config::Config::embedded_default().expect("valid");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
//! upgate::run(listener, config, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod cors;
pub mod dev_seed;
pub mod error;
pub mod events;
pub mod jwt;
pub mod metrics;
pub mod model;
pub mod ownership;
pub mod policies;
pub mod reaper;
pub mod serve;
pub mod stack;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod uploads;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::config::{Config, StorageTarget};
use crate::storage::ObjectStore;
use crate::store::SessionStore;

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid (every problem listed).
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// A backend could not be set up.
    #[error("cannot start: {0}")]
    Backend(String),
    /// Binding or serving failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Connections the admin listener serves at once (health probes and metric scrapers).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A gateway ready to serve: configuration plus its two backends.
#[derive(Clone)]
pub struct Gateway {
    state: AppState,
    layers: stack::Layers,
}

impl Gateway {
    /// Builds the backends the configuration names (connecting to Redis / S3 as needed).
    pub async fn from_config(config: Config) -> Result<Gateway, StartError> {
        let handle = match &config.redis {
            Some(target) => Some(redis_handle(&config, target)?),
            None => None,
        };
        let store: Arc<dyn SessionStore> = match &handle {
            Some(h) => Arc::new(
                store::redis::RedisStore::new(h.clone(), redis_store_options(&config))
                    .map_err(|e| StartError::Backend(e.to_string()))?,
            ),
            None => Arc::new(store::memory::MemoryStore::new(config.session_retention)),
        };
        let storages = build_storages(&config).await?;
        Ok(Gateway::with_storages(config, store, storages).with_redis_layers(handle))
    }

    /// A gateway over backends the caller built (tests wrap real backends this way); the
    /// rate-limit and idempotency layers keep their state in process (see
    /// [`Gateway::with_redis_layers`]).
    ///
    /// Every tenant's objects go to `storage` (a tenant's own `storage` setting is not
    /// built here), with the tenant's object settings.
    pub fn with_backends(
        config: Config,
        store: Arc<dyn SessionStore>,
        storage: Arc<dyn ObjectStore>,
    ) -> Gateway {
        let storage: Arc<dyn ObjectStore> = Arc::new(storage::Timed(storage));
        let mut storages = storage::Storages::new(config.storage_label(), storage);
        for t in &config.tenants {
            storages = storages.tenant(&t.id, None, t.objects.clone());
        }
        Gateway::with_storages(config, store, storages)
    }

    /// A gateway over `store` and `storages` (see [`build_storages`]; stores wrapped in
    /// [`storage::Timed`] have their calls' latency in the metrics).
    pub fn with_storages(
        config: Config,
        store: Arc<dyn SessionStore>,
        storages: storage::Storages,
    ) -> Gateway {
        let layers = stack::Layers::new(&config, store.clone(), None);
        let storages = Arc::new(storages);
        let metrics = Arc::new(metrics::Metrics::default());
        let uploads = Arc::new(uploads::Uploads::new(
            store.clone(),
            storages.clone(),
            metrics.clone(),
            uploads::Timing::default(),
        ));
        let tokens = Arc::new(if config.upload_token_secrets.0.is_empty() {
            tokens::UploadTokens::pending()
        } else {
            tokens::UploadTokens::configured(&config.upload_token_secrets.0)
        });
        Gateway {
            state: AppState {
                config: Arc::new(config),
                store,
                storages,
                tokens,
                metrics,
                uploads,
            },
            layers,
        }
    }

    /// Runs the upload protocol on other clocks (tests shorten the completion lease and the
    /// cleanup retry).
    pub fn with_timing(mut self, timing: uploads::Timing) -> Gateway {
        self.state.uploads = Arc::new(uploads::Uploads::new(
            self.state.store.clone(),
            self.state.storages.clone(),
            self.state.metrics.clone(),
            timing,
        ));
        self
    }

    /// Keeps the rate-limit and idempotency state in Redis (shared by all replicas).
    pub fn with_redis_layers(mut self, handle: Option<store::redis::RedisHandle>) -> Gateway {
        if handle.is_some() {
            self.layers = stack::Layers::new(&self.state.config, self.state.store.clone(), handle);
        }
        self
    }

    /// The policy layers (for their counters).
    pub fn layers(&self) -> &stack::Layers {
        &self.layers
    }

    /// The shared state (for tests and embedding).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The API router with the full middleware stack.
    pub fn router(&self) -> axum::Router {
        stack::build(self.state.clone(), &self.layers)
    }

    /// Serves the API on `listener` and the admin routes on `admin` (if given) until
    /// `shutdown` resolves; then stops accepting, lets in-flight requests finish within
    /// `shutdown_grace_seconds`, stops the reaper, and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let config = self.state.config.clone();
        let stop = CancellationToken::new();
        // The upload token key is asked for once now, so the first token request does not
        // wait for it (if the store is down, the first request that needs it asks again).
        // The session store is also pinged once now: a Redis that cannot be reached, or whose
        // TLS certificate does not verify, is reported at start (the gateway still starts,
        // not ready, as in any outage).
        let (tokens, store) = (self.state.tokens.clone(), self.state.store.clone());
        tokio::spawn(async move {
            if let Err(e) = store.ping().await {
                tracing::error!(error = %e, "the session store is not reachable at start; the gateway is not ready until it is");
            }
            if let Err(e) = tokens.reload(&*store).await {
                tracing::warn!(error = %e, "loading the upload token key at start failed; retried when a request needs it");
            }
        });
        let reaper = tokio::spawn(reaper::run(
            self.state.clone(),
            config.reaper_interval,
            stop.clone(),
        ));
        let webhooks = tokio::spawn(events::deliver::run(
            config.clone(),
            self.state.store.clone(),
            self.state.metrics.clone(),
            self.state.uploads.waker(),
            stop.clone(),
        ));
        let admin_task = admin.map(|l| {
            let router = admin::routes(self.state.clone(), Arc::new(self.layers.metrics()));
            let stop = stop.clone();
            // The same accept loop as the API, with few connections: probes and scrapers.
            let limits = serve::ServeLimits {
                max_connections: ADMIN_MAX_CONNECTIONS,
                header_read_timeout: config.header_read_timeout,
                idle_timeout: config.idle_timeout,
                grace: std::time::Duration::from_secs(1),
            };
            tokio::spawn(serve::serve(l, router, limits, async move {
                stop.cancelled().await
            }))
        });
        let limits = serve::ServeLimits {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            grace: config.shutdown_grace,
        };
        serve::serve(listener, self.router(), limits, shutdown).await;
        stop.cancel();
        let _ = reaper.await;
        let _ = webhooks.await;
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The session store the configuration names.
pub async fn build_store(config: &Config) -> Result<Arc<dyn SessionStore>, StartError> {
    let Some(target) = &config.redis else {
        return Ok(Arc::new(store::memory::MemoryStore::new(
            config.session_retention,
        )));
    };
    let handle = redis_handle(config, target)?;
    let store = store::redis::RedisStore::new(handle, redis_store_options(config))
        .map_err(|e| StartError::Backend(e.to_string()))?;
    Ok(Arc::new(store))
}

fn redis_store_options(config: &Config) -> store::redis::RedisStoreOptions {
    store::redis::RedisStoreOptions {
        retention: config.session_retention,
        command_timeout: config.redis_timeout,
        ..Default::default()
    }
}

/// A pooled connection handle on the configured Redis (single or cluster).
pub fn redis_handle(
    config: &Config,
    target: &config::RedisTarget,
) -> Result<store::redis::RedisHandle, StartError> {
    let pool = store::redis::RedisPoolOptions {
        timeout: config.redis_timeout,
        ca_pem: config.redis_ca.clone(),
        ..Default::default()
    };
    match target {
        config::RedisTarget::Single(url) => store::redis::RedisHandle::single_with(url, &pool),
        config::RedisTarget::Cluster(urls) => store::redis::RedisHandle::cluster_with(urls, &pool),
    }
    .map_err(|e| StartError::Backend(e.to_string()))
}

/// The gateway's object store (`storage`).
pub async fn build_storage(config: &Config) -> Result<Arc<dyn ObjectStore>, StartError> {
    open_storage(
        &config.storage,
        config.s3.endpoint.as_deref(),
        &config.s3.region,
        config,
        &mut None,
    )
    .await
}

/// Every storage the configuration names: the gateway's and each tenant's own (tenants
/// whose storage settings are equal share one client), each call timed.
pub async fn build_storages(config: &Config) -> Result<storage::Storages, StartError> {
    let timed = |s: Arc<dyn ObjectStore>| -> Arc<dyn ObjectStore> { Arc::new(storage::Timed(s)) };
    // One AWS configuration (one credential cache) for every S3 client.
    let mut sdk = None;
    let gateway = open_storage(
        &config.storage,
        config.s3.endpoint.as_deref(),
        &config.s3.region,
        config,
        &mut sdk,
    )
    .await?;
    let mut storages = storage::Storages::new(config.storage_label(), timed(gateway));
    for t in &config.tenants {
        let own = match &t.storage {
            None => None,
            Some(_) => {
                let label = config.tenant_storage_label(t);
                let store = match storages.find(&label) {
                    Some(existing) => existing,
                    None => {
                        let (target, endpoint, region) = config.tenant_storage(t);
                        timed(open_storage(target, endpoint, region, config, &mut sdk).await?)
                    }
                };
                Some((label, store))
            }
        };
        storages = storages.tenant(&t.id, own, t.objects.clone());
    }
    Ok(storages)
}

/// The store `target` names; S3 clients share `sdk` (the AWS configuration, loaded from the
/// standard chain by the first one).
async fn open_storage(
    target: &StorageTarget,
    endpoint: Option<&str>,
    region: &str,
    config: &Config,
    sdk: &mut Option<aws_config::SdkConfig>,
) -> Result<Arc<dyn ObjectStore>, StartError> {
    match target {
        StorageTarget::Filesystem(dir) => Ok(Arc::new(
            storage::fs::FsStore::new(dir)
                .await
                .map_err(|e| StartError::Backend(e.to_string()))?,
        )),
        StorageTarget::S3 { bucket, prefix } => {
            let mut settings = storage::s3::S3Settings::new(bucket.clone());
            settings.prefix = prefix.clone();
            settings.endpoint = endpoint.map(str::to_owned);
            settings.region = region.to_owned();
            settings.force_path_style = config.s3.force_path_style;
            if sdk.is_none() {
                *sdk = Some(storage::s3::S3Store::load_sdk_config(region).await);
            }
            let s3 = match sdk {
                Some(sdk) => storage::s3::S3Store::with_sdk_config(sdk, settings),
                None => storage::s3::S3Store::new(settings).await,
            }
            .map_err(|e| StartError::Backend(e.to_string()))?;
            Ok(Arc::new(s3))
        }
    }
}

/// Starts the gateway the configuration describes on `listener` (the admin listener is bound
/// from `admin_listen`) and serves until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let admin = TcpListener::bind(config.admin_listen).await?;
    if config.rate_limit_bypass {
        tracing::warn!("RATE_LIMIT_BYPASS is enabled: rate limits are NOT enforced (would-be rejections are logged and counted). Never enable this in production.");
    }
    let gateway = Gateway::from_config(config).await?;
    gateway.serve(listener, Some(admin), shutdown).await
}
