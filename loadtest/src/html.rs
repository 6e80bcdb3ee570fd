//! The crowd's HTML report: one self-contained file (inline CSS, charts as inline SVG drawn with
//! plotters), no scripts and no external assets.

use std::fmt::Write;

use plotters::prelude::*;

use crate::crowd::Report;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 320;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart of `(second, value)` points as an SVG string.
fn line_chart(title: &str, y_label: &str, points: &[(u32, usize)]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let x_max = points.iter().map(|p| p.0).max().unwrap_or(1).max(1);
        let y_max = points.iter().map(|p| p.1).max().unwrap_or(1).max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0u32..x_max, 0usize..y_max + y_max / 10 + 1)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the crowd started")
            .y_desc(y_label)
            .draw()?;
        chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE))?;
        root.present()?;
    }
    Ok(svg)
}

/// Seconds per point of the rate-against-latency chart.
const BUCKET_SECS: u32 = 5;

/// Per [`BUCKET_SECS`]: admissions per minute, and the p99 of holds and checkouts (ms) where
/// there were any.
pub fn rate_and_latency(
    admissions: &[(u32, usize)],
    purchases: &[&[(f32, f32)]],
) -> Vec<(u32, f64, Option<f64>)> {
    let last = admissions
        .iter()
        .map(|p| p.0)
        .chain(purchases.iter().flat_map(|s| s.iter().map(|p| p.0 as u32)))
        .max()
        .unwrap_or(0);
    let buckets = (last / BUCKET_SECS + 1) as usize;
    let mut admitted = vec![0usize; buckets];
    for (second, n) in admissions {
        admitted[(second / BUCKET_SECS) as usize] += n;
    }
    let mut latencies: Vec<Vec<f32>> = vec![Vec::new(); buckets];
    for (second, ms) in purchases.iter().flat_map(|s| s.iter()) {
        latencies[(*second as u32 / BUCKET_SECS) as usize].push(*ms);
    }
    admitted
        .into_iter()
        .zip(latencies)
        .enumerate()
        .map(|(i, (n, mut ms))| {
            ms.sort_by(f32::total_cmp);
            let p99 = (!ms.is_empty()).then(|| {
                let rank = ((ms.len() as f64 * 0.99).ceil() as usize).clamp(1, ms.len());
                f64::from(ms[rank - 1])
            });
            (
                i as u32 * BUCKET_SECS,
                n as f64 * 60.0 / f64::from(BUCKET_SECS),
                p99,
            )
        })
        .collect()
}

