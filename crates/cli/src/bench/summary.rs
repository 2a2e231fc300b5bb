//! Results of a whole run ([`Point`]: one series at one batch size, K repeats) and the summary
//! across them: mean, median and spread of each latency, and the LoRA overhead against the
//! no-LoRA series at the same batch size.

use serde::Serialize;

use super::records::{BatchLatency, BatchRun};
use super::workload::Series;

/// One measured repetition.
#[derive(Debug, Clone)]
pub struct Measured {
    pub run: BatchRun,
    pub latency: BatchLatency,
    /// Where the run differs from what the original's arithmetic assumes.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone)]
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
        workload: match p.series {
            Series::NoLora => "none",
            Series::Lora(w) => w.name(),
        },
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
