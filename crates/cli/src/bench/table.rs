//! The table printed at the end of a run: one row per series × batch size, the numbers a
//! reader looks for first, and the notes of any point that did not run as the original assumes.

use std::fmt::Write as _;

use super::summary::{ClientLatencies, RequestLatencyRow, Stats, SummaryRow};

fn cell(s: &Stats) -> String {
    match s.stdev {
        Some(sd) => format!("{:.2} ±{:.2}", s.mean, sd),
        None => format!("{:.2}", s.mean),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:+.1}%"))
}

pub fn render(rows: &[SummaryRow]) -> String {
    let header = [
        "mode",
        "workload",
        "batch",
        "adapters",
        "prefill ms",
        "decode ms",
        "e2e ms",
        "decode tok/s",
        "decode vs no-LoRA",
    ];
    let body: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.mode.to_string(),
                r.workload.to_string(),
                r.batch_size.to_string(),
                r.num_adapters.to_string(),
                cell(&r.prefill_latency_ms),
                cell(&r.decode_latency_ms),
                cell(&r.e2e_latency_ms),
                format!("{:.1}", r.decode_tokens_per_s),
                pct(r.decode_overhead_pct),
            ]
        })
        .collect();
    // A blank line between workloads.
    let mut out = grid(&header, &body, |i| {
        i > 0 && rows[i].workload != rows[i - 1].workload
    });
    // Spread this large says more about the machine than about the engine.
    let noisy = rows
        .iter()
        .filter(|r| {
            r.decode_latency_ms
                .stdev
                .is_some_and(|sd| sd > 0.1 * r.decode_latency_ms.mean)
        })
        .count();
    if noisy > 0 {
        let _ = writeln!(
            out,
            "\n{noisy} of {} points vary by more than 10% (decode stdev / mean) between repeats: the machine was busy, or the runs are short; compare medians in summary.csv, or raise --repeat and --num-tokens.",
            rows.len()
        );
    }
    let noted: Vec<&SummaryRow> = rows.iter().filter(|r| !r.notes.is_empty()).collect();
    if !noted.is_empty() {
        out.push_str("\nnotes:\n");
        for r in noted {
            let _ = writeln!(
                out,
                "  {} batch {}: {}",
                r.workload,
                r.batch_size,
                r.notes.join("; ")
            );
        }
    }
    out
}

/// Client mode's second table: p50 and p99 of each per-request latency, ms.
pub fn render_request_latencies(rows: &[RequestLatencyRow]) -> String {
    let mut header = vec!["mode".to_string(), "workload".into(), "batch".into()];
    for m in ClientLatencies::LABELS {
        header.push(format!("{m} p50/p99 ms"));
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.mode.to_string(),
                r.workload.to_string(),
                r.batch_size.to_string(),
            ];
            cells.extend(
                r.latencies
                    .all()
                    .map(|p| p.map_or("-".into(), |p| format!("{:.2} / {:.2}", p.p50, p.p99))),
            );
            cells
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    grid(&header, &body, |i| {
        i > 0 && rows[i].workload != rows[i - 1].workload
    })
}

/// Aligned columns under a header and a rule: the first two (text) left-aligned, numbers
/// right-aligned; a blank line before each row where `gap_before(row index)`.
fn grid<C: AsRef<[String]>>(header: &[&str], body: &[C], gap_before: impl Fn(usize) -> bool) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in body {
        for (w, c) in widths.iter_mut().zip(row.as_ref()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i < 2 {
                let _ = write!(out, "{c:<w$}  ");
            } else {
                let _ = write!(out, "{c:>w$}  ");
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(
        &mut out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    line(&mut out, &rule);
    for (i, cells) in body.iter().enumerate() {
        if gap_before(i) {
            out.push('\n');
        }
        line(&mut out, cells.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::summary::{summarize, tests::point, Percentiles};
    use crate::bench::workload::{Series, Workload};

    #[test]
    fn renders_aligned_rows_with_overhead() {
        let rows = summarize(&[
            point(Series::NoLora, 1, &[4.0]),
            point(Series::Lora(Workload::Identical), 1, &[5.0, 7.0]),
        ]);
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("mode") && lines[0].ends_with("decode vs no-LoRA"));
        assert!(lines[2].starts_with("no-lora     none"), "{t}");
        assert!(
            lines[4].contains("6.00 ±1.41") && lines[4].ends_with("+50.0%"),
            "{t}"
        );
        assert!(t.contains("1 of 2 points vary by more than 10%"), "{t}");
    }

    #[test]
    fn renders_request_latency_percentiles() {
        let p = |v: f64| Percentiles::of(&[v, 2.0 * v]);
        let row = |workload, batch_size, itl_ms| RequestLatencyRow {
            mode: "multi-lora",
            workload,
            batch_size,
            repeats: 1,
            num_requests: batch_size,
            latencies: ClientLatencies {
                ttft_ms: p(10.0),
                tpot_ms: p(1.0),
                itl_ms,
                e2e_ms: p(100.0),
            },
        };
        let t = render_request_latencies(&[row("distinct", 1, p(1.0)), row("uniform", 16, None)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("mode") && lines[0].ends_with("E2E p50/p99 ms"),
            "{t}"
        );
        assert!(
            lines[2].contains("15.00 / 19.90") && lines[2].ends_with("150.00 / 199.00"),
            "{t}"
        );
        assert_eq!(lines[3], "", "a blank line between workloads: {t}");
        assert!(lines[4].contains(" 16 ") && lines[4].contains(" - "), "{t}");
    }
}
