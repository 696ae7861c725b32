//! `drover`: dispatches to the client commands, the server launchers and the drill.

use std::process::ExitCode;

use clap::Parser;
use drover_cli::commands::{self, Ctx};
use drover_cli::{Cli, Command, drill, servers};

use drover_proto::trace::init as init_logging;

/// mimalloc instead of glibc's malloc: under a read load the orchestrator spent about
/// 12% of its CPU samples in glibc's allocator (allocating, freeing and consolidating
/// chunks); see docs/performance.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.log_format;
    match cli.command {
        Command::Orchestrator(a) => match &a.cmd {
            Some(servers::OrchestratorCmd::List { client }) => servers::list_orchestrators(client).await,
            None => {
                init_logging("info", format);
                servers::run_orchestrator(a).await
            }
        },
        Command::Agent(a) => {
            init_logging("info", format);
            servers::run_agent(a).await
        }
        Command::Drill(a) => {
            init_logging("warn", format);
            drill::run(a).await.map_err(anyhow::Error::msg)
        }
        Command::Version { client } => commands::version(&mut Ctx::connect(&client).await?).await,
        Command::Site { client, cmd } => commands::site::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Backend { client, cmd } => commands::backend::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Volume { client, cmd } => commands::volume::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Compute(a) => {
            if a.cmd.is_none() {
                init_logging("info", format);
            }
            drover_cli::compute::run(a).await
        }
        Command::Adopt { client, cmd } => commands::adopt::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Snapshot { client, cmd } => commands::snapshot::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::GroupType { client, cmd } => commands::group_type::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Execution { client, cmd } => commands::execution::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Group { client, cmd } => commands::group::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Message { client, cmd } => commands::message::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Project { client, cmd } => commands::project::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Certs { cmd } => commands::certs::run(cmd),
        Command::Token { client, cmd } => commands::token::run(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Audit { client, cmd } => commands::token::run_audit(&mut Ctx::connect(&client).await?, cmd).await,
        Command::Runbook { client, cmd } => commands::runbook::run(&mut Ctx::connect(&client).await?, cmd).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = match &cli.command {
        Command::Orchestrator(a) => a.cmd.is_none(),
        Command::Agent(_) | Command::Drill(_) => true,
        Command::Compute(a) => a.cmd.is_none(),
        _ => false,
    };
    if !serving {
        init_logging("warn", cli.log_format);
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("error: {} ({:?})", s.message(), s.code()),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
