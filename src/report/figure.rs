//! The physical size of the report figures. In: a figure laid out in units of 1/96 inch (the
//! CSS pixel, which is what an SVG's `width` and `height` mean) and a drawing of it that takes
//! a [`Scale`]; out: `<name>.svg` at that size (scale 1, as before) and `<name>.png`, the same
//! figure at the same physical size rendered at [`PNG_DPI`] (every size, from the canvas to
//! fonts, line widths, markers, margins and the legend strip, times 300 / 96 = 3.125), with
//! its resolution recorded in the PNG's `pHYs` chunk. A layout unit is 0.75 pt, so a 14-unit
//! legend font is 10.5 pt and a 584-unit-wide figure is 6.08 inches wide.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::util::write_bytes_atomic;

/// The resolution of the PNG figures, dots per inch.
pub const PNG_DPI: u32 = 300;
/// Layout units per inch: the CSS pixel, an SVG's own unit.
pub const UNITS_PER_INCH: u32 = 96;

/// How many device pixels one layout unit takes on a backend.
#[derive(Clone, Copy, Debug)]
pub struct Scale(f64);

impl Scale {
    /// The SVG: one unit, one pixel.
    pub const SVG: Scale = Scale(1.0);
    /// The PNG at [`PNG_DPI`].
    pub const PNG: Scale = Scale(PNG_DPI as f64 / UNITS_PER_INCH as f64);

    /// A length or position of `v` units, in pixels.
    pub fn px(self, v: i32) -> i32 {
        (f64::from(v) * self.0).round() as i32
    }

    /// An unsigned length of `v` units, in pixels.
    pub fn upx(self, v: u32) -> u32 {
        (f64::from(v) * self.0).round() as u32
    }

    /// A line width of `w` units, in pixels (at least one).
    pub fn stroke(self, w: u32) -> u32 {
        self.upx(w).max(1)
    }

    /// The bundled sans-serif font at `size` units.
    pub fn font(self, size: f64) -> FontDesc<'static> {
        ("sans-serif", size * self.0).into_font()
    }

    /// A canvas of `size` units, in pixels.
    pub fn canvas(self, (w, h): (u32, u32)) -> (u32, u32) {
        (self.upx(w), self.upx(h))
    }
}

/// A figure that can be drawn at any scale on any plotters backend.
pub(crate) trait Figure {
    /// Draws the whole figure onto `root` at scale `s` and presents it.
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>, s: Scale) -> Result<()>;
}

/// Writes `<name>.png` (at [`PNG_DPI`], with its `pHYs` chunk) and `<name>.svg` of `fig`, laid
/// out at `size` units, into `dir`; returns the two file names.
pub(crate) fn write_figure(
    dir: &Path,
    name: &str,
    size: (u32, u32),
    fig: &impl Figure,
) -> Result<[String; 2]> {
    let (png, svg) = (format!("{name}.png"), format!("{name}.svg"));
    let png_path = dir.join(&png);
    fig.draw(
        BitMapBackend::new(&png_path, Scale::PNG.canvas(size)).into_drawing_area(),
        Scale::PNG,
    )?;
    stamp_dpi(&png_path, PNG_DPI)?;
    fig.draw(
        SVGBackend::new(&dir.join(&svg), size).into_drawing_area(),
        Scale::SVG,
    )?;
    Ok([png, svg])
}

/// The end of a PNG's signature (8 bytes) and header chunk (length, type, 13 bytes, CRC).
const AFTER_IHDR: usize = 8 + 4 + 4 + 13 + 4;

/// Records `dpi` in the PNG file at `path`: a `pHYs` chunk (pixels per metre, both axes) right
/// after the header chunk, where the PNG specification puts it (before the image data).
pub fn stamp_dpi(path: &Path, dpi: u32) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    if bytes.len() < AFTER_IHDR || &bytes[12..16] != b"IHDR" {
        return Err(Error::Invalid(format!(
            "{}: not a PNG file with a header chunk",
            path.display()
        )));
    }
    let ppm = (f64::from(dpi) / 0.0254).round() as u32;
    let mut body = b"pHYs".to_vec();
    body.extend(ppm.to_be_bytes());
    body.extend(ppm.to_be_bytes());
    body.push(1); // the unit is the metre
    let mut out = Vec::with_capacity(bytes.len() + 21);
    out.extend(&bytes[..AFTER_IHDR]);
    out.extend(9u32.to_be_bytes());
    out.extend(&body);
    out.extend(crc32(&body).to_be_bytes());
    out.extend(&bytes[AFTER_IHDR..]);
    write_bytes_atomic(path, &out)
}

/// The CRC-32 of `bytes` (ISO-HDLC, the one PNG chunks carry).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_known_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        // The IEND chunk every PNG ends with.
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn the_png_scale_is_300_over_96() {
        assert_eq!(Scale::PNG.canvas((584, 396)), (1825, 1238));
        assert_eq!(Scale::SVG.canvas((584, 396)), (584, 396));
        assert_eq!(Scale::PNG.stroke(1), 3);
        assert_eq!(Scale::SVG.stroke(0), 1);
    }
}
