//! Results of a whole run ([`Point`]: one series at one batch size, K repeats) and the summary
//! across them: mean, median and spread of each latency, and the LoRA overhead against the
//! no-LoRA series at the same batch size; and, for client mode, percentiles of the per-request
//! latencies (TTFT, TPOT, ITL, e2e) of each point, as `bench serving` reports them.

use serde::{Deserialize, Serialize};

use super::records::{BatchLatency, BatchRun, RequestRecord};
use super::workload::Series;

/// One measured repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub run: BatchRun,
    pub latency: BatchLatency,
    /// Where the run differs from what the original's arithmetic assumes.
    pub notes: Vec<String>,
}

/// Also a line of the report's `points.jsonl`, which `--resume` reads back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub series: Series,
    pub batch_size: usize,
    /// Index into the adapter group of each request (empty for no-LoRA).
    pub adapter_indices: Vec<usize>,
    pub repeats: Vec<Measured>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    /// Sample standard deviation; `None` for one value.
    pub stdev: Option<f64>,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        assert!(!values.is_empty(), "a point has at least one repeat");
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        let stdev = (values.len() > 1)
            .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
        Stats {
            mean,
            median,
            stdev,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

/// Percentiles of one latency over many samples, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Names of [`Percentiles::values`], in order (CSV column suffixes).
    pub const NAMES: [&'static str; 6] = ["mean", "p50", "p90", "p95", "p99", "max"];

    /// `None` for no values. Linear interpolation between ranks (numpy's default, as vLLM's
    /// benchmark reports them).
    pub fn of(values: &[f64]) -> Option<Percentiles> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let rank = p / 100.0 * (v.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
        };
        Some(Percentiles {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: at(50.0),
            p90: at(90.0),
            p95: at(95.0),
            p99: at(99.0),
            max: v[v.len() - 1],
        })
    }

    pub fn values(&self) -> [f64; 6] {
        [self.mean, self.p50, self.p90, self.p95, self.p99, self.max]
    }
}

/// What a client of a server measures per request, as percentiles in ms: TTFT and e2e from
/// sending the request, TPOT per request, ITL every gap between streamed chunks. `None` where
/// there were no samples.
#[derive(Debug, Clone, Serialize)]
pub struct ClientLatencies {
    pub ttft_ms: Option<Percentiles>,
    pub tpot_ms: Option<Percentiles>,
    pub itl_ms: Option<Percentiles>,
    pub e2e_ms: Option<Percentiles>,
}

