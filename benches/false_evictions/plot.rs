//! The SVG plot, drawn with plotters: false evictions (per 1,000 sessions
//! per 10 minutes, from the holds on a clean link and under 2 % loss)
//! against the median idle detection time on host death (from the host
//! death cases on the same link conditions), one point per proxy per link
//! condition, with pulsegate's idle detection targets as vertical lines.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::common::Via;
use crate::fleet::Kind;
use crate::report::Results;

const SIZE: (u32, u32) = (960, 620);
const PULSEGATE: RGBColor = RGBColor(31, 119, 180);
const HAPROXY: RGBColor = RGBColor(230, 110, 0);
const TARGET: RGBColor = RGBColor(0, 150, 60);

/// One point: a proxy on one link condition.
struct Point {
    via: Via,
    clean: bool,
    detection_s: f64,
    rate: f64,
}

/// (hold case, host death case, clean link?) pairs that make a point.
const CONDITIONS: [(u32, u32, bool); 2] = [(0, 4, true), (1, 5, false)];

fn points(results: &Results, vias: &[Via]) -> Vec<Point> {
    let mut points = Vec::new();
    for (hold_id, death_id, clean) in CONDITIONS {
        let hold = results.holds.iter().find(|h| h.case.id == hold_id);
        let death = results.deaths.iter().find(|d| d.id == death_id);
        let (Some(hold), Some(death)) = (hold, death) else {
            continue;
        };
        for &via in vias {
            let rate = hold
                .outcomes
                .iter()
                .find(|o| o.via == via)
                .map(|o| o.fleet.rate());
            let detection = death.detection(via, Kind::Idle).and_then(|d| d.median);
            if let (Some(rate), Some(detection)) = (rate, detection) {
                points.push(Point {
                    via,
                    clean,
                    detection_s: detection.as_secs_f64(),
                    rate,
                });
            }
        }
    }
    points
}

/// Draws the plot into `path`; `false` (and no file) when the run had no
/// hold and host-death case on the same link condition to pair.
pub fn draw(results: &Results, vias: &[Via], path: &Path) -> Result<bool> {
    let points = points(results, vias);
    if points.is_empty() {
        return Ok(false);
    }
    let targets: Vec<(f64, String)> = results
        .deaths
        .iter()
        .map(|g| {
            (
                g.idle_target.as_secs_f64(),
                format!("pulsegate idle target, {}", g.label),
            )
        })
        .collect();
    draw_svg(&points, &targets, path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(true)
}

fn draw_svg(
    points: &[Point],
    targets: &[(f64, String)],
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "False evictions vs. detection of a dead host (emulated link)",
        ("sans-serif", 20),
    )?;
    let x_max = points
        .iter()
        .map(|p| p.detection_s)
        .chain(targets.iter().map(|t| t.0))
        .fold(1.0, f64::max)
        * 1.25;
    // Headroom above the highest point for the legend (upper left).
    let y_max = points.iter().map(|p| p.rate).fold(10.0, f64::max) * 1.4;
    let mut chart = ChartBuilder::on(&root)
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("idle sessions: median time from host death to the client's reset (s)")
        .y_desc("false evictions per 1,000 sessions per 10 min")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (x, label) in targets {
        let x = *x;
        chart
            .draw_series(LineSeries::new(
                [(x, 0.0), (x, y_max)],
                TARGET.mix(0.6).stroke_width(2),
            ))?
            .label(format!("{label} ({x:.1} s)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], TARGET.mix(0.6).stroke_width(2))
            });
    }
    // Each point is its own legend entry, so points close together stay
    // readable. Colour: the proxy; ring: clean link; triangle: 2 % loss
    // (inside the ring when both fall on the same place).
    for p in points {
        let color = match p.via {
            Via::Haproxy => HAPROXY,
            _ => PULSEGATE,
        };
        let condition = if p.clean { "clean link" } else { "2 % loss" };
        let label = format!(
            "{}, {condition}: {:.1} false evictions, idle detection {:.2} s",
            p.via.label(),
            p.rate,
            p.detection_s
        );
        let at = (p.detection_s, p.rate);
        if p.clean {
            chart
                .draw_series([Circle::new(at, 10, color.stroke_width(2))])?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 10, y), 6, color.stroke_width(2)));
        } else {
            chart
                .draw_series([TriangleMarker::new(at, 7, color.filled())])?
                .label(label)
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
