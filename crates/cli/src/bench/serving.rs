//! `multilora bench serving`: load on an OpenAI-compatible server the way serving is evaluated
//! (vLLM's `benchmark_serving`, S-LoRA's evaluation): requests arrive as a Poisson process at
//! `--request-rate` or from `--max-concurrency` closed-loop clients, for `--num-prompts`
//! requests or `--duration` seconds, each naming one of up to thousands of adapters drawn
//! uniformly or by a power law (Zipf). Reports throughput, TTFT/TPOT/ITL/e2e percentiles,
//! goodput against the given SLOs, and, from the server's `/metrics` where it exports them,
//! adapter loads and the time requests waited for their adapter ([`server_metrics`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

use super::openai::{OpenAiClient, RequestTiming, ServerArgs};
use super::report::{Csv, Staging};
use super::server_metrics::{self, AdapterMetrics, HistSummary, Scrape};
use super::summary::ClientLatencies;
use super::{inputs, run_info};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Popularity {
    Uniform,
    /// Zipf: adapter k (1-based, in the server's order) with weight 1 / k^alpha.
    PowerLaw,
}

#[derive(clap::Args, Debug, Serialize)]
pub struct ServingArgs {
    #[command(flatten)]
    #[serde(skip)]
    pub server: ServerArgs,
    /// Prompts, as the original's prompts.json; each request draws one.
    #[arg(long, default_value = "config/prompts.json")]
    pub prompts: PathBuf,
    /// Output tokens per request (min = max, EOS ignored).
    #[arg(long, default_value_t = 64)]
    pub num_tokens: usize,
    /// Poisson arrivals per second (default: all at once, bounded by --max-concurrency).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Requests in flight at most (closed loop when no --request-rate).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests to send (default 200 unless --duration).
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// Send for this many seconds instead of a request count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Adapters to use: the first K the server lists (default all; 0 = base model only).
    #[arg(long)]
    pub num_adapters: Option<usize>,
    /// How requests pick their adapter.
    #[arg(long, value_enum, default_value = "uniform")]
    pub adapter_popularity: Popularity,
    /// Exponent of the power law.
    #[arg(long, default_value_t = 1.0)]
    pub power_law_alpha: f64,
    /// SLO on time to first token, ms: goodput counts the requests per second that meet every
    /// SLO given.
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// SLO on time per output token after the first, ms (see --slo-ttft-ms).
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// SLO on a request's end-to-end latency, ms (see --slo-ttft-ms).
    #[arg(long)]
    pub slo_e2e_ms: Option<f64>,
    /// Seed of the arrivals, adapter draws and prompt draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder the report goes under (a new timestamped folder each run).
    #[arg(long, default_value = "reports")]
    pub report_dir: PathBuf,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One request as sent and answered.
struct Outcome {
    index: usize,
    model: String,
    /// Seconds after the benchmark started.
    start_s: f64,
    result: Result<RequestTiming, String>,
}

#[derive(Debug, Serialize)]
pub struct ServingSummary {
    pub duration_s: f64,
    pub num_requests: usize,
    pub num_failed: usize,
    pub num_adapters_used: usize,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub total_token_throughput: f64,
    #[serde(flatten)]
    pub latencies: ClientLatencies,
    /// Requests per second that met every SLO given; `None` without SLOs.
    pub goodput: Option<f64>,
    pub slo_attainment_pct: Option<f64>,
    /// Which successful requests have no TTFT or TPOT, how many and why (empty when every one
    /// has both): the percentiles leave them out.
    pub missing_figures: Vec<String>,
    /// From the server's `/metrics` over the run; `None`: not reported by server.
    pub server_adapter_metrics: Option<AdapterMetrics>,
}

pub fn run(args: ServingArgs) -> anyhow::Result<ExitCode> {
    check_args(&args)?;
    let prompts = inputs::read_prompts(&args.prompts)?;
    if prompts.is_empty() {
        bail!("{}: no prompts", args.prompts.display());
    }
    let started = SystemTime::now();
    let (start_time, stamp) = run_info::utc(started);
    let staging = Staging::create(&args.report_dir, &format!("serving-{stamp}"), false)?;
    let client = OpenAiClient::new(&args.server)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let models = runtime.block_on(client.models())?;
    let base = OpenAiClient::base_model(&models, args.server.model.as_deref())?;
    let mut adapters = OpenAiClient::adapter_names(&models);
    if let Some(k) = args.num_adapters {
        if k > adapters.len() {
            bail!(
                "--num-adapters {k}: the server lists {} adapters (load more with --lora-modules or /v1/load_lora_adapter)",
                adapters.len()
            );
        }
        adapters.truncate(k);
    }
    eprintln!(
        "serving benchmark: {} at {}, {} adapters ({}), {}",
        base,
        args.server.base_url,
        adapters.len(),
        match args.adapter_popularity {
            Popularity::Uniform => "uniform".to_string(),
            Popularity::PowerLaw => format!("power law, alpha {}", args.power_law_alpha),
        },
        match (args.request_rate, args.max_concurrency) {
            (Some(r), Some(c)) => format!("{r} req/s (Poisson), at most {c} in flight"),
            (Some(r), None) => format!("{r} req/s (Poisson)"),
            (None, Some(c)) => format!("{c} concurrent clients"),
            (None, None) => "all requests at once".into(),
        }
    );

    let scrape = |client: &OpenAiClient| {
        let text = runtime.block_on(client.metrics_text());
        text.map(|t| Scrape::parse(&t))
    };
    let before = scrape(&client);
    let clock = Instant::now();
    let outcomes = runtime.block_on(drive(&args, client.clone(), &base, &adapters, &prompts))?;
    let duration_s = clock.elapsed().as_secs_f64();
    let after = scrape(&client);
    let mut summary = summarize(&args, &outcomes, duration_s);
    summary.server_adapter_metrics = server_metrics::adapter_metrics(before.as_ref(), after.as_ref());

    staging.write("requests.csv", &requests_csv(&outcomes))?;
    staging.write("summary.csv", &summary_csv(&summary))?;
    let run_json = json!({
        "tool": "multilora bench serving",
        "multilora_version": env!("CARGO_PKG_VERSION"),
        "git_revision": run_info::git_revision().0,
        "command_line": std::env::args().collect::<Vec<_>>(),
        "start_time": start_time,
        "server": {"base_url": args.server.base_url, "model": base, "adapters": adapters.len()},
        "args": args,
        "summary": summary,
    });
    staging.write("run.json", &(serde_json::to_string_pretty(&run_json)? + "\n"))?;
    let dest = staging.finish()?;
    if args.json {
        let out = json!({"report_dir": dest, "summary": summary});
        crate::print_stdout(&(serde_json::to_string_pretty(&out)? + "\n"))?;
    } else {
        crate::print_stdout(&render(&summary))?;
    }
    eprintln!("report: {}", dest.display());
    Ok(if summary.num_failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} of {} requests failed (see requests.csv)",
            summary.num_failed, summary.num_requests
        );
        ExitCode::FAILURE
    })
}

