//! The SVG timeline, drawn with plotters: one lane per route, each with
//! its latency over time (median and worst request of each bucket, log
//! scale) above and its failed and hung requests per bucket below; every
//! lane marks the fault, the route's first sign of it (pulsegate: from its
//! log; the others: the first failed or hung request), the moment every
//! client of the route was served again, and the primary's return
//! (`restart`) or the partition's end (`flap`) as vertical lines.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::{Bucket, Report};
use super::BenchError;

const WIDTH: u32 = 1200;
/// Height of the title, and of each route's lane.
const TITLE: u32 = 40;
const LANE: u32 = 420;
const PULSEGATE: RGBColor = RGBColor(31, 119, 180);
const HAPROXY: RGBColor = RGBColor(130, 60, 170);
const PGBOUNCER: RGBColor = RGBColor(40, 140, 120);
const DIRECT: RGBColor = RGBColor(230, 110, 0);
const FAULT: RGBColor = RGBColor(200, 0, 0);
const DETECTED: RGBColor = RGBColor(0, 150, 60);
const RESTARTED: RGBColor = RGBColor(120, 120, 120);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Fallible = Result<(), Box<dyn std::error::Error>>;

/// Draws the timeline of `report` into `path`.
pub(crate) fn draw(report: &Report, path: &Path) -> Result<(), BenchError> {
    draw_svg(report, path).map_err(|e| BenchError::Plot(format!("{}: {e}", path.display())))
}

fn draw_svg(r: &Report, path: &Path) -> Fallible {
    let lanes = r.routes.len().max(1) as u32;
    let root = SVGBackend::new(path, (WIDTH, TITLE + lanes * LANE)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "pulsegate bench failover: {} workload, {} at {:.2} s, {} clients per route",
        r.settings.workload, r.fault.kind, r.fault.at_s, r.settings.clients_per_route
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let areas = root.split_evenly((r.routes.len().max(1), 1));
    for (area, route) in areas.iter().zip(&r.routes) {
        let area = area.titled(&format!("via {}", route.route), ("sans-serif", 16))?;
        let (upper, lower) = area.split_vertically(LANE * 3 / 5);
        let lane = Lane {
            route: route.route,
            color: color_of(route.route),
        };
        latency_chart(&upper, r, &lane)?;
        error_chart(&lower, r, &lane)?;
    }
    root.present()?;
    Ok(())
}

/// The route a lane draws.
struct Lane {
    route: &'static str,
    color: RGBColor,
}

fn color_of(route: &str) -> RGBColor {
    match route {
        "pulsegate" => PULSEGATE,
        "haproxy" => HAPROXY,
        "pgbouncer" => PGBOUNCER,
        _ => DIRECT,
    }
}

fn route_buckets<'a>(r: &'a Report, route: &'a str) -> impl Iterator<Item = &'a Bucket> + 'a {
    r.timeline.iter().filter(move |b| b.route == route)
}

/// Vertical lines of `route`'s lane: (x in seconds, label, colour).
fn markers(r: &Report, route: &str) -> Vec<(f64, String, RGBColor)> {
    let at = r.fault.at_s;
    let mut lines = vec![(at, format!("fault ({})", r.fault.kind), FAULT)];
    let Some(me) = r.route(route) else {
        return lines;
    };
    let first_sign = match (route, &r.detection) {
        ("pulsegate", Some(d)) => d.detected_s.map(|d| {
            (
                d,
                format!("pulsegate's first sign, from its log (+{d:.2} s)"),
            )
        }),
        _ => me
            .first_failure_s
            .map(|d| (d, format!("first failed or hung request (+{d:.2} s)"))),
    };
    if let Some((d, label)) = first_sign {
        lines.push((at + d, label, DETECTED));
    }
    if let Some(s) = me.served_again_s {
        lines.push((
            at + s,
            format!("every {route} client served again (+{s:.2} s)"),
            color_of(route),
        ));
    }
    if let Some(t) = r.fault.restarted_s {
        lines.push((t, "primary restarted".to_string(), RESTARTED));
    }
    if let Some(t) = r.fault.healed_s {
        lines.push((t, "partition healed".to_string(), RESTARTED));
    }
    lines
}

