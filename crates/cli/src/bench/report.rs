//! The report folder: the original's CSV files, one subfolder per series (`no-lora/`,
//! `distinct/`, `uniform/`, `identical/`) so each file keeps the original's name and columns,
//! and beside them our own files (`summary.csv`, `runs.csv`, `requests.csv`, `steps.csv`,
//! `run.json`, `latency.svg`, `points.jsonl`).
//!
//! A bench report ([`ReportDir`]) is rewritten after every measured point, each file replaced
//! whole (written aside, then renamed), so at any moment, even after a crash or a kill, it is a
//! valid report of the points measured so far; `points.jsonl` keeps every measurement for
//! `--resume`. A run gets a new timestamped folder under `report_dir`; `--overwrite` writes into
//! `report_dir` itself, as the original does. `bench serving` writes its short report aside
//! ([`Staging`]) and moves it into place at the end.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::records::{BatchLatency, RequestRecord};
use super::summary::{ClientLatencies, Measured, Percentiles, Point, RequestLatencyRow, Stats, SummaryRow};

/// Files of a bench report that are not in a series folder.
const TOP_FILES: [&str; 9] = [
    "summary.csv",
    "runs.csv",
    "requests.csv",
    "steps.csv",
    REQUEST_LATENCIES_FILE,
    "latency.svg",
    "run.json",
    POINTS_FILE,
    INCOMPLETE_FILE,
];

/// One JSON line per measured point: what `--resume` reads back.
pub const POINTS_FILE: &str = "points.jsonl";
/// Present while the report lacks points: what is missing and how to finish it.
pub const INCOMPLETE_FILE: &str = "INCOMPLETE.txt";

/// A bench report folder, written as the run goes.
pub struct ReportDir {
    pub dir: PathBuf,
}

