//! A PNG of the training curves (training loss per step, held-out loss, the bare model's and the
//! teacher's levels as horizontal lines, with labelled axes and a legend), drawn without any
//! plotting or font dependency: lines and a small bitmap font on an RGB buffer, written as a PNG
//! with stored (uncompressed) deflate blocks. The JSONL file next to it carries the numbers.
//!
//! Colours: training loss blue, held-out loss red (with dots), bare model grey, teacher green.
//!
//! [`render_scatter`] draws labelled points on labelled axes (an evaluation's quality against KV
//! memory per mode), with the small bitmap font of [`font`].

mod font;

use std::path::Path;

use cartridge_formats::atomic::write_atomic;

use crate::error::{Error, Result};

const W: usize = 800;
const H: usize = 480;

const BLUE: [u8; 3] = [31, 119, 180];
const RED: [u8; 3] = [214, 39, 40];
const GREY: [u8; 3] = [140, 140, 140];
const GREEN: [u8; 3] = [44, 160, 44];
const BLACK: [u8; 3] = [0, 0, 0];

/// The curves to draw.
#[derive(Debug, Clone, Default)]
pub struct Curves {
    /// `(step, loss)` of training steps.
    pub train: Vec<(f64, f64)>,
    /// `(step, loss)` of held-out evaluations.
    pub eval: Vec<(f64, f64)>,
    /// The bare model's held-out loss.
    pub bare: Option<f64>,
    /// The teacher's own loss.
    pub teacher: Option<f64>,
}

impl Curves {
    /// Read the curves from a metrics JSONL file written by the trainer.
    pub fn from_jsonl(text: &str) -> Self {
        let mut c = Curves::default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
            let (Some(step), Some(loss)) = (num("step"), num("loss")) else {
                continue;
            };
            match v.get("event").and_then(|e| e.as_str()) {
                Some("step") => c.train.push((step, loss)),
                Some("eval") => {
                    c.eval.push((step, loss));
                    c.bare = num("bare_loss").or(c.bare);
                    c.teacher = num("teacher_loss").or(c.teacher);
                }
                _ => {}
            }
        }
        c
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham line, 2 px thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn dot(&mut self, (x, y): (i64, i64), c: [u8; 3]) {
        for dx in -2..=2 {
            for dy in -2..=2 {
                self.set(x + dx, y + dy, c);
            }
        }
    }

    /// `text` with its top-left corner at `(x, y)`, one glyph column per pixel.
    fn text(&mut self, (x, y): (i64, i64), text: &str, c: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let x0 = x + (i * TEXT_ADVANCE) as i64;
            for (row, bits) in font::glyph(ch).iter().enumerate() {
                for col in 0..font::GLYPH_W {
                    if bits & (1 << (font::GLYPH_W - 1 - col)) != 0 {
                        self.set(x0 + col as i64, y + row as i64, c);
                    }
                }
            }
        }
    }
}

/// Pixels from one character to the next.
const TEXT_ADVANCE: usize = font::GLYPH_W + 1;

/// Width in pixels of `text` drawn by [`Canvas::text`].
fn text_width(text: &str) -> usize {
    text.chars().count() * TEXT_ADVANCE
}

/// Render the curves as PNG bytes: labelled axes with ticks, a title, and a legend.
pub fn render(c: &Curves) -> Vec<u8> {
    let mut canvas = Canvas::new();
    let ys = c
        .train
        .iter()
        .chain(&c.eval)
        .map(|p| p.1)
        .chain(c.bare)
        .chain(c.teacher)
        .filter(|y| y.is_finite());
    let (lo, hi) = padded_range(ys);
    let x_hi = c
        .train
        .iter()
        .chain(&c.eval)
        .map(|p| p.0)
        .fold(1f64, f64::max);
    let frame = Frame {
        x: (0.0, x_hi),
        y: (lo, hi),
    };
    frame.draw_axes(
        &mut canvas,
        "training: loss per target token",
        "optimiser step",
        "loss",
    );
    for (level, colour) in [(c.bare, GREY), (c.teacher, GREEN)] {
        if let Some(y) = level.filter(|y| y.is_finite()) {
            canvas.line(frame.at(0.0, y), frame.at(x_hi, y), colour);
        }
    }
    for (series, colour) in [(&c.train, BLUE), (&c.eval, RED)] {
        let pts: Vec<(i64, i64)> = series
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| frame.at(x, y))
            .collect();
        for w in pts.windows(2) {
            canvas.line(w[0], w[1], colour);
        }
        if colour == RED {
            for &p in &pts {
                canvas.dot(p, colour);
            }
        }
    }
    // Legend, top right inside the plot area.
    let (_, top, right, _) = SCATTER_BOX;
    let entries = [
        ("training batch", BLUE),
        ("held-out", RED),
        ("bare model", GREY),
        ("teacher (in context)", GREEN),
    ];
    let width = entries
        .iter()
        .map(|(t, _)| text_width(t))
        .max()
        .unwrap_or(0) as i64
        + 24;
    for (i, (text, colour)) in entries.iter().enumerate() {
        let y = top as i64 + 8 + 14 * i as i64;
        let x = right as i64 - width;
        canvas.line((x, y + 3), (x + 14, y + 3), *colour);
        canvas.text((x + 20, y), text, *colour);
    }
    encode_png(&canvas.px, W, H)
}

