//! What `bench serving` reads off the server's Prometheus `/metrics`, scraped before and after
//! the run: how many adapters the server loaded and how long each load took, and how long
//! requests waited for their adapter, as the difference of the two scrapes (so the server's
//! earlier life does not count). Percentiles come from histogram buckets, interpolated within a
//! bucket as Prometheus' `histogram_quantile` does: estimates, exact only to a bucket's width.
//! A server without these series (vLLM, or a multilora without LoRA) gives `None`, which the
//! report calls "not reported by server".

use serde::Serialize;

/// multilora's series (see the server's `metrics.rs`).
const LOAD_TIME: &str = "multilora:lora_load_time_seconds";
const LOAD_FAILURES: &str = "multilora:lora_load_failures_total";
const ADAPTER_WAIT: &str = "multilora:lora_adapter_wait_time_seconds";

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A scrape of `/metrics` (Prometheus or OpenMetrics text).
#[derive(Debug, Clone, Default)]
pub struct Scrape(Vec<Sample>);

/// A histogram over every series of one name: `(upper bound, cumulative count)` by bound.
#[derive(Debug, Clone, PartialEq)]
struct Hist {
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
}

/// A histogram's figures in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HistSummary {
    pub count: u64,
    /// Exact (the histogram's sum over its count).
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The server's adapter figures over the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdapterMetrics {
    /// Adapters read into host memory during the run (first loads and reloads of evicted
    /// ones); `None` when there were none.
    pub load_time_ms: Option<HistSummary>,
    pub num_loads: u64,
    pub num_load_failures: u64,
    /// Of requests that named an adapter and got a first token: arrival until their adapter
    /// was in host memory (0 when it already was).
    pub adapter_wait_ms: Option<HistSummary>,
}

impl Scrape {
    /// Parses the text format; lines that are not samples (comments, `# EOF`, blanks, anything
    /// malformed) are skipped, so a scrape never fails a benchmark.
    pub fn parse(text: &str) -> Self {
        Scrape(text.lines().filter_map(parse_sample).collect())
    }

    fn sum_of(&self, name: &str) -> Option<f64> {
        let mut it = self.0.iter().filter(|s| s.name == name).peekable();
        it.peek()?;
        Some(it.map(|s| s.value).sum())
    }

    fn histogram(&self, name: &str) -> Option<Hist> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for s in self.0.iter().filter(|s| s.name == bucket) {
            let Some(le) = s.labels.iter().find(|(k, _)| k == "le") else {
                continue;
            };
            let Some(le) = parse_value(&le.1) else {
                continue;
            };
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += s.value,
                None => buckets.push((le, s.value)),
            }
        }
        if buckets.is_empty() {
            return None;
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Hist {
            buckets,
            count: self.sum_of(&format!("{name}_count"))?,
            sum: self.sum_of(&format!("{name}_sum"))?,
        })
    }
}

impl Hist {
    /// What was observed between `before` and `self` (the same buckets, or `self` as is when
    /// the server restarted and its counts went down).
    fn since(&self, before: Option<&Hist>) -> Hist {
        let Some(b) = before.filter(|b| b.count <= self.count) else {
            return self.clone();
        };
        let buckets = (self.buckets.iter())
            .map(|&(le, c)| {
                let old = b.buckets.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
                (le, (c - old).max(0.0))
            })
            .collect();
        Hist {
            buckets,
            count: self.count - b.count,
            sum: self.sum - b.sum,
        }
    }

    /// The `q` quantile, linear within its bucket (from 0 for the first); the largest finite
    /// bound where it falls in `+Inf`.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let (mut lo, mut below) = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank && cum > below {
                if le.is_infinite() {
                    return Some(lo);
                }
                return Some(lo + (le - lo) * (rank - below) / (cum - below));
            }
            (lo, below) = (le, cum);
        }
        Some(lo)
    }

    fn summary_ms(&self) -> Option<HistSummary> {
        let ms = |q: f64| self.quantile(q).map(|s| s * 1e3);
        Some(HistSummary {
            count: self.count.round() as u64,
            mean: self.sum / self.count * 1e3,
            p50: ms(0.5)?,
            p90: ms(0.9)?,
            p99: ms(0.99)?,
        })
    }
}

