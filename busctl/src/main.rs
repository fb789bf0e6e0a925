//! busctl: the arrowbus admin CLI. Parses the command line, connects, runs
//! one command, and turns any failure into one line on stderr and an exit
//! code (see `busctl --help`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod cli;
mod cluster;
mod consume;
mod format;
mod output;
mod produce;
mod topics;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, ClusterCmd, Command, Output};

/// Exit code of a usage error (clap's convention).
const EXIT_USAGE: u8 = 2;
/// Exit code of every other failure.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(EXIT_USAGE)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // clap's message spans lines (the error, its details, a usage
            // block); keep the paragraph before the first blank line.
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let msg = msg.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("busctl: {msg} (see 'busctl --help')");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if cli.output == Output::Arrow && !matches!(cli.command, Command::Consume(_)) {
        eprintln!(
            "busctl: --output arrow is only for `consume`; use table or json (see 'busctl --help')"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("busctl: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("busctl: {msg}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config = arrowbus::ClientConfig::resolve(cli.broker, cli.ca)?;
    let client = arrowbus::Client::connect(config).await?;
    match cli.command {
        Command::Topics { cmd } => topics::run(&client, cmd, cli.output).await,
        Command::Produce(args) => produce::run(&client, args, cli.output).await,
        Command::Consume(args) => consume::run(&client, args, cli.output).await,
        Command::Cluster { cmd: None } => cluster::run(&client, cli.output).await,
        Command::Cluster {
            cmd: Some(ClusterCmd::AddNode { id, addr }),
        } => cluster::add_node(&client, id, &addr, cli.output).await,
        Command::Cluster {
            cmd: Some(ClusterCmd::RemoveNode { id, timeout_secs }),
        } => cluster::remove_node(&client, id, timeout_secs, cli.output).await,
    }
}

/// A reader that went away (`busctl consume ... | head`) is not a failure.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = c.downcast_ref::<std::io::Error>().or_else(|| {
            match c.downcast_ref::<arrow_schema::ArrowError>() {
                Some(arrow_schema::ArrowError::IoError(_, io)) => Some(io),
                _ => None,
            }
        });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
