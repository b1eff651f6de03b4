//! Clips: RGB frames with values in `[0, 1]`, read from folders of PNG frames
//! (`clip_NNNN/frame_MMM.png`) or animated GIFs, written as PNG folders or GIF previews.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::codecs::gif::{GifDecoder, GifEncoder, Repeat};
use image::{AnimationDecoder, Delay, RgbImage, RgbaImage};

use crate::error::{Result, VideoError, invalid, io};
use crate::metrics::Frame;

/// A clip: at least one RGB frame, all of one size, values in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    frames: Vec<Frame>,
}

fn decode(path: &Path, e: impl std::fmt::Display) -> VideoError {
    VideoError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn from_rgb(img: &RgbImage) -> Result<Frame> {
    let (w, h) = img.dimensions();
    let pixels = img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    Ok(Frame::new(w as usize, h as usize, 3, pixels)?)
}

fn to_rgb(frame: &Frame) -> RgbImage {
    let (w, h, _) = frame.size();
    let raw = frame
        .pixels()
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, raw).unwrap_or_else(|| RgbImage::new(w as u32, h as u32))
}

/// One image file (PNG, JPEG, a GIF's first frame, …) as an RGB frame; grey images are made RGB.
pub fn read_image(path: &Path) -> Result<Frame> {
    let img = image::open(path).map_err(|e| decode(path, e))?.to_rgb8();
    from_rgb(&img)
}

/// Video file extensions (read through FFmpeg with the `ffmpeg` feature).
const VIDEO_EXTENSIONS: &[&str] = &["mp4", "mkv", "mov", "avi", "webm", "m4v"];

fn is_video_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| VIDEO_EXTENSIONS.iter().any(|v| e.eq_ignore_ascii_case(v)))
}

/// Writes `bytes` through a temporary file renamed into place (nothing half-written).
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

impl Clip {
    /// A clip from frames of one size with 3 channels.
    pub fn new(frames: Vec<Frame>) -> Result<Self> {
        let first = frames
            .first()
            .ok_or_else(|| invalid("frames", "a clip needs at least one frame"))?
            .size();
        if first.2 != 3 {
            return Err(invalid(
                "frames",
                format!("frames need 3 channels, got {}", first.2),
            ));
        }
        if let Some((i, f)) = frames.iter().enumerate().find(|(_, f)| f.size() != first) {
            return Err(invalid(
                "frames",
                format!("frame {i} is {:?}, frame 0 is {first:?}", f.size()),
            ));
        }
        Ok(Self { frames })
    }

    /// The frames.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether the clip has no frames (never: a clip has at least one).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// `(width, height)`.
    pub fn size(&self) -> (usize, usize) {
        let (w, h, _) = self.frames[0].size();
        (w, h)
    }

    /// Encodes the clip at `fps` frames per second into `path` (MP4, MKV, …: the container
    /// from the extension) through FFmpeg, written to a temporary file renamed into place.
    #[cfg(feature = "ffmpeg")]
    pub fn write_video(&self, path: &Path, fps: u32) -> Result<()> {
        crate::ffmpeg::write_frames(&self.frames, path, fps)
    }

    /// The first `n` frames (all when the clip is shorter).
    pub fn trim(&self, n: usize) -> Self {
        Self {
            frames: self.frames[..n.clamp(1, self.frames.len())].to_vec(),
        }
    }

