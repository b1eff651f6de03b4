//! A rule-based checker of clips against synthetic-generator labels: does a (generated) clip
//! show objects of the asked colour, moving in the asked direction, as many as asked? Objects
//! are the saturated, bright pixels (the generator's background is dark grey): their mean
//! colour is matched to the palette, the motion is the displacement of their centroid from the
//! first frames to the last (its dominant axis and sign), and the count is the median number
//! of 4-connected blobs per frame.

use serde::{Deserialize, Serialize};

use crate::clip::Clip;
use crate::synthetic::{Colour, Direction, Label};

/// What the checker sees in a clip.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// The palette colour nearest the objects' mean colour (`None`: no objects seen).
    pub colour: Option<Colour>,
    /// The direction of the centroid's motion (`None`: no objects, or no clear motion).
    pub direction: Option<Direction>,
    /// Median number of objects per frame.
    pub count: usize,
}

/// Which parts of a label a clip shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The colour matches.
    pub colour: bool,
    /// The direction matches.
    pub direction: bool,
    /// The count matches.
    pub count: bool,
}

impl Verdict {
    /// Everything matches.
    pub fn all(&self) -> bool {
        self.colour && self.direction && self.count
    }
}

/// Smallest blob (pixels) counted as an object.
const MIN_BLOB: usize = 6;

/// Foreground mask of one frame: bright and saturated pixels.
fn mask(pixels: &[f32]) -> Vec<bool> {
    pixels
        .chunks_exact(3)
        .map(|p| {
            let max = p[0].max(p[1]).max(p[2]);
            let min = p[0].min(p[1]).min(p[2]);
            max > 0.4 && max - min > 0.25
        })
        .collect()
}

/// Number of 4-connected blobs of at least [`MIN_BLOB`] pixels.
fn blobs(mask: &[bool], w: usize, h: usize) -> usize {
    let mut seen = vec![false; mask.len()];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if size >= MIN_BLOB {
            count += 1;
        }
    }
    count
}

/// Looks at a clip.
pub fn observe(clip: &Clip) -> Observation {
    let (w, h) = clip.size();
    let mut sum = [0f64; 3];
    let mut n = 0usize;
    let mut centroids = Vec::new();
    let mut counts = Vec::new();
    for frame in clip.frames() {
        let px = frame.pixels();
        let m = mask(px);
        let (mut cx, mut cy, mut k) = (0f64, 0f64, 0usize);
        for (i, _) in m.iter().enumerate().filter(|(_, on)| **on) {
            for c in 0..3 {
                sum[c] += f64::from(px[i * 3 + c]);
            }
            cx += (i % w) as f64;
            cy += (i / w) as f64;
            k += 1;
        }
        n += k;
        centroids.push((k >= MIN_BLOB).then(|| (cx / k as f64, cy / k as f64)));
        counts.push(blobs(&m, w, h));
    }
    counts.sort_unstable();
    let count = counts[counts.len() / 2];
    let colour = (n > 0).then(|| {
        let mean = sum.map(|s| (s / n as f64) as f32);
        let palette = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];
        let distance = |c: Colour| {
            let rgb = c.rgb();
            (0..3).map(|i| (rgb[i] - mean[i]).powi(2)).sum::<f32>()
        };
        palette
            .into_iter()
            .min_by(|a, b| distance(*a).total_cmp(&distance(*b)))
            .unwrap_or(Colour::Red)
    });
    // Centroid motion: mean of the first third of the frames with objects to the mean of the
    // last third.
    let seen: Vec<(f64, f64)> = centroids.into_iter().flatten().collect();
    let direction = (seen.len() >= 2).then(|| {
        let k = (seen.len() / 3).max(1);
        let mean = |s: &[(f64, f64)]| {
            let (x, y) = s.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            (x / s.len() as f64, y / s.len() as f64)
        };
        let (a, b) = (mean(&seen[..k]), mean(&seen[seen.len() - k..]));
        (b.0 - a.0, b.1 - a.1)
    });
    // At least a pixel of travel on the dominant axis.
    let direction = direction.and_then(|(dx, dy)| {
        if dx.abs().max(dy.abs()) < 1.0 {
            None
        } else if dx.abs() >= dy.abs() {
            Some(if dx > 0.0 {
                Direction::Right
            } else {
                Direction::Left
            })
        } else {
            Some(if dy > 0.0 {
                Direction::Down
            } else {
                Direction::Up
            })
        }
    });
    Observation {
        colour,
        direction,
        count,
    }
}

/// Checks a clip against the label it was asked to show.
pub fn check(clip: &Clip, label: &Label) -> Verdict {
    let o = observe(clip);
    Verdict {
        colour: o.colour == Some(label.colour),
        direction: o.direction == Some(label.direction),
        count: o.count == label.count,
    }
}
