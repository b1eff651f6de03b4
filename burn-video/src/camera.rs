//! Camera clips from still images and short animations: a virtual camera pans, zooms and turns
//! a little over the source (the way the public clips were made), with camera-like changes
//! (a mirrored view, exposure and contrast, sensor noise, defocus, the clip played backwards, a
//! faster camera as a lower frame rate would show it); and a corpus of such clips whose
//! manifest records each clip's source and split, so that whole sources can be held out.

use std::path::{Path, PathBuf};

use burn_parallel::rng::{Rng, name_key};
use serde::{Deserialize, Serialize};

use crate::clip::{Clip, read_image};
use crate::error::{Result, invalid, io};
use crate::metrics::Frame;

/// How clips are cut from a source.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    /// Side of the square frames, pixels.
    pub size: usize,
    /// Frames per clip.
    pub frames: usize,
    /// The window's side as a fraction of the source's shorter side, drawn in this range
    /// (crops at several scales).
    pub scale: (f64, f64),
    /// Largest pan over a clip, as a fraction of the window's side.
    pub pan: f64,
    /// Largest zoom over a clip: the window's side changes by a factor up to this (in or out).
    pub zoom: f64,
    /// Largest rotation over a clip, radians.
    pub rotation: f64,
    /// Camera-like changes (see the module docs).
    pub augment: bool,
}

impl Default for CameraConfig {
    /// 17 frames of 64 × 64, as the public clips.
    fn default() -> Self {
        Self {
            size: 64,
            frames: 17,
            scale: (0.25, 0.9),
            pan: 0.5,
            zoom: 1.3,
            rotation: 0.15,
            augment: true,
        }
    }
}

impl CameraConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.size < 4 {
            return Err(invalid("size", format!("{} is below 4 pixels", self.size)));
        }
        if self.frames == 0 {
            return Err(invalid("frames", "must be at least 1"));
        }
        let (lo, hi) = self.scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(invalid(
                "scale",
                format!("({lo}, {hi}) must satisfy 0 < low ≤ high ≤ 1"),
            ));
        }
        if !(self.pan >= 0.0 && self.pan.is_finite()) {
            return Err(invalid("pan", "must be a finite non-negative number"));
        }
        if !(self.zoom >= 1.0 && self.zoom.is_finite()) {
            return Err(invalid("zoom", "must be a finite number ≥ 1"));
        }
        if !(self.rotation >= 0.0 && self.rotation.is_finite()) {
            return Err(invalid("rotation", "must be a finite non-negative number"));
        }
        Ok(())
    }
}

/// The camera-like changes drawn for one clip.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Look {
    mirror: bool,
    brightness: f32,
    contrast: f32,
    noise: f32,
    defocus: bool,
    backwards: bool,
    speed: f64,
}

impl Look {
    fn draw(rng: &mut Rng, augment: bool) -> Self {
        let mut u = || rng.uniform();
        if !augment {
            return Self {
                mirror: false,
                brightness: 0.0,
                contrast: 1.0,
                noise: 0.0,
                defocus: false,
                backwards: false,
                speed: 1.0,
            };
        }
        Self {
            mirror: u() < 0.5,
            brightness: ((u() - 0.5) * 0.2) as f32,
            contrast: (0.8 + 0.4 * u()) as f32,
            noise: if u() < 0.5 { (0.02 * u()) as f32 } else { 0.0 },
            defocus: u() < 0.25,
            backwards: u() < 0.5,
            speed: if u() < 0.3 { 2.0 } else { 1.0 },
        }
    }
}

/// The value of channel `c` at `(x, y)` (pixel centres at integer + 0.5), bilinear, clamped
/// at the borders.
fn bilinear(frame: &Frame, x: f64, y: f64, c: usize) -> f32 {
    let (w, h, ch) = frame.size();
    let px = frame.pixels();
    let fx = (x - 0.5).clamp(0.0, (w - 1) as f64);
    let fy = (y - 0.5).clamp(0.0, (h - 1) as f64);
    let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (ax, ay) = ((fx - x0 as f64) as f32, (fy - y0 as f64) as f32);
    let at = |x: usize, y: usize| px[(y * w + x) * ch + c];
    let top = at(x0, y0) * (1.0 - ax) + at(x1, y0) * ax;
    let bottom = at(x0, y1) * (1.0 - ax) + at(x1, y1) * ax;
    top * (1.0 - ay) + bottom * ay
}

