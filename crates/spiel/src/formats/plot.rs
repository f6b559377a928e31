//! Line charts as PNG (loss curves): plotters draws the axes, grid and lines into an RGB buffer;
//! labels are drawn with an embedded 8x8 bitmap font so no system font is needed; the `png`
//! crate encodes the result.

use std::path::Path;

use font8x8::UnicodeFonts;
use plotters::prelude::*;

use crate::{formats::fsutil, Error, Result};

const W: u32 = 900;
const H: u32 = 520;
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One named line.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, in x order.
    pub points: Vec<(f64, f64)>,
}

fn draw_text(buf: &mut [u8], x: i32, y: i32, text: &str, scale: i32) {
    let mut cx = x;
    for ch in text.chars() {
        if let Some(glyph) = font8x8::BASIC_FONTS.get(ch) {
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                let (px, py) = (cx + col * scale + dx, y + row as i32 * scale + dy);
                                if px >= 0 && py >= 0 && (px as u32) < W && (py as u32) < H {
                                    let o = ((py as u32 * W + px as u32) * 3) as usize;
                                    buf[o..o + 3].copy_from_slice(&[20, 20, 20]);
                                }
                            }
                        }
                    }
                }
            }
        }
        cx += 8 * scale;
    }
}

/// Round tick values covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    (first..)
        .map(|k| k as f64 * step)
        .take_while(|v| *v <= hi + 1e-9 * span)
        .collect()
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}").trim_end_matches('0').to_string()
    }
}

/// Draw `series` into a PNG at `path` (written atomically).
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return Err(Error::Invalid(format!("{}: nothing to plot", path.display())));
    }
    let (mut x0, mut x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    (y0, y1) = (y0 - pad, y1 + pad);
    x0 = x0.min(0.0);
    let mut buf = vec![255u8; (W * H * 3) as usize];
    let (left, top, plot_w, plot_h) = (80i32, 40i32, W as i32 - 110, H as i32 - 100);
    let mut tick_px: Vec<(i32, i32, String, bool)> = Vec::new();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        let area = root.margin(top as u32, 60, left as u32, 30);
        let mut chart = ChartBuilder::on(&area)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| Error::Invalid(format!("plot: {e}")))?;
        let grid = RGBColor(225, 225, 225);
        for t in ticks(x0, x1, 8) {
            let _ = chart.draw_series(LineSeries::new([(t, y0), (t, y1)], grid));
            let (px, py) = chart.backend_coord(&(t, y0));
            tick_px.push((px, py, fmt_tick(t), true));
        }
        for t in ticks(y0, y1, 6) {
            let _ = chart.draw_series(LineSeries::new([(x0, t), (x1, t)], grid));
            let (px, py) = chart.backend_coord(&(x0, t));
            tick_px.push((px, py, fmt_tick(t), false));
        }
        let axis = RGBColor(60, 60, 60);
        let _ = chart.draw_series(LineSeries::new([(x0, y0), (x1, y0)], axis));
        let _ = chart.draw_series(LineSeries::new([(x0, y0), (x0, y1)], axis));
        for (i, s) in series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let p: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.1.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(p.clone(), c.stroke_width(2)))
                .map_err(|e| Error::Invalid(format!("plot: {e}")))?;
            if p.len() <= 30 {
                let _ = chart.draw_series(p.iter().map(|q| Circle::new(*q, 3, c.filled())));
            }
        }
        root.present().map_err(|e| Error::Invalid(format!("plot: {e}")))?;
    }
    let _ = (plot_w, plot_h);
    for (px, py, text, is_x) in &tick_px {
        let w = text.len() as i32 * 8;
        if *is_x {
            draw_text(&mut buf, px - w / 2, py + 6, text, 1);
        } else {
            draw_text(&mut buf, px - w - 6, py - 4, text, 1);
        }
    }
    draw_text(&mut buf, (W as i32 - title.len() as i32 * 16) / 2, 8, title, 2);
    draw_text(
        &mut buf,
        (W as i32 - x_label.len() as i32 * 8) / 2,
        H as i32 - 24,
        x_label,
        1,
    );
    draw_text(&mut buf, 4, 24, y_label, 1);
    for (i, s) in series.iter().enumerate() {
        let (lx, ly) = (W as i32 - 240, 48 + i as i32 * 16);
        let c = COLORS[i % COLORS.len()];
        for dy in 0..4 {
            for dx in 0..20 {
                let o = (((ly + 2 + dy) as u32 * W + (lx + dx) as u32) * 3) as usize;
                buf[o..o + 3].copy_from_slice(&[c.0, c.1, c.2]);
            }
        }
        draw_text(&mut buf, lx + 26, ly, &s.name, 1);
    }
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, W, H);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| Error::Invalid(format!("png: {e}")))?;
        w.write_image_data(&buf)
            .map_err(|e| Error::Invalid(format!("png: {e}")))?;
    }
    fsutil::write_atomic(path, &png_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 40.0, 8),
            vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0]
        );
        let t = ticks(1.62, 1.75, 6);
        assert!(
            t[0] >= 1.62 && *t.last().unwrap() <= 1.75 + 1e-9 && t.len() >= 3,
            "{t:?}"
        );
    }

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let s = vec![
            Series {
                name: "train".into(),
                points: (1..=40).map(|i| (i as f64, 2.0 / (i as f64).sqrt())).collect(),
            },
            Series {
                name: "held-out".into(),
                points: vec![(0.0, 1.8), (20.0, 1.7), (40.0, 1.65)],
            },
        ];
        line_chart(&p, "loss", "step", "loss", &s).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(line_chart(&p, "x", "x", "y", &[]).is_err());
    }
}
