//! `drover message`: user messages, the failures no reply could tell (a periodic sync
//! that keeps failing, an execution that failed after its caller left).

use anyhow::Result;
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::Ctx;
use crate::output::{Table, emit, timestamp};

/// `drover message …`
#[derive(Subcommand)]
pub enum MessageCmd {
    /// List the project's messages, newest first.
    List {
        /// Every project's (admins): by project, each newest first.
        #[arg(long)]
        all_projects: bool,
    },
    /// Show one message: what happened, and what to do next.
    Show { id: String },
    /// Delete a message once handled.
    Delete { id: String },
}

fn table(messages: &[pb::UserMessage]) -> Table {
    let mut t = Table::new(&["ID", "PROJECT", "RESOURCE", "EVENT", "COUNT", "LAST", "DETAIL"]);
    for m in messages {
        t.row(vec![
            m.id.clone(),
            m.project.clone(),
            format!("{} {}", m.resource_type, m.resource_name),
            m.event.clone(),
            m.count.to_string(),
            timestamp(m.updated_ms),
            m.detail.clone(),
        ]);
    }
    t
}

/// Runs one message command.
pub async fn run(ctx: &mut Ctx, cmd: MessageCmd) -> Result<()> {
    let project = ctx.project.clone();
    let api = &mut ctx.api.messages;
    match cmd {
        MessageCmd::List { all_projects } => {
            let project = if all_projects { String::new() } else { project };
            // Every page, newest first, each printed as it arrives.
            let mut out = crate::output::PageStream::new(ctx.fmt, "messages", table);
            let mut marker = String::new();
            loop {
                let req = pb::ListMessagesRequest { project: project.clone(), limit: 0, marker };
                let page = api.list_messages(req).await?.into_inner();
                out.page(&page.messages);
                marker = page.next_marker;
                if marker.is_empty() {
                    break;
                }
            }
            out.finish();
        }
        MessageCmd::Show { id } => {
            let m = api.get_message(pb::GetMessageRequest { id, project }).await?.into_inner();
            emit(ctx.fmt, &m, |m| {
                let mut t = table(std::slice::from_ref(m));
                t.row(vec![format!("next: {}", m.next_step)]);
                t
            });
        }
        MessageCmd::Delete { id } => {
            api.delete_message(pb::GetMessageRequest { id: id.clone(), project }).await?;
            super::deleted(ctx.fmt, "message", &id);
        }
    }
    Ok(())
}
