//! `drover token` and `drover audit`: API tokens and the audit trail (admin only).

use anyhow::Result;
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::Ctx;
use crate::output::{Format, Table, emit, timestamp};

/// `drover token …`
#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once and never again.
    Create {
        /// A label for people.
        #[arg(long)]
        name: String,
        /// The project it belongs to (`--project` of the command, by default).
        #[arg(long = "for-project")]
        for_project: Option<String>,
        /// admin, member or reader.
        #[arg(long, default_value = "member")]
        role: String,
    },
    /// List tokens (never their secrets).
    List {
        /// Only this project's tokens.
        #[arg(long = "for-project")]
        for_project: Option<String>,
    },
    /// Revoke a token: every orchestrator refuses it within `auth.token_cache_ttl`.
    Revoke { id: String },
}

/// `drover audit …`
#[derive(Subcommand)]
pub enum AuditCmd {
    /// List audit records, newest first.
    List {
        /// Only calls by this token id.
        #[arg(long)]
        token_id: Option<String>,
        /// Only calls of tokens of this project.
        #[arg(long = "of-project")]
        of_project: Option<String>,
        /// Only methods whose name contains this text, e.g. Failover.
        #[arg(long)]
        method: Option<String>,
        /// Only refused calls.
        #[arg(long)]
        refused: bool,
        /// Only records newer than this, e.g. 1h.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Records per page (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after this record id (the previous page's last).
        #[arg(long, default_value = "")]
        marker: String,
    },
}

fn table(tokens: &[pb::Token]) -> Table {
    let mut t = Table::new(&["ID", "NAME", "PROJECT", "ROLE", "CREATED", "REVOKED"]);
    for k in tokens {
        t.row(vec![
            k.id.clone(),
            k.name.clone(),
            k.project.clone(),
            k.role.clone(),
            timestamp(k.created_at_ms),
            if k.revoked_at_ms == 0 { "-".into() } else { timestamp(k.revoked_at_ms) },
        ]);
    }
    t
}

/// Runs one token command.
pub async fn run(ctx: &mut Ctx, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create { name, for_project, role } => {
            let project = for_project.unwrap_or_else(|| ctx.project.clone());
            let r = ctx.api.tokens.create_token(pb::CreateTokenRequest { name, project, role }).await?.into_inner();
            emit(ctx.fmt, &r, |r| {
                let mut t = table(r.token.as_slice());
                t.row(vec![format!("secret (shown once): {}", r.secret)]);
                t
            });
        }
        TokenCmd::List { for_project } => {
            let project = for_project.unwrap_or_default();
            // Every page (tokens are made by admins, so they stay few), oldest first.
            let mut all = pb::ListTokensResponse::default();
            loop {
                let req = pb::ListTokensRequest { project: project.clone(), limit: 0, marker: all.next_marker };
                let page = ctx.api.tokens.list_tokens(req).await?.into_inner();
                all.tokens.extend(page.tokens);
                all.next_marker = page.next_marker;
                if all.next_marker.is_empty() {
                    break;
                }
            }
            all.tokens.sort_by_key(|t| t.created_at_ms);
            emit(ctx.fmt, &all, |r| table(&r.tokens));
        }
        TokenCmd::Revoke { id } => {
            let r = ctx.api.tokens.revoke_token(pb::RevokeTokenRequest { id }).await?.into_inner();
            emit(ctx.fmt, &r, |r| table(std::slice::from_ref(r)));
        }
    }
    Ok(())
}

/// Runs one audit command.
pub async fn run_audit(ctx: &mut Ctx, cmd: AuditCmd) -> Result<()> {
    let AuditCmd::List { token_id, of_project, method, refused, since, limit, marker } = cmd;
    let since_ms = since.map(|d| drover_orchestrator::model::now_ms() - d.as_millis() as i64).unwrap_or(0);
    let mut req = pb::ListAuditRequest {
        since_ms,
        token_id: token_id.unwrap_or_default(),
        project: of_project.unwrap_or_default(),
        method: method.unwrap_or_default(),
        refused_only: refused,
        limit,
        marker,
    };
    // One call reads a bounded stretch of the trail, so a page of a narrow filter may
    // come back short with a marker: ask again from it until the page is full or the
    // trail ends.
    let want = if limit == 0 { 100 } else { limit as usize };
    let mut r = pb::ListAuditResponse::default();
    loop {
        let page = ctx.api.audit.list_audit(req.clone()).await?.into_inner();
        r.records.extend(page.records);
        r.next_marker = page.next_marker;
        if r.next_marker.is_empty() || r.records.len() >= want {
            break;
        }
        req.limit = (want - r.records.len()) as u32;
        req.marker = r.next_marker.clone();
    }
    emit(ctx.fmt, &r, |r| {
        let mut t = Table::new(&["TIME", "TOKEN", "PROJECT", "ROLE", "METHOD", "CODE", "PEER", "MESSAGE"]);
        for a in &r.records {
            t.row(vec![
                timestamp(a.at_ms),
                a.token_id.clone(),
                a.project.clone(),
                a.role.clone(),
                a.method.trim_start_matches("/drover.v1.").to_string(),
                a.code.clone(),
                a.peer.clone(),
                a.message.clone(),
            ]);
        }
        if !r.next_marker.is_empty() {
            t.row(vec![format!("more: --marker {}", r.next_marker)]);
        }
        t
    });
    if ctx.fmt == Format::Table && r.records.is_empty() {
        eprintln!("no audit records match");
    }
    Ok(())
}
