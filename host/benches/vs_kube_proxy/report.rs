//! The bench's results: one row per proxy and size, the markdown table
//! with kwp/upstream ratios, and an SVG plot of one-change latency and
//! peak RSS against the number of Services (plain SVG text: no plotting
//! dependency for two panels of lines).

use std::fmt::Write;

#[derive(Debug, Clone, Default)]
pub struct Row {
    pub cold_start: f64,
    pub cold_cpu: f64,
    /// One-change latencies, ms, sorted.
    pub changes: Vec<f64>,
    /// A Service created, then deleted: API write to kernel, ms, sorted.
    pub creates: Vec<f64>,
    pub deletes: Vec<f64>,
    /// CPU seconds over the steady load (one change per second), and
    /// how long that load ran.
    pub load_cpu: f64,
    pub load_secs: f64,
    pub peak_rss_mib: f64,
    /// API traffic of the whole run, through the counting relay.
    pub api_sent_mib: f64,
    pub api_received_mib: f64,
    pub api_connections: f64,
    /// API reads (get, list, watch) of the whole run, from the audit log.
    pub api_reads: f64,
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

type Metric = (&'static str, fn(&Row) -> f64);

const METRICS: [Metric; 16] = [
    ("cold start (s)", |r| r.cold_start),
    ("cold start CPU (s)", |r| r.cold_cpu),
    ("one change p50 (ms)", |r| pct(&r.changes, 0.5)),
    ("one change p99 (ms)", |r| pct(&r.changes, 0.99)),
    ("one change max (ms)", |r| pct(&r.changes, 1.0)),
    ("changes measured", |r| r.changes.len() as f64),
    ("Service created p50 (ms)", |r| pct(&r.creates, 0.5)),
    ("Service created max (ms)", |r| pct(&r.creates, 1.0)),
    ("Service deleted p50 (ms)", |r| pct(&r.deletes, 0.5)),
    ("Service deleted max (ms)", |r| pct(&r.deletes, 1.0)),
    ("CPU s per 60 s at 1 change/s", |r| {
        if r.load_secs > 0.0 {
            r.load_cpu * 60.0 / r.load_secs
        } else {
            f64::NAN
        }
    }),
    ("peak RSS (MiB)", |r| r.peak_rss_mib),
    ("API MiB received", |r| r.api_received_mib),
    ("API MiB sent", |r| r.api_sent_mib),
    ("API reads (get/list/watch)", |r| r.api_reads),
    ("API connections", |r| r.api_connections),
];

pub type Table = Vec<(usize, Vec<(String, Row)>)>;

fn find<'a>(rows: &'a [(String, Row)], name: &str) -> Option<&'a Row> {
    rows.iter().find(|(p, _)| p == name).map(|(_, r)| r)
}

pub fn print_table(table: &Table) {
    println!();
    // Against upstream, or against another kwp build (`kwp-base`).
    let other = if table
        .iter()
        .any(|(_, rows)| find(rows, "kube-proxy").is_some())
    {
        "kube-proxy"
    } else {
        "kwp-base"
    };
    println!("| Services | metric | kwp | {other} | kwp/{other} |");
    println!("|---:|---|---:|---:|---:|");
    for (n, rows) in table {
        let (k, u) = (find(rows, "kwp"), find(rows, other));
        for (name, f) in METRICS {
            let a = k.map_or(f64::NAN, f);
            let b = u.map_or(f64::NAN, f);
            if a.is_nan() && b.is_nan() {
                continue;
            }
            let ratio = if b > 0.0 { a / b } else { f64::NAN };
            let cell = |v: f64| {
                if v.is_nan() {
                    "–".to_string()
                } else {
                    format!("{v:.2}")
                }
            };
            println!(
                "| {n} | {name} | {} | {} | {} |",
                cell(a),
                cell(b),
                if ratio.is_nan() {
                    "–".to_string()
                } else {
                    format!("{ratio:.3}")
                }
            );
        }
    }
}

/// Two panels, log-log: one change p50 (ms) and peak RSS (MiB) against
/// Services, a line per proxy.
pub fn svg(table: &Table, title: &str) -> String {
    let panels: [Metric; 2] = [
        ("one change, API write to kernel, p50 (ms)", |r| {
            pct(&r.changes, 0.5)
        }),
        ("peak RSS (MiB)", |r| r.peak_rss_mib),
    ];
    let (w, h, pad) = (360.0, 260.0, 60.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        2.0 * (w + pad) + pad,
        h + 2.0 * pad
    );
    let _ = writeln!(
        out,
        r#"<text x="{pad}" y="20" font-size="13">{title}</text>"#
    );
    let ns: Vec<f64> = table.iter().map(|(n, _)| *n as f64).collect();
    let log_range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min).max(1e-3);
        let hi = v
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
            .max(lo * 10.0);
        (lo.log10().floor(), hi.log10().ceil())
    };
    let (x0, x1) = log_range(&ns);
    for (i, (label, f)) in panels.iter().enumerate() {
        let left = pad + i as f64 * (w + pad);
        let values: Vec<f64> = table
            .iter()
            .flat_map(|(_, rows)| rows.iter().map(|(_, r)| f(r)))
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        if values.is_empty() {
            continue;
        }
        let (y0, y1) = log_range(&values);
        let x = |n: f64| left + (n.log10() - x0) / (x1 - x0) * w;
        let y = |v: f64| pad + h - (v.log10() - y0) / (y1 - y0) * h;
        let _ = writeln!(
            out,
            r##"<rect x="{left}" y="{pad}" width="{w}" height="{h}" fill="none" stroke="#888"/><text x="{left}" y="{}">{label}</text>"##,
            pad - 8.0
        );
        for e in y0 as i32..=y1 as i32 {
            let v = 10f64.powi(e);
            let _ = writeln!(
                out,
                r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v}</text>"##,
                left + w,
                left - 4.0,
                y(v) + 4.0,
                yy = y(v)
            );
        }
        for (n, _) in table {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">{n}</text>"#,
                x(*n as f64),
                pad + h + 16.0
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">Services</text>"#,
            left + w / 2.0,
            pad + h + 32.0
        );
        for (k, (proxy, colour)) in [("kwp", "#1f77b4"), ("kube-proxy", "#d62728")]
            .iter()
            .enumerate()
        {
            let points: Vec<(f64, f64)> = table
                .iter()
                .filter_map(|(n, rows)| {
                    let v = find(rows, proxy).map(f)?;
                    (v.is_finite() && v > 0.0).then(|| (x(*n as f64), y(v)))
                })
                .collect();
            let path: Vec<String> = points
                .iter()
                .map(|(a, b)| format!("{a:.1},{b:.1}"))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.join(" ")
            );
            for (a, b) in &points {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{a:.1}" cy="{b:.1}" r="3" fill="{colour}"/>"#
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" fill="{colour}">{proxy}</text>"#,
                left + 8.0,
                pad + 14.0 + 14.0 * k as f64
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
