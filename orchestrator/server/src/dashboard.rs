//! The web dashboard (served at `dashboard_listen`): server-rendered HTML pages, read-only,
//! for any token (reader, member or admin), each page built by calling the same API
//! handlers a gRPC client reaches, with the caller's identity, after the same rule check
//! the auth layer makes. A member or reader therefore sees its own project's groups and
//! executions only, exactly as through the API.
//!
//! - `/` sites and backends with agent health, then the groups and the newest executions;
//! - `/groups` every group the caller sees: replication status, RPO coloured against the
//!   group's interval (green up to 1×, amber up to 2×, red beyond), the RPO a disaster
//!   failover would have now (asked of the side it would move to), the last point;
//! - `/executions` and `/executions/{id}`: an execution's steps and items with live
//!   progress (the page polls a fragment of itself while the execution runs), and, for a
//!   runbook run, its DR report.
//!
//! Sign-in: `/login` takes a token (pasted, or in the URL fragment `#token=…`, which never
//! reaches a server log) and keeps it in an HttpOnly, SameSite=Strict cookie; calls with
//! `Authorization: Bearer` work too. The dashboard speaks plain HTTP: with TLS configured
//! it binds loopback only (put a TLS-terminating proxy in front) and marks the cookie
//! Secure, so a browser sends it over HTTPS only.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use drover_proto::v1 as pb;
use futures::StreamExt;
use pb::execution_service_server::ExecutionService;
use pb::group_service_server::GroupService;
use pb::site_service_server::SiteService;
use tonic::Request;

use crate::auth::tokens::{Rejected, Verifier};
use crate::auth::{Caller, Need, rule_for};
use crate::model::{GroupRec, keys, now_ms, replication_status as rs};
use crate::runbook::report::Report;
use crate::runbook::run::RunState;
use crate::service::Core;

const COOKIE: &str = "drover_token";
/// Groups shown on one page, each asked of its agents.
const GROUPS_PER_PAGE: u32 = 200;

struct App {
    core: Arc<Core>,
    verifier: Verifier,
    secure: bool,
}

type Page = Result<Response, Response>;

/// Binds `addr` and serves the dashboard until `shutdown`; returns the bound address.
pub async fn listen(
    core: Arc<Core>,
    addr: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for the dashboard on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    // Tokens must not cross a network in plain text: with TLS configured (a real
    // deployment) the dashboard binds loopback only, behind a TLS-terminating proxy.
    if core.config.tls_files().is_some() && !local.ip().is_loopback() {
        return Err(std::io::Error::other(format!(
            "the dashboard serves plain HTTP and carries API tokens, so with TLS configured it binds a loopback \
             address only; set dashboard_listen to 127.0.0.1:PORT and put a TLS proxy in front (asked: {addr})"
        )));
    }
    let app = Arc::new(App {
        verifier: Verifier::new(core.repo.clone(), core.config.auth.token_cache_ttl),
        secure: core.config.tls_files().is_some(),
        core: core.clone(),
    });
    let router = axum::Router::new()
        .route("/", axum::routing::get(overview))
        .route("/groups", axum::routing::get(groups_page))
        .route("/executions", axum::routing::get(executions_page))
        .route("/executions/{id}", axum::routing::get(execution_page))
        .route("/login", axum::routing::get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
        .with_state(app);
    tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(shutdown).await });
    tracing::info!("serving the dashboard on http://{local}/");
    Ok(local)
}

// ---------------------------------------------------------------------------- sign-in

fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')).map(str::to_string))
        .filter(|t| !t.is_empty())
}

/// The caller of a page, or the answer to give instead (the sign-in page, or why the
/// store cannot be read).
async fn who(app: &App, headers: &HeaderMap) -> Result<Caller, Response> {
    let Some(token) = token_of(headers) else { return Err(Redirect::to("/login").into_response()) };
    match app.verifier.verify(&token).await {
        Ok(c) => Ok(c),
        Err(Rejected::Invalid) => Err(Redirect::to("/login?why=invalid").into_response()),
        Err(Rejected::Revoked { .. }) => Err(Redirect::to("/login?why=revoked").into_response()),
        Err(Rejected::Unavailable(e)) => Err(problem(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the orchestrator cannot read its store ({e}); reload this page once it is back"),
        )),
    }
}