/// Value ranges mapped onto the plot area [`SCATTER_BOX`].
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn at(&self, x: f64, y: f64) -> (i64, i64) {
        let (left, top, right, bottom) = SCATTER_BOX;
        let (left, top, right, bottom) = (left as f64, top as f64, right as f64, bottom as f64);
        let fx = (x - self.x.0) / (self.x.1 - self.x.0);
        let fy = (y - self.y.0) / (self.y.1 - self.y.0);
        (
            (left + fx * (right - left)).round() as i64,
            (bottom - fy * (bottom - top)).round() as i64,
        )
    }

    /// Axes, ticks with their values, axis labels and the title.
    fn draw_axes(&self, canvas: &mut Canvas, title: &str, x_label: &str, y_label: &str) {
        let (left, top, right, bottom) = SCATTER_BOX;
        let (left, top, right, bottom) = (left as i64, top as i64, right as i64, bottom as i64);
        canvas.line((left, bottom), (right, bottom), BLACK);
        canvas.line((left, top), (left, bottom), BLACK);
        let glyph_h = font::GLYPH_H as i64;
        for i in 0..TICKS {
            let f = i as f64 / (TICKS - 1) as f64;
            let xv = self.x.0 + f * (self.x.1 - self.x.0);
            let yv = self.y.0 + f * (self.y.1 - self.y.0);
            let (tx, _) = self.at(xv, self.y.0);
            canvas.line((tx, bottom), (tx, bottom + 4), BLACK);
            let label = tick_text(xv);
            canvas.text(
                (tx - text_width(&label) as i64 / 2, bottom + 8),
                &label,
                BLACK,
            );
            let (_, ty) = self.at(self.x.0, yv);
            canvas.line((left - 4, ty), (left, ty), BLACK);
            let label = tick_text(yv);
            canvas.text(
                (left - 8 - text_width(&label) as i64, ty - glyph_h / 2),
                &label,
                BLACK,
            );
        }
        let x_mid = (left + right) / 2;
        canvas.text(
            (x_mid - text_width(x_label) as i64 / 2, bottom + 28),
            x_label,
            BLACK,
        );
        canvas.text((8, top - 16), y_label, BLACK);
        canvas.text((x_mid - text_width(title) as i64 / 2, 8), title, BLACK);
    }
}

/// One labelled point of a scatter plot.
#[derive(Debug, Clone, PartialEq)]
pub struct ScatterPoint {
    /// Drawn next to the point.
    pub label: String,
    /// Horizontal value.
    pub x: f64,
    /// Vertical value.
    pub y: f64,
}

/// A scatter plot: labelled points on axes with a title and axis labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scatter {
    /// Above the plot.
    pub title: String,
    /// Under the horizontal axis.
    pub x_label: String,
    /// Above the vertical axis.
    pub y_label: String,
    /// The points (non-finite coordinates are left out).
    pub points: Vec<ScatterPoint>,
}

/// Point colours, in turn.
const PALETTE: [[u8; 3]; 6] = [BLUE, RED, GREEN, GREY, [148, 103, 189], [255, 127, 14]];
/// Plot area of a scatter: left, top, right, bottom edges in pixels (room for tick labels).
const SCATTER_BOX: (usize, usize, usize, usize) = (80, 40, W - 40, H - 50);
/// Ticks per axis (including both ends).
const TICKS: usize = 5;