/// Splits points into runs of neighbouring buckets, so that no line
/// bridges a time in which no request started.
fn runs(points: impl Iterator<Item = (f64, f64)>, step: f64) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    for point in points {
        match runs.last_mut() {
            Some(run)
                if run
                    .last()
                    .is_some_and(|last| point.0 - last.0 <= step * 1.5) =>
            {
                run.push(point)
            }
            _ => runs.push(vec![point]),
        }
    }
    runs
}

fn latency_chart(area: &Area, r: &Report, lane: &Lane) -> Fallible {
    let values = || {
        r.timeline
            .iter()
            .flat_map(|b| [b.p50_ms, b.max_ms, b.waiting_ms])
            .flatten()
    };
    let low = values().fold(f64::INFINITY, f64::min).clamp(0.001, 1.0) / 2.0;
    let high = values().fold(1.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..r.settings.duration_s, (low..high).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start of the load")
        .y_desc("latency (ms, log scale)")
        .y_label_formatter(&|v| format!("{v}"))
        .draw()?;
    let (route, color) = (lane.route, lane.color);
    {
        let lines = [
            ("median", color.stroke_width(2), true),
            ("worst", color.mix(0.45).stroke_width(1), false),
        ];
        for (what, style, median) in lines {
            chart
                .draw_series(LineSeries::new(std::iter::empty(), style))?
                .label(format!("{route}: {what}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            let points = route_buckets(r, route)
                .filter_map(|b| Some((b.t_s, if median { b.p50_ms? } else { b.max_ms? })));
            for run in runs(points, r.bucket_s) {
                match run.as_slice() {
                    [single] => {
                        chart.draw_series([Circle::new(*single, 2, style.filled())])?;
                    }
                    _ => {
                        chart.draw_series(LineSeries::new(run, style))?;
                    }
                }
            }
        }
    }
    {
        let waiting = route_buckets(r, route).filter_map(|b| Some((b.t_s, b.waiting_ms?)));
        chart
            .draw_series(waiting.map(|p| Cross::new(p, 5, color.stroke_width(2))))?
            .label(format!("{route}: still waiting at the end (waited so far)"))
            .legend(move |(x, y)| Cross::new((x + 10, y), 5, color.stroke_width(2)));
    }
    for (x, label, color) in markers(r, route) {
        chart
            .draw_series(LineSeries::new(
                [(x, low), (x, high)],
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn error_chart(area: &Area, r: &Report, lane: &Lane) -> Fallible {
    let high = r
        .timeline
        .iter()
        .map(|b| b.failed.max(b.hung))
        .max()
        .unwrap_or(0) as f64
        * 1.15
        + 1.0;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..r.settings.duration_s, 0f64..high)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start of the load")
        .y_desc(format!("requests per {:.0} ms", r.bucket_s * 1000.0))
        .draw()?;
    let (route, color) = (lane.route, lane.color);
    {
        let failed = route_buckets(r, route).filter(|b| b.failed > 0);
        chart
            .draw_series(failed.map(|b| Circle::new((b.t_s, b.failed as f64), 4, color.filled())))?
            .label(format!("{route}: failed"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        let hung = route_buckets(r, route).filter(|b| b.hung > 0);
        chart
            .draw_series(
                hung.map(|b| TriangleMarker::new((b.t_s, b.hung as f64), 6, color.filled())),
            )?
            .label(format!("{route}: hung (> {} s)", r.settings.hang_bound_s))
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color.filled()));
    }
    for (x, _, color) in markers(r, route) {
        chart.draw_series(LineSeries::new(
            [(x, 0.0), (x, high)],
            color.stroke_width(2),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_break_where_no_request_started() {
        let points = [(0.0, 1.0), (0.1, 1.0), (0.5, 9.0), (0.6, 1.0), (1.0, 2.0)];
        let split = runs(points.into_iter(), 0.1);
        assert_eq!(split.len(), 3);
        assert_eq!(split[0], vec![(0.0, 1.0), (0.1, 1.0)]);
        assert_eq!(split[2], vec![(1.0, 2.0)]);
    }
}