/// A request to an API handler, as `who` made it, after the rule of `method` (the gRPC
/// path) admitted it, as the auth layer would.
// The error is the page to answer with, as every handler here returns.
#[allow(clippy::result_large_err)]
fn call<T>(who: &Caller, method: &str, msg: T) -> Result<Request<T>, Response> {
    let allowed = match rule_for(method).map(|r| r.need) {
        Some(Need::Public) => true,
        Some(Need::Role(role)) => who.role >= role,
        _ => false,
    };
    if !allowed {
        return Err(problem(StatusCode::FORBIDDEN, &format!("this token's role may not call {method}")));
    }
    let mut r = Request::new(msg);
    r.extensions_mut().insert(who.clone());
    Ok(r)
}

fn api_error(s: tonic::Status) -> Response {
    let code = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    problem(code, s.message())
}

fn problem(code: StatusCode, why: &str) -> Response {
    let body =
        format!("<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/\">Back to the overview</a></p>", code, esc(why));
    (code, Html(layout("Drover: error", "", &body, false))).into_response()
}

async fn login_page(Query(q): Query<HashMap<String, String>>) -> Html<String> {
    let why = match q.get("why").map(String::as_str) {
        Some("invalid") => {
            "<p class=\"error\">That token is not valid. Create one with <code>drover token create \
                            --project P --role reader</code>.</p>"
        }
        Some("revoked") => "<p class=\"error\">That token was revoked. Ask an admin for a new one.</p>",
        _ => "",
    };
    let body = format!(
        "<h1>Sign in</h1>{why}<form id=\"login\" method=\"post\" action=\"/login\"><label>API token <input \
         name=\"token\" type=\"password\" autocomplete=\"off\" required></label> <button>Sign in</button></form><p \
         class=\"muted\">Any token works: readers and members see their own project, admins see every \
         project.</p><script>{LOGIN_JS}</script>"
    );
    Html(layout("Drover: sign in", "", &body, false))
}