/// A tick value as short text: up to 4 significant digits, no trailing zeros.
fn tick_text(v: f64) -> String {
    let digits = if v == 0.0 {
        0
    } else {
        (3 - v.abs().log10().floor() as i64).clamp(0, 6) as usize
    };
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `lo..hi` padded by 5% on each side (and widened around a single value).
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    // Padding does not push a range of non-negative values (sizes, counts) below zero.
    let padded_lo = lo - 0.05 * span;
    let padded_lo = if lo >= 0.0 {
        padded_lo.max(0.0)
    } else {
        padded_lo
    };
    (padded_lo, hi + 0.05 * span)
}

/// Render a scatter plot as PNG bytes.
pub fn render_scatter(s: &Scatter) -> Vec<u8> {
    let mut canvas = Canvas::new();
    let pts: Vec<&ScatterPoint> = s
        .points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite())
        .collect();
    let frame = Frame {
        x: padded_range(pts.iter().map(|p| p.x)),
        y: padded_range(pts.iter().map(|p| p.y)),
    };
    frame.draw_axes(&mut canvas, &s.title, &s.x_label, &s.y_label);
    let glyph_h = font::GLYPH_H as i64;
    for (i, p) in pts.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let (x, y) = frame.at(p.x, p.y);
        canvas.dot((x, y), colour);
        // Labels go right of the point, or left of it near the right edge.
        let w = text_width(&p.label) as i64;
        let lx = if x + 6 + w < W as i64 {
            x + 6
        } else {
            x - 6 - w
        };
        canvas.text((lx, y - glyph_h / 2), &p.label, colour);
    }
    encode_png(&canvas.px, W, H)
}

/// Render `scatter` into `png` (atomically).
pub fn write_scatter(scatter: &Scatter, png: &Path) -> Result<()> {
    write_atomic(png, &render_scatter(scatter)).map_err(|e| Error::io(png, e))
}

/// Render the metrics at `metrics` into `png` (atomically).
pub fn plot_metrics(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let bytes = render(&Curves::from_jsonl(&text));
    write_atomic(png, &bytes).map_err(|e| Error::io(png, e))
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit RGB PNG (filter 0 on every row, zlib with stored blocks).
fn encode_png(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (1 + 3 * w));
    for row in rgb.chunks(3 * w) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = b.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn renders_a_png_with_the_curves() {
        let text = r#"{"event":"eval","step":0,"loss":3.0,"bare_loss":4.0,"teacher_loss":1.0,"gap_closed":0.33}
{"event":"step","step":1,"loss":3.2}
{"event":"step","step":2,"loss":2.5}
{"event":"eval","step":2,"loss":2.0,"bare_loss":4.0,"teacher_loss":1.0,"gap_closed":0.66}"#;
        let c = Curves::from_jsonl(text);
        assert_eq!((c.train.len(), c.eval.len()), (2, 2));
        assert_eq!((c.bare, c.teacher), (Some(4.0), Some(1.0)));
        let png = render(&c);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
        // Red (held-out) pixels were drawn.
        let raw_has_red = png.windows(3).any(|w| w == RED);
        assert!(raw_has_red);
    }

    #[test]
    fn scatter_draws_labelled_points_and_axes() {
        let point = |label: &str, x: f64, y: f64| ScatterPoint {
            label: label.into(),
            x,
            y,
        };
        let s = Scatter {
            title: "quality vs kv memory".into(),
            x_label: "kv memory (mib)".into(),
            y_label: "answer log-likelihood".into(),
            points: vec![
                point("bare", 0.0, -3.0),
                point("icl", 90.0, -1.0),
                point("nan", f64::NAN, 0.0),
            ],
        };
        let mut canvas = Canvas::new();
        canvas.text((10, 10), "A", BLACK);
        // The glyph's top row (0x0E: .XXX.) sets columns 1 to 3 only.
        let px = |x: usize, y: usize| &canvas.px[(y * W + x) * 3..(y * W + x) * 3 + 3];
        assert_eq!(
            (px(10, 10), px(11, 10), px(13, 10), px(14, 10)),
            (&[255u8; 3][..], &BLACK[..], &BLACK[..], &[255u8; 3][..])
        );
        let png = render_scatter(&s);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // The first two points' colours were drawn (blue, red); no third colour for the NaN point.
        assert!(png.windows(3).any(|w| w == BLUE));
        assert!(png.windows(3).any(|w| w == RED));
        assert!(!png.windows(3).any(|w| w == GREEN));
        assert_eq!(tick_text(0.0), "0");
        assert_eq!(tick_text(-1.23456), "-1.235");
        assert_eq!(tick_text(90.0), "90");
        assert_eq!(tick_text(2.5e-5), "0.000025");
        assert_eq!(tick_text(1234567.0), "1234567");
    }
}
