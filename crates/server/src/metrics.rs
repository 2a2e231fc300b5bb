//! `/metrics` through `prometheus-client`: vLLM's metric names under a `multilora:` prefix (so
//! vLLM dashboards carry over by renaming the prefix), every series labelled with the served
//! `model_name`. The engine loop updates them (they are atomics: no lock); the handler encodes.
//!
//! Adapter loading has no vLLM counterpart; its series (`lora_load_time_seconds`,
//! `lora_loads_in_flight`, `lora_load_failures_total`, `lora_adapter_wait_time_seconds`) follow
//! the same naming. The load time histogram is the engine's own (its loader threads observe it),
//! exported as it stands rather than re-observed here.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use multilora_engine::lora::manager::{LoadTimeHistogram, LoraStats, LOAD_TIME_BUCKETS_S};
use multilora_engine::sequence::RequestMetrics;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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

/// Time requests waited for their adapter to arrive in host memory: most wait nothing (a hit,
/// its own bucket, so percentiles read 0 rather than a guess within the next one), a miss waits
/// for a disk read of milliseconds to seconds.
const ADAPTER_WAIT_BUCKETS: &[f64] = &[
    0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// vLLM's finish reasons, each with a series from the start (at 0).
const FINISH_REASONS: [&str; 3] = ["stop", "length", "abort"];

type ReasonLabel = [(&'static str, &'static str); 1];

pub struct Metrics {
    registry: Registry,
    pub num_requests_running: Gauge,
    pub num_requests_waiting: Gauge,
    pub lora_adapters_on_device: Gauge,
    pub lora_adapters_on_host: Gauge,
    pub num_prompt_tokens: Counter,
    pub num_generation_tokens: Counter,
    pub num_steps: Counter,
    pub num_rejected_queue_full: Counter,
    lora_cache_hits: Counter,
    lora_cache_misses: Counter,
    lora_cache_evictions: Counter,
    lora_slot_loads: Counter,
    lora_load_failures: Counter,
    lora_loads_in_flight: Gauge,
    lora_load_time: EngineHistogram,
    /// Of requests that name an adapter, from arrival until their adapter was in host memory
    /// (zero when it already was), observed at their first token.
    pub lora_adapter_wait: Histogram,
    num_finished: Family<ReasonLabel, Counter>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    time_per_output_token: Histogram,
    e2e_request_latency: Histogram,
    queue_time: Histogram,
}

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        // prometheus-client writes label values as given.
        let model = escape_label(model_name);
        let mut r = Registry::with_labels([(Cow::Borrowed("model_name"), Cow::Owned(model))].into_iter());
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(format!("multilora:{name}"), help, g.clone());
            g
        };
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(format!("multilora:{name}"), help, c.clone());
            c
        };
        let histogram = |r: &mut Registry, name: &str, help: &str, bounds: &[f64]| {
            let h = Histogram::new(bounds.iter().copied());
            r.register(format!("multilora:{name}"), help, h.clone());
            h
        };
        let num_finished = Family::<ReasonLabel, Counter>::default();
        for reason in FINISH_REASONS {
            let _ = num_finished.get_or_create(&[("finished_reason", reason)]);
        }
        let lora_load_time = EngineHistogram::default();
        r.register(
            "multilora:lora_load_time_seconds",
            "Time to read, validate and convert an adapter into host memory (background loads and first loads).",
            lora_load_time.clone(),
        );
        r.register(
            "multilora:request_success",
            "Finished requests by finish reason.",
            num_finished.clone(),
        );
        Metrics {
            num_requests_running: gauge(&mut r, "num_requests_running", "Requests in the running batch."),
            num_requests_waiting: gauge(
                &mut r,
                "num_requests_waiting",
                "Requests waiting to be scheduled.",
            ),
            lora_adapters_on_device: gauge(
                &mut r,
                "lora_adapters_on_device",
                "Adapters resident in device slots (max_loras).",
            ),
            lora_adapters_on_host: gauge(
                &mut r,
                "lora_adapters_on_host",
                "Adapters in the host cache (max_cpu_loras).",
            ),
            num_prompt_tokens: counter(&mut r, "prompt_tokens", "Prefilled prompt tokens."),
            num_generation_tokens: counter(&mut r, "generation_tokens", "Generated tokens."),
            num_steps: counter(&mut r, "engine_steps", "Engine steps run."),
            num_rejected_queue_full: counter(
                &mut r,
                "request_rejected_queue_full",
                "Requests refused because the waiting queue was full.",
            ),
            lora_cache_hits: counter(
                &mut r,
                "lora_cache_hits",
                "Adapter lookups served from a device slot or the host cache.",
            ),
            lora_cache_misses: counter(&mut r, "lora_cache_misses", "Adapters loaded from disk."),
            lora_cache_evictions: counter(
                &mut r,
                "lora_cache_evictions",
                "Adapters evicted from the host cache.",
            ),
            lora_slot_loads: counter(
                &mut r,
                "lora_slot_loads",
                "Adapters copied from the host cache into a device slot.",
            ),
            lora_load_failures: counter(
                &mut r,
                "lora_load_failures",
                "Background adapter loads that failed (their requests were aborted).",
            ),
            lora_loads_in_flight: gauge(
                &mut r,
                "lora_loads_in_flight",
                "Adapter loads running on the loader threads.",
            ),
            lora_load_time,
            lora_adapter_wait: histogram(
                &mut r,
                "lora_adapter_wait_time_seconds",
                "Of requests naming an adapter: time from arrival until the adapter was in host memory.",
                ADAPTER_WAIT_BUCKETS,
            ),
            time_to_first_token: histogram(
                &mut r,
                "time_to_first_token_seconds",
                "Time from arrival to the first token.",
                TTFT_BUCKETS,
            ),
            inter_token_latency: histogram(
                &mut r,
                "inter_token_latency_seconds",
                "Time between consecutive tokens of a request.",
                TPOT_BUCKETS,
            ),
            time_per_output_token: histogram(
                &mut r,
                "request_time_per_output_token_seconds",
                "Per request: (last token - first token) / (output tokens - 1).",
                TPOT_BUCKETS,
            ),
            e2e_request_latency: histogram(
                &mut r,
                "e2e_request_latency_seconds",
                "Time from arrival to the last token.",
                REQUEST_BUCKETS,
            ),
            queue_time: histogram(
                &mut r,
                "request_queue_time_seconds",
                "Time from arrival to first scheduled.",
                REQUEST_BUCKETS,
            ),
            num_finished,
            // Last: the fields above borrow it.
            registry: r,
        }
    }

    pub fn count_finish(&self, reason: &'static str) {
        self.num_finished
            .get_or_create(&[("finished_reason", reason)])
            .inc();
    }

    /// The latencies of a finished request whose last token came at `now`.
    pub fn observe_finished(&self, m: &RequestMetrics, now: Instant, num_output_tokens: usize) {
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

    /// The engine's cumulative adapter counters, copied into ours.
    pub fn set_lora_stats(&self, s: &LoraStats) {
        for (c, v) in [
            (&self.lora_cache_hits, s.cache_hits),
            (&self.lora_cache_misses, s.cache_misses),
            (&self.lora_cache_evictions, s.cache_evictions),
            (&self.lora_slot_loads, s.slot_loads),
            (&self.lora_load_failures, s.num_load_failures),
        ] {
            c.inc_by(v.saturating_sub(c.get()));
        }
        self.lora_loads_in_flight.set(s.num_loads_in_flight as i64);
        self.lora_load_time.set(&s.load_time);
    }

    /// OpenMetrics text, which Prometheus scrapes as is.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A histogram kept by the engine, encoded from its latest snapshot (the engine's bucket bounds
/// are its own; a Prometheus `Histogram` could only re-observe samples it never saw).
#[derive(Debug, Clone, Default)]
struct EngineHistogram(Arc<Mutex<LoadTimeHistogram>>);

impl EngineHistogram {
    fn set(&self, h: &LoadTimeHistogram) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = *h;
    }
}