/// Signs in with the token in the URL fragment, which a link or a test can carry.
const LOGIN_JS: &str = "(function(){var m=location.hash.match(/^#token=(.+)$/);if(!m)return;\
history.replaceState(null,'','/login');var f=document.getElementById('login');\
f.elements.token.value=decodeURIComponent(m[1]);f.submit();})();";

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(app): State<Arc<App>>, axum::Form(f): axum::Form<LoginForm>) -> Response {
    let token = f.token.trim().to_string();
    match app.verifier.verify(&token).await {
        Ok(_) => {
            let secure = if app.secure { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={token}; Path=/; Max-Age=43200; HttpOnly; SameSite=Strict{secure}");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Err(Rejected::Invalid) => Redirect::to("/login?why=invalid").into_response(),
        Err(Rejected::Revoked { .. }) => Redirect::to("/login?why=revoked").into_response(),
        Err(Rejected::Unavailable(e)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the orchestrator cannot read its store ({e}); try again once it is back"),
        ),
    }
}

async fn logout() -> Response {
    let cookie = format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

// ---------------------------------------------------------------------------- pages

async fn overview(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let who = who(&app, &headers).await?;
    let sites = crate::service::sites::SiteApi { core: app.core.clone() };
    let req = call(&who, "/drover.v1.SiteService/ListBackends", pb::ListBackendsRequest::default())?;
    let backends = sites.list_backends(req).await.map_err(api_error)?.into_inner().backends;
    let mut body = String::from("<h1>Overview</h1><h2>Sites and backends</h2>");
    body.push_str(&backends_table(&backends));
    let (groups, more) = group_rows(&app, &who, "").await?;
    let _ = write!(body, "<h2>Groups</h2>{}", groups_table(&groups));
    if !more.is_empty() {
        body.push_str("<p><a href=\"/groups\">All groups</a></p>");
    }
    let execs = list_executions(&app, &who, 10).await?;
    let _ = write!(
        body,
        "<h2>Newest executions</h2>{}<p><a href=\"/executions\">All executions</a></p>",
        executions_table(&execs)
    );
    Ok(Html(layout("Drover: overview", "/", &body, true)).into_response())
}

async fn groups_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Page {
    let who = who(&app, &headers).await?;
    let marker = q.get("marker").cloned().unwrap_or_default();
    let (rows, next) = group_rows(&app, &who, &marker).await?;
    let mut body = format!("<h1>Groups</h1>{}", groups_table(&rows));
    if !next.is_empty() {
        let _ = write!(body, "<p><a href=\"/groups?marker={}\">Next page</a></p>", esc(&next));
    }
    Ok(Html(layout("Drover: groups", "/groups", &body, true)).into_response())
}

async fn executions_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let who = who(&app, &headers).await?;
    let execs = list_executions(&app, &who, 100).await?;
    let body = format!("<h1>Executions</h1>{}", executions_table(&execs));
    Ok(Html(layout("Drover: executions", "/executions", &body, true)).into_response())
}

async fn execution_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Page {
    let who = who(&app, &headers).await?;
    let api = crate::service::executions::ExecutionApi { core: app.core.clone() };
    let get = || async {
        let req = call(&who, "/drover.v1.ExecutionService/GetExecution", pb::GetExecutionRequest { id: id.clone() })?;
        Ok::<_, Response>(api.get_execution(req).await.map_err(api_error)?.into_inner())
    };
    let mut e = get().await?;
    if q.contains_key("fragment") {
        // A long poll: answer once the execution changed from what the page shows
        // (`since`, its update time), or after 10 s.
        let since = q.get("since").and_then(|s| s.parse::<i64>().ok());
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while since == Some(e.updated_ms) && e.status == "running" && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            e = get().await?;
        }
        return Ok(Html(live_section(&e)).into_response());
    }
    let live = live_section(&e);
    let mut body = format!("<h1>Execution <code>{}</code></h1>", esc(&e.id));
    let _ = write!(
        body,
        "<dl class=\"facts\"><dt>kind</dt><dd>{}</dd><dt>summary</dt><dd>{}</dd><dt>created</dt><dd>{}</dd>\
         <dt>owner</dt><dd>{} (epoch {}, claimed {} time{})</dd><dt>trace</dt><dd><code>{}</code></dd>{}</dl>",
        esc(&e.kind),
        esc(&e.summary),
        time(e.created_ms),
        esc(&e.owner),
        e.epoch,
        e.claims,
        if e.claims == 1 { "" } else { "s" },
        esc(&e.trace_id),
        if e.project.is_empty() { String::new() } else { format!("<dt>project</dt><dd>{}</dd>", esc(&e.project)) },
    );
    body.push_str(&live);
    if e.status != "running" && e.kind == crate::runbook::run::KIND {
        let req = call(
            &who,
            "/drover.v1.ExecutionService/GetExecutionReport",
            pb::GetExecutionReportRequest { id: e.id.clone(), format: "json".into() },
        )?;
        match api.get_execution_report(req).await {
            Ok(r) => match serde_json::from_str::<Report>(&r.into_inner().text) {
                Ok(report) => body.push_str(&report_html(&report)),
                Err(err) => {
                    let _ =
                        write!(body, "<p class=\"error\">The report could not be read: {}</p>", esc(&err.to_string()));
                }
            },
            Err(s) => {
                let _ = write!(body, "<p class=\"error\">No report: {}</p>", esc(s.message()));
            }
        }
    }
    Ok(Html(layout(&format!("Drover: execution {}", e.id), "/executions", &body, false)).into_response())
}

// ---------------------------------------------------------------------------- data

/// A group as the groups table shows it.
struct GroupRow {
    g: pb::Group,
    /// Age of the newest point complete on every volume; -1 unknown or not replicating.
    rpo_ms: i64,
    /// The RPO a disaster failover would have now.
    predicted_ms: i64,
    /// The last recovery point (of the volume whose newest point is oldest) and when.
    last_point: String,
    last_point_ms: i64,
}

async fn group_rows(app: &App, who: &Caller, marker: &str) -> Result<(Vec<GroupRow>, String), Response> {
    let api = crate::service::groups::GroupApi { core: app.core.clone() };
    let req = call(
        who,
        "/drover.v1.GroupService/ListGroups",
        pb::ListGroupsRequest { project: String::new(), limit: GROUPS_PER_PAGE, marker: marker.to_string() },
    )?;
    let page = api.list_groups(req).await.map_err(api_error)?.into_inner();
    let core = &app.core;
    let rows = futures::stream::iter(page.groups.into_iter().map(|g| async move {
        let mut row = GroupRow { g, rpo_ms: -1, predicted_ms: -1, last_point: String::new(), last_point_ms: 0 };
        if !matches!(row.g.replication_status.as_str(), rs::ENABLED | rs::FAILED_OVER) {
            return row;
        }
        let Ok(Some(rec)) = core.repo.get::<GroupRec>(&keys::group(&row.g.id)).await else { return row };
        if let Ok(infos) = crate::service::shared::volume_infos(core, &rec.rec).await {
            row.rpo_ms = crate::service::shared::rpo_ms(&infos);
            if let Some(oldest) = infos.iter().filter(|i| i.last_sync_time_ms > 0).min_by_key(|i| i.last_sync_time_ms) {
                row.last_point = oldest.recovery_point_id.clone();
                row.last_point_ms = oldest.last_sync_time_ms;
            }
        }
        row.predicted_ms = crate::service::shared::target_rpo_ms(core, &rec.rec).await;
        row
    }))
    .buffered(32)
    .collect::<Vec<_>>()
    .await;
    Ok((rows, page.next_marker))
}

async fn list_executions(app: &App, who: &Caller, limit: u32) -> Result<Vec<pb::Execution>, Response> {
    let api = crate::service::executions::ExecutionApi { core: app.core.clone() };
    let req = call(
        who,
        "/drover.v1.ExecutionService/ListExecutions",
        pb::ListExecutionsRequest { status: String::new(), limit, marker: String::new() },
    )?;
    Ok(api.list_executions(req).await.map_err(api_error)?.into_inner().executions)
}

// ---------------------------------------------------------------------------- rendering

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn seconds(ms: i64) -> String {
    if ms < 0 { "unknown".into() } else { format!("{:.1} s", ms as f64 / 1000.0) }
}

/// The colour class of an RPO against the group's interval: green up to 1×, amber up
/// to 2×, red beyond (and grey when unknown).
pub fn rpo_class(rpo_ms: i64, interval_s: i64) -> &'static str {
    if rpo_ms < 0 || interval_s <= 0 {
        return "unknown";
    }
    let interval_ms = interval_s * 1000;
    if rpo_ms <= interval_ms {
        "ok"
    } else if rpo_ms <= 2 * interval_ms {
        "warn"
    } else {
        "bad"
    }
}