fn check_args(a: &ServingArgs) -> anyhow::Result<()> {
    if a.num_tokens == 0 {
        bail!("--num-tokens must be at least 1");
    }
    if a.request_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--request-rate must be a positive number of requests per second");
    }
    if a.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1");
    }
    if a.duration.is_some_and(|d| !(d.is_finite() && d > 0.0)) {
        bail!("--duration must be a positive number of seconds");
    }
    if a.duration.is_some() && a.num_prompts.is_some() {
        bail!("give --duration or --num-prompts, not both");
    }
    if a.duration.is_some() && a.request_rate.is_none() && a.max_concurrency.is_none() {
        bail!("--duration needs --request-rate or --max-concurrency (else it would send without bound)");
    }
    if a.num_prompts == Some(0) {
        bail!("--num-prompts must be at least 1");
    }
    if !(a.power_law_alpha.is_finite() && a.power_law_alpha > 0.0) {
        bail!("--power-law-alpha must be a positive number");
    }
    Ok(())
}

/// Sends the requests and waits for all of them.
async fn drive(
    args: &ServingArgs,
    client: OpenAiClient,
    base: &str,
    adapters: &[String],
    prompts: &[String],
) -> anyhow::Result<Vec<Outcome>> {
    let power_law = (args.adapter_popularity == Popularity::PowerLaw).then_some(args.power_law_alpha);
    let mut draws = Draws::new(
        args.seed,
        args.request_rate,
        power_law,
        adapters.len(),
        prompts.len(),
    )?;
    let limit = Arc::new(Semaphore::new(
        args.max_concurrency.unwrap_or(Semaphore::MAX_PERMITS),
    ));
    let num_prompts = args
        .num_prompts
        .unwrap_or(if args.duration.is_some() { usize::MAX } else { 200 });
    let deadline = args.duration.map(Duration::from_secs_f64);
    let start = Instant::now();
    let mut next_arrival = start;
    let mut tasks = Vec::new();
    for index in 0..num_prompts {
        if let Some(gap) = draws.gap() {
            next_arrival += gap;
            tokio::time::sleep_until(next_arrival.into()).await;
        }
        if deadline.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .context("the request limiter closed")?;
        if deadline.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let model = match draws.adapter() {
            None => base.to_string(),
            Some(a) => adapters[a].clone(),
        };
        let prompt = prompts[draws.prompt()].clone();
        let client = client.clone();
        let num_tokens = args.num_tokens;
        let start_s = start.elapsed().as_secs_f64();
        tasks.push(tokio::spawn(async move {
            let result = client
                .complete(&model, &prompt, num_tokens)
                .await
                .map_err(|e| format!("{e:#}"));
            drop(permit);
            Outcome {
                index,
                model,
                start_s,
                result,
            }
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.context("a request task panicked")?);
    }
    Ok(outcomes)
}

fn summarize(args: &ServingArgs, outcomes: &[Outcome], duration_s: f64) -> ServingSummary {
    let ok: Vec<&RequestTiming> = outcomes.iter().filter_map(|o| o.result.as_ref().ok()).collect();
    let ms = |v: f64| v * 1e3;
    let ttft: Vec<f64> = ok.iter().filter_map(|t| t.ttft_s()).map(ms).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|t| t.tpot_s()).map(ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|t| t.itls_s()).map(ms).collect();
    let e2e: Vec<f64> = ok.iter().map(|t| ms(t.e2e_s())).collect();
    let output: usize = ok.iter().map(|t| t.output_tokens).sum();
    let prompt: usize = ok.iter().map(|t| t.prompt_tokens).sum();
    let has_slo = args.slo_ttft_ms.is_some() || args.slo_tpot_ms.is_some() || args.slo_e2e_ms.is_some();
    let meets = |t: &RequestTiming| {
        let within = |v: Option<f64>, slo: Option<f64>| slo.is_none_or(|s| v.is_some_and(|v| ms(v) <= s));
        within(t.ttft_s(), args.slo_ttft_ms)
            && within(t.tpot_s().or(Some(0.0)), args.slo_tpot_ms)
            && within(Some(t.e2e_s()), args.slo_e2e_ms)
    };
    let num_good = ok.iter().filter(|t| meets(t)).count();
    let mut missing_figures = Vec::new();
    let num_ok = ok.len();
    if ttft.len() < num_ok {
        missing_figures.push(format!(
            "TTFT: {} of {num_ok} successful requests streamed no token",
            num_ok - ttft.len()
        ));
    }
    if tpot.len() < num_ok {
        missing_figures.push(format!(
            "TPOT: {} of {num_ok} successful requests have fewer than 2 streamed tokens",
            num_ok - tpot.len()
        ));
    }
    let mut used: Vec<&str> = outcomes.iter().map(|o| o.model.as_str()).collect();
    used.sort_unstable();
    used.dedup();
    let per_s = |n: f64| if duration_s > 0.0 { n / duration_s } else { 0.0 };
    ServingSummary {
        duration_s,
        num_requests: outcomes.len(),
        num_failed: outcomes.len() - ok.len(),
        num_adapters_used: used.len(),
        request_throughput: per_s(ok.len() as f64),
        output_token_throughput: per_s(output as f64),
        total_token_throughput: per_s((output + prompt) as f64),
        latencies: ClientLatencies::of(&ttft, &tpot, &itl, &e2e),
        goodput: has_slo.then(|| per_s(num_good as f64)),
        slo_attainment_pct: (has_slo && !outcomes.is_empty())
            .then(|| 100.0 * num_good as f64 / outcomes.len() as f64),
        missing_figures,
        server_adapter_metrics: None,
    }
}

pub const REQUESTS_HEADER: [&str; 11] = [
    "index",
    "model",
    "start_s",
    "prompt_tokens",
    "output_tokens",
    "ttft_ms",
    "tpot_ms",
    "itl_mean_ms",
    "e2e_ms",
    "finish_reason",
    "error",
];

fn requests_csv(outcomes: &[Outcome]) -> String {
    let mut csv = Csv::new(&REQUESTS_HEADER);
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{:.4}", v * 1e3));
    for o in outcomes {
        let mut row = vec![o.index.to_string(), o.model.clone(), format!("{:.6}", o.start_s)];
        match &o.result {
            Ok(t) => {
                let itls: Vec<f64> = t.itls_s().collect();
                let itl_mean = (!itls.is_empty()).then(|| itls.iter().sum::<f64>() / itls.len() as f64);
                row.extend([
                    t.prompt_tokens.to_string(),
                    t.output_tokens.to_string(),
                    f(t.ttft_s()),
                    f(t.tpot_s()),
                    f(itl_mean),
                    f(Some(t.e2e_s())),
                    t.finish_reason.clone(),
                    String::new(),
                ]);
            }
            Err(e) => {
                row.extend(std::iter::repeat_n(String::new(), 7));
                row.push(e.clone());
            }
        }
        csv.row(row);
    }
    csv.0
}

pub const SUMMARY_HEADER: [&str; 8] = ["metric", "count", "mean", "p50", "p90", "p95", "p99", "max"];

fn summary_csv(s: &ServingSummary) -> String {
    let mut csv = Csv::new(&SUMMARY_HEADER);
    for (name, p) in ClientLatencies::NAMES.into_iter().zip(s.latencies.all()) {
        if let Some(p) = p {
            let mut row = vec![name.to_string(), p.count.to_string()];
            row.extend(p.values().map(|v| format!("{v:.4}")));
            csv.row(row);
        }
    }
    let one = |csv: &mut Csv, name: &str, v: f64| {
        let mut row = vec![name.to_string(), String::new(), format!("{v:.4}")];
        row.extend(std::iter::repeat_n(String::new(), 5));
        csv.row(row);
    };
    one(&mut csv, "duration_s", s.duration_s);
    one(&mut csv, "request_throughput", s.request_throughput);
    one(&mut csv, "output_token_throughput", s.output_token_throughput);
    one(&mut csv, "total_token_throughput", s.total_token_throughput);
    if let Some(g) = s.goodput {
        one(&mut csv, "goodput", g);
    }
    // The server's histograms: count, mean, p50, p90, p99 (p95 and max it cannot give).
    let hist = |csv: &mut Csv, name: &str, h: &HistSummary| {
        let f = |v: f64| format!("{v:.4}");
        csv.row(vec![
            name.to_string(),
            h.count.to_string(),
            f(h.mean),
            f(h.p50),
            f(h.p90),
            String::new(),
            f(h.p99),
            String::new(),
        ]);
    };
    match &s.server_adapter_metrics {
        Some(m) => {
            one(&mut csv, "server_adapter_loads", m.num_loads as f64);
            one(
                &mut csv,
                "server_adapter_load_failures",
                m.num_load_failures as f64,
            );
            if let Some(h) = &m.load_time_ms {
                hist(&mut csv, "server_adapter_load_time_ms", h);
            }
            if let Some(h) = &m.adapter_wait_ms {
                hist(&mut csv, "server_adapter_wait_ms", h);
            }
        }
        None => {
            let mut row = vec![
                "server_adapter_metrics".into(),
                String::new(),
                NOT_REPORTED.into(),
            ];
            row.extend(std::iter::repeat_n(String::new(), 5));
            csv.row(row);
        }
    }
    csv.0
}

const NOT_REPORTED: &str = "not reported by server";

fn render(s: &ServingSummary) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<34}{v:>14}\n"));
    line(
        &mut out,
        "Successful requests:",
        format!("{}", s.num_requests - s.num_failed),
    );
    line(&mut out, "Failed requests:", format!("{}", s.num_failed));
    line(&mut out, "Adapters used:", format!("{}", s.num_adapters_used));
    line(
        &mut out,
        "Benchmark duration (s):",
        format!("{:.2}", s.duration_s),
    );
    line(
        &mut out,
        "Request throughput (req/s):",
        format!("{:.2}", s.request_throughput),
    );
    line(
        &mut out,
        "Output token throughput (tok/s):",
        format!("{:.2}", s.output_token_throughput),
    );
    line(
        &mut out,
        "Total token throughput (tok/s):",
        format!("{:.2}", s.total_token_throughput),
    );
    if let (Some(g), Some(a)) = (s.goodput, s.slo_attainment_pct) {
        line(&mut out, "Goodput (req/s):", format!("{g:.2}"));
        line(&mut out, "SLO attainment (%):", format!("{a:.1}"));
    }
    for (name, p) in ClientLatencies::LABELS.into_iter().zip(s.latencies.all()) {
        if let Some(p) = p {
            line(
                &mut out,
                &format!("{name} mean / p50 (ms):"),
                format!("{:.2} / {:.2}", p.mean, p.p50),
            );
            line(
                &mut out,
                &format!("{name} p90 / p99 (ms):"),
                format!("{:.2} / {:.2}", p.p90, p.p99),
            );
        }
    }
    match &s.server_adapter_metrics {
        Some(m) => {
            line(&mut out, "Adapter loads (server):", format!("{}", m.num_loads));
            line(
                &mut out,
                "Adapter load failures (server):",
                format!("{}", m.num_load_failures),
            );
            let p =
                |h: &Option<HistSummary>| h.map_or("none".into(), |h| format!("{:.2} / {:.2}", h.p50, h.p99));
            line(&mut out, "Adapter load p50 / p99 (ms):", p(&m.load_time_ms));
            line(&mut out, "Adapter wait p50 / p99 (ms):", p(&m.adapter_wait_ms));
        }
        None => line(&mut out, "Adapter loads and waits:", NOT_REPORTED.into()),
    }
    for m in &s.missing_figures {
        out.push_str(&format!("note: no {m}; the percentiles leave them out\n"));
    }
    out
}

