//! `multilora`: offline generation, the Multi-LoRA benchmark, adapter synthesis and the demo.

use std::process::ExitCode;

use anyhow::Context as _;
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
    /// Seed of the random weights (the demo model's text is noise whatever the seed).
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
        // `multilora ... | head`: the reader has what it wanted.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            print_error(&err);
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints `error: ` and the chain of causes; a cause that its context already ends with (an
/// error type that prints its source in its own message) is not repeated.
fn print_error(err: &anyhow::Error) {
    let mut text = String::new();
    for cause in err.chain().map(|c| c.to_string()) {
        if !text.ends_with(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    eprintln!("error: {text}");
}

/// Writes `text` to stdout; a closed pipe comes back as an error that `main` ends quietly on.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Demo(args) => {
            let wrote = multilora_engine::demo::ensure_demo(&args.dir, args.seed)?;
            let verb = if wrote { "wrote" } else { "already complete:" };
            eprintln!(
                "{verb} demo model and adapters in {} (random weights: latencies are real, generated text is noise)",
                args.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Adapters(cmd) => adapters::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Serve(args) => serve::run(*args),
    }
}