fn status_class(s: &str) -> &'static str {
    match s {
        "enabled" | "failed-over" | "succeeded" | "up" => "ok",
        "error" | "failed" | "down" | "cancelled" => "bad",
        "enabling" | "failing-over" | "failing-back" | "disabling" | "running" | "waiting" => "busy",
        _ => "unknown",
    }
}

fn badge(s: &str) -> String {
    format!("<span class=\"badge {}\">{}</span>", status_class(s), esc(s))
}

fn backends_table(backends: &[pb::Backend]) -> String {
    if backends.is_empty() {
        return "<p class=\"muted\">No backends yet: add one with <code>drover backend create</code>.</p>".into();
    }
    let mut t = String::from(
        "<div class=\"scroll\"><table id=\"backends\"><thead><tr><th>backend</th><th>site</th><th>status</th>\
         <th>agents up</th><th class=\"wide\">driver</th><th>frozen</th></tr></thead><tbody>",
    );
    for b in backends {
        let up = b.agents.iter().filter(|a| a.liveness == "up").count();
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{up} of {}</td><td class=\"wide\">{}</td><td>{}</td></tr>",
            esc(&b.name),
            esc(&b.site),
            badge(&b.status),
            b.agents.len(),
            esc(&b.driver),
            if b.frozen { "<span class=\"badge warn\">frozen</span>" } else { "no" }
        );
    }
    t.push_str("</tbody></table></div>");
    t
}

