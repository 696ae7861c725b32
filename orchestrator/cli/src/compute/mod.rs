//! `drover compute --site S`: the reference compute service. It serves
//! `drover.compute.v1.ComputeHook` and runs each instance as a child process (the
//! workload in [`workload`]) that writes a verifiable log to its volumes over NBD, so a
//! failover's effect on applications can be checked end to end with real data.
//!
//! Instances are declared in a YAML file (`instances: [{id, project, volume_ids,
//! labels}]`); every site runs its own service with the same file, the instances
//! stopped until started with their volumes' connection info (`RefreshAttachments`).
//! Each mutating call is answered once per op_id (the same op_id again gets the first
//! answer). A service that restarts finds its instances stopped (their processes died
//! with it) and keeps their attachments.

pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use drover_proto::compute::v1 as cpb;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

/// `drover compute …` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ComputeArgs {
    #[command(subcommand)]
    pub cmd: Option<ComputeCmd>,
    /// The site this service is the compute side of.
    #[arg(long, default_value = "")]
    pub site: String,
    /// Address to serve on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:7800")]
    pub listen: String,
    /// The instances (YAML: `instances: [{id, project, volume_ids, labels}]`).
    #[arg(long)]
    pub instances: Option<PathBuf>,
    /// Where state and each instance's ack file are kept.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Time between an instance's records.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ComputeCmd {
    /// Checks an instance's log on its volumes: an exact prefix, no torn record, and at
    /// least every acknowledged record.
    Check {
        /// The instance id.
        #[arg(long)]
        instance: String,
        /// Its volumes' NBD URIs, in its order (`drover volume attach` prints them).
        #[arg(long = "uri", required = true)]
        uris: Vec<String>,
        /// The instance's ack file: the log must hold every record it acknowledged.
        #[arg(long)]
        acked_file: Option<PathBuf>,
    },
    /// The workload of one instance (run by the service).
    #[command(hide = true)]
    Instance {
        #[arg(long)]
        id: String,
        #[arg(long = "uri", required = true)]
        uris: Vec<String>,
        #[arg(long)]
        ack_file: PathBuf,
        #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceDef {
    id: String,
    #[serde(default)]
    project: String,
    volume_ids: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstancesFile {
    instances: Vec<InstanceDef>,
}

/// What survives a restart of the service.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    /// By instance: volume id to URI.
    attachments: BTreeMap<String, BTreeMap<String, String>>,
    /// Answers by op_id.
    answers: BTreeMap<String, Vec<(String, i32, String)>>,
}

struct Running {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    quiesced: bool,
}

struct State {
    /// As last read from the instances file (read again at every call, so instances can
    /// be added without a restart).
    defs: Vec<InstanceDef>,
    saved: Saved,
    running: HashMap<String, Running>,
}

/// The ComputeHook service.
pub struct Service {
    site: String,
    instances: PathBuf,
    dir: PathBuf,
    interval: Duration,
    state: Mutex<State>,
}

type Outcomes = Vec<cpb::InstanceOutcome>;

fn ok(id: &str) -> cpb::InstanceOutcome {
    cpb::InstanceOutcome { instance_id: id.into(), kind: cpb::OutcomeKind::Success as i32, reason: String::new() }
}

fn err(id: &str, why: String) -> cpb::InstanceOutcome {
    cpb::InstanceOutcome { instance_id: id.into(), kind: cpb::OutcomeKind::Error as i32, reason: why }
}