/// A 3 × 3 box blur (defocus), borders clamped.
fn defocus(frame: &[f32], size: usize) -> Vec<f32> {
    let mut out = vec![0.0; frame.len()];
    for y in 0..size {
        for x in 0..size {
            for c in 0..3 {
                let mut sum = 0.0;
                for dy in [-1i64, 0, 1] {
                    for dx in [-1i64, 0, 1] {
                        let yy = (y as i64 + dy).clamp(0, size as i64 - 1) as usize;
                        let xx = (x as i64 + dx).clamp(0, size as i64 - 1) as usize;
                        sum += frame[(yy * size + xx) * 3 + c];
                    }
                }
                out[(y * size + x) * 3 + c] = sum / 9.0;
            }
        }
    }
    out
}

/// One clip of `config` from `source` (one frame for a still image; an animation's frames are
/// played in order from a frame drawn at random, looping): the window's centre moves along a
/// straight line, its side changes geometrically and it turns at a constant rate; the window
/// always stays inside the source. Where the window is larger than the frame, 2 × 2 samples per
/// pixel are averaged.
pub fn camera_clip(source: &[Frame], config: &CameraConfig, rng: &mut Rng) -> Result<Clip> {
    config.validate()?;
    let first = source
        .first()
        .ok_or_else(|| invalid("source", "has no frame"))?;
    let (w, h, channels) = first.size();
    if channels != 3 || source.iter().any(|f| f.size() != (w, h, 3)) {
        return Err(invalid("source", "frames must be RGB and all of one size"));
    }
    let look = Look::draw(rng, config.augment);
    let short = w.min(h) as f64;
    let span = |lo: f64, hi: f64, u: f64| lo + (hi - lo) * u;
    // Sides at the start and the end; the rotated window must fit: its half-diagonal bounds
    // the margin.
    let mut side0 = short * span(config.scale.0, config.scale.1, rng.uniform());
    let zoom = config.zoom.ln() * (2.0 * rng.uniform() - 1.0);
    let mut side1 = side0 * zoom.exp();
    let fit = short / std::f64::consts::SQRT_2;
    let largest = side0.max(side1);
    if largest > fit {
        side0 *= fit / largest;
        side1 *= fit / largest;
    }
    let margin = side0.max(side1) * std::f64::consts::SQRT_2 / 2.0;
    // (Rounding can put the bounds a hair apart the wrong way when the window just fits.)
    let (lo_x, hi_x) = (
        margin.min(w as f64 / 2.0),
        (w as f64 - margin).max(w as f64 / 2.0),
    );
    let (lo_y, hi_y) = (
        margin.min(h as f64 / 2.0),
        (h as f64 - margin).max(h as f64 / 2.0),
    );
    let c0 = (
        span(lo_x, hi_x, rng.uniform()),
        span(lo_y, hi_y, rng.uniform()),
    );
    let direction = 2.0 * std::f64::consts::PI * rng.uniform();
    let distance = config.pan * side0 * look.speed * rng.uniform();
    let c1 = (
        (c0.0 + distance * direction.cos()).clamp(lo_x, hi_x),
        (c0.1 + distance * direction.sin()).clamp(lo_y, hi_y),
    );
    // An animation starts anywhere in it (a still image draws nothing here).
    let start = if source.len() > 1 {
        rng.below(source.len())
    } else {
        0
    };
    let angle0 = config.rotation * (rng.uniform() - 0.5);
    let turn = config.rotation * look.speed * (2.0 * rng.uniform() - 1.0);
    let n = config.size;
    let last = (config.frames.max(2) - 1) as f64;
    let mut frames = Vec::with_capacity(config.frames);
    for k in 0..config.frames {
        let t = k as f64 / last;
        let (cx, cy) = (c0.0 + t * (c1.0 - c0.0), c0.1 + t * (c1.1 - c0.1));
        let side = side0 * (side1 / side0).powf(t);
        let angle = angle0 + t * turn;
        let (cos, sin) = (angle.cos(), angle.sin());
        let src = &source[(start + (k as f64 * look.speed) as usize) % source.len()];
        let sub = if side > 1.5 * n as f64 { 2 } else { 1 };
        let mut px = vec![0f32; n * n * 3];
        for i in 0..n {
            for j in 0..n {
                for c in 0..3 {
                    let mut sum = 0.0;
                    for si in 0..sub {
                        for sj in 0..sub {
                            let u = (j as f64 + (sj as f64 + 0.5) / sub as f64) / n as f64 - 0.5;
                            let v = (i as f64 + (si as f64 + 0.5) / sub as f64) / n as f64 - 0.5;
                            let u = if look.mirror { -u } else { u };
                            let x = cx + side * (u * cos - v * sin);
                            let y = cy + side * (u * sin + v * cos);
                            sum += bilinear(src, x, y, c);
                        }
                    }
                    px[(i * n + j) * 3 + c] = sum / (sub * sub) as f32;
                }
            }
        }
        if look.defocus {
            px = defocus(&px, n);
        }
        for p in &mut px {
            let noise = if look.noise > 0.0 {
                look.noise * rng.normal() as f32
            } else {
                0.0
            };
            *p = ((*p - 0.5) * look.contrast + 0.5 + look.brightness + noise).clamp(0.0, 1.0);
        }
        frames.push(Frame::new(n, n, 3, px)?);
    }
    if look.backwards {
        frames.reverse();
    }
    Clip::new(frames)
}

