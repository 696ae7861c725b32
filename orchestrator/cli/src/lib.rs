//! The `drover` command: a client of the drover.v1 API (one module per resource under
//! [`commands`]), plus `drover orchestrator` and `drover agent`, which hand over to the
//! servers' own launchers ([`servers`]), and the local two-site [`drill`].

pub mod client;
pub mod commands;
pub mod compute;
pub mod drill;
pub mod output;
pub mod progress;
pub mod servers;
pub mod size;

use clap::{Parser, Subcommand};

/// The command line.
#[derive(Parser)]
#[command(name = "drover", version, about = "Drover: replication and disaster recovery for block storage")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How logs are printed: `text` (for people) or `json` (one object per line, with
    /// each event's spans and their trace ids).
    #[arg(long, global = true, env = "DROVER_LOG_FORMAT", default_value = "text")]
    pub log_format: drover_proto::trace::LogFormat,
}

/// Every `drover` subcommand.
#[derive(Subcommand)]
pub enum Command {
    /// Show the client's and the server's versions.
    Version {
        #[command(flatten)]
        client: commands::ClientArgs,
    },
    /// Sites (failure domains).
    Site {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::site::SiteCmd,
    },
    /// Backends, their agents and capabilities.
    Backend {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::backend::BackendCmd,
    },
    /// Volumes.
    Volume {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::volume::VolumeCmd,
    },
    /// Snapshots of volumes (group snapshots: `drover group snapshot`).
    Snapshot {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::snapshot::SnapshotCmd,
    },
    /// The reference compute service of a site (`drover compute --site S`), and the check
    /// of its instances' logs (`drover compute check`): docs/compute.md.
    Compute(compute::ComputeArgs),
    /// After a disaster: plan and apply the adoption of volumes Drover does not manage.
    Adopt {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::adopt::AdoptCmd,
    },
    /// Group types.
    #[command(name = "group-type")]
    GroupType {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::group_type::GroupTypeCmd,
    },
    /// Groups and their replication.
    Group {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::group::GroupCmd,
    },
    /// Executions: operations that run on their own and survive crashes.
    Execution {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::execution::ExecutionCmd,
    },
    /// Runbooks: validate, plan and run declarative DR plans.
    Runbook {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::runbook::RunbookCmd,
    },
    /// User messages: failures no reply could tell (list, show, delete).
    Message {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::message::MessageCmd,
    },
    /// Project policy: what an admin allows a project's members.
    Project {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::project::ProjectCmd,
    },
    /// API tokens: create, list and revoke (admin).
    Token {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::token::TokenCmd,
    },
    /// The audit trail of every mutating call (admin).
    Audit {
        #[command(flatten)]
        client: commands::ClientArgs,
        #[command(subcommand)]
        cmd: commands::token::AuditCmd,
    },
    /// TLS certificates for a cluster: a CA, the orchestrator's and the agents'.
    Certs {
        #[command(subcommand)]
        cmd: commands::certs::CertsCmd,
    },
    /// Run the orchestrator server.
    Orchestrator(servers::OrchestratorArgs),
    /// Run an agent server for one backend.
    Agent(servers::AgentArgs),
    /// Run the local two-site DR drill: an orchestrator on the embedded store and one
    /// agent per site (qemu by default, writing and verifying real data with qemu-io).
    Drill(drill::DrillArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for sub in cmd.get_subcommands() {
            let here = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() {
                missing.push(here.clone());
            }
            walk(sub, &here, missing);
        }
    }

    #[test]
    fn every_subcommand_has_a_one_line_help() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "drover", &mut missing);
        assert!(missing.is_empty(), "subcommands without help: {missing:?}");
    }

    fn help_of(path: &[&str]) -> String {
        // Building propagates global flags into subcommands, as parsing does.
        let mut cmd = Cli::command();
        cmd.build();
        for p in path {
            cmd = cmd.find_subcommand(p).unwrap().clone();
        }
        cmd.render_long_help().to_string()
    }

    #[test]
    fn server_commands_show_no_client_flags() {
        for server in ["agent", "orchestrator", "drill"] {
            let help = help_of(&[server]);
            for client_flag in ["--endpoint", "--project", "--output"] {
                assert!(!help.contains(client_flag), "`drover {server} --help` shows {client_flag}:\n{help}");
            }
        }
        let help = help_of(&["volume", "list"]);
        assert!(help.contains("--endpoint") && help.contains("--output"), "{help}");
    }

    #[test]
    fn drill_help_names_the_agents_it_runs() {
        let help = help_of(&["drill"]);
        assert!(help.contains("qemu") && !help.contains("mock agents"), "{help}");
        let top = Cli::command().render_long_help().to_string();
        assert!(!top.contains("mock agents"), "{top}");
    }
}
