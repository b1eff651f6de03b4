//! Clip scores and the filters of the data pipeline, on luma `Y = 0.299 R + 0.587 G + 0.114 B`
//! in 8-bit units (0–255), the scale their usual thresholds are quoted in:
//!
//! - **scene cuts**: the distance between the luma histograms (32 bins, half the L1 distance
//!   of the normalised histograms, in `[0, 1]`) of consecutive frames; a cut where it exceeds a
//!   threshold;
//! - **sharpness**: the variance of the 4-neighbour Laplacian of luma (interior pixels), the
//!   mean over frames (a blurred clip scores low);
//! - **motion**: the mean absolute luma difference between consecutive frames (a static clip
//!   scores 0).

use serde::{Deserialize, Serialize};

use crate::clip::Clip;
use crate::metrics::Frame;

/// Luma of each pixel, 0–255.
pub fn luma(frame: &Frame) -> Vec<f64> {
    frame
        .pixels()
        .chunks_exact(3)
        .map(|p| {
            255.0 * (0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        })
        .collect()
}

/// Variance of the 4-neighbour Laplacian of luma over interior pixels (0 for frames smaller
/// than 3×3).
pub fn laplacian_variance(frame: &Frame) -> f64 {
    let (w, h, _) = frame.size();
    if w < 3 || h < 3 {
        return 0.0;
    }
    let y = luma(frame);
    let at = |x: usize, r: usize| y[r * w + x];
    let mut values = Vec::with_capacity((w - 2) * (h - 2));
    for r in 1..h - 1 {
        for x in 1..w - 1 {
            values.push(at(x - 1, r) + at(x + 1, r) + at(x, r - 1) + at(x, r + 1) - 4.0 * at(x, r));
        }
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n
}

/// Mean absolute luma difference of two frames of one size.
pub fn mean_abs_diff(a: &Frame, b: &Frame) -> f64 {
    let (ya, yb) = (luma(a), luma(b));
    ya.iter().zip(&yb).map(|(x, y)| (x - y).abs()).sum::<f64>() / ya.len().max(1) as f64
}

/// Half the L1 distance between the normalised 32-bin luma histograms of two frames, in `[0, 1]`.
pub fn histogram_distance(a: &Frame, b: &Frame) -> f64 {
    let hist = |f: &Frame| {
        let y = luma(f);
        let mut h = [0f64; 32];
        for v in &y {
            h[((v / 256.0 * 32.0) as usize).min(31)] += 1.0;
        }
        let n = y.len().max(1) as f64;
        h.map(|c| c / n)
    };
    let (ha, hb) = (hist(a), hist(b));
    0.5 * ha.iter().zip(&hb).map(|(x, y)| (x - y).abs()).sum::<f64>()
}

/// The scores of a clip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Mean Laplacian variance of the frames.
    pub sharpness: f64,
    /// Mean absolute luma difference of consecutive frames (0 for one frame).
    pub motion: f64,
    /// Largest histogram distance between consecutive frames (0 for one frame).
    pub max_cut: f64,
    /// Frame index after which the largest histogram jump happens (0 for one frame).
    pub cut_at: usize,
}

/// Scores `clip`.
pub fn scores(clip: &Clip) -> Scores {
    let f = clip.frames();
    let sharpness = f.iter().map(laplacian_variance).sum::<f64>() / f.len() as f64;
    let pairs: Vec<(f64, f64)> = f
        .windows(2)
        .map(|w| {
            (
                mean_abs_diff(&w[0], &w[1]),
                histogram_distance(&w[0], &w[1]),
            )
        })
        .collect();
    let motion = if pairs.is_empty() {
        0.0
    } else {
        pairs.iter().map(|p| p.0).sum::<f64>() / pairs.len() as f64
    };
    let (cut_at, max_cut) = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| (i + 1, p.1))
        .fold((0, 0.0), |best, x| if x.1 > best.1 { x } else { best });
    Scores {
        sharpness,
        motion,
        max_cut,
        cut_at,
    }
}

/// Thresholds of the filters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// A histogram distance above this between consecutive frames is a scene cut.
    pub max_cut: f64,
    /// Clips whose sharpness is below this are blurred.
    pub min_sharpness: f64,
    /// Clips whose motion is below this are static.
    pub min_motion: f64,
    /// Clips whose motion is above this change too fast to learn from.
    pub max_motion: f64,
    /// Clips with fewer frames are too short.
    pub min_frames: usize,
}

impl Default for Filters {
    /// Thresholds for 8-bit clips: a histogram jump above 0.3 is a cut (camera moves over a
    /// photograph stay below 0.1); a Laplacian variance below 100 is blurred or featureless
    /// (the usual blur-detection threshold; detailed photographs score in the thousands, a
    /// smooth colour gradient below 10); mean frame differences below 0.5 are static, above 60
    /// too fast.
    fn default() -> Self {
        Self {
            max_cut: 0.3,
            min_sharpness: 100.0,
            min_motion: 0.5,
            max_motion: 60.0,
            min_frames: 2,
        }
    }
}

/// Why a clip was rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Rejection {
    /// A scene cut after frame `frame`.
    SceneCut {
        /// The first frame of the new scene.
        frame: usize,
        /// Histogram distance at the cut.
        distance: f64,
    },
    /// Too blurred.
    Blurry {
        /// The clip's sharpness.
        sharpness: f64,
    },
    /// Nothing moves.
    Static {
        /// The clip's motion.
        motion: f64,
    },
    /// Changes too fast.
    TooFast {
        /// The clip's motion.
        motion: f64,
    },
    /// Too few frames.
    TooShort {
        /// Frames.
        frames: usize,
    },
    /// Could not be read.
    Unreadable {
        /// Why.
        error: String,
    },
    /// No bucket takes its resolution.
    NoBucket {
        /// Width.
        width: usize,
        /// Height.
        height: usize,
    },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SceneCut { frame, distance } => {
                write!(
                    f,
                    "scene cut at frame {frame} (histogram distance {distance:.3})"
                )
            }
            Self::Blurry { sharpness } => {
                write!(f, "blurred or featureless (sharpness {sharpness:.1})")
            }
            Self::Static { motion } => write!(f, "static (motion {motion:.3})"),
            Self::TooFast { motion } => write!(f, "too fast (motion {motion:.1})"),
            Self::TooShort { frames } => write!(f, "too short ({frames} frames)"),
            Self::Unreadable { error } => write!(f, "unreadable: {error}"),
            Self::NoBucket { width, height } => write!(f, "no bucket for {width}x{height}"),
        }
    }
}

/// The filters `scores` fails (empty: accepted).
pub fn assess(s: &Scores, frames: usize, filters: &Filters) -> Vec<Rejection> {
    let mut out = Vec::new();
    if frames < filters.min_frames {
        out.push(Rejection::TooShort { frames });
    }
    if s.max_cut > filters.max_cut {
        out.push(Rejection::SceneCut {
            frame: s.cut_at,
            distance: s.max_cut,
        });
    }
    if s.sharpness < filters.min_sharpness {
        out.push(Rejection::Blurry {
            sharpness: s.sharpness,
        });
    }
    if frames > 1 && s.motion < filters.min_motion {
        out.push(Rejection::Static { motion: s.motion });
    }
    if s.motion > filters.max_motion {
        out.push(Rejection::TooFast { motion: s.motion });
    }
    out
}