fn groups_table(rows: &[GroupRow]) -> String {
    if rows.is_empty() {
        return "<p class=\"muted\">No groups to show.</p>".into();
    }
    let mut t = String::from(
        "<div class=\"scroll\"><table id=\"groups\"><thead><tr><th>group</th><th class=\"wide\">project</th>\
         <th>status</th><th>RPO</th><th>interval</th><th>disaster RPO now</th><th class=\"wide\">active</th>\
         <th class=\"wide\">last recovery point</th></tr></thead><tbody>",
    );
    for r in rows {
        let g = &r.g;
        let reason = if g.status_reason.is_empty() {
            String::new()
        } else {
            format!("<div class=\"reason\">{}</div>", esc(&g.status_reason))
        };
        let _ = write!(
            t,
            "<tr data-group=\"{name}\"><td>{name}</td><td class=\"wide\">{project}</td><td>{status}{reason}</td>\
             <td class=\"rpo {class}\" data-rpo-ms=\"{rpo}\">{rpo_text}</td><td>{interval} s</td>\
             <td class=\"{pclass}\">{predicted}</td><td class=\"wide\">{active}</td><td class=\"wide\">{point}</td></tr>",
            name = esc(&g.name),
            project = esc(&g.project),
            status = badge(&g.replication_status),
            class = rpo_class(r.rpo_ms, g.sync_interval_seconds),
            rpo = r.rpo_ms,
            rpo_text = seconds(r.rpo_ms),
            interval = g.sync_interval_seconds,
            pclass = rpo_class(r.predicted_ms, g.sync_interval_seconds),
            predicted = seconds(r.predicted_ms),
            active = esc(&g.active_backend),
            point = if r.last_point.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "<code title=\"{p}\">{}</code> {}",
                    esc(&short(&r.last_point)),
                    time(r.last_point_ms),
                    p = esc(&r.last_point)
                )
            },
        );
    }
    t.push_str("</tbody></table></div>");
    t
}

fn short(id: &str) -> String {
    id.chars().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect()
}

/// Done and total units of an execution: a runbook's items (a step without items counts
/// as one), or for other kinds its steps.
fn progress_of(e: &pb::Execution) -> (usize, usize) {
    if let Ok(state) = serde_json::from_str::<RunState>(&e.state_json) {
        let (mut done, mut total) = (0, 0);
        for s in &state.steps {
            if s.items.is_empty() {
                total += 1;
                done += usize::from(!matches!(s.status.as_str(), "pending" | "running"));
            } else {
                total += s.items.len();
                done += s.items.iter().filter(|i| i.done()).count();
            }
        }
        return (done, total);
    }
    let done = e.steps.iter().filter(|s| s.ended_ms > 0).count();
    (done, e.steps.len().max(done))
}

fn progress_bar(e: &pb::Execution) -> String {
    let (done, total) = progress_of(e);
    let (done, total) = if e.status != "running" && total == 0 { (1, 1) } else { (done, total.max(1)) };
    format!(
        "<progress max=\"{total}\" value=\"{done}\"></progress> <span class=\"progress-text\">{done} of {total} \
         done</span>"
    )
}

fn executions_table(execs: &[pb::Execution]) -> String {
    if execs.is_empty() {
        return "<p class=\"muted\">No executions yet.</p>".into();
    }
    let mut t = String::from(
        "<div class=\"scroll\"><table id=\"executions\"><thead><tr><th>execution</th><th>kind</th><th>status</th>\
         <th>progress</th><th class=\"wide\">summary</th><th class=\"wide\">updated</th></tr></thead><tbody>",
    );
    for e in execs {
        let _ = write!(
            t,
            "<tr><td><a href=\"/executions/{id}\"><code>{short}</code></a></td><td>{kind}</td><td>{status}</td>\
             <td>{progress}</td><td class=\"wide\">{summary}</td><td class=\"wide\">{updated}</td></tr>",
            id = esc(&e.id),
            short = esc(&short(&e.id)),
            kind = esc(&e.kind),
            status = badge(&e.status),
            progress = progress_bar(e),
            summary = esc(&e.summary),
            updated = time(e.updated_ms),
        );
    }
    t.push_str("</tbody></table></div>");
    t
}

