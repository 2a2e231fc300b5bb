//! `multilora bench`: the original Multi-LoRA benchmark (`no_lora.py`,
//! `multilora_inference.py`) on our engine — same config files, same measurement, same CSV
//! files — plus a no-LoRA baseline in the same report, several workloads on one loaded engine,
//! repeats with spread, a summary, a chart and `run.json`.
//!
//! Data flow: [`config`] (common.json + flags) → [`inputs`] (adapters.json, prompts.json) →
//! [`plan`] (every batch's requests and every adapter, checked before anything is measured) →
//! a [`backend::Backend`] runs each batch into plain [`records`] → [`summary`] → [`report`],
//! [`plot`], [`table`]. The report is rewritten after every measured point, so an error or a
//! Ctrl-C ([`interrupt`]) leaves a valid partial report that `--resume DIR` finishes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::engine_args::EngineArgs;

mod backend;
pub(crate) mod config;
mod inputs;
mod interrupt;
mod openai;
mod plan;
mod plot;
mod records;
mod report;
mod run_info;
mod server_metrics;
mod serving;
mod summary;
mod table;
mod workload;

use backend::{Backend, EngineBackend};
use records::BatchLatency;
use report::ReportDir;
use summary::{Measured, Point};
use workload::Series;

#[derive(clap::Subcommand)]
pub enum Command {
    /// The base model alone (the original's no_lora.py).
    // The engine's LoRA flags are shared with multi-lora; hidden here, and refused if given.
    #[command(
        mut_arg("max_loras", |a| a.hide(true)),
        mut_arg("max_lora_rank", |a| a.hide(true)),
        mut_arg("max_cpu_loras", |a| a.hide(true)),
        mut_arg("lora_target_modules", |a| a.hide(true))
    )]
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
    /// Finish the report in DIR that a failure or Ctrl-C left incomplete: its settings come
    /// from DIR/run.json, and only the points it lacks are measured.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Only warn about keys of the config this benchmark does not know (default: an error,
    /// since a misspelt key would silently fall back to its default).
    #[arg(long)]
    pub allow_unknown_keys: bool,
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
    match &args.resume {
        Some(dir) => resume(dir, lora.is_some(), args.json),
        None => bench(args, lora, None),
    }
}

/// A report to finish: its folder, its `run.json` and the points it holds.
struct Resume {
    dir: PathBuf,
    run_json: Value,
    points: Vec<Point>,
}

/// `--resume DIR`: the run's command line and working directory come from `DIR/run.json`, its
/// measured points from `DIR/points.jsonl`; every input is checked again, must resolve to the
/// same settings, and only the missing points are measured.
fn resume(dir: &Path, is_multi_lora: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mode = if is_multi_lora { "multi-lora" } else { "no-lora" };
    let extra: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.starts_with("--") && !a.starts_with("--resume") && a != "--json")
        .collect();
    if !extra.is_empty() {
        bail!(
            "--resume takes every setting from the report's run.json; give only --resume DIR (and --json), not {}",
            extra.join(" ")
        );
    }
    let dir = std::path::absolute(dir).with_context(|| format!("--resume {}", dir.display()))?;
    let run_path = dir.join("run.json");
    let text = std::fs::read_to_string(&run_path).with_context(|| {
        format!(
            "--resume {}: reading {} (is it a bench report folder?)",
            dir.display(),
            run_path.display()
        )
    })?;
    let run_json: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", run_path.display()))?;
    let argv: Vec<String> = serde_json::from_value(run_json["command_line"].clone()).with_context(|| {
        format!(
            "{}: key \"command_line\": expected a list of strings",
            run_path.display()
        )
    })?;
    let cwd: PathBuf = serde_json::from_value(run_json["working_directory"].clone()).with_context(|| {
        format!(
            "{}: key \"working_directory\": expected a path",
            run_path.display()
        )
    })?;
    let bad_argv = || format!("{}: command_line {argv:?} is not a bench run", run_path.display());
    let cli = crate::Cli::try_parse_from(&argv).with_context(bad_argv)?;
    let crate::Command::Bench(cmd) = cli.command else {
        bail!(bad_argv());
    };
    let (mut args, lora) = match cmd {
        Command::NoLora(a) => (a, None),
        Command::MultiLora(m) => (m.common, Some(m.lora)),
        Command::Serving(_) => bail!(bad_argv()),
    };
    if lora.is_some() != is_multi_lora {
        let theirs = if lora.is_some() { "multi-lora" } else { "no-lora" };
        bail!(
            "{} is a report of bench {theirs}, not {mode}: multilora bench {theirs} --resume {}",
            dir.display(),
            dir.display()
        );
    }
    // Relative paths in the command line and the config mean what they meant.
    std::env::set_current_dir(&cwd)
        .with_context(|| format!("--resume: entering the run's working directory {}", cwd.display()))?;
    args.json = json;
    let points = read_points(&dir.join(report::POINTS_FILE))?;
    bench(
        &args,
        lora.as_ref(),
        Some(Resume {
            dir,
            run_json,
            points,
        }),
    )
}