/// A source of a corpus: its name (the file stem) and its frames (one for a still image).
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// The file stem, which names the source in the manifest.
    pub name: String,
    /// Its frames.
    pub frames: Vec<Frame>,
}

/// Image extensions read by [`read_sources`] (GIFs may be animated).
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "gif"];

/// Every image of `dir` (PNG, JPEG, GIF; sorted by name), as sources named by their file stem.
/// Grey images are made RGB; an animated GIF keeps every frame.
pub fn read_sources(dir: &Path) -> Result<Vec<Source>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(invalid(
            "sources",
            format!("{}: no PNG, JPEG or GIF image", dir.display()),
        ));
    }
    let mut sources = Vec::with_capacity(paths.len());
    for path in paths {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let frames = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gif"))
        {
            Clip::read_gif(&path)?.frames().to_vec()
        } else {
            vec![read_image(&path)?]
        };
        sources.push(Source { name, frames });
    }
    Ok(sources)
}

/// Which part of a corpus a clip belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training.
    Train,
    /// Held out: every clip of a held-out source.
    Holdout,
}

/// One clip of a corpus, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusEntry {
    /// The clip's folder, relative to the corpus.
    pub clip: String,
    /// The source it was cut from.
    pub source: String,
    /// Its split.
    pub split: Split,
}

/// The manifest's file name in a corpus folder.
pub const MANIFEST: &str = "corpus.jsonl";

