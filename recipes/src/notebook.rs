//! Inline display in Jupyter notebooks run by the evcxr kernel: values that show themselves
//! ([`Png`], [`Html`]; evcxr calls a value's `evcxr_display` when a cell ends with it, which
//! prints the `EVCXR_BEGIN_CONTENT` protocol) and the pictures the notebooks draw, made in
//! memory: [`line_chart`], [`bar_chart`], [`heatmap`], [`image`], and [`table`].
//!
//! ```
//! use burn_recipes::notebook::{Png, line_chart};
//!
//! let png: Png = line_chart("loss", "step", "nats", &[("train", vec![(0.0, 2.0), (1.0, 1.5)])]).unwrap();
//! assert_eq!(&png.0[1..4], b"PNG");
//! ```

use std::fmt::Write as _;

use base64::Engine as _;
use plotters::prelude::*;

use crate::error::{RecipeError, Result};

/// A PNG image shown inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Png(pub Vec<u8>);

impl Png {
    /// Prints the image for evcxr (called by the kernel when a cell ends with the value).
    pub fn evcxr_display(&self) {
        let data = base64::engine::general_purpose::STANDARD.encode(&self.0);
        println!("EVCXR_BEGIN_CONTENT image/png\n{data}\nEVCXR_END_CONTENT");
    }

    /// Writes the image to `path`.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        std::fs::write(path, &self.0).map_err(|e| RecipeError::io(path, e))
    }
}

/// HTML shown inline (tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Html(pub String);

