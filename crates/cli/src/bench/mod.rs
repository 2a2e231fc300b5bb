//! `multilora bench`: the original Multi-LoRA benchmark (`no_lora.py`,
//! `multilora_inference.py`) on our engine — same config files, same measurement, same CSV
//! files — plus a no-LoRA baseline in the same report, several workloads on one loaded engine,
//! repeats with spread, a summary, a chart and `run.json`.
//!
//! Data flow: [`config`] (common.json + flags) → [`inputs`] (adapters.json, prompts.json) →
//! [`plan`] (every batch's requests, checked up front) → a [`backend::Backend`] runs each batch
//! into plain [`records`] → [`summary`] → [`report`], [`plot`], [`table`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::engine_args::EngineArgs;

mod backend;
pub(crate) mod config;
mod inputs;
mod openai;
mod plan;
mod plot;
mod records;
mod report;
mod run_info;
mod serving;
mod summary;
mod table;
mod workload;

use backend::{Backend, EngineBackend};
use records::BatchLatency;
use summary::{Measured, Point};
use workload::Series;

#[derive(clap::Subcommand)]
pub enum Command {
    /// The base model alone (the original's no_lora.py).
    NoLora(CommonArgs),
    /// LoRA workloads, after a no-LoRA baseline on the same prompts file (the original's
    /// multilora_inference.py, and no_lora.py before it).
    MultiLora(MultiLoraArgs),
    /// Load on an OpenAI-compatible server: Poisson or closed-loop arrivals over many
    /// adapters; throughput, TTFT/TPOT/ITL percentiles, goodput.
    Serving(Box<serving::ServingArgs>),
}

#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// The original's common.json.
    #[arg(long, default_value = "config/common.json")]
    pub config: PathBuf,
    /// Comma-separated (default: the config's batch_sizes, else 1,2,4,8,16,32).
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Option<Vec<usize>>,
    /// Output tokens per request in a measured run (config: num_tokens).
    #[arg(long)]
    pub num_tokens: Option<usize>,
    /// Output tokens per request in the warm-up before each point; 0 skips it.
    #[arg(long)]
    pub warmup_num_tokens: Option<usize>,
    /// Folder the report goes under (config: report_dir).
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// Measure each point K times; the summary gives mean, median and spread.
    #[arg(long)]
    pub repeat: Option<usize>,
    /// Write into report_dir itself, as the original does, replacing files of the same names
    /// (default: a new timestamped folder under it).
    #[arg(long)]
    pub overwrite: bool,
    /// Print the summary as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub enforce_eager: bool,
    #[arg(long)]
    pub gpu_memory_utilization: Option<f32>,
    /// Engine overrides; --seed sets random_seed (workloads) and the engine seed.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// `--backend openai --base-url URL`: the same runs against a server.
    #[command(flatten)]
    pub client: openai::BackendArgs,
}

#[derive(clap::Args, Debug)]
pub struct LoraArgs {
    /// distinct, uniform, identical, all, or a comma-separated list (config: workload_type;
    /// default all).
    #[arg(long)]
    pub workload: Option<String>,
    /// Adapter index the identical workload repeats (config: identical_lora_id).
    #[arg(long)]
    pub identical_lora_id: Option<usize>,
    /// Skip the no-LoRA baseline (the summary then has no LoRA overhead).
    #[arg(long)]
    pub no_baseline: bool,
}

