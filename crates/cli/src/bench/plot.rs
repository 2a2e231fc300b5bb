//! `latency.svg`: prefill, decode and end-to-end latency against batch size, one line per
//! series (no-LoRA dashed), mean with min–max whiskers when points were repeated. Plain SVG
//! written by hand: any browser opens it, and it costs no dependency.

use std::fmt::Write as _;

use super::summary::{Stats, SummaryRow};

const PANEL_W: f64 = 380.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 62.0;
const MARGIN_R: f64 = 16.0;
const MARGIN_T: f64 = 64.0;
const MARGIN_B: f64 = 86.0;

#[derive(Clone, Copy)]
enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
}

/// Colour, dash and marker of a series (by workload name; `none` is no-LoRA). Dashes and
/// markers differ too, so series that coincide (as LoRA workloads often do) stay apart.
fn style(workload: &str) -> (&'static str, &'static str, Marker) {
    match workload {
        "none" => ("#444444", "6,4", Marker::Circle),
        "distinct" => ("#1f77b4", "", Marker::Square),
        "uniform" => ("#ff7f0e", "9,3", Marker::Triangle),
        "identical" => ("#2ca02c", "2,3", Marker::Diamond),
        _ => ("#9467bd", "", Marker::Circle),
    }
}

/// A point marker centred on (x, y), with a tooltip.
fn marker(m: Marker, x: f64, y: f64, color: &str, tooltip: &str) -> String {
    let r = 3.5;
    let shape = match m {
        Marker::Circle => format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}""#),
        Marker::Square => format!(
            r#"<rect x="{:.1}" y="{:.1}" width="{}" height="{}""#,
            x - r,
            y - r,
            2.0 * r,
            2.0 * r
        ),
        Marker::Triangle => format!(
            r#"<polygon points="{x:.1},{:.1} {:.1},{:.1} {:.1},{:.1}""#,
            y - r - 1.0,
            x - r - 0.5,
            y + r,
            x + r + 0.5,
            y + r
        ),
        Marker::Diamond => format!(
            r#"<polygon points="{x:.1},{:.1} {:.1},{y:.1} {x:.1},{:.1} {:.1},{y:.1}""#,
            y - r - 0.5,
            x + r + 0.5,
            y + r + 0.5,
            x - r - 0.5
        ),
    };
    format!(
        r#"{shape} fill="{color}"><title>{}</title></{}>"#,
        escape(tooltip),
        tag(m)
    )
}

fn tag(m: Marker) -> &'static str {
    match m {
        Marker::Circle => "circle",
        Marker::Square => "rect",
        Marker::Triangle | Marker::Diamond => "polygon",
    }
}

fn label(workload: &str) -> String {
    if workload == "none" {
        "no LoRA".into()
    } else {
        format!("LoRA {workload}")
    }
}

/// A panel's y axis: logarithmic, from the tick (1, 2 or 5 × 10^k) at or below the smallest
/// value to the one at or above the largest, with every such tick between. On a linear axis
/// from 0 the small batches' latencies sit on the floor under batch 32's.
fn log_axis(min: f64, max: f64) -> (f64, f64, Vec<f64>) {
    if !(min > 0.0 && max >= min && max.is_finite()) {
        return (1.0, 10.0, vec![1.0, 2.0, 5.0, 10.0]);
    }
    let (k0, k1) = (min.log10().floor() as i32, max.log10().ceil() as i32);
    let all: Vec<f64> = (k0..=k1)
        .flat_map(|k| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(k)))
        .collect();
    let lo = all.iter().copied().filter(|&t| t <= min).fold(all[0], f64::max);
    let hi = all
        .iter()
        .copied()
        .find(|&t| t >= max && t > lo)
        .unwrap_or(10f64.powi(k1 + 1));
    let ticks = all.into_iter().filter(|&t| t >= lo && t <= hi).collect();
    (lo, hi, ticks)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A panel's title and the statistic it shows.
