//! `--plot`: a PNG of how cost and latency grow with the number of calls.
//! Built only with the `plot` feature, which brings in plotters.
//!
//! Three panels over N (concurrent calls): CPU in cores, resident memory in MiB (server and
//! agent process each), and the p99 round trip. Drawn with plotters' bitmap backend. Text needs
//! a TrueType font: the first one found among common system paths (or `TELCOFLOW_PLOT_FONT`)
//! is loaded at run time; without one the plot is drawn without text, so it still works on a
//! machine without fonts.

use super::RunResult;
use anyhow::Context;
use plotters::prelude::*;
use std::path::Path;

/// Fonts tried in order when `TELCOFLOW_PLOT_FONT` is not set.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a font for plotters' `sans-serif`; false when none could be loaded.
fn load_font() -> bool {
    let env = std::env::var("TELCOFLOW_PLOT_FONT").ok();
    let paths = env
        .iter()
        .map(String::as_str)
        .chain(FONT_CANDIDATES.iter().copied());
    for path in paths {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// One panel's series: name, colour, (N, value) points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Draws the plot for the runs (one point per run) into `path`.
pub(crate) fn draw(path: &Path, runs: &[RunResult]) -> anyhow::Result<()> {
    let text = load_font();
    if !text {
        tracing::warn!("no TrueType font found (set TELCOFLOW_PLOT_FONT); plotting without text");
    }
    let xs = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<(f64, f64)> {
        runs.iter()
            .filter_map(|r| f(r).map(|v| (r.calls as f64, v)))
            .collect()
    };
    let panels: [(&str, Vec<Series>); 3] = [
        (
            "CPU (cores)",
            vec![
                ("server", RED, xs(&|r| r.server.map(|c| c.cpu_cores))),
                ("agent", BLUE, xs(&|r| r.agent.map(|c| c.cpu_cores))),
            ],
        ),
        (
            "RSS (MiB)",
            vec![
                ("server", RED, xs(&|r| r.server.map(|c| c.rss_mib_loaded))),
                ("agent", BLUE, xs(&|r| r.agent.map(|c| c.rss_mib_loaded))),
            ],
        ),
        (
            "round trip p99 (ms)",
            vec![("p99", BLACK, xs(&|r| Some(r.round_trip_ms.p99)))],
        ),
    ];
    let x_max = runs.iter().map(|r| r.calls).max().unwrap_or(1) as f64 * 1.05;

    let root = BitMapBackend::new(path, (1200, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, 3));
    for (area, (title, series)) in areas.iter().zip(panels) {
        let y_max = series
            .iter()
            .flat_map(|s| s.2.iter().map(|p| p.1))
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.15;
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if text {
            builder
                .caption(title, ("sans-serif", 18))
                .x_label_area_size(35)
                .y_label_area_size(50);
        }
        let mut chart = builder.build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("concurrent calls")
                .x_label_formatter(&|x| format!("{x:.0}"));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        for (name, colour, points) in series {
            let line =
                chart.draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?;
            if text {
                line.label(name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            }
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        }
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
