//! `burn-recipes plot RUN_DIR`: PNG plots of a run's `metrics.jsonl` — `loss.png` (training
//! loss per step, with the source's entropy floor when known) and `expert_load.png` (share of
//! the routed tokens each expert received, per MoE layer).
//!
//! Labels use a system TrueType font (DejaVu Sans, Liberation Sans or FreeSans); without one,
//! the plots are drawn without text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::{RecipeError, Result};

const FONT_FILES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers the first system font found (once per process); whether one was.
pub(crate) fn font() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        for path in FONT_FILES {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the whole process: one font file, loaded once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> RecipeError {
    RecipeError::Io {
        path: path.to_path_buf(),
        reason: format!("plotting: {e}"),
    }
}

/// The metrics of a run: (step, loss) and per step the expert loads of every MoE layer.
type Series = (Vec<(f64, f64)>, Vec<(f64, Vec<Vec<f64>>)>);

fn read_metrics(run_dir: &Path) -> Result<Series> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| RecipeError::Io {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut loss = Vec::new();
    let mut load = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| RecipeError::Io {
            path: path.clone(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        let step = v["step"].as_f64().unwrap_or(i as f64 + 1.0);
        if let Some(l) = v["loss"].as_f64() {
            loss.push((step, l));
        }
        if let Some(layers) = v["expert_load"].as_array() {
            let rows: Vec<Vec<f64>> = layers
                .iter()
                .map(|l| {
                    l.as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                        .unwrap_or_default()
                })
                .collect();
            load.push((step, rows));
        }
    }
    if loss.is_empty() {
        return Err(RecipeError::Io {
            path,
            reason: "no metrics to plot".into(),
        });
    }
    Ok((loss, load))
}

/// Writes `loss.png` and `expert_load.png` into `run_dir`; returns their paths.
pub fn plot(run_dir: &Path, entropy_floor: Option<f64>) -> Result<Vec<PathBuf>> {
    let (loss, load) = read_metrics(run_dir)?;
    let text = font();
    let mut written = Vec::new();

    let loss_png = run_dir.join("loss.png");
    {
        let root = BitMapBackend::new(&loss_png, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(&loss_png, e))?;
        let x_max = loss.last().map_or(1.0, |p| p.0).max(1.0);
        let mut y_max = loss.iter().map(|p| p.1).fold(0.0, f64::max);
        let mut y_min = loss.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        if let Some(f) = entropy_floor {
            y_min = y_min.min(f);
            y_max = y_max.max(f);
        }
        let pad = 0.05 * (y_max - y_min).max(1e-3);
        let mut builder = ChartBuilder::on(&root);
        builder.margin(15);
        if text {
            builder
                .caption("training loss (nats/token)", ("sans-serif", 22))
                .x_label_area_size(35)
                .y_label_area_size(55);
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| plot_error(&loss_png, e))?;
        if text {
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("loss")
                .draw()
                .map_err(|e| plot_error(&loss_png, e))?;
        }
        chart
            .draw_series(LineSeries::new(loss.iter().copied(), &BLUE))
            .map_err(|e| plot_error(&loss_png, e))?;
        if let Some(f) = entropy_floor {
            chart
                .draw_series(LineSeries::new([(0.0, f), (x_max, f)], &RED))
                .map_err(|e| plot_error(&loss_png, e))?;
        }
        root.present().map_err(|e| plot_error(&loss_png, e))?;
    }
    written.push(loss_png);

    if !load.is_empty() && load.iter().any(|(_, l)| !l.is_empty()) {
        let load_png = run_dir.join("expert_load.png");
        let layers = load.iter().map(|(_, l)| l.len()).max().unwrap_or(0);
        let root = BitMapBackend::new(&load_png, (900, 300 * layers as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(&load_png, e))?;
        let x_max = load.last().map_or(1.0, |p| p.0).max(1.0);
        for (layer, area) in root.split_evenly((layers, 1)).iter().enumerate() {
            let shares: Vec<(f64, Vec<f64>)> = load
                .iter()
                .filter_map(|(step, l)| {
                    let row = l.get(layer)?;
                    let total: f64 = row.iter().sum();
                    (total > 0.0).then(|| (*step, row.iter().map(|c| c / total).collect()))
                })
                .collect();
            let experts = shares.first().map_or(0, |s| s.1.len());
            let y_max = shares
                .iter()
                .flat_map(|s| s.1.iter().copied())
                .fold(0.0, f64::max)
                .max(1e-3);
            let mut builder = ChartBuilder::on(area);
            builder.margin(10);
            if text {
                builder
                    .caption(
                        format!("MoE layer {layer}: share of routed tokens per expert"),
                        ("sans-serif", 18),
                    )
                    .x_label_area_size(30)
                    .y_label_area_size(50);
            }
            let mut chart = builder
                .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.1)
                .map_err(|e| plot_error(&load_png, e))?;
            if text {
                chart
                    .configure_mesh()
                    .x_desc("step")
                    .draw()
                    .map_err(|e| plot_error(&load_png, e))?;
            }
            for e in 0..experts {
                let color = Palette99::pick(e);
                chart
                    .draw_series(LineSeries::new(
                        shares.iter().map(|(s, v)| (*s, v[e])),
                        &color,
                    ))
                    .map_err(|err| plot_error(&load_png, err))?;
            }
        }
        root.present().map_err(|e| plot_error(&load_png, e))?;
        drop(root);
        written.push(load_png);
    }
    Ok(written)
}