impl Service {
    fn save(&self, st: &State) {
        let path = self.dir.join("compute-state.json");
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(&st.saved).expect("state serialises");
        if std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
            tracing::warn!(path = %path.display(), "could not save the compute state");
        }
    }

    /// The answer recorded for `op_id`, if any.
    fn answered(st: &State, op_id: &str) -> Option<Outcomes> {
        st.saved.answers.get(op_id).map(|list| {
            list.iter()
                .map(|(id, kind, reason)| cpb::InstanceOutcome {
                    instance_id: id.clone(),
                    kind: *kind,
                    reason: reason.clone(),
                })
                .collect()
        })
    }

    fn record(&self, st: &mut State, op_id: &str, outcomes: &Outcomes) {
        if op_id.is_empty() {
            return;
        }
        let list = outcomes.iter().map(|o| (o.instance_id.clone(), o.kind, o.reason.clone())).collect();
        st.saved.answers.insert(op_id.to_string(), list);
        self.save(st);
    }

    /// Reads the instances file again; on a mistake, keeps the last good list.
    fn reload(&self, st: &mut State) {
        match load_instances(&self.instances) {
            Ok(defs) => st.defs = defs,
            Err(e) => tracing::warn!(error = %e, "the instances file is unreadable; keeping the last list"),
        }
    }

    fn def<'a>(st: &'a State, id: &str) -> Option<&'a InstanceDef> {
        st.defs.iter().find(|d| d.id == id)
    }

    async fn start_one(&self, st: &mut State, id: &str) -> Result<(), String> {
        if st.running.contains_key(id) {
            return Ok(());
        }
        let def = Self::def(st, id).ok_or_else(|| format!("no instance {id} at site {}", self.site))?.clone();
        let attached = st.saved.attachments.get(id).cloned().unwrap_or_default();
        let mut uris = Vec::new();
        for v in &def.volume_ids {
            let uri = attached.get(v).ok_or_else(|| {
                format!("instance {id} has no connection info for volume {v} here; refresh its attachments first")
            })?;
            uris.push(uri.clone());
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(["compute", "instance", "--id", id, "--interval", &format!("{}ms", self.interval.as_millis())]);
        cmd.arg("--ack-file").arg(self.dir.join(format!("{id}.ack")));
        for u in &uris {
            cmd.args(["--uri", u]);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start instance {id}: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        st.running.insert(id.to_string(), Running { child, stdin, stdout, quiesced: false });
        tracing::info!(instance = id, site = %self.site, "instance started");
        Ok(())
    }

    async fn stop_one(&self, st: &mut State, id: &str, grace: Duration) -> Result<(), String> {
        let Some(mut r) = st.running.remove(id) else { return Ok(()) };
        tracing::info!(instance = id, site = %self.site, "stopping instance");
        let _ = r.stdin.write_all(b"stop\n").await;
        // And end its input, which is a stop too.
        drop(r.stdin);
        match tokio::time::timeout(grace, r.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("instance {id} exited with {status} while stopping")),
            Ok(Err(e)) => Err(format!("instance {id}: {e}")),
            Err(_) => {
                let _ = r.child.kill().await;
                Err(format!("instance {id} did not stop within {grace:?}; it was killed"))
            }
        }
    }

    async fn say(&self, st: &mut State, id: &str, word: &str, expect: &str, within: Duration) -> Result<(), String> {
        let r = st.running.get_mut(id).ok_or_else(|| format!("instance {id} is not running"))?;
        let want_quiesced = word == "quiesce";
        if r.quiesced == want_quiesced {
            return Ok(());
        }
        r.stdin.write_all(format!("{word}\n").as_bytes()).await.map_err(|e| format!("instance {id}: {e}"))?;
        match tokio::time::timeout(within, r.stdout.next_line()).await {
            Ok(Ok(Some(l))) if l.trim() == expect => {
                r.quiesced = want_quiesced;
                Ok(())
            }
            Ok(other) => Err(format!("instance {id} answered {other:?} to {word}")),
            Err(_) => Err(format!("instance {id} did not {word} within {within:?}")),
        }
    }

    async fn each(&self, req: &cpb::InstancesRequest, what: &str) -> Outcomes {
        let mut st = self.state.lock().await;
        if let Some(a) = Self::answered(&st, &req.op_id) {
            return a;
        }
        self.reload(&mut st);
        let deadline = match req.deadline_ms {
            0 => Duration::from_secs(10),
            ms => Duration::from_millis(ms as u64),
        };
        let mut out = Vec::new();
        for id in &req.instance_ids {
            if Self::def(&st, id).is_none() {
                out.push(err(id, format!("no instance {id} at site {}", self.site)));
                continue;
            }
            let r = match what {
                "stop" => self.stop_one(&mut st, id, deadline).await,
                "start" => self.start_one(&mut st, id).await,
                "quiesce" => self.say(&mut st, id, "quiesce", "quiesced", deadline).await,
                _ => self.say(&mut st, id, "unquiesce", "unquiesced", deadline).await,
            };
            out.push(match r {
                Ok(()) => ok(id),
                Err(why) => err(id, why),
            });
        }
        self.record(&mut st, &req.op_id, &out);
        out
    }
}

