//! `multilora`: offline generation, the Multi-LoRA benchmark, adapter synthesis and the demo.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod adapters;
mod bench;
mod engine_args;
mod generate;
mod serve;

#[derive(Parser)]
#[command(
    name = "multilora",
    version,
    about = "Serve and benchmark many LoRA adapters on one base model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline batch inference over a JSONL file of requests.
    Generate(generate::Args),
    /// Write the embedded demo model and adapters (what the benchmark uses on a fresh clone).
    Demo(DemoArgs),
    /// Adapter tools.
    #[command(subcommand)]
    Adapters(adapters::Command),
    /// The Multi-LoRA benchmark: prefill, decode and end-to-end latency per batch size.
    #[command(subcommand)]
    Bench(bench::Command),
    /// OpenAI-compatible server with per-request adapters (as `vllm serve`).
    Serve(Box<serve::Args>),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Folder to write `model/` and `adapters/` into; missing parts are written, existing kept.
    #[arg(long, default_value = "demo")]
    dir: std::path::PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Demo(args) => {
            let wrote = multilora_engine::demo::ensure_demo(&args.dir, args.seed)?;
            let verb = if wrote { "wrote" } else { "already complete:" };
            eprintln!("{verb} demo model and adapters in {}", args.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Adapters(cmd) => adapters::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Serve(args) => serve::run(*args),
    }
}