#[derive(clap::Args, Debug)]
pub struct MultiLoraArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let (args, lora) = match &cmd {
        Command::NoLora(a) => (a, None),
        Command::MultiLora(m) => (&m.common, Some(&m.lora)),
        Command::Serving(_) => {
            let Command::Serving(s) = cmd else { unreachable!() };
            return serving::run(*s);
        }
    };
    let is_client = args.client.backend == openai::BackendKind::Openai;
    let mode = if lora.is_some() { "multi-lora" } else { "no-lora" };
    let started = SystemTime::now();
    let clock = Instant::now();
    let cfg = config::load(args, lora)?;
    if !is_client {
        ensure_demo(&cfg)?;
    }

    let prompts = match &cfg.no_lora_prompts_path {
        Some(p) => Some(inputs::read_prompts(p)?),
        None if cfg.baseline => anyhow::bail!(
            "{}: missing key \"no_lora_prompts_path\"; the no-LoRA baseline reads its prompts from it (or pass --no-baseline)",
            cfg.config_path.display()
        ),
        None => None,
    };
    let adapters = match (&cfg.lora_adapters_config_path, &cfg.lora_adapters_path) {
        (Some(file), Some(root)) if lora.is_some() => Some(inputs::read_adapters(
            file,
            cfg.engine.max_lora_rank,
            root,
            prompts.as_deref().unwrap_or_default(),
        )?),
        _ => None,
    };
    let planned = plan::build(&cfg, prompts.as_deref(), adapters.as_ref())?;
    for p in &planned {
        for w in &p.warnings {
            eprintln!("warning: {} batch {}: {w}", p.series.name(), p.batch_size);
        }
    }
    let (start_time, stamp) = run_info::utc(started);
    let staging = report::Staging::create(&cfg.report_dir, &format!("{mode}-{stamp}"), args.overwrite)?;

    let units_per_point = cfg.repeat as u64 + u64::from(cfg.warmup_num_tokens > 0);
    let bar = ProgressBar::new(planned.len() as u64 * units_per_point);
    bar.set_style(
        ProgressStyle::with_template("{bar:32} {pos}/{len} runs  {msg}  [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut points: Vec<Point> = Vec::new();
    let mut backends = serde_json::Map::new();
    let mut checked = false;
    // The no-LoRA series runs on an engine without LoRA (as no_lora.py's), the workloads on
    // one LoRA engine, loaded once.
    for enable_lora in [false, true] {
        let group: Vec<&plan::PlannedPoint> = planned
            .iter()
            .filter(|p| (p.series != Series::NoLora) == enable_lora)
            .collect();
        if group.is_empty() {
            continue;
        }
        let mut engine_cfg = cfg.engine.clone();
        engine_cfg.enable_lora = enable_lora;
        bar.set_message(format!("loading {}", cfg.base_model_path.display()));
        let mut backend: Box<dyn Backend> = if is_client {
            let fallback = engine_cfg.max_model_len.unwrap_or(usize::MAX);
            Box::new(openai::OpenAiBackend::connect(&args.client.server, fallback)?)
        } else {
            Box::new(EngineBackend::open(&engine_cfg)?)
        };
        if !checked {
            plan::check_prompt_lengths(&cfg, &planned, backend.as_mut())?;
            checked = true;
        }
        points.extend(measure_group(&cfg, &group, backend.as_mut(), &bar)?);
        let key = if enable_lora { "multi-lora" } else { "no-lora" };
        backends.insert(key.into(), backend.describe());
    }
    bar.finish_and_clear();

    let rows = summary::summarize(&points);
    for series in cfg.series() {
        let of_series: Vec<&Point> = points.iter().filter(|p| p.series == series).collect();
        for (name, text) in report::series_files(&of_series, cfg.repeat, !is_client) {
            staging.write(&format!("{}/{name}", series.name()), &text)?;
        }
    }
    staging.write("summary.csv", &report::summary_csv(&rows, &points))?;
    // A client of a server sees requests, not engine steps: no step files (rather than empty
    // ones), and the per-request latencies' percentiles instead.
    let request_latencies = is_client.then(|| summary::request_latencies(&points));
    match &request_latencies {
        Some(r) => staging.write(report::REQUEST_LATENCIES_FILE, &report::request_latencies_csv(r))?,
        None => staging.write("steps.csv", &report::steps_csv(&points))?,
    }
    let device = backends
        .values()
        .next()
        .and_then(|b| b["device"].as_str())
        .unwrap_or("?")
        .to_string();
    let title = format!(
        "multilora bench {mode}: {} on {device}, {} output tokens",
        model_name(&cfg.base_model_path),
        cfg.num_tokens
    );
    staging.write("latency.svg", &plot::svg(&rows, &title))?;
    let (revision, dirty) = run_info::git_revision();
    let run_json = json!({
        "tool": "multilora bench",
        "mode": mode,
        "multilora_version": env!("CARGO_PKG_VERSION"),
        "git_revision": revision,
        "git_dirty": dirty,
        "command_line": std::env::args().collect::<Vec<_>>(),
        "working_directory": std::env::current_dir().ok(),
        "start_time": start_time,
        "end_time": run_info::utc(SystemTime::now()).0,
        "wall_time_s": clock.elapsed().as_secs_f64(),
        "host": { "available_parallelism": std::thread::available_parallelism().map_or(0, |n| n.get()) },
        "config": cfg,
        "engine_config": engine_json(&cfg.engine),
        "backends": backends,
        "adapters": adapters.as_ref().map(|a| json!({
            "file": a.file, "rank": a.rank, "root": a.root, "names": a.names,
        })),
        "points": points.iter().map(|p| json!({
            "series": p.series.name(),
            "batch_size": p.batch_size,
            "adapter_indices": p.adapter_indices,
            "latency": p.repeats.iter().map(|m| m.latency).collect::<Vec<_>>(),
            "notes": p.repeats.iter().map(|m| &m.notes).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "summary": rows,
        "client_latency_percentiles": request_latencies,
        "layout": if is_client { CLIENT_LAYOUT } else { ENGINE_LAYOUT },
    });
    staging.write("run.json", &(serde_json::to_string_pretty(&run_json)? + "\n"))?;
    let dest = staging.finish()?;

    if args.json {
        let mut out = json!({ "report_dir": dest, "summary": rows });
        if let Some(r) = &request_latencies {
            out["client_latency_percentiles"] = json!(r);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", table::render(&rows));
        if let Some(r) = &request_latencies {
            println!("\nper-request latencies as the client saw them:");
            print!("{}", table::render_request_latencies(r));
        }
    }
    if is_client {
        eprintln!(
            "note: client mode: {} holds TTFT/TPOT/ITL/e2e percentiles per batch; no step_latency-<B>.csv or steps.csv, since a client sees no engine steps",
            report::REQUEST_LATENCIES_FILE
        );
    }
    eprintln!(
        "report: {} ({:.1} s)",
        dest.display(),
        clock.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

const ENGINE_LAYOUT: &str = "one folder per series (no-lora, distinct, uniform, identical) holding the original's per_batch_latency.csv, per_request_latency-<B>.csv and step_latency-<B>.csv; with repeat > 1 each gets a trailing repeat column; beside them summary.csv, steps.csv (every engine step), latency.svg";
const CLIENT_LAYOUT: &str = "one folder per series (no-lora, distinct, uniform, identical) holding the original's per_batch_latency.csv and per_request_latency-<B>.csv; with repeat > 1 each gets a trailing repeat column; no step_latency-<B>.csv and no steps.csv: a client of a server sees no engine steps; beside them summary.csv, client_latency_percentiles.csv (TTFT/TPOT/ITL/e2e mean, p50, p90, p95, p99, max in ms per series and batch size, pooled over repeats), latency.svg";

/// Measures the points of one engine. Per batch size: a warm-up run (thrown away) of each
/// point, then the `repeat` measured runs round-robin over the points, so slow drift of the
/// machine (heat, other load) spreads over the workloads instead of favouring the first.
fn measure_group(
    cfg: &config::BenchConfig,
    group: &[&plan::PlannedPoint],
    backend: &mut dyn Backend,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<Point>> {
    let mut points: Vec<Point> = group
        .iter()
        .map(|p| Point {
            series: p.series,
            batch_size: p.batch_size,
            adapter_indices: p.adapter_indices.clone(),
            repeats: Vec::with_capacity(cfg.repeat),
        })
        .collect();
    let what = |p: &plan::PlannedPoint| format!("{} batch {}", p.series.name(), p.batch_size);
    for &b in &cfg.batch_sizes {
        let at_b: Vec<usize> = (0..group.len()).filter(|&i| group[i].batch_size == b).collect();
        if cfg.warmup_num_tokens > 0 {
            for &i in &at_b {
                bar.set_message(format!("{}: warm-up", what(group[i])));
                backend
                    .run_batch(&group[i].requests, cfg.warmup_num_tokens)
                    .with_context(|| format!("{}: warm-up run", what(group[i])))?;
                bar.inc(1);
            }
        }
        for k in 0..cfg.repeat {
            for &i in &at_b {
                let p = group[i];
                bar.set_message(format!("{}: run {}/{}", what(p), k + 1, cfg.repeat));
                let m = measure(cfg, p, backend)
                    .with_context(|| format!("{}: measured run {}", what(p), k + 1))?;
                for n in &m.notes {
                    bar.suspend(|| eprintln!("warning: {}: {n}", what(p)));
                }
                points[i].repeats.push(m);
                bar.inc(1);
            }
        }
    }
    Ok(points)
}

/// One measured run of a point, checked and split into prefill and decode.
fn measure(
    cfg: &config::BenchConfig,
    p: &plan::PlannedPoint,
    backend: &mut dyn Backend,
) -> anyhow::Result<Measured> {
    let run = backend.run_batch(&p.requests, cfg.num_tokens)?;
    let notes = records::check(&run, p.batch_size, cfg.num_tokens)
        .context("the engine did not run the batch as expected")?;
    let latency = if run.steps.is_empty() {
        // A client of a server sees requests, not steps.
        BatchLatency::from_requests(&run.requests, run.e2e_ms)?
    } else {
        let step_ms: Vec<f64> = run.steps.iter().map(|s| s.latency_ms).collect();
        BatchLatency::from_steps(&step_ms, cfg.num_tokens, run.e2e_ms)?
    };
    Ok(Measured { run, latency, notes })
}

/// Writes the demo model and adapters when the config points at a missing demo (a folder
/// named `demo` holding `model/` and `adapters/`, as `config/common.json` has it).
fn ensure_demo(cfg: &config::BenchConfig) -> anyhow::Result<()> {
    let root_of = |p: &Path, leaf: &str| -> Option<PathBuf> {
        let parent = p.parent()?;
        (p.file_name()? == leaf && parent.file_name()? == "demo").then(|| parent.to_path_buf())
    };
    let mut roots = vec![root_of(&cfg.base_model_path, "model")];
    if cfg.engine.enable_lora {
        roots.push(
            cfg.lora_adapters_path
                .as_deref()
                .and_then(|p| root_of(p, "adapters")),
        );
    }
    let mut roots: Vec<PathBuf> = roots.into_iter().flatten().collect();
    roots.dedup();
    for root in roots {
        if multilora_engine::demo::ensure_demo(&root, 0)
            .with_context(|| format!("writing the demo model and adapters to {}", root.display()))?
        {
            eprintln!(
                "wrote the missing demo model and adapters to {} (multilora demo --dir {} does the same)",
                root.display(),
                root.display()
            );
        }
    }
    Ok(())
}

fn model_name(p: &Path) -> String {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match name(p).as_deref() {
        Some("model") => p
            .parent()
            .and_then(name)
            .map_or("model".into(), |n| format!("{n}/model")),
        Some(n) => n.to_string(),
        None => p.display().to_string(),
    }
}

fn engine_json(e: &multilora_engine::EngineConfig) -> serde_json::Value {
    json!({
        "model": e.model,
        "load_format": format!("{:?}", e.load_format).to_lowercase(),
        "device": format!("{:?}", e.device).to_lowercase(),
        "dtype": e.dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "max_num_batched_tokens": e.max_num_batched_tokens,
        "block_size": e.block_size,
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "enforce_eager": e.enforce_eager,
        "max_loras": e.max_loras,
        "max_lora_rank": e.max_lora_rank,
        "max_cpu_loras": e.max_cpu_loras.unwrap_or(e.max_loras),
        "seed": e.seed,
    })
}