/// The run's adapter figures from scrapes before and after it; `None` when the server does not
/// export them (no scrape after, or no adapter wait histogram in it).
pub fn adapter_metrics(before: Option<&Scrape>, after: Option<&Scrape>) -> Option<AdapterMetrics> {
    let after = after?;
    let hist = |s: Option<&Scrape>, name: &str| s.and_then(|s| s.histogram(name));
    let wait = hist(Some(after), ADAPTER_WAIT)?.since(hist(before, ADAPTER_WAIT).as_ref());
    let loads = hist(Some(after), LOAD_TIME).map(|h| h.since(hist(before, LOAD_TIME).as_ref()));
    let failures = |s: Option<&Scrape>| s.and_then(|s| s.sum_of(LOAD_FAILURES)).unwrap_or(0.0);
    Some(AdapterMetrics {
        load_time_ms: loads.as_ref().and_then(Hist::summary_ms),
        num_loads: loads.map_or(0, |h| h.count.round() as u64),
        num_load_failures: (failures(Some(after)) - failures(before)).max(0.0).round() as u64,
        adapter_wait_ms: wait.summary_ms(),
    })
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => v.parse().ok(),
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let (labels, rest) = match line[name_end..].strip_prefix('{') {
        Some(body) => parse_labels(body)?,
        None => (Vec::new(), &line[name_end..]),
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: line[..name_end].to_string(),
        labels,
        value,
    })
}