/// The part of an execution's page that changes while it runs; the page's script asks
/// for it again (a long poll, answered when the execution changed) and swaps it in,
/// until `data-ended` shows.
fn live_section(e: &pb::Execution) -> String {
    let running = e.status == "running";
    let mut out = format!(
        "<section id=\"live\" data-status=\"{status}\" data-updated=\"{updated}\"{ended}><p>Status {badge} {bar}</p>",
        status = esc(&e.status),
        updated = e.updated_ms,
        ended = if running { "" } else { " data-ended=\"1\"" },
        badge = badge(&e.status),
        bar = progress_bar(e),
    );
    if running {
        let _ = write!(out, "<p>Now at step <b id=\"at\">{}</b>", esc(&e.step));
        if e.paused {
            out.push_str(" (paused: <code>drover execution resume ID</code> goes on)");
        }
        out.push_str("</p>");
        if e.step.starts_with("prompt") {
            let _ = write!(
                out,
                "<p class=\"prompt\">Waiting for a decision: <code>drover execution approve {id}</code> or \
                 <code>drover execution reject {id}</code>.</p>",
                id = esc(&e.id)
            );
        }
    }
    if !e.error.is_empty() {
        let _ = write!(out, "<p class=\"error\">{}</p>", esc(&e.error));
    }
    match serde_json::from_str::<RunState>(&e.state_json) {
        Ok(state) => {
            out.push_str(
                "<div class=\"scroll\"><table id=\"steps\"><thead><tr><th>step</th><th>kind</th><th>status</th>\
                 <th>items</th><th class=\"wide\">note</th></tr></thead><tbody>",
            );
            for s in &state.steps {
                // The step the execution is at may not have marked itself started yet
                // (a prompt waits before it does).
                let here = running
                    && (e.step == s.name
                        || e.step.strip_prefix(&s.kind).and_then(|r| r.strip_prefix(':')) == Some(s.name.as_str()));
                let status = match s.status.as_str() {
                    "pending" if here && s.kind == "prompt" => "waiting",
                    "pending" if here => "running",
                    other => other,
                };
                let done = s.items.iter().filter(|i| i.done()).count();
                let items = if s.items.is_empty() {
                    "-".to_string()
                } else {
                    format!(
                        "<progress max=\"{}\" value=\"{done}\"></progress> {done} of {}",
                        s.items.len(),
                        s.items.len()
                    )
                };
                let _ = write!(
                    out,
                    "<tr data-step=\"{name}\"><td>{name}</td><td>{kind}</td><td>{status}</td><td>{items}</td>\
                     <td class=\"wide\">{note}</td></tr>",
                    name = esc(&s.name),
                    kind = esc(&s.kind),
                    status = badge(status),
                    note = esc(&s.note),
                );
            }
            out.push_str("</tbody></table></div>");
            for s in state.steps.iter().filter(|s| !s.shown.is_empty()) {
                let _ = write!(out, "<h3>Prompt {}</h3><ul>", esc(&s.name));
                for line in &s.shown {
                    let _ = write!(out, "<li>{}</li>", esc(line));
                }
                out.push_str("</ul>");
            }
        }
        Err(_) => {
            out.push_str(
                "<div class=\"scroll\"><table id=\"steps\"><thead><tr><th>step</th><th>started</th><th>ended</th>\
                 <th class=\"wide\">note</th></tr></thead><tbody>",
            );
            for s in &e.steps {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"wide\">{}</td></tr>",
                    esc(&s.name),
                    time(s.started_ms),
                    time(s.ended_ms),
                    esc(&s.note)
                );
            }
            out.push_str("</tbody></table></div>");
        }
    }
    out.push_str("</section>");
    if running {
        out.push_str(concat!("<script>", include_str!("dashboard/poll.js"), "</script>"));
    }
    out
}