/// The points of `points.jsonl`; a last line cut short by a kill is dropped (that point is
/// measured again).
fn read_points(path: &Path) -> anyhow::Result<Vec<Point>> {
    let text = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.with_context(|| format!("reading {}", path.display()))?,
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut points = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(p) => points.push(p),
            Err(_) if n + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => bail!("{}:{}: not a measured point: {e}", path.display(), n + 1),
        }
    }
    Ok(points)
}

fn bench(args: &CommonArgs, lora: Option<&LoraArgs>, resume: Option<Resume>) -> anyhow::Result<ExitCode> {
    let is_client = args.client.backend == openai::BackendKind::Openai;
    let mode = if lora.is_some() { "multi-lora" } else { "no-lora" };
    let started = SystemTime::now();
    let clock = Instant::now();
    let cfg = config::load(args, lora)?;

    // Every input is checked before anything is written or measured.
    let prompts = match &cfg.no_lora_prompts_path {
        Some(p) => Some(inputs::read_prompts(p)?),
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
    std::fs::create_dir_all(&cfg.report_dir)
        .with_context(|| format!("creating report_dir {}", cfg.report_dir.display()))?;
    let mut done: Vec<Option<Point>> = vec![None; planned.len()];
    let (start_time, stamp) = run_info::utc(started);
    let (revision, dirty) = run_info::git_revision();
    let mut run_json = json!({
        "tool": "multilora bench",
        "mode": mode,
        "multilora_version": env!("CARGO_PKG_VERSION"),
        "git_revision": revision,
        "git_dirty": dirty,
        "command_line": std::env::args().collect::<Vec<_>>(),
        "working_directory": std::env::current_dir().ok(),
        "start_time": start_time,
        "backends": {},
    });
    let mut dir = None;
    if let Some(r) = resume {
        check_same_settings(&r.run_json, &cfg, &r.dir)?;
        for p in r.points {
            let i = planned
                .iter()
                .position(|q| q.series == p.series && q.batch_size == p.batch_size)
                .filter(|&i| planned[i].adapter_indices == p.adapter_indices && p.repeats.len() == cfg.repeat)
                .with_context(|| {
                    format!(
                        "{}: {} batch {} is not a point of this run as planned now",
                        r.dir.join(report::POINTS_FILE).display(),
                        p.series.name(),
                        p.batch_size
                    )
                })?;
            done[i] = Some(p);
        }
        // What this run adds to the first one's record.
        let resumed = json!({
            "start_time": start_time,
            "command_line": run_json["command_line"],
            "git_revision": run_json["git_revision"],
            "git_dirty": run_json["git_dirty"],
        });
        run_json = r.run_json;
        let mut all = run_json["resumed"].as_array().cloned().unwrap_or_default();
        all.push(resumed);
        run_json["resumed"] = all.into();
        dir = Some(ReportDir { dir: r.dir });
    }
    if !is_client {
        ensure_demo(&cfg)?;
    }
    if let Some(set) = &adapters {
        let model = (!is_client)
            .then(|| {
                multilora_engine::ModelConfig::from_dir(&cfg.base_model_path).with_context(|| {
                    format!(
                        "base_model_path {} ({})",
                        cfg.base_model_path.display(),
                        cfg.config_path.display()
                    )
                })
            })
            .transpose()?;
        plan::check_adapters(&cfg, set, &planned, model.as_ref())?;
    }

    let mut report = Report {
        cfg: &cfg,
        mode,
        is_client,
        planned: &planned,
        done,
        dir,
        dir_name: format!("{mode}-{stamp}"),
        overwrite: args.overwrite,
        run_json,
        clock,
    };
    let num_todo = report.done.iter().filter(|d| d.is_none()).count();
    let units_per_point = cfg.repeat as u64 + u64::from(cfg.warmup_num_tokens > 0);
    let bar = ProgressBar::new(num_todo as u64 * units_per_point);
    bar.set_style(
        ProgressStyle::with_template("{bar:32} {pos}/{len} runs  {msg}  [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let outcome = measure_all(args, &mut report, &bar);
    bar.finish_and_clear();

    let missing = report.missing();
    let (status, error) = match &outcome {
        Ok(()) if missing.is_empty() => ("complete", None),
        Ok(()) => ("interrupted", None),
        Err(e) => ("failed", Some(format!("{e:#}"))),
    };
    if report.dir.is_some() {
        if let Err(e) = report.write(status, error.as_deref()) {
            eprintln!("warning: {e:#}");
        }
    }
    let points: Vec<Point> = report.done.iter().flatten().cloned().collect();
    let rows = summary::summarize(&points);
    let request_latencies = is_client.then(|| summary::request_latencies(&points));
    let dest = report.dir.as_ref().map(|d| d.dir.clone());
    if !points.is_empty() {
        if args.json {
            let mut out =
                json!({ "report_dir": dest, "status": status, "missing_points": missing, "summary": rows });
            if let Some(r) = &request_latencies {
                out["client_latency_percentiles"] = json!(r);
            }
            crate::print_stdout(&(serde_json::to_string_pretty(&out)? + "\n"))?;
        } else {
            let mut text = table::render(&rows);
            if let Some(r) = &request_latencies {
                text.push_str("\nper-request latencies as the client saw them:\n");
                text.push_str(&table::render_request_latencies(r));
            }
            crate::print_stdout(&text)?;
        }
    }
    if is_client && status == "complete" {
        eprintln!(
            "note: client mode: {} holds TTFT/TPOT/ITL/e2e percentiles per batch; no step_latency-<B>.csv or steps.csv, since a client sees no engine steps",
            report::REQUEST_LATENCIES_FILE
        );
    }
    let Some(dest) = dest else {
        // Nothing was measured, so there is no report to keep.
        outcome?;
        eprintln!("interrupted before the first point was measured: no report written");
        return Ok(ExitCode::from(130));
    };
    if missing.is_empty() {
        eprintln!(
            "report: {} ({:.1} s)",
            dest.display(),
            clock.elapsed().as_secs_f64()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let finish = format!(
        "partial report: {} ({} of {} points; {} lists what is missing); multilora bench {mode} --resume {} measures the rest",
        dest.display(),
        planned.len() - missing.len(),
        planned.len(),
        report::INCOMPLETE_FILE,
        dest.display()
    );
    match outcome {
        Ok(()) => {
            eprintln!("interrupted: {finish}");
            Ok(ExitCode::from(130))
        }
        Err(e) => {
            crate::print_error(&e);
            eprintln!("{finish}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A resumed run must measure what the first one did: the same resolved config and engine.
fn check_same_settings(old: &Value, cfg: &config::BenchConfig, dir: &Path) -> anyhow::Result<()> {
    let now = [
        ("config", json!(cfg)),
        ("engine_config", engine_json(&cfg.engine)),
    ];
    let mut changed = Vec::new();
    for (section, now) in &now {
        let (Some(now), Some(then)) = (now.as_object(), old[section].as_object()) else {
            bail!(
                "{}: no {section:?} to compare with",
                dir.join("run.json").display()
            );
        };
        for (key, v) in now {
            if then.get(key) != Some(v) {
                let was = then.get(key).map_or("absent".into(), Value::to_string);
                changed.push(format!("{key} was {was}, now {v}"));
            }
        }
    }
    if !changed.is_empty() {
        bail!(
            "--resume {}: the settings changed since the run ({}); a report must hold one setup: start a new run instead",
            dir.display(),
            changed.join("; ")
        );
    }
    Ok(())
}

/// The report of a run in progress: the points measured so far, and everything written from
/// them after each one.
struct Report<'a> {
    cfg: &'a config::BenchConfig,
    mode: &'static str,
    is_client: bool,
    planned: &'a [plan::PlannedPoint],
    /// One entry per planned point, `Some` once measured.
    done: Vec<Option<Point>>,
    /// Created with the first point, so a run that measures nothing leaves nothing.
    dir: Option<ReportDir>,
    dir_name: String,
    overwrite: bool,
    /// What `run.json` says of the run beside the results (start time, command line, backends).
    run_json: Value,
    clock: Instant,
}

impl Report<'_> {
    fn what(p: &plan::PlannedPoint) -> String {
        format!("{} batch {}", p.series.name(), p.batch_size)
    }

    fn missing(&self) -> Vec<String> {
        self.planned
            .iter()
            .zip(&self.done)
            .filter(|(_, d)| d.is_none())
            .map(|(p, _)| Self::what(p))
            .collect()
    }

    /// Keeps point `i` and rewrites the report with it.
    fn save(&mut self, i: usize, point: Point) -> anyhow::Result<()> {
        if self.dir.is_none() {
            let names: Vec<&str> = self.cfg.series().iter().map(|s| s.name()).collect();
            self.dir = Some(ReportDir::create(
                &self.cfg.report_dir,
                &self.dir_name,
                self.overwrite,
                &names,
            )?);
        }
        self.done[i] = Some(point);
        self.write("running", None)
    }

    /// Writes every file of the report from the points measured so far.
    fn write(&self, status: &str, error: Option<&str>) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let cfg = self.cfg;
        let points: Vec<Point> = self.done.iter().flatten().cloned().collect();
        let rows = summary::summarize(&points);
        for series in cfg.series() {
            let of_series: Vec<&Point> = points.iter().filter(|p| p.series == series).collect();
            if of_series.is_empty() {
                continue;
            }
            for (name, text) in report::series_files(&of_series, !self.is_client) {
                dir.write(&format!("{}/{name}", series.name()), &text)?;
            }
        }
        dir.write("summary.csv", &report::summary_csv(&rows, &points))?;
        let (runs, requests) = report::runs_and_requests_csv(&points);
        dir.write("runs.csv", &runs)?;
        dir.write("requests.csv", &requests)?;
        // A client of a server sees requests, not engine steps: no step files (rather than
        // empty ones), and the per-request latencies' percentiles instead.
        if self.is_client {
            let r = summary::request_latencies(&points);
            dir.write(report::REQUEST_LATENCIES_FILE, &report::request_latencies_csv(&r))?;
        } else {
            dir.write("steps.csv", &report::steps_csv(&points))?;
        }
        let device = self.run_json["backends"]
            .as_object()
            .and_then(|b| b.values().next())
            .and_then(|b| b["device"].as_str())
            .unwrap_or("?")
            .to_string();
        let title = format!(
            "multilora bench {}: {} on {device}, {} output tokens",
            self.mode,
            model_name(&cfg.base_model_path),
            cfg.num_tokens
        );
        dir.write("latency.svg", &plot::svg(&rows, &title))?;
        let lines: String = points
            .iter()
            .map(|p| serde_json::to_string(p).map(|l| l + "\n"))
            .collect::<Result<_, _>>()?;
        dir.write(report::POINTS_FILE, &lines)?;
        let missing = self.missing();
        if missing.is_empty() {
            dir.remove(report::INCOMPLETE_FILE)?;
        } else {
            let why = match (status, error) {
                ("running", _) => "the run is in progress, or was killed".to_string(),
                ("interrupted", _) => "the run was interrupted (Ctrl-C)".to_string(),
                (_, Some(e)) => format!("the run failed: {e}"),
                _ => format!("the run ended {status}"),
            };
            dir.write(
                report::INCOMPLETE_FILE,
                &format!(
                    "This report holds {} of the run's {} points: {why}.\nMissing: {}.\nTo measure them into this folder: multilora bench {} --resume {}\n",
                    points.len(),
                    self.planned.len(),
                    missing.join(", "),
                    self.mode,
                    dir.dir.display()
                ),
            )?;
        }
        let mut run_json = self.run_json.clone();
        let extra = json!({
            "status": status,
            "error": error,
            "missing_points": missing,
            "end_time": run_info::utc(SystemTime::now()).0,
            "wall_time_s": self.clock.elapsed().as_secs_f64(),
            "host": { "available_parallelism": std::thread::available_parallelism().map_or(0, |n| n.get()) },
            "config": cfg,
            "engine_config": engine_json(&cfg.engine),
            "points": points.iter().map(|p| json!({
                "series": p.series.name(),
                "batch_size": p.batch_size,
                "adapter_indices": p.adapter_indices,
                "latency": p.repeats.iter().map(|m| m.latency).collect::<Vec<_>>(),
                "notes": p.repeats.iter().map(|m| &m.notes).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "summary": rows,
            "client_latency_percentiles": self.is_client.then(|| summary::request_latencies(&points)),
            "layout": if self.is_client { CLIENT_LAYOUT } else { ENGINE_LAYOUT },
        });
        if let (Some(all), Some(extra)) = (run_json.as_object_mut(), extra.as_object()) {
            all.extend(extra.clone());
        }
        dir.write("run.json", &(serde_json::to_string_pretty(&run_json)? + "\n"))
    }
}

const ENGINE_LAYOUT: &str = "one folder per series (no-lora, distinct, uniform, identical) holding the original's per_batch_latency.csv, per_request_latency-<B>.csv and step_latency-<B>.csv exactly as the original writes them (one run per batch size: with repeats, the run of median decode latency); beside them summary.csv (mean, median, spread over repeats), runs.csv, requests.csv and steps.csv (every repeat), latency.svg, points.jsonl (what --resume reads)";
const CLIENT_LAYOUT: &str = "one folder per series (no-lora, distinct, uniform, identical) holding the original's per_batch_latency.csv and per_request_latency-<B>.csv exactly as the original writes them (one run per batch size: with repeats, the run of median decode latency); no step_latency-<B>.csv and no steps.csv: a client of a server sees no engine steps; beside them summary.csv, runs.csv, requests.csv, client_latency_percentiles.csv (TTFT/TPOT/ITL/e2e mean, p50, p90, p95, p99, max in ms per series and batch size, pooled over repeats), latency.svg, points.jsonl (what --resume reads)";

/// Measures every point not yet measured: the no-LoRA series on an engine without LoRA (as
/// no_lora.py's), the workloads on one LoRA engine, loaded once. Returns early, with what was
/// measured kept, at a Ctrl-C.
fn measure_all(args: &CommonArgs, report: &mut Report, bar: &ProgressBar) -> anyhow::Result<()> {
    let cfg = report.cfg;
    let interrupted = interrupt::install();
    let mut checked = false;
    for enable_lora in [false, true] {
        let group: Vec<usize> = (0..report.planned.len())
            .filter(|&i| (report.planned[i].series != Series::NoLora) == enable_lora)
            .filter(|&i| report.done[i].is_none())
            .collect();
        if group.is_empty() || interrupted.load(Ordering::Relaxed) {
            continue;
        }
        let mut engine_cfg = cfg.engine.clone();
        engine_cfg.enable_lora = enable_lora;
        bar.set_message(format!("loading {}", cfg.base_model_path.display()));
        let mut backend: Box<dyn Backend> = if report.is_client {
            let fallback = engine_cfg.max_model_len.unwrap_or(usize::MAX);
            Box::new(openai::OpenAiBackend::connect(&args.client.server, fallback)?)
        } else {
            Box::new(EngineBackend::open(&engine_cfg).with_context(|| {
                format!(
                    "loading the model of base_model_path {} ({})",
                    cfg.base_model_path.display(),
                    cfg.config_path.display()
                )
            })?)
        };
        if !checked {
            plan::check_prompt_lengths(cfg, report.planned, backend.as_mut())?;
            backend.prepare(report.planned)?;
            checked = true;
        }
        let key = if enable_lora { "multi-lora" } else { "no-lora" };
        report.run_json["backends"][key] = backend.describe();
        measure_group(&group, backend.as_mut(), report, bar, interrupted)?;
        report.run_json["backends"][key] = backend.describe();
    }
    Ok(())
}

/// Measures the points `group` (indices into the plan) on one backend. Per batch size: a
/// warm-up run (thrown away) of each point, then the `repeat` measured runs round-robin over
/// the points, so slow drift of the machine (heat, other load) spreads over the workloads
/// instead of favouring the first. Each point is saved as soon as its last run is measured.
fn measure_group(
    group: &[usize],
    backend: &mut dyn Backend,
    report: &mut Report,
    bar: &ProgressBar,
    interrupted: &AtomicBool,
) -> anyhow::Result<()> {
    let cfg = report.cfg;
    let planned = report.planned;
    let is_tty = std::io::stderr().is_terminal();
    for &b in &cfg.batch_sizes {
        let at_b: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&i| planned[i].batch_size == b)
            .collect();
        let stop = || interrupted.load(Ordering::Relaxed);
        if cfg.warmup_num_tokens > 0 {
            for &i in &at_b {
                if stop() {
                    return Ok(());
                }
                let what = Report::what(&planned[i]);
                bar.set_message(format!("{what}: warm-up"));
                backend
                    .run_batch(&planned[i].requests, cfg.warmup_num_tokens)
                    .with_context(|| format!("{what}: warm-up run"))?;
                bar.inc(1);
            }
        }
        let mut runs: Vec<Vec<Measured>> = vec![Vec::with_capacity(cfg.repeat); at_b.len()];
        for k in 0..cfg.repeat {
            for (j, &i) in at_b.iter().enumerate() {
                if stop() {
                    return Ok(());
                }
                let p = &planned[i];
                let what = Report::what(p);
                bar.set_message(format!("{what}: run {}/{}", k + 1, cfg.repeat));
                let m =
                    measure(cfg, p, backend).with_context(|| format!("{what}: measured run {}", k + 1))?;
                for n in &m.notes {
                    bar.suspend(|| eprintln!("warning: {what}: {n}"));
                }
                runs[j].push(m);
                bar.inc(1);
                if k + 1 < cfg.repeat {
                    continue;
                }
                let point = Point {
                    series: p.series,
                    batch_size: p.batch_size,
                    adapter_indices: p.adapter_indices.clone(),
                    repeats: std::mem::take(&mut runs[j]),
                };
                if !is_tty {
                    // indicatif draws nothing off a terminal: a line per point instead.
                    let row = &summary::summarize(std::slice::from_ref(&point))[0];
                    let num_done = report.done.iter().flatten().count() + 1;
                    eprintln!(
                        "[{num_done}/{}] {what}: prefill {:.2} ms, decode {:.2} ms, e2e {:.2} ms",
                        planned.len(),
                        row.prefill_latency_ms.mean,
                        row.decode_latency_ms.mean,
                        row.e2e_latency_ms.mean
                    );
                }
                report.save(i, point)?;
            }
        }
    }
    Ok(())
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

/// Writes the demo model and adapters where the config points at a missing demo (a folder
/// named `demo` holding `model/` and `adapters/`, as `config/common.json` has it).
fn ensure_demo(cfg: &config::BenchConfig) -> anyhow::Result<()> {
    let mut roots = vec![config::demo_root(&cfg.base_model_path, "model")];
    if cfg.engine.enable_lora {
        roots.push(
            cfg.lora_adapters_path
                .as_deref()
                .and_then(|p| config::demo_root(p, "adapters")),
        );
    }
    let mut roots: Vec<PathBuf> = roots.into_iter().flatten().collect();
    roots.dedup();
    for root in roots {
        if multilora_engine::demo::ensure_demo(&root, 0)
            .with_context(|| format!("writing the demo model and adapters to {}", root.display()))?
        {
            eprintln!(
                "wrote the missing demo model (random weights: its text is noise) and adapters to {} (multilora demo --dir {} does the same)",
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
        "long_prefill_token_threshold": e.long_prefill_token_threshold,
        "block_size": e.block_size,
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "tensor_parallel_size": e.tensor_parallel_size,
        "enforce_eager": e.enforce_eager,
        "max_loras": e.max_loras,
        "max_lora_rank": e.max_lora_rank,
        "lora_target_modules": e.lora_target_modules,
        "max_cpu_loras": e.max_cpu_loras.unwrap_or(e.max_loras),
        "seed": e.seed,
    })
}