/// `key="value",...}` (after the `{`): the labels, and what follows the `}`.
fn parse_labels(body: &str) -> Option<(Vec<(String, String)>, &str)> {
    let b = body.as_bytes();
    let mut labels = Vec::new();
    let mut i = 0;
    loop {
        while b.get(i)?.is_ascii_whitespace() {
            i += 1;
        }
        if b[i] == b'}' {
            return Some((labels, &body[i + 1..]));
        }
        let eq = i + body[i..].find('=')?;
        let key = body[i..eq].trim();
        if key.is_empty() || *b.get(eq + 1)? != b'"' {
            return None;
        }
        // Delimiters are ASCII, so the bytes between them are whole UTF-8 characters.
        let mut value = Vec::new();
        i = eq + 2;
        loop {
            match *b.get(i)? {
                b'"' => break,
                b'\\' => {
                    i += 1;
                    value.push(if *b.get(i)? == b'n' { b'\n' } else { b[i] });
                }
                c => value.push(c),
            }
            i += 1;
        }
        labels.push((key.to_string(), String::from_utf8(value).ok()?));
        i += 1;
        match *b.get(i)? {
            b',' => i += 1,
            b'}' => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP multilora:lora_load_time_seconds Time to load.
# TYPE multilora:lora_load_time_seconds histogram
multilora:lora_load_time_seconds_sum{model_name="demo"} 0.004
multilora:lora_load_time_seconds_count{model_name="demo"} 2
multilora:lora_load_time_seconds_bucket{le="0.001",model_name="demo"} 0
multilora:lora_load_time_seconds_bucket{le="0.01",model_name="demo"} 2
multilora:lora_load_time_seconds_bucket{le="0.1",model_name="demo"} 2
multilora:lora_load_time_seconds_bucket{le="+Inf",model_name="demo"} 2
multilora:lora_load_failures_total{model_name="demo"} 1
multilora:lora_adapter_wait_time_seconds_sum{model_name="demo"} 0.0
multilora:lora_adapter_wait_time_seconds_count{model_name="demo"} 0
multilora:lora_adapter_wait_time_seconds_bucket{le="0.01",model_name="demo"} 0
multilora:lora_adapter_wait_time_seconds_bucket{le="1.0",model_name="demo"} 0
multilora:lora_adapter_wait_time_seconds_bucket{le="+Inf",model_name="demo"} 0
# EOF
"#;

    /// Ten more loads (8 of 10-100 ms, 2 above 100 ms) and 100 waits, 90 within 10 ms.
    const AFTER: &str = r#"multilora:lora_load_time_seconds_sum{model_name="demo"} 1.004
multilora:lora_load_time_seconds_count{model_name="demo"} 12
multilora:lora_load_time_seconds_bucket{le="0.001",model_name="demo"} 0
multilora:lora_load_time_seconds_bucket{le="0.01",model_name="demo"} 2
multilora:lora_load_time_seconds_bucket{le="0.1",model_name="demo"} 10
multilora:lora_load_time_seconds_bucket{le="+Inf",model_name="demo"} 12
multilora:lora_load_failures_total{model_name="demo"} 3
multilora:lora_adapter_wait_time_seconds_sum{model_name="demo"} 5.0
multilora:lora_adapter_wait_time_seconds_count{model_name="demo"} 100
multilora:lora_adapter_wait_time_seconds_bucket{le="0.01",model_name="demo"} 90
multilora:lora_adapter_wait_time_seconds_bucket{model_name="demo",le="1.0"} 100
multilora:lora_adapter_wait_time_seconds_bucket{le="+Inf",model_name="demo"} 100
"#;

    #[test]
    fn figures_are_the_difference_of_the_scrapes() {
        let (b, a) = (Scrape::parse(BEFORE), Scrape::parse(AFTER));
        let m = adapter_metrics(Some(&b), Some(&a)).unwrap();
        assert_eq!((m.num_loads, m.num_load_failures), (10, 2));
        let load = m.load_time_ms.unwrap();
        assert_eq!(load.count, 10);
        assert!((load.mean - 100.0).abs() < 1e-9, "{load:?}");
        // rank 5 of the 8 in (10, 100] ms: 10 + 90 * 5/8
        assert!((load.p50 - 66.25).abs() < 1e-9, "{load:?}");
        // p99 falls in +Inf: the largest finite bound
        assert!((load.p99 - 100.0).abs() < 1e-9, "{load:?}");
        let wait = m.adapter_wait_ms.unwrap();
        assert_eq!(wait.count, 100);
        assert!((wait.p50 - 10.0 * 50.0 / 90.0).abs() < 1e-9, "{wait:?}");
        // rank 99: 9 of the 10 in (10, 1000] ms
        assert!((wait.p99 - (10.0 + 990.0 * 0.9)).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn no_loads_during_the_run_is_not_a_percentile() {
        let b = Scrape::parse(BEFORE);
        let m = adapter_metrics(Some(&b), Some(&b)).unwrap();
        assert_eq!((m.num_loads, m.num_load_failures), (0, 0));
        assert_eq!((m.load_time_ms, m.adapter_wait_ms), (None, None));
        // Without a first scrape, everything the server counted so far.
        let m = adapter_metrics(None, Some(&b)).unwrap();
        assert_eq!(m.num_loads, 2);
    }

    #[test]
    fn servers_without_the_series_report_none() {
        let vllm = Scrape::parse(
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 0.0\n",
        );
        assert!(adapter_metrics(Some(&vllm), Some(&vllm)).is_none());
        assert!(adapter_metrics(None, None).is_none());
    }

    #[test]
    fn labels_with_escapes_and_odd_lines_parse() {
        let s = parse_sample(r#"x_bucket{model_name="a\"b,}c",le="+Inf"} 7 1700000000"#).unwrap();
        assert_eq!(s.name, "x_bucket");
        assert_eq!(s.labels[0], ("model_name".into(), "a\"b,}c".into()));
        assert_eq!(s.labels[1], ("le".into(), "+Inf".into()));
        assert_eq!(s.value, 7.0);
        assert_eq!(parse_sample("up 1").unwrap().value, 1.0);
        assert_eq!(parse_sample("y{} 2").unwrap().value, 2.0);
        assert_eq!(parse_sample("z{a=\"1\",} 3").unwrap().labels.len(), 1);
        for bad in ["", "# EOF", "x{a=1} 2", "x{a=\"1\" 2", "x not_a_number"] {
            assert!(parse_sample(bad).is_none(), "{bad:?}");
        }
    }
}