impl Html {
    /// Prints the HTML for evcxr.
    pub fn evcxr_display(&self) {
        println!(
            "EVCXR_BEGIN_CONTENT text/html\n{}\nEVCXR_END_CONTENT",
            self.0
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An HTML table of `rows` under `headers`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> Html {
    let mut html = String::from("<table><thead><tr>");
    for h in headers {
        let _ = write!(html, "<th>{}</th>", escape(h));
    }
    html.push_str("</tr></thead><tbody>");
    for row in rows {
        html.push_str("<tr>");
        for cell in row {
            let _ = write!(html, "<td>{}</td>", escape(cell));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    Html(html)
}

fn draw_error(e: impl std::fmt::Display) -> RecipeError {
    RecipeError::invalid("chart", e.to_string())
}

/// A PNG of an RGB image `width × height` (row-major, 3 bytes per pixel).
pub fn image(rgb: &[u8], width: u32, height: u32) -> Result<Png> {
    if rgb.len() != 3 * width as usize * height as usize {
        return Err(RecipeError::invalid(
            "rgb",
            format!("{} bytes for a {width}×{height} RGB image", rgb.len()),
        ));
    }
    let mut out = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(
        &mut out,
        rgb,
        width,
        height,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(draw_error)?;
    Ok(Png(out.into_inner()))
}

/// Draws on a white `width × height` canvas and returns it as a PNG.
fn canvas(
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<Png> {
    let mut rgb = vec![255u8; 3 * width as usize * height as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        draw(&root)?;
        root.present().map_err(draw_error)?;
    }
    image(&rgb, width, height)
}

/// A chart on `root` with a margin and, when a font exists, `title` and room for axis labels.
fn titled<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    text: bool,
) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder.margin(15);
    if text {
        builder
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(35)
            .y_label_area_size(60);
    }
    builder
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = 0.05 * (hi - lo).max(1e-6);
    (lo - pad, hi + pad)
}

/// Lines of `(x, y)` points, one per named series, with a legend.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<Png> {
    let text = crate::plot::font();
    canvas((800, 450), |root| {
        let points = || series.iter().flat_map(|(_, s)| s.iter());
        let (x0, x1) = range(points().map(|p| p.0));
        let (y0, y1) = range(points().map(|p| p.1));
        let mut builder = titled(root, title, text);
        let mut chart = builder
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_error)?;
        if text {
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .draw()
                .map_err(draw_error)?;
        }
        for (i, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let drawn = chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(draw_error)?;
            if text {
                drawn.label(*name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        if text && series.len() > 1 {
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(draw_error)?;
        }
        Ok(())
    })
}

/// Bars for `labels`, stacked from `parts` (each a named value per label), with a legend.
pub fn bar_chart(title: &str, labels: &[String], parts: &[(&str, Vec<f64>)]) -> Result<Png> {
    let text = crate::plot::font();
    if let Some((name, _)) = parts.iter().find(|(_, v)| v.len() != labels.len()) {
        return Err(RecipeError::invalid(
            "parts",
            format!("`{name}` has not one value per label ({})", labels.len()),
        ));
    }
    canvas((800, 450), |root| {
        let totals: Vec<f64> = (0..labels.len())
            .map(|i| parts.iter().map(|(_, v)| v[i].max(0.0)).sum())
            .collect();
        // Room above the tallest bar for the legend.
        let top = totals.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.45;
        let mut builder = titled(root, title, text);
        // Bar `i` is centred on `i`, where its label is drawn.
        let n = labels.len().max(1) as f64;
        let mut chart = builder
            .build_cartesian_2d(-0.5..n - 0.5, 0.0..top)
            .map_err(draw_error)?;
        if text {
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(labels.len() + 1)
                .x_label_formatter(&|x| {
                    let i = x.round();
                    if (x - i).abs() > 1e-6 || i < 0.0 {
                        return String::new();
                    }
                    labels.get(i as usize).cloned().unwrap_or_default()
                })
                .draw()
                .map_err(draw_error)?;
        }
        let mut base = vec![0.0; labels.len()];
        for (p, (name, values)) in parts.iter().enumerate() {
            let color = Palette99::pick(p).to_rgba();
            let bars: Vec<Rectangle<(f64, f64)>> = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let (lo, hi) = (base[i], base[i] + v.max(0.0));
                    base[i] = hi;
                    Rectangle::new(
                        [(i as f64 - 0.35, lo), (i as f64 + 0.35, hi)],
                        color.filled(),
                    )
                })
                .collect();
            let drawn = chart.draw_series(bars).map_err(draw_error)?;
            if text {
                drawn.label(*name).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            }
        }
        if text && parts.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(draw_error)?;
        }
        Ok(())
    })
}

/// A `rows × cols` grid of `values` (row-major) as colours from white (the smallest) to dark
/// blue (the largest), one cell of `cell` pixels per value.
pub fn heatmap(values: &[f64], rows: usize, cols: usize, cell: u32) -> Result<Png> {
    if values.len() != rows * cols || rows == 0 || cols == 0 {
        return Err(RecipeError::invalid(
            "values",
            format!("{} values for a {rows}×{cols} grid", values.len()),
        ));
    }
    let (lo, hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = (hi - lo).max(1e-12);
    let (w, h) = (cols as u32 * cell, rows as u32 * cell);
    let mut rgb = Vec::with_capacity(3 * (w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            let v = values[(y / cell) as usize * cols + (x / cell) as usize];
            let t = ((v - lo) / span).clamp(0.0, 1.0);
            let shade = |full: f64| (255.0 - t * (255.0 - full)).round() as u8;
            rgb.extend([shade(8.0), shade(48.0), shade(107.0)]);
        }
    }
    image(&rgb, w, h)
}

/// Rows of video frames as one picture: row `r` holds `rows[r]` left to right (pixels in
/// `[0, 1]`, one or three channels, every frame the size of the first), each pixel drawn
/// `zoom × zoom`, with a white gap of `zoom` pixels between frames.
pub fn frames(rows: &[&[burn_video::metrics::Frame]], zoom: usize) -> Result<Png> {
    let Some(first) = rows.iter().find_map(|r| r.first()) else {
        return Err(RecipeError::invalid("rows", "no frame to draw"));
    };
    let (fw, fh, _) = first.size();
    let zoom = zoom.max(1);
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let (cell_w, cell_h) = (fw * zoom + zoom, fh * zoom + zoom);
    let (w, h) = (cols * cell_w, rows.len() * cell_h);
    let mut rgb = vec![255u8; 3 * w * h];
    for (r, row) in rows.iter().enumerate() {
        for (c, frame) in row.iter().enumerate() {
            let (fw2, fh2, ch) = frame.size();
            if (fw2, fh2) != (fw, fh) || !(ch == 1 || ch == 3) {
                return Err(RecipeError::invalid(
                    "rows",
                    format!("frame {c} of row {r} is {fw2}×{fh2}×{ch}; {fw}×{fh}, 1 or 3 channels"),
                ));
            }
            let px = frame.pixels();
            for y in 0..fh * zoom {
                for x in 0..fw * zoom {
                    let at = ((y / zoom) * fw + x / zoom) * ch;
                    let (ox, oy) = (c * cell_w + x, r * cell_h + y);
                    for k in 0..3 {
                        let v = px[at + if ch == 3 { k } else { 0 }];
                        rgb[3 * (oy * w + ox) + k] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                }
            }
        }
    }
    image(&rgb, w as u32, h as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(png: &Png) -> image::RgbImage {
        image::load_from_memory(&png.0).expect("a PNG").to_rgb8()
    }

    #[test]
    fn a_heatmap_draws_each_value_as_a_cell_from_white_to_dark_blue() {
        let png = heatmap(&[0.0, 1.0, 0.5, 0.0], 2, 2, 3).expect("heatmap");
        let img = decoded(&png);
        assert_eq!(img.dimensions(), (6, 6));
        assert_eq!(
            img.get_pixel(0, 0).0,
            [255, 255, 255],
            "the smallest is white"
        );
        assert_eq!(
            img.get_pixel(4, 1).0,
            [8, 48, 107],
            "the largest is dark blue"
        );
        assert_eq!(img.get_pixel(1, 4).0, [132, 152, 181], "halfway between");
        assert!(heatmap(&[1.0; 3], 2, 2, 3).is_err());
    }

    #[test]
    fn frames_are_laid_out_in_rows_with_gaps_and_bad_frames_are_refused() {
        let grey = burn_video::metrics::Frame::new(2, 1, 1, vec![0.0, 1.0]).expect("frame");
        let red = burn_video::metrics::Frame::new(2, 1, 3, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
            .expect("frame");
        let png = frames(
            &[&[grey.clone(), grey.clone()], std::slice::from_ref(&red)],
            2,
        )
        .expect("frames");
        let img = decoded(&png);
        // Two frames of 2×1 pixels, zoomed twice, with a 2-pixel gap: 2 · (4 + 2) × 2 · (2 + 2).
        assert_eq!(img.dimensions(), (12, 8));
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(2, 1).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(1, 4).0, [255, 0, 0]);
        let small = burn_video::metrics::Frame::new(1, 1, 1, vec![0.5]).expect("frame");
        assert!(frames(&[&[grey, small]], 1).is_err());
        assert!(frames(&[], 1).is_err());
    }

    #[test]
    fn charts_and_tables_render() {
        let line = line_chart("t", "x", "y", &[("a", vec![(0.0, 1.0), (1.0, 2.0)])]).expect("line");
        assert_eq!(decoded(&line).dimensions(), (800, 450));
        let labels = vec!["p".to_string(), "q".to_string()];
        let bars = bar_chart(
            "t",
            &labels,
            &[("a", vec![1.0, 2.0]), ("b", vec![0.5, 0.5])],
        );
        assert_eq!(decoded(&bars.expect("bars")).dimensions(), (800, 450));
        assert!(bar_chart("t", &labels, &[("a", vec![1.0])]).is_err());
        let html = table(&["a<b"], &[vec!["1 & 2".into()]]);
        assert_eq!(
            html.0,
            "<table><thead><tr><th>a&lt;b</th></tr></thead><tbody><tr><td>1 &amp; 2</td></tr></tbody></table>"
        );
    }
}