impl EncodeMetric for EngineHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Per-bucket counts, not cumulative, as the encoder takes them; f64::MAX is `+Inf`.
        let bounds = LOAD_TIME_BUCKETS_S.iter().copied().chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds.zip(h.counts).collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum.as_secs_f64(), h.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_has_the_model_label() {
        let m = Metrics::new("demo");
        m.time_to_first_token.observe(0.05);
        m.count_finish("length");
        let mut load_time = LoadTimeHistogram::default();
        load_time.observe(std::time::Duration::from_millis(2));
        load_time.observe(std::time::Duration::from_millis(30));
        load_time.observe(std::time::Duration::from_secs(20));
        m.set_lora_stats(&LoraStats {
            cache_hits: 3,
            num_load_failures: 2,
            num_loads_in_flight: 5,
            load_time,
            ..Default::default()
        });
        m.lora_adapter_wait.observe(0.0);
        let out = m.render();
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(samples.len() > 20, "{out}");
        for l in &samples {
            assert!(l.starts_with("multilora:"), "{l}");
            assert!(l.contains("model_name=\"demo\""), "{l}");
        }
        assert!(
            out.contains("multilora:time_to_first_token_seconds_bucket{le=\"0.06\",model_name=\"demo\"} 1\n")
                || out.contains(
                    "multilora:time_to_first_token_seconds_bucket{model_name=\"demo\",le=\"0.06\"} 1\n"
                ),
            "{out}"
        );
        assert!(out.contains("finished_reason=\"length\"} 1\n"), "{out}");
        assert!(
            out.contains("multilora:lora_cache_hits_total{model_name=\"demo\"} 3\n"),
            "{out}"
        );
        for line in [
            "multilora:lora_load_failures_total{model_name=\"demo\"} 2",
            "multilora:lora_loads_in_flight{model_name=\"demo\"} 5",
            "# TYPE multilora:lora_load_time_seconds histogram",
            "multilora:lora_load_time_seconds_count{model_name=\"demo\"} 3",
            "multilora:lora_load_time_seconds_sum{model_name=\"demo\"} 20.032",
            "multilora:lora_adapter_wait_time_seconds_count{model_name=\"demo\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in\n{out}");
        }
        // Cumulative buckets: 1 load under 2.5 ms, 2 under 50 ms, all 3 counting +Inf.
        let bucket = |le: &str| {
            out.lines()
                .find(|l| {
                    l.starts_with("multilora:lora_load_time_seconds_bucket")
                        && l.contains(&format!("le=\"{le}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        assert_eq!(bucket("0.0025").as_deref(), Some("1"), "{out}");
        assert_eq!(bucket("0.05").as_deref(), Some("2"), "{out}");
        assert_eq!(bucket("10.0").as_deref(), Some("2"), "{out}");
        assert_eq!(bucket("+Inf").as_deref(), Some("3"), "{out}");
    }

    #[test]
    fn labels_are_escaped() {
        let out = Metrics::new("a\"b").render();
        assert!(out.contains("model_name=\"a\\\"b\""), "{out}");
    }
}