type Panel = (&'static str, fn(&SummaryRow) -> &Stats);

pub fn svg(rows: &[SummaryRow], title: &str) -> String {
    let panels: [Panel; 3] = [
        ("prefill latency (ms, log scale)", |r| &r.prefill_latency_ms),
        ("decode latency per step (ms, log scale)", |r| {
            &r.decode_latency_ms
        }),
        ("end-to-end latency (ms, log scale)", |r| &r.e2e_latency_ms),
    ];
    let mut series: Vec<&str> = Vec::new();
    let mut batches: Vec<usize> = Vec::new();
    for r in rows {
        if !series.contains(&r.workload) {
            series.push(r.workload);
        }
        if !batches.contains(&r.batch_size) {
            batches.push(r.batch_size);
        }
    }
    batches.sort_unstable();
    let width = 3.0 * PANEL_W;
    let height = PANEL_H + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    let (lo, hi) = (
        (*batches.first().unwrap_or(&1) as f64).log2(),
        (*batches.last().unwrap_or(&1) as f64).log2(),
    );
    for (k, (name, stat)) in panels.iter().enumerate() {
        let x0 = k as f64 * PANEL_W + MARGIN_L;
        let (w, h) = (
            PANEL_W - MARGIN_L - MARGIN_R,
            PANEL_H - MARGIN_T - MARGIN_B + 40.0,
        );
        let y0 = MARGIN_T;
        let data_min = rows
            .iter()
            .map(|r| stat(r).min)
            .filter(|&v| v > 0.0)
            .fold(f64::INFINITY, f64::min);
        let data_max = rows.iter().map(|r| stat(r).max).fold(0.0, f64::max);
        let (ymin, ymax, ticks) = log_axis(data_min, data_max);
        let px = |b: usize| {
            if hi > lo {
                x0 + ((b as f64).log2() - lo) / (hi - lo) * w
            } else {
                x0 + w / 2.0
            }
        };
        let py = |v: f64| {
            let v = v.clamp(ymin, ymax);
            y0 + h - (v / ymin).log10() / (ymax / ymin).log10() * h
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{name}</text>"#,
            x0 + w / 2.0,
            y0 - 10.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##
        );
        for v in ticks {
            let y = py(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                x0 + w,
                x0 - 6.0,
                y + 4.0,
                fmt_tick(v)
            );
        }
        for &b in &batches {
            let x = px(b);
            let _ = writeln!(
                s,
                r#"<text x="{x}" y="{}" text-anchor="middle">{b}</text>"#,
                y0 + h + 16.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">batch size</text>"#,
            x0 + w / 2.0,
            y0 + h + 34.0
        );
        for &ser in &series {
            let (color, dash, shape) = style(ser);
            let pts: Vec<(usize, &Stats)> = rows
                .iter()
                .filter(|r| r.workload == ser)
                .map(|r| (r.batch_size, stat(r)))
                .collect();
            let mut sorted = pts.clone();
            sorted.sort_by_key(|(b, _)| *b);
            let path: Vec<String> = sorted
                .iter()
                .map(|(b, st)| format!("{:.1},{:.1}", px(*b), py(st.mean)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
                path.join(" ")
            );
            for (b, st) in sorted {
                let x = px(b);
                if st.max > st.min {
                    let _ = writeln!(
                        s,
                        r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{color}"/>"#,
                        py(st.min),
                        py(st.max)
                    );
                }
                let tip = format!("{} batch {b}: {:.3} ms", label(ser), st.mean);
                let _ = writeln!(s, "{}", marker(shape, x, py(st.mean), color, &tip));
            }
        }
    }
    // Legend along the bottom.
    let mut x = MARGIN_L;
    let y = height - 14.0;
    for &ser in &series {
        let (color, dash, shape) = style(ser);
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>{}<text x="{}" y="{y}">{}</text>"#,
            y - 4.0,
            x + 24.0,
            y - 4.0,
            marker(shape, x + 12.0, y - 4.0, color, &label(ser)),
            x + 30.0,
            label(ser)
        );
        x += 150.0;
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64) -> String {
    // Ticks are multiples of 1, 2, 2.5 or 5 × 10^k: at most two decimals below 1 need showing.
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::summary::{summarize, tests::point};
    use crate::bench::workload::{Series, Workload};

    #[test]
    fn log_axis_spans_the_data_on_round_ticks() {
        assert_eq!(
            log_axis(3.0, 180.0),
            (2.0, 200.0, vec![2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0])
        );
        assert_eq!(log_axis(0.4, 0.9).0, 0.2);
        assert_eq!(log_axis(5.0, 5.0), (5.0, 10.0, vec![5.0, 10.0]));
        assert_eq!(log_axis(f64::INFINITY, 0.0).0, 1.0);
        assert_eq!(fmt_tick(0.2), "0.2");
        assert_eq!(fmt_tick(500.0), "500");
    }

    #[test]
    fn small_batches_are_not_squashed_on_the_floor() {
        // Decode 1 ms at batch 1, 1000 ms at batch 32: on a linear axis batch 1 would sit
        // 0.1% above the floor; on the log axis it is at the floor tick and batch 4 well above.
        let rows = summarize(&[
            point(Series::NoLora, 1, &[1.0]),
            point(Series::NoLora, 4, &[10.0]),
            point(Series::NoLora, 32, &[1000.0]),
        ]);
        let s = svg(&rows, "t");
        let decode = s.split("decode latency").nth(1).expect("decode panel");
        let line = decode.split("<polyline points=\"").nth(1).expect("a line");
        let ys: Vec<f64> = line
            .split('"')
            .next()
            .expect("points")
            .split(' ')
            .map(|xy| xy.split(',').nth(1).and_then(|y| y.parse().ok()).expect("x,y"))
            .collect();
        let (floor, top) = (ys[0], ys[2]);
        let at_4 = (floor - ys[1]) / (floor - top);
        assert!(
            (at_4 - 1.0 / 3.0).abs() < 0.01,
            "batch 4 at {at_4} of the axis: {ys:?}"
        );
    }

    #[test]
    fn one_line_per_series_in_each_panel() {
        let rows = summarize(&[
            point(Series::NoLora, 1, &[2.0]),
            point(Series::NoLora, 4, &[3.0]),
            point(Series::Lora(Workload::Distinct), 1, &[2.5, 3.0]),
            point(Series::Lora(Workload::Distinct), 4, &[4.0]),
        ]);
        let s = svg(&rows, "demo <cpu>");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2 * 3);
        // A marker per point and per legend entry.
        assert_eq!(s.matches("<title>").count(), 4 * 3 + 2);
        assert!(s.contains("demo &lt;cpu&gt;"));
        assert!(s.contains("no LoRA") && s.contains("LoRA distinct"));
    }
}