fn report_html(r: &Report) -> String {
    let t = &r.totals;
    let mut out = format!(
        "<section id=\"report\"><h2>DR report</h2><p>Runbook <b>{}</b>, status {}, started {}, ended {}. Items: {} — {} \
         succeeded, {} failed, {} skipped.</p>",
        esc(&r.runbook),
        badge(&r.status),
        time(r.started_ms),
        time(r.ended_ms),
        t.items,
        t.succeeded,
        t.failed,
        t.skipped
    );
    if !r.groups.is_empty() {
        out.push_str(
            "<p class=\"muted\">Predictions were made when the run was submitted.</p><div class=\"scroll\"><table \
             id=\"report-groups\"><thead><tr><th>tier</th><th>group</th><th>outcome</th><th>RPO</th><th>RPO \
             predicted</th><th>final sync</th><th>final sync predicted</th><th>RTO</th><th \
             class=\"wide\">reason</th></tr></thead><tbody>",
        );
        for g in &r.groups {
            let _ = write!(
                out,
                "<tr data-group=\"{name}\"><td>{}</td><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td class=\"wide\">{}</td></tr>",
                g.tier,
                badge(&g.outcome),
                seconds(g.rpo_ms),
                seconds(g.predicted.rpo_ms),
                esc(&crate::runbook::report::shipped(g.sync_bytes, g.sync_ms)),
                esc(&crate::runbook::report::shipped(g.predicted.sync_bytes, g.predicted.sync_ms)),
                seconds(g.rto_ms),
                esc(&g.reason),
                name = esc(&g.group),
            );
        }
        out.push_str("</tbody></table></div>");
    }
    out.push_str("<h3>Timeline</h3><div class=\"scroll\"><table id=\"timeline\"><thead><tr><th>step</th><th>kind</th><th>status</th><th class=\"wide\">started</th><th class=\"wide\">ended</th><th class=\"wide\">note</th></tr></thead><tbody>");
    for s in &r.steps {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"wide\">{}</td><td class=\"wide\">{}</td><td \
             class=\"wide\">{}</td></tr>",
            esc(&s.name),
            esc(&s.kind),
            badge(&s.status),
            time(s.started_ms),
            time(s.ended_ms),
            esc(&s.note)
        );
        if let Some(d) = &s.decision {
            let _ = write!(
                out,
                "<tr><td colspan=\"6\">Decision: <b>{}</b> by {} at {}</td></tr>",
                if d.approve { "approved" } else { "rejected" },
                esc(&d.by),
                time(d.at_ms)
            );
        }
    }
    out.push_str("</tbody></table></div></section>");
    out
}

fn layout(title: &str, here: &str, body: &str, refresh: bool) -> String {
    let nav = [("/", "Overview"), ("/groups", "Groups"), ("/executions", "Executions")]
        .iter()
        .map(|(href, name)| {
            format!("<a href=\"{href}\"{}>{name}</a>", if *href == here { " aria-current=\"page\"" } else { "" })
        })
        .collect::<String>();
    let signed_in = !title.ends_with("sign in");
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width, initial-scale=1\">{refresh}<title>{title}</title><style>{CSS}</style></head>\
         <body><header><b>Drover</b><nav>{nav}</nav>{logout}</header><main>{body}<p class=\"muted\">Rendered {now}{auto}.\
         </p></main></body></html>",
        refresh = if refresh { "<meta http-equiv=\"refresh\" content=\"15\">" } else { "" },
        title = esc(title),
        logout = if signed_in {
            "<form method=\"post\" action=\"/logout\" class=\"logout\"><button>Sign out</button></form>"
        } else {
            ""
        },
        now = time(now_ms()),
        auto = if refresh { "; refreshed every 15 s" } else { "" },
    )
}

const CSS: &str = include_str!("dashboard/style.css");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rpo_colour_follows_the_interval() {
        assert_eq!(rpo_class(-1, 60), "unknown");
        assert_eq!(rpo_class(0, 60), "ok");
        assert_eq!(rpo_class(60_000, 60), "ok");
        assert_eq!(rpo_class(60_001, 60), "warn");
        assert_eq!(rpo_class(120_000, 60), "warn");
        assert_eq!(rpo_class(120_001, 60), "bad");
        assert_eq!(rpo_class(5, 0), "unknown", "no interval, no colour");
    }

    #[test]
    fn text_is_escaped_and_tokens_are_found_in_either_place() {
        assert_eq!(esc("<a href='x'>&\"</a>"), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=b; drover_token=dr_1.xyz; c=d".parse().unwrap());
        assert_eq!(token_of(&h).as_deref(), Some("dr_1.xyz"));
        h.insert(header::AUTHORIZATION, "Bearer dr_2.abc".parse().unwrap());
        assert_eq!(token_of(&h).as_deref(), Some("dr_2.abc"), "a header wins over the cookie");
        assert_eq!(token_of(&HeaderMap::new()), None);
        let mut empty = HeaderMap::new();
        empty.insert(header::COOKIE, "drover_token=".parse().unwrap());
        assert_eq!(token_of(&empty), None, "a signed-out cookie is no token");
    }
}
