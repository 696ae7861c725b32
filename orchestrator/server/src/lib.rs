//! The Drover orchestrator.
//!
//! It serves `drover.v1`, keeps every bit of state in the store (etcd or the embedded
//! store), and drives agents to carry out volume, group and replication changes. See
//! `service::replication` for the state machine and its guarantees.

pub mod agents;
pub mod auth;
pub mod compute;
pub mod config;
pub mod dashboard;
pub mod deadline;
pub mod error;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod procedures;
pub mod repo;
pub mod runbook;
pub mod service;
pub mod transitions;

use std::net::SocketAddr;
use std::sync::Arc;

use drover_proto::v1 as pb;
use drover_store::{EmbeddedStore, EtcdStore, KvStore, Prefixed};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use config::{OrchestratorConfig, StoreKind};
use repo::Repo;
use service::Core;
use service::version::check_api_version;

/// Opens the configured store, confined to the configured prefix. On etcd, compacts its
/// history every `store.compaction_interval` until `shutdown` (see
/// [`EtcdStore::compact_history`]).
pub async fn open_store(
    config: &OrchestratorConfig,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn KvStore>, drover_store::StoreError> {
    let raw: Arc<dyn KvStore> = match config.store.kind {
        StoreKind::Embedded => Arc::new(EmbeddedStore::open(&config.store.path).await?),
        StoreKind::Etcd => {
            let etcd = Arc::new(EtcdStore::connect(&config.store.endpoints, config.store.timeout).await?);
            if config.store.history_revisions > 0 {
                tokio::spawn(compact_forever(
                    etcd.clone(),
                    config.store.history_revisions,
                    config.store.compaction_interval,
                    shutdown.clone(),
                ));
            }
            etcd
        }
    };
    Ok(Arc::new(Prefixed::new(raw, config.store.prefix.clone())))
}

/// Compacts etcd's history to the newest `keep` revisions every `every`, until `shutdown`.
async fn compact_forever(etcd: Arc<EtcdStore>, keep: i64, every: std::time::Duration, shutdown: CancellationToken) {
    loop {
        match etcd.compact_history(keep).await {
            Ok(Some(to)) => tracing::debug!(revision = to, "compacted etcd's history"),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "could not compact etcd's history; retrying at the next interval (etcd's database grows until then)"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// A running orchestrator.
pub struct RunningOrchestrator {
    /// The address it serves on.
    pub local_addr: SocketAddr,
    /// Resolves when the server stops.
    pub handle: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// The drover.v1 services the orchestrator serves (reflection lists these, plus health
/// and reflection itself).
pub const SERVED: [&str; 14] = [
    pb::version_service_server::SERVICE_NAME,
    pb::site_service_server::SERVICE_NAME,
    pb::agent_registry_server::SERVICE_NAME,
    pb::volume_service_server::SERVICE_NAME,
    pb::snapshot_service_server::SERVICE_NAME,
    pb::group_service_server::SERVICE_NAME,
    pb::replication_service_server::SERVICE_NAME,
    pb::runbook_service_server::SERVICE_NAME,
    pb::cluster_service_server::SERVICE_NAME,
    pb::execution_service_server::SERVICE_NAME,
    pb::token_service_server::SERVICE_NAME,
    pb::audit_service_server::SERVICE_NAME,
    pb::message_service_server::SERVICE_NAME,
    pb::project_service_server::SERVICE_NAME,
];

/// Serves drover.v1, health and reflection on `listener` until `shutdown` fires. Seeds
/// the built-in group types and starts the procedure manager, which resumes every
/// execution no live orchestrator owns.
pub async fn serve(
    config: OrchestratorConfig,
    store: Arc<dyn KvStore>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<RunningOrchestrator, error::ApiError> {
    let local_addr = listener.local_addr().map_err(|e| error::ApiError::Internal(e.to_string()))?;
    let manager = drover_procedure::Manager::new(
        store.clone(),
        drover_procedure::ManagerConfig {
            owner_id: format!("orchestrator-{local_addr}-{}", uuid::Uuid::now_v7()),
            lease_ttl: config.owner_lease_ttl,
            scan_interval: std::time::Duration::from_secs(1),
        },
        shutdown.clone(),
    );
    let core = Core::new(Repo::new(store), config, manager.clone());
    service::groups::seed_group_types(&core).await?;
    service::shared::build_dependency_index(&core.repo).await?;
    service::messages::build_index(&core.repo).await?;
    // Executions left by a previous orchestrator (or one that died) resume from here on.
    procedures::register(&manager, &core);
    // Metrics and the compute sides' notices of each end (best effort: not made again
    // if this orchestrator dies right after an end).
    manager.on_end({
        let core = core.clone();
        Arc::new(move |rec: &drover_procedure::ExecutionRec| {
            let labels = metrics::ExecEnd { kind: rec.kind.clone(), status: rec.status.as_str().to_string() };
            let seconds = (rec.updated_ms - rec.created_ms).max(0) as f64 / 1000.0;
            core.metrics.execution_seconds.get_or_create(&labels).observe(seconds);
            core.hooks.notify_execution("execution.finished", rec, report_link(&core.config, &rec.id));
            // A group that moved is news of its own for the compute sides.
            if rec.kind == procedures::GROUP_KIND && rec.status == drover_procedure::ExecutionStatus::Succeeded {
                let event = match rec.state["action"].as_str() {
                    Some("failover") => Some("group.failed_over"),
                    Some("failback") => Some("group.failed_back"),
                    _ => None,
                };
                if let Some(event) = event {
                    core.hooks.notify_execution(event, rec, report_link(&core.config, &rec.id));
                }
            }
        })
    });
    // A project's failed executions become user messages there, stored with their end.
    manager.on_end_writes({
        let retention = core.config.message_retention;
        Arc::new(move |rec: &drover_procedure::ExecutionRec| service::messages::execution_end_writes(retention, rec))
    });
    // The compute sides hear when an execution starts, from the orchestrator it was
    // submitted to.
    manager.on_start({
        let core = core.clone();
        Arc::new(move |rec: &drover_procedure::ExecutionRec| {
            core.hooks.notify_execution("execution.started", rec, report_link(&core.config, &rec.id))
        })
    });
    manager.announce(serde_json::json!({
        "id": manager.owner_id(),
        "endpoint": format!("{}://{local_addr}", core.config.scheme()),
        "version": env!("CARGO_PKG_VERSION"),
        "started_at_ms": crate::model::now_ms(),
    }));
    manager.start();
    core.agents.follow_registrations(shutdown.clone());

    let sites = || service::sites::SiteApi { core: core.clone() };
    let volumes = Arc::new(service::volumes::VolumeApi { core: core.clone() });
    let replication = Arc::new(service::replication::ReplicationApi { core: core.clone(), parent: String::new() });
    let executions = service::executions::ExecutionApi { core: core.clone() };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<pb::volume_service_server::VolumeServiceServer<service::volumes::VolumeApi>>().await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    // Reflection lists exactly what this server serves (not the agent APIs in the same
    // descriptor set), in both reflection versions.
    let (reflection, reflection_alpha) =
        drover_proto::reflection::services(&SERVED).map_err(|e| error::ApiError::Internal(e.to_string()))?;

    match auth::tokens::bootstrap(&core.repo, &core.config.auth.token_file).await {
        Ok(line) => tracing::info!("{line}"),
        Err(e) => return Err(e),
    }
    tokio::spawn({
        let repo = core.repo.clone();
        let retention = core.config.auth.audit_retention;
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                () = auth::audit::prune_forever(repo, retention, std::time::Duration::from_secs(600)) => {}
                () = shutdown.cancelled() => {}
            }
        }
    });
    tokio::spawn({
        let repo = core.repo.clone();
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                () = service::messages::prune_forever(repo, std::time::Duration::from_secs(600)) => {}
                () = shutdown.cancelled() => {}
            }
        }
    });
    tokio::spawn({
        let repo = core.repo.clone();
        let retention = core.config.history_retention;
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                () = service::groups::prune_history_forever(repo, retention, std::time::Duration::from_secs(3600)) => {}
                () = shutdown.cancelled() => {}
            }
        }
    });
    tokio::spawn({
        let procedures = core.procedures.clone();
        let retention = core.config.execution_retention;
        let shutdown = shutdown.clone();
        async move {
            loop {
                match procedures.prune_ended(retention).await {
                    Ok(n) if n > 0 => tracing::info!(executions = n, "pruned executions past their retention"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning ended executions failed; retrying later"),
                }
                // Items a submit stored before its submitter died, an hour on.
                if let Err(e) = procedures.sweep_orphan_items(std::time::Duration::from_secs(3600)).await {
                    tracing::warn!(error = %e, "sweeping the items of unfinished submits failed; retrying later");
                }
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    });
    let guard = Arc::new(auth::layer::Guard {
        verifier: auth::tokens::Verifier::new(core.repo.clone(), core.config.auth.token_cache_ttl),
        repo: core.repo.clone(),
        tls: core.config.tls_files().is_some(),
        limits: auth::layer::TenantLimits {
            per_second: f64::from(core.config.auth.tenant_mutations_per_second),
            burst: f64::from(core.config.auth.tenant_mutation_burst),
            max_running: core.config.auth.tenant_max_running_executions as usize,
            procedures: manager.clone(),
            buckets: Default::default(),
        },
        metrics: core.metrics.clone(),
    });
    if !core.config.metrics_listen.is_empty() {
        let refresh: drover_proto::metrics::Refresh = {
            let core = core.clone();
            Arc::new(move || {
                let core = core.clone();
                Box::pin(async move { core.metrics.refresh(&core).await })
            })
        };
        drover_proto::metrics::listen(
            &core.config.metrics_listen,
            core.metrics.registry.clone(),
            Some(refresh),
            shutdown.clone().cancelled_owned(),
        )
        .await
        .map_err(|e| error::ApiError::InvalidArgument(format!("{e}; fix `metrics_listen`")))?;
    }
    if !core.config.dashboard_listen.is_empty() {
        dashboard::listen(core.clone(), &core.config.dashboard_listen, shutdown.clone().cancelled_owned())
            .await
            .map_err(|e| error::ApiError::InvalidArgument(format!("{e}; fix `dashboard_listen`")))?;
    }

    let mut server = tonic::transport::Server::builder();
    match core.config.tls_files() {
        Some(tls) => {
            // Client certificates are optional here: users present tokens; agents
            // present certificates, which the auth layer requires of their calls.
            let cfg = tls.server(false).map_err(error::ApiError::Unavailable)?;
            server = server.tls_config(cfg).map_err(|e| error::ApiError::Internal(format!("TLS: {e}")))?;
        }
        None => tracing::warn!(
            "serving in plain text (insecure): tokens, agent registrations and replication cross the network \
             unencrypted and unauthenticated; for development only"
        ),
    }
    let incoming = drover_proto::incoming(listener);
    let router = server
        .trace_fn(drover_proto::trace::server_span)
        .layer(auth::layer::AuthLayer { guard })
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(pb::version_service_server::VersionServiceServer::new(service::version::VersionApi))
        .add_service(InterceptedService::new(
            pb::site_service_server::SiteServiceServer::new(sites()),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::agent_registry_server::AgentRegistryServer::new(sites()),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::volume_service_server::VolumeServiceServer::from_arc(volumes),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::snapshot_service_server::SnapshotServiceServer::new(service::snapshots::SnapshotApi {
                core: core.clone(),
            }),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::group_service_server::GroupServiceServer::new(service::groups::GroupApi { core: core.clone() }),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::replication_service_server::ReplicationServiceServer::from_arc(replication),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::runbook_service_server::RunbookServiceServer::new(service::runbooks::RunbookApi { core: core.clone() }),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::cluster_service_server::ClusterServiceServer::new(service::cluster::ClusterApi { core: core.clone() }),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::execution_service_server::ExecutionServiceServer::new(executions),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::token_service_server::TokenServiceServer::new(auth::tokens::TokenApi { core: core.clone() }),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::audit_service_server::AuditServiceServer::new(auth::audit::AuditApi { core: core.clone() }),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::message_service_server::MessageServiceServer::new(service::messages::MessageApi { core: core.clone() }),
            check_api_version,
        ))
        .add_service(InterceptedService::new(
            pb::project_service_server::ProjectServiceServer::new(service::projects::ProjectApi { core: core.clone() }),
            check_api_version,
        ));
    let handle = tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()));

    Ok(RunningOrchestrator { local_addr, handle })
}

/// Where a person reads an execution's report: the dashboard's page when it is served,
/// else the command that prints it.
fn report_link(config: &config::OrchestratorConfig, id: &str) -> String {
    match config.dashboard_listen.is_empty() {
        true => format!("drover execution report {id}"),
        false => format!("http://{}/executions/{id}", config.dashboard_listen),
    }
}