#[tonic::async_trait]
impl cpb::compute_hook_server::ComputeHook for Service {
    async fn list_instances(
        &self,
        req: Request<cpb::ListInstancesRequest>,
    ) -> Result<Response<cpb::ListInstancesResponse>, Status> {
        let project = req.into_inner().project;
        let mut st = self.state.lock().await;
        self.reload(&mut st);
        let instances = st
            .defs
            .iter()
            .filter(|d| project.is_empty() || d.project == project)
            .map(|d| cpb::Instance {
                id: d.id.clone(),
                project: d.project.clone(),
                site: self.site.clone(),
                state: match st.running.get(&d.id) {
                    Some(r) if r.quiesced => "quiesced",
                    Some(_) => "running",
                    None => "stopped",
                }
                .into(),
                volume_ids: d.volume_ids.clone(),
                labels: d.labels.clone().into_iter().collect(),
            })
            .collect();
        Ok(Response::new(cpb::ListInstancesResponse { instances }))
    }

    async fn stop(&self, req: Request<cpb::InstancesRequest>) -> Result<Response<cpb::InstancesResponse>, Status> {
        Ok(Response::new(cpb::InstancesResponse { outcomes: self.each(req.get_ref(), "stop").await }))
    }

    async fn start(&self, req: Request<cpb::InstancesRequest>) -> Result<Response<cpb::InstancesResponse>, Status> {
        Ok(Response::new(cpb::InstancesResponse { outcomes: self.each(req.get_ref(), "start").await }))
    }

    async fn quiesce(&self, req: Request<cpb::InstancesRequest>) -> Result<Response<cpb::InstancesResponse>, Status> {
        Ok(Response::new(cpb::InstancesResponse { outcomes: self.each(req.get_ref(), "quiesce").await }))
    }

    async fn unquiesce(&self, req: Request<cpb::InstancesRequest>) -> Result<Response<cpb::InstancesResponse>, Status> {
        Ok(Response::new(cpb::InstancesResponse { outcomes: self.each(req.get_ref(), "unquiesce").await }))
    }

    async fn refresh_attachments(
        &self,
        req: Request<cpb::RefreshRequest>,
    ) -> Result<Response<cpb::InstancesResponse>, Status> {
        let r = req.into_inner();
        let mut st = self.state.lock().await;
        if let Some(a) = Self::answered(&st, &r.op_id) {
            return Ok(Response::new(cpb::InstancesResponse { outcomes: a }));
        }
        self.reload(&mut st);
        let mut out = Vec::new();
        for id in &r.instance_ids {
            let Some(def) = Self::def(&st, id).cloned() else {
                out.push(err(id, format!("no instance {id} at site {}", self.site)));
                continue;
            };
            if st.running.contains_key(id) {
                out.push(err(id, format!("instance {id} is running; stop it before its attachments change")));
                continue;
            }
            let mine: BTreeMap<String, String> = r
                .attachments
                .iter()
                .filter(|a| def.volume_ids.contains(&a.volume_id))
                .map(|a| (a.volume_id.clone(), a.uri.clone()))
                .collect();
            st.saved.attachments.entry(id.clone()).or_default().extend(mine);
            out.push(ok(id));
        }
        self.record(&mut st, &r.op_id, &out);
        Ok(Response::new(cpb::InstancesResponse { outcomes: out }))
    }