/// Writes a corpus into the new folder `out`: `per_source` clips of every source
/// (`clip_NNNN/frame_MMM.png`, sources in order) and the manifest [`MANIFEST`], one JSON line
/// per clip with its source and split; the sources named in `holdout` are held out whole.
/// Seeded: the same call writes the same corpus, and a source's clips depend only on the seed,
/// its name and its frames, so adding or removing other sources leaves them as they were (and a
/// larger `per_source` adds clips after the same first ones).
/// Everything is written into a temporary folder renamed into place at the end, so a failure
/// leaves nothing behind.
pub fn build_corpus(
    sources: &[Source],
    out: &Path,
    holdout: &[String],
    (per_source, seed): (usize, u64),
    config: &CameraConfig,
) -> Result<Vec<CorpusEntry>> {
    config.validate()?;
    if per_source == 0 {
        return Err(invalid("per_source", "must be at least 1"));
    }
    if let Some(missing) = holdout
        .iter()
        .find(|h| !sources.iter().any(|s| &s.name == *h))
    {
        return Err(invalid(
            "holdout",
            format!("no source is named `{missing}`"),
        ));
    }
    if out.exists() {
        return Err(invalid(
            "out",
            format!("{} exists: a corpus goes into a new folder", out.display()),
        ));
    }
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let mut entries = Vec::with_capacity(sources.len() * per_source);
    let written = (|| {
        for source in sources {
            // One stream per source, seeded by its name: a source's clips do not depend on the
            // other sources, nor on its place among them.
            let mut rng = Rng::new(seed ^ name_key(&source.name));
            let split = if holdout.contains(&source.name) {
                Split::Holdout
            } else {
                Split::Train
            };
            for _ in 0..per_source {
                let clip = camera_clip(&source.frames, config, &mut rng)?;
                let name = format!("clip_{:04}", entries.len());
                clip.write_dir(&tmp.join(&name))?;
                entries.push(CorpusEntry {
                    clip: name,
                    source: source.name.clone(),
                    split,
                });
            }
        }
        let lines: String = entries
            .iter()
            .map(|e| serde_json::to_string(e).map(|l| l + "\n"))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| invalid("manifest", e.to_string()))?;
        std::fs::write(tmp.join(MANIFEST), lines).map_err(|e| io(tmp.join(MANIFEST), e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| io(out, e))?;
    Ok(entries)
}

/// The manifest of a corpus folder, or `None` for a plain folder of clips.
pub fn read_corpus(dir: &Path) -> Result<Option<Vec<CorpusEntry>>> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| crate::error::VideoError::Decode {
                path: path.clone(),
                reason: format!("line {}: {e}", i + 1),
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 96 × 80 source with a smooth pattern (so bilinear sampling is close to exact).
    fn source() -> Frame {
        let (w, h) = (96, 80);
        let px = (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    let (x, y) = (x as f32 + 0.5, y as f32 + 0.5);
                    [x / w as f32, y / h as f32, 0.5]
                })
            })
            .collect();
        Frame::new(w, h, 3, px).unwrap()
    }

    #[test]
    fn a_still_camera_without_changes_crops_the_source() {
        // No pan, zoom or turn, window = 32 pixels of the source for 32 output pixels: every
        // pixel is the source's at the window's position (a linear ramp, sampled exactly).
        let config = CameraConfig {
            size: 32,
            frames: 3,
            scale: (0.4, 0.4),
            pan: 0.0,
            zoom: 1.0,
            rotation: 0.0,
            augment: false,
        };
        let clip = camera_clip(&[source()], &config, &mut Rng::new(3)).unwrap();
        assert_eq!(clip.len(), 3);
        let f = &clip.frames()[0];
        assert_eq!(f.size(), (32, 32, 3));
        assert_eq!(clip.frames()[1], *f);
        // Red rises by 1/96 per pixel to the right, green by 1/80 per pixel down.
        let px = f.pixels();
        let (r0, r1) = (px[0], px[3]);
        let g1 = px[32 * 3 + 1];
        assert!(((r1 - r0) - 1.0 / 96.0).abs() < 1e-5, "{r0} {r1}");
        assert!(((g1 - px[1]) - 1.0 / 80.0).abs() < 1e-5);
        // The window lies inside the source.
        assert!(r0 > 0.0 && px[(31 * 32 + 31) * 3] < 1.0);
    }

    #[test]
    fn an_animation_plays_in_order_from_a_drawn_frame_and_loops() {
        // Frame k of the source is uniformly k / 10; no augmentation, so one source frame per
        // clip frame.
        let n = 10;
        let frames: Vec<Frame> = (0..n)
            .map(|k| Frame::new(40, 40, 3, vec![k as f32 / n as f32; 40 * 40 * 3]).unwrap())
            .collect();
        let config = CameraConfig {
            size: 8,
            frames: 12,
            augment: false,
            ..CameraConfig::default()
        };
        let mut starts = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let clip = camera_clip(&frames, &config, &mut Rng::new(seed)).unwrap();
            let index: Vec<usize> = clip
                .frames()
                .iter()
                .map(|f| (f.pixels()[0] * n as f32).round() as usize)
                .collect();
            for (a, b) in index.iter().zip(&index[1..]) {
                assert_eq!(*b, (a + 1) % n, "{index:?}");
            }
            starts.insert(index[0]);
        }
        assert!(starts.len() >= 5, "clips start at {starts:?}");
    }

    #[test]
    fn a_moving_camera_stays_inside_the_source_and_repeats_with_its_seed() {
        let config = CameraConfig::default();
        let a = camera_clip(&[source()], &config, &mut Rng::new(11)).unwrap();
        let b = camera_clip(&[source()], &config, &mut Rng::new(11)).unwrap();
        assert_eq!(a, b);
        let c = camera_clip(&[source()], &config, &mut Rng::new(12)).unwrap();
        assert_ne!(a, c);
        assert_eq!(a.len(), 17);
        assert_eq!(a.size(), (64, 64));
        // A window that just fits a square source (its bounds meet) is no error.
        let square = Frame::new(40, 40, 3, vec![0.5; 40 * 40 * 3]).unwrap();
        let full = CameraConfig {
            scale: (1.0, 1.0),
            ..CameraConfig::default()
        };
        for seed in 0..20 {
            camera_clip(std::slice::from_ref(&square), &full, &mut Rng::new(seed)).unwrap();
        }
        let bad = CameraConfig {
            scale: (0.5, 0.2),
            ..CameraConfig::default()
        };
        let err = camera_clip(&[source()], &bad, &mut Rng::new(1)).unwrap_err();
        assert!(err.to_string().contains("`scale`"), "{err}");
    }

    #[test]
    fn a_corpus_holds_out_whole_sources_and_writes_nothing_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let sources: Vec<Source> = ["a", "b", "c"]
            .iter()
            .map(|n| Source {
                name: n.to_string(),
                frames: vec![source()],
            })
            .collect();
        let config = CameraConfig {
            size: 16,
            frames: 5,
            ..CameraConfig::default()
        };
        let out = dir.path().join("corpus");
        let bad = build_corpus(&sources, &out, &["z".to_string()], (2, 7), &config).unwrap_err();
        assert!(bad.to_string().contains("`holdout`"), "{bad}");
        assert!(!out.exists());
        let entries = build_corpus(&sources, &out, &["b".to_string()], (2, 7), &config).unwrap();
        assert_eq!(entries.len(), 6);
        assert_eq!(read_corpus(&out).unwrap().unwrap(), entries);
        for e in &entries {
            assert_eq!(e.split == Split::Holdout, e.source == "b", "{e:?}");
            assert_eq!(Clip::read(&out.join(&e.clip)).unwrap().len(), 5);
        }
        assert!(read_corpus(dir.path()).unwrap().is_none());
        // The VAE's split follows the manifest: every clip of `b` held out, none trained on,
        // whatever `holdout_every` says.
        let (train, held) = crate::vae_training::split_clips(&out, 2).unwrap();
        let of = |split: Split| -> Vec<Clip> {
            entries
                .iter()
                .filter(|e| e.split == split)
                .map(|e| Clip::read(&out.join(&e.clip)).unwrap())
                .collect()
        };
        assert_eq!(held, of(Split::Holdout));
        assert_eq!(train, of(Split::Train));
        assert!(train.iter().all(|c| !held.contains(c)));
        let groups = crate::vae_training::held_out_sources(&out)
            .unwrap()
            .unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].0, "b");
        assert_eq!(groups[0].1, held);
        let again = build_corpus(&sources, &out, &[], (2, 7), &config).unwrap_err();
        assert!(again.to_string().contains("`out`"), "{again}");
    }

    #[test]
    fn a_sources_clips_do_not_change_with_the_other_sources() {
        let dir = tempfile::tempdir().unwrap();
        let named = |n: &str| Source {
            name: n.to_string(),
            frames: vec![source()],
        };
        let config = CameraConfig {
            size: 16,
            frames: 5,
            ..CameraConfig::default()
        };
        let clips_of = |sources: &[Source], folder: &str, name: &str| -> Vec<Clip> {
            let out = dir.path().join(folder);
            build_corpus(sources, &out, &[], (3, 7), &config)
                .unwrap()
                .iter()
                .filter(|e| e.source == name)
                .map(|e| Clip::read(&out.join(&e.clip)).unwrap())
                .collect()
        };
        let alone = clips_of(&[named("b")], "alone", "b");
        let second = clips_of(&[named("a"), named("b")], "second", "b");
        assert_eq!(alone.len(), 3);
        assert_eq!(alone, second);
        // Same image under another name: other clips.
        let other = clips_of(&[named("c")], "other", "c");
        assert_ne!(alone, other);
    }
}