impl ReportDir {
    /// A new folder `report_dir/name` (`name-2`, ... if taken), or with `overwrite`
    /// `report_dir` itself, cleared of the files and series folders a report holds.
    pub fn create(
        report_dir: &Path,
        name: &str,
        overwrite: bool,
        series: &[&str],
    ) -> anyhow::Result<ReportDir> {
        std::fs::create_dir_all(report_dir)
            .with_context(|| format!("creating report_dir {}", report_dir.display()))?;
        if overwrite {
            for entry in series.iter().chain(&TOP_FILES) {
                let path = report_dir.join(entry);
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match removed {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("--overwrite: removing {}", path.display()))
                    }
                    _ => {}
                }
            }
            return Ok(ReportDir {
                dir: report_dir.to_path_buf(),
            });
        }
        let mut dir = report_dir.join(name);
        let mut n = 2;
        // create_dir, not exists(): two runs started in the same second get different folders.
        loop {
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(ReportDir { dir }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    dir = report_dir.join(format!("{name}-{n}"));
                    n += 1;
                }
                Err(e) => return Err(e).with_context(|| format!("creating {} in report_dir", dir.display())),
            }
        }
    }

    /// Replaces `rel` whole: written aside, then renamed, so a reader (or a kill) never sees a
    /// half-written file.
    pub fn write(&self, rel: &str, text: &str) -> anyhow::Result<()> {
        let path = self.dir.join(rel);
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let name = path.file_name().map_or(rel.into(), |n| n.to_string_lossy());
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn remove(&self, rel: &str) -> anyhow::Result<()> {
        let path = self.dir.join(rel);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// A report being written aside.
pub struct Staging {
    pub tmp: PathBuf,
    /// Where the report ends up.
    pub dest: PathBuf,
    overwrite: bool,
}

impl Staging {
    /// Creates the staging folder now, so an unwritable `report_dir` fails before any
    /// measurement.
    pub fn create(report_dir: &Path, name: &str, overwrite: bool) -> anyhow::Result<Staging> {
        std::fs::create_dir_all(report_dir)
            .with_context(|| format!("creating report_dir {}", report_dir.display()))?;
        let dest = if overwrite {
            report_dir.to_path_buf()
        } else {
            let mut dest = report_dir.join(name);
            let mut n = 2;
            while dest.exists() {
                dest = report_dir.join(format!("{name}-{n}"));
                n += 1;
            }
            dest
        };
        let tmp = report_dir.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp)
            .with_context(|| format!("creating a folder in report_dir {}", report_dir.display()))?;
        Ok(Staging { tmp, dest, overwrite })
    }

    pub fn write(&self, rel: &str, text: &str) -> anyhow::Result<()> {
        let path = self.tmp.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Moves the report into place.
    pub fn finish(self) -> anyhow::Result<PathBuf> {
        if !self.overwrite {
            std::fs::rename(&self.tmp, &self.dest)
                .with_context(|| format!("moving the report to {}", self.dest.display()))?;
            return Ok(self.dest.clone());
        }
        let entries =
            std::fs::read_dir(&self.tmp).with_context(|| format!("reading {}", self.tmp.display()))?;
        for entry in entries {
            let entry = entry?;
            let to = self.dest.join(entry.file_name());
            if to.is_dir() {
                std::fs::remove_dir_all(&to).with_context(|| format!("replacing {}", to.display()))?;
            }
            std::fs::rename(entry.path(), &to).with_context(|| format!("writing {}", to.display()))?;
        }
        std::fs::remove_dir(&self.tmp).ok();
        Ok(self.dest.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // After `finish` the folder is gone; on an error path this removes the partial report.
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Rows of CSV text; fields with commas, quotes or newlines are quoted.
pub(super) struct Csv(pub(super) String);

impl Csv {
    pub(super) fn new(header: &[&str]) -> Csv {
        let mut c = Csv(String::new());
        c.row(header.iter().map(|s| s.to_string()));
        c
    }

    pub(super) fn row(&mut self, fields: impl IntoIterator<Item = String>) {
        for (i, f) in fields.into_iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            if f.contains([',', '"', '\n']) {
                let _ = write!(self.0, "\"{}\"", f.replace('"', "\"\""));
            } else {
                self.0.push_str(&f);
            }
        }
        self.0.push('\n');
    }
}

fn ms(v: f64) -> String {
    format!("{v:.4}")
}

fn secs(v: f64) -> String {
    format!("{v:.6}")
}

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v:.2}"))
}

pub const PER_BATCH_HEADER: [&str; 4] = [
    "batch_size",
    "prefill_latency_ms",
    "decode_latency_ms",
    "e2e_latency_ms",
];
pub const PER_REQUEST_HEADER: [&str; 8] = [
    "#tokens",
    "first_token_time",
    "completion_time",
    "prompt_num_tokens",
    "output_num_tokens",
    "finish_reason",
    "tokens_per_second",
    "latency",
];
pub const STEP_HEADER: [&str; 1] = ["step_latency_ms"];

/// The repeat the original's files show: the one of median decode latency (the lower middle
/// of an even count), so its three files describe one real run.
pub fn representative(p: &Point) -> (usize, &Measured) {
    let mut order: Vec<usize> = (0..p.repeats.len()).collect();
    order.sort_by(|&a, &b| {
        let decode = |k: usize| p.repeats[k].latency.decode_ms;
        decode(a).total_cmp(&decode(b))
    });
    let k = order[(order.len() - 1) / 2];
    (k, &p.repeats[k])
}

fn per_batch_fields(batch_size: usize, l: &BatchLatency) -> Vec<String> {
    vec![
        batch_size.to_string(),
        ms(l.prefill_ms),
        ms(l.decode_ms),
        ms(l.e2e_ms),
    ]
}

fn per_request_fields(r: &RequestRecord) -> Vec<String> {
    vec![
        r.output_num_tokens.to_string(),
        secs(r.first_token_time_s),
        secs(r.completion_time_s),
        r.prompt_num_tokens.to_string(),
        r.output_num_tokens.to_string(),
        r.finish_reason.clone(),
        format!("{:.3}", r.tokens_per_second()),
        secs(r.latency_s()),
    ]
}

/// The original's three files for one series, keyed by file name, exactly as the original
/// writes them: one row per batch size, one run per batch size (with repeats, the
/// [`representative`] one; every repeat is in `runs.csv`, `requests.csv` and `steps.csv`).
/// Without `with_steps` (a client of a server, which sees no engine steps) there is no
/// `step_latency-<B>.csv`.
pub fn series_files(points: &[&Point], with_steps: bool) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut per_batch = Csv::new(&PER_BATCH_HEADER);
    for p in points {
        let (_, m) = representative(p);
        per_batch.row(per_batch_fields(p.batch_size, &m.latency));
        let mut per_request = Csv::new(&PER_REQUEST_HEADER);
        for r in &m.run.requests {
            per_request.row(per_request_fields(r));
        }
        files.push((format!("per_request_latency-{}.csv", p.batch_size), per_request.0));
        if with_steps {
            let mut steps = Csv::new(&STEP_HEADER);
            for s in &m.run.steps {
                steps.row([ms(s.latency_ms)]);
            }
            files.push((format!("step_latency-{}.csv", p.batch_size), steps.0));
        }
    }
    files.insert(0, ("per_batch_latency.csv".into(), per_batch.0));
    files
}

/// The columns that say which run a row of `runs.csv` or `requests.csv` belongs to.
const RUN_KEY: [&str; 4] = ["mode", "workload", "batch_size", "repeat"];

fn run_key(p: &Point, k: usize) -> Vec<String> {
    vec![
        p.series.mode().to_string(),
        p.series.workload_name().to_string(),
        p.batch_size.to_string(),
        (k + 1).to_string(),
    ]
}

/// `runs.csv`: every measured run (all repeats) with the original's per-batch numbers, and
/// which run the original's files show; `requests.csv`: every request of every run with the
/// original's per-request columns.
pub fn runs_and_requests_csv(points: &[Point]) -> (String, String) {
    let mut header: Vec<&str> = RUN_KEY.to_vec();
    header.extend(&PER_BATCH_HEADER[1..]);
    header.push("in_original_files");
    let mut runs = Csv::new(&header);
    let mut header: Vec<&str> = RUN_KEY.to_vec();
    header.push("request");
    header.extend(PER_REQUEST_HEADER);
    let mut requests = Csv::new(&header);
    for p in points {
        let (shown, _) = representative(p);
        for (k, m) in p.repeats.iter().enumerate() {
            let mut f = run_key(p, k);
            f.extend(per_batch_fields(p.batch_size, &m.latency).into_iter().skip(1));
            f.push((k == shown).to_string());
            runs.row(f);
            for r in &m.run.requests {
                let mut f = run_key(p, k);
                f.push(r.request_id.clone());
                f.extend(per_request_fields(r));
                requests.row(f);
            }
        }
    }
    (runs.0, requests.0)
}

pub const SUMMARY_HEADER: [&str; 28] = [
    "mode",
    "workload",
    "batch_size",
    "repeats",
    "num_adapters",
    "prompt_tokens_mean",
    "prefill_latency_ms_mean",
    "prefill_latency_ms_median",
    "prefill_latency_ms_stdev",
    "prefill_latency_ms_min",
    "prefill_latency_ms_max",
    "decode_latency_ms_mean",
    "decode_latency_ms_median",
    "decode_latency_ms_stdev",
    "decode_latency_ms_min",
    "decode_latency_ms_max",
    "e2e_latency_ms_mean",
    "e2e_latency_ms_median",
    "e2e_latency_ms_stdev",
    "e2e_latency_ms_min",
    "e2e_latency_ms_max",
    "decode_tokens_per_s",
    "prefill_overhead_pct",
    "decode_overhead_pct",
    "e2e_overhead_pct",
    "prefill_steps",
    "decode_steps",
    "notes",
];

fn stats_fields(s: &Stats) -> [String; 5] {
    [
        ms(s.mean),
        ms(s.median),
        s.stdev.map_or(String::new(), ms),
        ms(s.min),
        ms(s.max),
    ]
}

/// `summary.csv`: one row per series × batch size. `steps` holds (prefill, decode) step counts
/// of each row's first repeat.
pub fn summary_csv(rows: &[SummaryRow], points: &[Point]) -> String {
    let mut c = Csv::new(&SUMMARY_HEADER);
    for (r, p) in rows.iter().zip(points) {
        let l = &p.repeats[0].latency;
        let mut f = vec![
            r.mode.to_string(),
            r.workload.to_string(),
            r.batch_size.to_string(),
            r.repeats.to_string(),
            r.num_adapters.to_string(),
            format!("{:.1}", r.prompt_tokens_mean),
        ];
        f.extend(stats_fields(&r.prefill_latency_ms));
        f.extend(stats_fields(&r.decode_latency_ms));
        f.extend(stats_fields(&r.e2e_latency_ms));
        f.extend([
            format!("{:.1}", r.decode_tokens_per_s),
            opt(r.prefill_overhead_pct),
            opt(r.decode_overhead_pct),
            opt(r.e2e_overhead_pct),
            l.num_prefill_steps.to_string(),
            l.num_decode_steps.to_string(),
            r.notes.join("; "),
        ]);
        c.row(f);
    }
    c.0
}

/// The file of per-request latency percentiles that client mode writes.
pub const REQUEST_LATENCIES_FILE: &str = "client_latency_percentiles.csv";

/// `client_latency_percentiles.csv`: one row per series × batch size; for each of TTFT, TPOT,
/// ITL and e2e its mean, p50, p90, p95, p99 and max in ms (empty where there were no samples).
pub fn request_latencies_csv(rows: &[RequestLatencyRow]) -> String {
    let mut header: Vec<String> = ["mode", "workload", "batch_size", "repeats", "num_requests"]
        .map(String::from)
        .to_vec();
    for metric in ClientLatencies::NAMES {
        header.extend(Percentiles::NAMES.map(|n| format!("{metric}_{n}")));
    }
    let mut c = Csv::new(&header.iter().map(String::as_str).collect::<Vec<_>>());
    for r in rows {
        let mut f = vec![
            r.mode.to_string(),
            r.workload.to_string(),
            r.batch_size.to_string(),
            r.repeats.to_string(),
            r.num_requests.to_string(),
        ];
        for p in r.latencies.all() {
            match p {
                Some(p) => f.extend(p.values().map(ms)),
                None => f.extend(Percentiles::NAMES.map(|_| String::new())),
            }
        }
        c.row(f);
    }
    c.0
}

pub const STEPS_HEADER: [&str; 13] = [
    "mode",
    "workload",
    "batch_size",
    "repeat",
    "step",
    "phase",
    "step_latency_ms",
    "step_wall_ms",
    "num_seqs",
    "num_prefill_tokens",
    "num_decode_tokens",
    "num_loras",
    "num_preempted",
];

/// `steps.csv`: every measured step of the run, with what it held; `phase` is how the
/// original's arithmetic counted it.
pub fn steps_csv(points: &[Point]) -> String {
    let mut c = Csv::new(&STEPS_HEADER);
    for p in points {
        for (k, m) in p.repeats.iter().enumerate() {
            let num_prefill = m.latency.num_prefill_steps;
            for (i, s) in m.run.steps.iter().enumerate() {
                c.row([
                    p.series.mode().to_string(),
                    p.series.workload_name().to_string(),
                    p.batch_size.to_string(),
                    (k + 1).to_string(),
                    (i + 1).to_string(),
                    if i < num_prefill { "prefill" } else { "decode" }.to_string(),
                    ms(s.latency_ms),
                    ms(s.wall_ms),
                    s.num_seqs.to_string(),
                    s.num_prefill_tokens.to_string(),
                    s.num_decode_tokens.to_string(),
                    s.num_loras.to_string(),
                    s.num_preempted.to_string(),
                ]);
            }
        }
    }
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::records::{BatchLatency, BatchRun, RequestRecord, StepRecord};
    use crate::bench::summary::{request_latencies, summarize, Measured};
    use crate::bench::workload::{Series, Workload};

    fn point(series: Series, batch_size: usize, num_tokens: usize, repeats: usize) -> Point {
        let run = BatchRun {
            steps: (0..num_tokens)
                .map(|i| StepRecord {
                    latency_ms: if i == 0 { 10.0 } else { 1.0 },
                    num_seqs: batch_size,
                    ..Default::default()
                })
                .collect(),
            requests: (0..batch_size)
                .map(|i| RequestRecord {
                    request_id: i.to_string(),
                    lora: None,
                    prompt_num_tokens: 7,
                    output_num_tokens: num_tokens,
                    finish_reason: "length".into(),
                    first_token_time_s: 0.01,
                    completion_time_s: 0.02,
                    inter_token_latencies_s: vec![0.02 / (num_tokens - 1) as f64; num_tokens - 1],
                })
                .collect(),
            e2e_ms: 20.0,
        };
        let steps: Vec<f64> = run.steps.iter().map(|s| s.latency_ms).collect();
        let latency = BatchLatency::from_steps(&steps, num_tokens, run.e2e_ms).expect("valid");
        Point {
            series,
            batch_size,
            adapter_indices: vec![],
            repeats: vec![
                Measured {
                    run,
                    latency,
                    notes: vec!["a, \"b\"".into()]
                };
                repeats
            ],
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn original_files_have_the_originals_headers_and_rows() {
        let a = point(Series::NoLora, 2, 4, 1);
        let b = point(Series::NoLora, 3, 4, 1);
        let files = series_files(&[&a, &b], true);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "per_batch_latency.csv",
                "per_request_latency-2.csv",
                "step_latency-2.csv",
                "per_request_latency-3.csv",
                "step_latency-3.csv"
            ]
        );
        let per_batch = lines(&files[0].1);
        assert_eq!(
            per_batch[0],
            "batch_size,prefill_latency_ms,decode_latency_ms,e2e_latency_ms"
        );
        assert_eq!(per_batch[1], "2,10.0000,1.0000,20.0000");
        assert_eq!(per_batch.len(), 3);
        let per_request = lines(&files[3].1);
        assert_eq!(
            per_request[0],
            "#tokens,first_token_time,completion_time,prompt_num_tokens,output_num_tokens,finish_reason,tokens_per_second,latency"
        );
        assert_eq!(per_request[1], "4,0.010000,0.020000,7,4,length,200.000,0.005000");
        assert_eq!(per_request.len(), 1 + 3);
        assert_eq!(
            lines(&files[4].1),
            ["step_latency_ms", "10.0000", "1.0000", "1.0000", "1.0000"]
        );
    }

    #[test]
    fn repeats_keep_the_originals_files_and_go_to_our_own() {
        let mut a = point(Series::Lora(Workload::Uniform), 2, 3, 3);
        for (k, decode) in [5.0, 1.0, 3.0].into_iter().enumerate() {
            a.repeats[k].latency.decode_ms = decode;
        }
        // The original's files: its header, one row per batch size, the median run.
        assert_eq!(representative(&a).0, 2);
        let files = series_files(&[&a], true);
        let per_batch = lines(&files[0].1);
        assert_eq!(per_batch[0], PER_BATCH_HEADER.join(","));
        assert_eq!(per_batch.len(), 2);
        assert_eq!(per_batch[1], "2,10.0000,3.0000,20.0000");
        assert_eq!(lines(&files[1].1).len(), 1 + 2);
        assert_eq!(lines(&files[2].1).len(), 1 + 3);
        // Ours: every repeat.
        let (runs, requests) = runs_and_requests_csv(&[a]);
        let runs = lines(&runs);
        assert_eq!(
            runs[0],
            "mode,workload,batch_size,repeat,prefill_latency_ms,decode_latency_ms,e2e_latency_ms,in_original_files"
        );
        assert_eq!(runs.len(), 1 + 3);
        assert_eq!(runs[3], "multi-lora,uniform,2,3,10.0000,3.0000,20.0000,true");
        let requests = lines(&requests);
        assert!(requests[0].starts_with("mode,workload,batch_size,repeat,request,#tokens,"));
        assert_eq!(requests.len(), 1 + 3 * 2);
    }

    #[test]
    fn client_mode_writes_no_step_files_and_a_percentiles_file() {
        let a = point(Series::NoLora, 2, 3, 1);
        let b = point(Series::Lora(Workload::Distinct), 4, 3, 2);
        let files = series_files(&[&a, &b], false);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "per_batch_latency.csv",
                "per_request_latency-2.csv",
                "per_request_latency-4.csv"
            ]
        );
        let text = request_latencies_csv(&request_latencies(&[a, b]));
        let l = lines(&text);
        assert_eq!(l.len(), 3);
        let header: Vec<&str> = l[0].split(',').collect();
        assert_eq!(header.len(), 5 + 4 * 6);
        assert_eq!(
            header[..6],
            [
                "mode",
                "workload",
                "batch_size",
                "repeats",
                "num_requests",
                "ttft_ms_mean"
            ]
        );
        assert!(
            header.contains(&"itl_ms_p99") && header[28] == "e2e_ms_max",
            "{header:?}"
        );
        // 4 requests x 2 repeats; TTFT 10 ms, e2e 30 ms, 2 gaps of 10 ms each.
        let row: Vec<&str> = l[2].split(',').collect();
        assert_eq!(row[..5], ["multi-lora", "distinct", "4", "2", "8"]);
        let col = |name: &str| row[header.iter().position(|h| *h == name).expect("column")];
        assert_eq!(col("ttft_ms_p50"), "10.0000");
        assert_eq!(col("tpot_ms_p99"), "10.0000");
        assert_eq!(col("itl_ms_mean"), "10.0000");
        assert_eq!(col("e2e_ms_max"), "30.0000");
    }

    #[test]
    fn summary_and_steps_csv() {
        let points = vec![
            point(Series::NoLora, 2, 3, 1),
            point(Series::Lora(Workload::Distinct), 2, 3, 2),
        ];
        let rows = summarize(&points);
        let s = summary_csv(&rows, &points);
        let l = lines(&s);
        assert_eq!(l[0], SUMMARY_HEADER.join(","));
        assert_eq!(l.len(), 3);
        assert!(l[2].starts_with("multi-lora,distinct,2,2,"), "{}", l[2]);
        // Notes with a comma and quotes are quoted.
        assert!(l[2].ends_with(",\"a, \"\"b\"\"\""), "{}", l[2]);
        for row in &l[1..] {
            // The quoted note holds one comma.
            assert_eq!(row.matches(',').count(), SUMMARY_HEADER.len(), "{row}");
        }
        let steps = steps_csv(&points);
        let l = lines(&steps);
        assert_eq!(l[0], STEPS_HEADER.join(","));
        assert_eq!(l.len(), 1 + 3 + 2 * 3);
        assert!(
            l[1].starts_with("no-lora,none,2,1,1,prefill,10.0000,"),
            "{}",
            l[1]
        );
        assert!(l[2].contains(",decode,"));
    }

    #[test]
    fn staging_renames_into_a_new_folder_and_cleans_up_on_drop() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = Staging::create(dir.path(), "run", false)?;
        s.write("a/x.csv", "1\n")?;
        let dest = s.finish()?;
        assert_eq!(std::fs::read_to_string(dest.join("a/x.csv"))?, "1\n");
        // The same name again goes next to it, never over it.
        let s = Staging::create(dir.path(), "run", false)?;
        assert_eq!(s.dest, dir.path().join("run-2"));
        s.write("y.csv", "2\n")?;
        drop(s);
        let left: Vec<_> = std::fs::read_dir(dir.path())?.collect();
        assert_eq!(left.len(), 1, "a dropped staging folder leaves nothing behind");
        // --overwrite replaces same-named entries in report_dir itself.
        let s = Staging::create(dir.path(), "run", true)?;
        s.write("run/new.csv", "3\n")?;
        s.finish()?;
        assert!(dir.path().join("run/new.csv").exists());
        assert!(!dir.path().join("run/a").exists());
        Ok(())
    }
}