    async fn notify(&self, req: Request<cpb::NotifyRequest>) -> Result<Response<cpb::NotifyResponse>, Status> {
        let r = req.into_inner();
        tracing::info!(site = %self.site, event = %r.event, execution = %r.execution_id, summary = %r.summary, "notified");
        let line = serde_json::to_string(&r).expect("events serialise") + "\n";
        let path = self.dir.join("notifications.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Status::internal(e.to_string()))?;
        std::io::Write::write_all(&mut f, line.as_bytes()).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(cpb::NotifyResponse {}))
    }
}

/// Runs `drover compute`.
pub async fn run(args: ComputeArgs) -> Result<()> {
    match args.cmd.clone() {
        Some(ComputeCmd::Instance { id, uris, ack_file, interval }) => {
            workload::run(&id, &uris, &ack_file, interval).await?;
            // Not a return: the runtime would wait for the thread blocked reading stdin.
            std::process::exit(0)
        }
        Some(ComputeCmd::Check { instance, uris, acked_file }) => {
            let n = workload::read_log(&instance, &uris).await?;
            let acked = match &acked_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading the ack file {}", f.display()))?
                        .trim()
                        .parse::<u64>()
                        .context("the ack file holds no record number")?,
                ),
                None => None,
            };
            if let Some(a) = acked
                && n <= a
            {
                anyhow::bail!(
                    "instance {instance}: the log holds {n} record(s), but record {a} was acknowledged: lost writes"
                );
            }
            println!(
                "instance {instance}: {n} record(s), an exact prefix{}",
                acked.map_or(String::new(), |a| format!(", every acknowledged record (up to {a}) present"))
            );
            Ok(())
        }
        None => serve(args).await,
    }
}

fn load_instances(file: &std::path::Path) -> Result<Vec<InstanceDef>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed: InstancesFile = serde_norway::from_str(&text).map_err(|e| {
        let at = e.location().map_or(String::new(), |l| format!(":{}:{}", l.line(), l.column()));
        anyhow::anyhow!("{}{at}: {e}", file.display())
    })?;
    Ok(parsed.instances)
}

async fn serve(args: ComputeArgs) -> Result<()> {
    anyhow::ensure!(!args.site.is_empty(), "give the site this service is the compute side of (--site)");
    let file = args.instances.clone().ok_or_else(|| anyhow::anyhow!("give the instances file (--instances)"))?;
    let dir = args.state_dir.clone().ok_or_else(|| anyhow::anyhow!("give a state directory (--state-dir)"))?;
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("compute service of site {} listening on http://{addr}", args.site);
    serve_on(listener, &args.site, file, dir, args.interval, tokio_util::sync::CancellationToken::new()).await
}

/// Serves the compute side of `site` on `listener` until `shutdown` (the drill runs two
/// in its own process); instances stop with it.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    site: &str,
    instances: PathBuf,
    dir: PathBuf,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let defs = load_instances(&instances)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let saved: Saved = match std::fs::read(dir.join("compute-state.json")) {
        Ok(b) => serde_json::from_slice(&b).context("reading compute-state.json")?,
        Err(_) => Saved::default(),
    };
    let service = Arc::new(Service {
        site: site.to_string(),
        instances,
        dir,
        interval,
        state: Mutex::new(State { defs, saved, running: HashMap::new() }),
    });
    tracing::warn!("the reference compute service serves plain HTTP: for drills and tests, not production");
    tonic::transport::Server::builder()
        .add_service(cpb::compute_hook_server::ComputeHookServer::from_arc(service.clone()))
        .serve_with_incoming_shutdown(drover_proto::incoming(listener), shutdown.cancelled_owned())
        .await?;
    // Instances are killed with their handles.
    service.state.lock().await.running.clear();
    Ok(())
}
