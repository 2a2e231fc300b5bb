//! `/metrics` in Prometheus text format, written by hand: a few gauges and counters and
//! histograms with vLLM's metric names under a `multilora:` prefix, so vLLM dashboards carry
//! over by renaming the prefix. The engine loop updates them; the handler renders them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

use multilora_engine::lora::manager::LoraStats;
use multilora_engine::sequence::RequestMetrics;

/// A cumulative histogram with fixed upper bounds (seconds).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// `[bounds.len()]`, not cumulative; `+Inf` is `count`
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

// vLLM's buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];
const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];

#[derive(Debug, Clone)]
pub struct Metrics {
    pub num_requests_running: usize,
    pub num_requests_waiting: usize,
    pub num_prompt_tokens: u64,
    pub num_generation_tokens: u64,
    pub num_steps: u64,
    pub num_rejected_queue_full: u64,
    /// Finished requests by reason (`stop`, `length`, `abort`).
    pub num_finished: BTreeMap<&'static str, u64>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_request_latency: Histogram,
    pub queue_time: Histogram,
    pub lora_adapters_on_device: usize,
    pub lora_adapters_on_host: usize,
    pub lora: LoraStats,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            num_requests_running: 0,
            num_requests_waiting: 0,
            num_prompt_tokens: 0,
            num_generation_tokens: 0,
            num_steps: 0,
            num_rejected_queue_full: 0,
            num_finished: BTreeMap::new(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(TPOT_BUCKETS),
            time_per_output_token: Histogram::new(TPOT_BUCKETS),
            e2e_request_latency: Histogram::new(REQUEST_BUCKETS),
            queue_time: Histogram::new(REQUEST_BUCKETS),
            lora_adapters_on_device: 0,
            lora_adapters_on_host: 0,
            lora: LoraStats::default(),
        }
    }
}

impl Metrics {
    pub fn count_finish(&mut self, reason: &'static str) {
        *self.num_finished.entry(reason).or_default() += 1;
    }

    /// The latencies of a finished request whose last token came at `now`.
    pub fn observe_finished(&mut self, m: &RequestMetrics, now: Instant, num_output_tokens: usize) {
        self.e2e_request_latency
            .observe((now - m.arrival_time).as_secs_f64());
        if let Some(first) = m.first_token_time.filter(|_| num_output_tokens > 1) {
            self.time_per_output_token
                .observe((now - first).as_secs_f64() / (num_output_tokens - 1) as f64);
        }
        if let Some(t) = m.first_scheduled_time {
            self.queue_time.observe((t - m.arrival_time).as_secs_f64());
        }
    }

    pub fn render(&self, model_name: &str) -> String {
        let mut out = String::with_capacity(8 << 10);
        let model = escape_label(model_name);
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP multilora:{name} {help}\n# TYPE multilora:{name} gauge\nmultilora:{name}{{model_name=\"{model}\"}} {v}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP multilora:{name}_total {help}\n# TYPE multilora:{name}_total counter\nmultilora:{name}_total{{model_name=\"{model}\"}} {v}"
            );
        };
        gauge(
            &mut out,
            "num_requests_running",
            "Requests in the running batch.",
            self.num_requests_running as f64,
        );
        gauge(
            &mut out,
            "num_requests_waiting",
            "Requests waiting to be scheduled.",
            self.num_requests_waiting as f64,
        );
        gauge(
            &mut out,
            "lora_adapters_on_device",
            "Adapters resident in device slots (max_loras).",
            self.lora_adapters_on_device as f64,
        );
        gauge(
            &mut out,
            "lora_adapters_on_host",
            "Adapters in the host cache (max_cpu_loras).",
            self.lora_adapters_on_host as f64,
        );
        counter(
            &mut out,
            "prompt_tokens",
            "Prefilled prompt tokens.",
            self.num_prompt_tokens,
        );
        counter(
            &mut out,
            "generation_tokens",
            "Generated tokens.",
            self.num_generation_tokens,
        );
        counter(&mut out, "engine_steps", "Engine steps run.", self.num_steps);
        counter(
            &mut out,
            "request_rejected_queue_full",
            "Requests refused because the waiting queue was full.",
            self.num_rejected_queue_full,
        );
        counter(
            &mut out,
            "lora_cache_hits",
            "Adapter lookups served from a device slot or the host cache.",
            self.lora.cache_hits,
        );
        counter(
            &mut out,
            "lora_cache_misses",
            "Adapters loaded from disk.",
            self.lora.cache_misses,
        );
        counter(
            &mut out,
            "lora_cache_evictions",
            "Adapters evicted from the host cache.",
            self.lora.cache_evictions,
        );
        counter(
            &mut out,
            "lora_slot_loads",
            "Adapters copied from the host cache into a device slot.",
            self.lora.slot_loads,
        );
        let name = "multilora:request_success_total";
        let _ = writeln!(
            out,
            "# HELP {name} Finished requests by finish reason.\n# TYPE {name} counter"
        );
        for reason in ["stop", "length", "abort"] {
            let n = self.num_finished.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{name}{{model_name=\"{model}\",finished_reason=\"{reason}\"}} {n}"
            );
        }
        self.time_to_first_token.render(
            &mut out,
            "multilora:time_to_first_token_seconds",
            "Time from arrival to the first token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "multilora:inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
        );
        self.time_per_output_token.render(
            &mut out,
            "multilora:request_time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1).",
        );
        self.e2e_request_latency.render(
            &mut out,
            "multilora:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
        );
        self.queue_time.render(
            &mut out,
            "multilora:request_queue_time_seconds",
            "Time from arrival to first scheduled.",
        );
        out
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn labels_are_escaped() {
        let out = Metrics::default().render("a\"b");
        assert!(out.contains("model_name=\"a\\\"b\""));
    }
}