/// The run's random draws, each from a stream of its own (all from `--seed`): arrival gaps,
/// adapters, prompts. So runs with one seed offer the same arrival times and prompts whatever
/// the adapter count or popularity (a power-law draw takes a varying number of samples from its
/// stream), and their throughput and latency compare like for like.
struct Draws {
    gaps: Option<(Exp<f64>, StdRng)>,
    adapters: Option<(Option<Zipf<f64>>, usize, StdRng)>,
    prompts: (usize, StdRng),
}

impl Draws {
    /// `power_law`: the exponent when adapters are drawn by a power law, else uniformly.
    fn new(
        seed: u64,
        request_rate: Option<f64>,
        power_law: Option<f64>,
        num_adapters: usize,
        num_prompts: usize,
    ) -> anyhow::Result<Self> {
        let stream = |k: u64| StdRng::seed_from_u64(seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let gaps = request_rate
            .map(|r| Exp::new(r).map_err(|e| anyhow::anyhow!("--request-rate {r}: {e}")))
            .transpose()?
            .map(|e| (e, stream(0)));
        let zipf = match power_law {
            Some(alpha) if num_adapters > 0 => Some(
                Zipf::new(num_adapters as f64, alpha)
                    .map_err(|e| anyhow::anyhow!("power law over {num_adapters} adapters: {e}"))?,
            ),
            _ => None,
        };
        Ok(Draws {
            gaps,
            adapters: (num_adapters > 0).then(|| (zipf, num_adapters, stream(1))),
            prompts: (num_prompts, stream(2)),
        })
    }

    /// Time to the next arrival (Poisson at `--request-rate`); `None`: all at once.
    fn gap(&mut self) -> Option<Duration> {
        let (exp, rng) = self.gaps.as_mut()?;
        Some(Duration::from_secs_f64(exp.sample(rng)))
    }

    /// Index of the next request's adapter; `None`: the base model.
    fn adapter(&mut self) -> Option<usize> {
        let (zipf, n, rng) = self.adapters.as_mut()?;
        Some(match zipf {
            Some(z) => (z.sample(rng) as usize).clamp(1, *n) - 1,
            None => rng.random_range(0..*n),
        })
    }

    fn prompt(&mut self) -> usize {
        let (n, rng) = &mut self.prompts;
        rng.random_range(0..*n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::summary::Percentiles;

    #[test]
    fn summary_columns_are_the_percentiles_names() {
        assert_eq!(SUMMARY_HEADER[2..], Percentiles::NAMES);
    }

    /// One seed, one offered load: the same arrival times and prompts under uniform and
    /// power-law popularity and any adapter count (the adapters drawn differ).
    #[test]
    fn arrivals_and_prompts_do_not_depend_on_the_adapter_draws() -> anyhow::Result<()> {
        let run = |power_law, num_adapters| -> anyhow::Result<Vec<(Duration, usize, Option<usize>)>> {
            let mut d = Draws::new(7, Some(24.0), power_law, num_adapters, 5)?;
            Ok((0..500)
                .map(|_| {
                    let gap = d.gap().expect("a rate");
                    let adapter = d.adapter();
                    (gap, d.prompt(), adapter)
                })
                .collect())
        };
        let uniform = run(None, 1000)?;
        let strip = |v: &[(Duration, usize, Option<usize>)]| v.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>();
        for (power_law, n) in [(Some(1.0), 1000), (None, 8), (Some(1.2), 2000), (None, 0)] {
            let other = run(power_law, n)?;
            assert_eq!(strip(&other), strip(&uniform), "{power_law:?} over {n} adapters");
        }
        // The adapter draws themselves do differ, and none is drawn without adapters.
        let power = run(Some(1.0), 1000)?;
        assert_ne!(
            power.iter().map(|x| x.2).collect::<Vec<_>>(),
            uniform.iter().map(|x| x.2).collect::<Vec<_>>()
        );
        assert!(run(None, 0)?.iter().all(|x| x.2.is_none()));
        Ok(())
    }

    #[test]
    fn power_law_favours_the_first_adapters() -> anyhow::Result<()> {
        let z = Zipf::new(1000.0, 1.0).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut rng = StdRng::seed_from_u64(0);
        let draws: Vec<usize> = (0..10_000).map(|_| z.sample(&mut rng) as usize).collect();
        assert!(draws.iter().all(|&k| (1..=1000).contains(&k)));
        let first_ten = draws.iter().filter(|&&k| k <= 10).count();
        // Zipf(1) over 1000: P(k <= 10) = H(10) / H(1000) ≈ 0.39.
        assert!((3_500..4_300).contains(&first_ten), "{first_ten}");
        Ok(())
    }
}