impl ClientLatencies {
    /// Field names (CSV and JSON) and display labels, in the order of [`Self::all`].
    pub const NAMES: [&'static str; 4] = ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"];
    pub const LABELS: [&'static str; 4] = ["TTFT", "TPOT", "ITL", "E2E"];

    /// From samples in ms.
    pub fn of(ttft: &[f64], tpot: &[f64], itl: &[f64], e2e: &[f64]) -> ClientLatencies {
        ClientLatencies {
            ttft_ms: Percentiles::of(ttft),
            tpot_ms: Percentiles::of(tpot),
            itl_ms: Percentiles::of(itl),
            e2e_ms: Percentiles::of(e2e),
        }
    }

    pub fn all(&self) -> [Option<&Percentiles>; 4] {
        [
            self.ttft_ms.as_ref(),
            self.tpot_ms.as_ref(),
            self.itl_ms.as_ref(),
            self.e2e_ms.as_ref(),
        ]
    }
}

/// The per-request latencies of one point in client mode, pooled over its repeats.
#[derive(Debug, Clone, Serialize)]
pub struct RequestLatencyRow {
    pub mode: &'static str,
    pub workload: &'static str,
    pub batch_size: usize,
    pub repeats: usize,
    pub num_requests: usize,
    #[serde(flatten)]
    pub latencies: ClientLatencies,
}

pub fn request_latencies(points: &[Point]) -> Vec<RequestLatencyRow> {
    points
        .iter()
        .map(|p| {
            let requests: Vec<&RequestRecord> = p.repeats.iter().flat_map(|m| &m.run.requests).collect();
            let ms = |v: f64| v * 1e3;
            let ttft: Vec<f64> = requests.iter().map(|r| ms(r.first_token_time_s)).collect();
            let tpot: Vec<f64> = requests.iter().filter_map(|r| r.tpot_s()).map(ms).collect();
            let itl: Vec<f64> = requests
                .iter()
                .flat_map(|r| r.inter_token_latencies_s.iter().map(|&v| ms(v)))
                .collect();
            let e2e: Vec<f64> = requests.iter().map(|r| ms(r.e2e_s())).collect();
            RequestLatencyRow {
                mode: p.series.mode(),
                workload: p.series.workload_name(),
                batch_size: p.batch_size,
                repeats: p.repeats.len(),
                num_requests: requests.len(),
                latencies: ClientLatencies::of(&ttft, &tpot, &itl, &e2e),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    pub mode: &'static str,
    /// The workload, or `none` for no-LoRA.
    pub workload: &'static str,
    pub batch_size: usize,
    pub repeats: usize,
    /// Distinct adapters in the batch.
    pub num_adapters: usize,
    pub prompt_tokens_mean: f64,
    pub prefill_latency_ms: Stats,
    pub decode_latency_ms: Stats,
    pub e2e_latency_ms: Stats,
    /// Output tokens per second of the whole batch in decode: B / mean decode step.
    pub decode_tokens_per_s: f64,
    /// (LoRA mean / no-LoRA mean − 1) × 100 at the same batch size, where both ran.
    pub prefill_overhead_pct: Option<f64>,
    pub decode_overhead_pct: Option<f64>,
    pub e2e_overhead_pct: Option<f64>,
    pub notes: Vec<String>,
}

pub fn summarize(points: &[Point]) -> Vec<SummaryRow> {
    let mut rows: Vec<SummaryRow> = points.iter().map(row).collect();
    let baseline: Vec<(usize, [f64; 3])> = rows
        .iter()
        .filter(|r| r.mode == Series::NoLora.mode())
        .map(|r| (r.batch_size, means(r)))
        .collect();
    for r in rows.iter_mut().filter(|r| r.mode != Series::NoLora.mode()) {
        if let Some((_, base)) = baseline.iter().find(|(b, _)| *b == r.batch_size) {
            let pct = |lora: f64, base: f64| (base > 0.0).then(|| (lora / base - 1.0) * 100.0);
            let m = means(r);
            r.prefill_overhead_pct = pct(m[0], base[0]);
            r.decode_overhead_pct = pct(m[1], base[1]);
            r.e2e_overhead_pct = pct(m[2], base[2]);
        }
    }
    rows
}

fn means(r: &SummaryRow) -> [f64; 3] {
    [
        r.prefill_latency_ms.mean,
        r.decode_latency_ms.mean,
        r.e2e_latency_ms.mean,
    ]
}

fn row(p: &Point) -> SummaryRow {
    let pick =
        |f: fn(&BatchLatency) -> f64| -> Vec<f64> { p.repeats.iter().map(|m| f(&m.latency)).collect() };
    let decode = Stats::of(&pick(|l| l.decode_ms));
    let mut distinct = p.adapter_indices.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let prompts: Vec<f64> = p
        .repeats
        .iter()
        .flat_map(|m| m.run.requests.iter().map(|r| r.prompt_num_tokens as f64))
        .collect();
    let mut notes: Vec<String> = Vec::new();
    for n in p.repeats.iter().flat_map(|m| &m.notes) {
        if !notes.contains(n) {
            notes.push(n.clone());
        }
    }
    SummaryRow {
        mode: p.series.mode(),
        workload: p.series.workload_name(),
        batch_size: p.batch_size,
        repeats: p.repeats.len(),
        num_adapters: distinct.len(),
        prompt_tokens_mean: prompts.iter().sum::<f64>() / prompts.len().max(1) as f64,
        prefill_latency_ms: Stats::of(&pick(|l| l.prefill_ms)),
        decode_latency_ms: decode,
        e2e_latency_ms: Stats::of(&pick(|l| l.e2e_ms)),
        decode_tokens_per_s: p.batch_size as f64 * 1e3 / decode.mean,
        prefill_overhead_pct: None,
        decode_overhead_pct: None,
        e2e_overhead_pct: None,
        notes,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::workload::Workload;

    #[test]
    fn stats() {
        let s = Stats::of(&[3.0, 1.0, 2.0, 6.0]);
        assert_eq!((s.mean, s.median, s.min, s.max), (3.0, 2.5, 1.0, 6.0));
        assert!((s.stdev.unwrap_or(0.0) - (14.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(Stats::of(&[5.0]).stdev, None);
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let p = Percentiles::of(&[4.0, 1.0, 3.0, 2.0]).expect("values");
        assert_eq!(p.p50, 2.5);
        assert!((p.p90 - 3.7).abs() < 1e-12);
        assert_eq!(p.max, 4.0);
        assert_eq!(p.mean, 2.5);
        assert!(Percentiles::of(&[]).is_none());
    }

    #[test]
    fn request_latencies_pool_the_repeats() {
        let req = |ttft: f64, itls: &[f64]| RequestRecord {
            request_id: "0".into(),
            lora: None,
            prompt_num_tokens: 3,
            output_num_tokens: itls.len() + 1,
            finish_reason: "length".into(),
            first_token_time_s: ttft,
            completion_time_s: itls.iter().sum(),
            inter_token_latencies_s: itls.to_vec(),
        };
        let mut p = point(Series::Lora(Workload::Uniform), 2, &[1.0, 1.0]);
        p.repeats[0].run.requests = vec![req(0.010, &[0.001, 0.003]), req(0.020, &[0.002, 0.002])];
        p.repeats[1].run.requests = vec![req(0.030, &[0.004, 0.004]), req(0.040, &[0.001])];
        let rows = request_latencies(&[p]);
        let r = &rows[0];
        assert_eq!((r.mode, r.workload, r.batch_size), ("multi-lora", "uniform", 2));
        assert_eq!((r.repeats, r.num_requests), (2, 4));
        let ttft = r.latencies.ttft_ms.as_ref().expect("ttft");
        assert!(
            (ttft.p50 - 25.0).abs() < 1e-9 && (ttft.max - 40.0).abs() < 1e-9,
            "{ttft:?}"
        );
        // Every gap of every request is one ITL sample; TPOT is one value per request.
        let itl = r.latencies.itl_ms.as_ref().expect("itl");
        assert_eq!(itl.count, 7);
        assert!((itl.max - 4.0).abs() < 1e-9);
        let tpot = r.latencies.tpot_ms.as_ref().expect("tpot");
        assert_eq!(tpot.count, 4);
        assert!((tpot.p50 - 2.0).abs() < 1e-9, "{tpot:?}");
        let e2e = r.latencies.e2e_ms.as_ref().expect("e2e");
        assert!((e2e.max - 41.0).abs() < 1e-9, "{e2e:?}");
        // The engine backend records no gaps: no ITL rather than zeros.
        assert!(request_latencies(&[point(Series::NoLora, 1, &[1.0])])[0]
            .latencies
            .itl_ms
            .is_none());
    }

    pub fn point(series: Series, batch_size: usize, decode_ms: &[f64]) -> Point {
        Point {
            series,
            batch_size,
            adapter_indices: match series {
                Series::NoLora => vec![],
                Series::Lora(_) => (0..batch_size).collect(),
            },
            repeats: decode_ms
                .iter()
                .map(|&d| Measured {
                    run: BatchRun::default(),
                    latency: BatchLatency {
                        prefill_ms: 10.0,
                        decode_ms: d,
                        e2e_ms: 10.0 + d,
                        num_prefill_steps: 1,
                        num_decode_steps: 1,
                    },
                    notes: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn overhead_against_no_lora_at_the_same_batch_size() {
        let rows = summarize(&[
            point(Series::NoLora, 2, &[4.0]),
            point(Series::Lora(Workload::Distinct), 2, &[5.0, 5.0]),
            point(Series::Lora(Workload::Distinct), 4, &[8.0]),
        ]);
        assert_eq!(rows[0].decode_overhead_pct, None);
        assert_eq!(rows[1].decode_overhead_pct, Some(25.0));
        assert_eq!(rows[1].prefill_overhead_pct, Some(0.0));
        assert_eq!(rows[1].num_adapters, 2);
        assert_eq!(rows[1].decode_tokens_per_s, 400.0);
        assert_eq!(rows[2].decode_overhead_pct, None, "no baseline at batch 4");
    }
}