    /// Reads a clip: a folder of PNG frames (sorted by name) or an animated GIF.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::read_dir(path)
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gif"))
        {
            Self::read_gif(path)
        } else if is_video_file(path) {
            #[cfg(feature = "ffmpeg")]
            {
                Self::new(crate::ffmpeg::read_frames(path)?)
            }
            #[cfg(not(feature = "ffmpeg"))]
            Err(decode(
                path,
                "reading video files needs burn-video's `ffmpeg` feature",
            ))
        } else {
            Err(decode(
                path,
                "not a folder of PNG frames, a .gif or a video file (mp4, mkv, mov, avi, webm, m4v)",
            ))
        }
    }

    /// Reads the `*.png` frames of a folder, in file-name order.
    pub fn read_dir(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(decode(dir, "no PNG frames"));
        }
        let frames = files
            .iter()
            .map(|f| read_image(f))
            .collect::<Result<Vec<_>>>()?;
        Self::new(frames).map_err(|e| decode(dir, e))
    }

    /// Reads every frame of an animated GIF (composited, as a viewer shows them).
    pub fn read_gif(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| io(path, e))?;
        let decoder = GifDecoder::new(BufReader::new(file)).map_err(|e| decode(path, e))?;
        let frames = decoder
            .into_frames()
            .collect_frames()
            .map_err(|e| decode(path, e))?
            .into_iter()
            .map(|f| {
                let rgb = image::DynamicImage::ImageRgba8(f.into_buffer()).to_rgb8();
                from_rgb(&rgb)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(frames).map_err(|e| decode(path, e))
    }

    /// Writes the frames as `frame_000.png`, … into `dir` (created).
    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        for (i, f) in self.frames.iter().enumerate() {
            let path = dir.join(format!("frame_{i:03}.png"));
            write_atomic(&path, |tmp| {
                to_rgb(f)
                    .save_with_format(tmp, image::ImageFormat::Png)
                    .map_err(|e| io(tmp, e))
            })?;
        }
        Ok(())
    }

    /// Writes an animated GIF that loops, `delay_ms` per frame.
    pub fn write_gif(&self, path: &Path, delay_ms: u32) -> Result<()> {
        write_atomic(path, |tmp| {
            let file = File::create(tmp).map_err(|e| io(tmp, e))?;
            let mut encoder = GifEncoder::new_with_speed(file, 10);
            encoder
                .set_repeat(Repeat::Infinite)
                .map_err(|e| io(tmp, e))?;
            let frames = self.frames.iter().map(|f| {
                let rgba = image::DynamicImage::ImageRgb8(to_rgb(f)).to_rgba8();
                image::Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(delay_ms, 1))
            });
            encoder.encode_frames(frames).map_err(|e| io(tmp, e))
        })
    }

    /// The two clips next to each other (`self` left), frame by frame; the shorter one holds
    /// its last frame.
    pub fn side_by_side(&self, right: &Clip) -> Result<Self> {
        let ((w1, h1), (w2, h2)) = (self.size(), right.size());
        if h1 != h2 {
            return Err(invalid("right", format!("heights differ: {h1} vs {h2}")));
        }
        let n = self.len().max(right.len());
        let frames = (0..n)
            .map(|t| {
                let a = &self.frames[t.min(self.len() - 1)];
                let b = &right.frames[t.min(right.len() - 1)];
                let mut out = RgbaImage::new((w1 + w2) as u32, h1 as u32);
                image::imageops::overlay(
                    &mut out,
                    &image::DynamicImage::ImageRgb8(to_rgb(a)).to_rgba8(),
                    0,
                    0,
                );
                image::imageops::overlay(
                    &mut out,
                    &image::DynamicImage::ImageRgb8(to_rgb(b)).to_rgba8(),
                    w1 as i64,
                    0,
                );
                from_rgb(&image::DynamicImage::ImageRgba8(out).to_rgb8())
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(frames)
    }
}

/// The clips under `dir`: sub-folders holding PNG frames and `*.gif` files, sorted by name.
pub fn list_clips(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            if p.is_dir() {
                std::fs::read_dir(p).is_ok_and(|mut d| {
                    d.any(|e| {
                        e.is_ok_and(|e| {
                            e.path()
                                .extension()
                                .is_some_and(|x| x.eq_ignore_ascii_case("png"))
                        })
                    })
                })
            } else {
                p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gif")) || is_video_file(p)
            }
        })
        .collect();
    out.sort();
    Ok(out)
}