/// Admission rate (left axis) against the p99 of holds and checkouts (right axis) over time:
/// what autotune steers by, and what it steers.
fn rate_latency_chart(points: &[(u32, f64, Option<f64>)]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let x_max = points.iter().map(|p| p.0).max().unwrap_or(1).max(1);
        let rate_max = points.iter().map(|p| p.1).fold(1.0, f64::max);
        let ms_max = points.iter().filter_map(|p| p.2).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Admission rate against purchase latency",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .right_y_label_area_size(64)
            .build_cartesian_2d(0u32..x_max, 0f64..rate_max * 1.1)?
            .set_secondary_coord(0u32..x_max, 0f64..ms_max * 1.1);
        chart
            .configure_mesh()
            .x_desc("seconds since the crowd started")
            .y_desc("admitted per minute")
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("hold + checkout p99 (ms)")
            .draw()?;
        chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &BLUE))?
            .label("admitted per minute")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        let red = RGBColor(200, 30, 30);
        chart
            .draw_secondary_series(LineSeries::new(
                points.iter().filter_map(|p| Some((p.0, p.2?))),
                &red,
            ))?
            .label("hold + checkout p99 (ms)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], red));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// One step's latencies: its name, (seconds, ms) points and colour.
type Series<'a> = (&'a str, &'a [(f32, f32)], RGBColor);

/// A scatter of latencies over time, one colour per step.
fn latency_chart(series: &[Series<'_>]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let all = series.iter().flat_map(|(_, points, _)| points.iter());
        let (x_max, y_max) = all.fold((1f32, 1f32), |(x, y), p| (x.max(p.0), y.max(p.1)));
        let mut chart = ChartBuilder::on(&root)
            .caption("Latency over time", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f32..x_max * 1.02, 0f32..y_max * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the crowd started")
            .y_desc("milliseconds")
            .draw()?;
        for (name, points, colour) in series {
            let colour = *colour;
            chart
                .draw_series(
                    points
                        .iter()
                        .map(move |p| Circle::new(*p, 2, colour.filled())),
                )?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x, y), 4, colour.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// The whole report as one HTML document.
pub fn render(r: &Report) -> anyhow::Result<String> {
    let mut html = String::new();
    writeln!(
        html,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fairgate crowd report — event {event}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 960px; padding: 0 1rem; color: #1b1b1b; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border-bottom: 1px solid #ddd; padding: .3rem .8rem; text-align: left; }}
.ok {{ color: #116611; font-weight: 600; }} .failed {{ color: #b00020; font-weight: 600; }}
figure {{ margin: 1.5rem 0; }} svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>Crowd report: event {event}</h1>
<p class="{class}">Overall: {overall}</p>"#,
        event = r.event_id,
        class = if r.ok { "ok" } else { "failed" },
        overall = if r.ok {
            "every invariant holds"
        } else {
            "an invariant FAILED"
        },
    )?;
    writeln!(html, "<h2>Figures</h2><table>")?;
    let rows: Vec<(&str, String)> = vec![
        ("fans", r.fans.to_string()),
        ("joined", r.joined.to_string()),
        ("joined after the draw", r.live_arrivals.to_string()),
        ("left the line on purpose", r.left.to_string()),
        ("misbehaving fans", r.misbehaving.to_string()),
        ("admitted", r.admitted.to_string()),
        ("bought", r.bought.to_string()),
        ("seats / sold", format!("{} / {}", r.seats, r.seats_sold)),
        ("declined cards", r.declined.to_string()),
        ("found it sold out", r.sold_out.to_string()),
        ("errors", r.errors.to_string()),
        (
            "fans told fewer places were left than fans ahead",
            format!(
                "{} ({} gave up at their time limit)",
                r.told_places_short, r.gave_up_places_short
            ),
        ),
        (
            "admission rate (configured / achieved)",
            format!(
                "{} / {:.0} per minute",
                r.configured_rate_per_minute, r.achieved_rate_per_minute
            ),
        ),
        (
            "Spearman(presale arrival, position)",
            r.spearman_presale
                .map_or("too few presale fans".into(), |v| format!("{v:+.3}")),
        ),
        ("wall time", format!("{:.1} s", r.wall_secs)),
    ];
    for (name, value) in rows {
        writeln!(
            html,
            "<tr><th>{}</th><td>{}</td></tr>",
            esc(name),
            esc(&value)
        )?;
    }
    writeln!(html, "</table><h2>Latency (ms)</h2><table><tr><th>step</th><th>n</th><th>p50</th><th>p90</th><th>p99</th><th>max</th></tr>")?;
    for (step, p) in &r.latency_ms {
        writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr>",
            esc(step),
            p.count,
            p.p50,
            p.p90,
            p.p99,
            p.max
        )?;
    }
    writeln!(html, "</table><h2>Invariants</h2><table>")?;
    for (name, holds) in &r.invariants {
        writeln!(
            html,
            "<tr><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(name),
            if *holds { "ok" } else { "failed" },
            if *holds { "holds" } else { "FAILED" }
        )?;
    }
    writeln!(html, "</table><h2>Charts</h2>")?;
    for svg in [
        line_chart("Fans waiting in line", "fans", &r.timeline.queue_length)?,
        line_chart(
            "Admissions per second",
            "fans admitted",
            &r.timeline.admissions_per_second,
        )?,
        rate_latency_chart(&rate_and_latency(
            &r.timeline.admissions_per_second,
            &[&r.timeline.hold_ms, &r.timeline.checkout_ms],
        ))?,
        latency_chart(&[
            ("join", &r.timeline.join_ms, BLUE),
            ("hold", &r.timeline.hold_ms, RGBColor(230, 120, 0)),
            ("checkout", &r.timeline.checkout_ms, RGBColor(0, 140, 60)),
        ])?,
    ] {
        writeln!(html, "<figure>{svg}</figure>")?;
    }
    for sample in &r.error_samples {
        writeln!(html, "<p>error sample: <code>{}</code></p>", esc(sample))?;
    }
    writeln!(html, "</body></html>")?;
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_latency_share_buckets() {
        let admissions = [(0, 5), (4, 5), (5, 1)];
        let holds = [(1.0, 10.0), (2.0, 30.0), (6.5, 7.0)];
        let checkouts = [(3.0, 20.0)];
        let points = rate_and_latency(&admissions, &[&holds, &checkouts]);
        assert_eq!(points, vec![(0, 120.0, Some(30.0)), (5, 12.0, Some(7.0))]);
        let quiet = rate_and_latency(&[(12, 1)], &[]);
        assert_eq!(quiet.last(), Some(&(10, 12.0, None)));
    }
}
