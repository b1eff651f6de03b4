//! A generator of labelled clips for conditional generation: one to three shapes of one colour
//! moving in one direction over a dark, lightly textured background, kept apart so the count
//! in the caption is the count on screen. The label is known, so a
//! rule-based checker can later tell whether a generated clip shows what was asked for.

use burn_parallel::rng::mix;
use serde::{Deserialize, Serialize};

use crate::clip::Clip;
use crate::error::{Result, invalid};
use crate::metrics::Frame;

/// Shape of the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A filled square.
    Square,
    /// A filled disc.
    Circle,
    /// A filled triangle pointing up.
    Triangle,
}

/// Colour of the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
}

impl Colour {
    /// RGB in `[0, 1]`.
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Self::Red => [0.9, 0.15, 0.1],
            Self::Green => [0.15, 0.8, 0.2],
            Self::Blue => [0.15, 0.3, 0.95],
            Self::Yellow => [0.95, 0.85, 0.1],
        }
    }
}

/// Direction the objects move in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Towards smaller x.
    Left,
    /// Towards larger x.
    Right,
    /// Towards smaller y.
    Up,
    /// Towards larger y.
    Down,
}

impl Direction {
    /// Unit step `(dx, dy)` in image coordinates.
    pub fn step(self) -> (f32, f32) {
        match self {
            Self::Left => (-1.0, 0.0),
            Self::Right => (1.0, 0.0),
            Self::Up => (0.0, -1.0),
            Self::Down => (0.0, 1.0),
        }
    }
}

/// What a synthetic clip shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Label {
    /// Shape.
    pub shape: Shape,
    /// Colour.
    pub colour: Colour,
    /// Motion direction.
    pub direction: Direction,
    /// Number of objects (1 to 3).
    pub count: usize,
}

impl Label {
    /// The caption, e.g. `2 red circles moving left`.
    pub fn caption(&self) -> String {
        let shape = match self.shape {
            Shape::Square => "square",
            Shape::Circle => "circle",
            Shape::Triangle => "triangle",
        };
        let colour = match self.colour {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        };
        let direction = match self.direction {
            Direction::Left => "left",
            Direction::Right => "right",
            Direction::Up => "up",
            Direction::Down => "down",
        };
        let plural = if self.count == 1 { "" } else { "s" };
        format!("{} {colour} {shape}{plural} moving {direction}", self.count)
    }

    /// The label of a caption written by [`Label::caption`] (`None` for any other text).
    pub fn parse(caption: &str) -> Option<Self> {
        (0..144)
            .map(Self::nth)
            .find(|l| l.caption() == caption.trim())
    }

    /// Label number `i` of the 3 × 4 × 4 × 3 combinations (shape, colour, direction, count).
    pub fn nth(i: usize) -> Self {
        let shapes = [Shape::Square, Shape::Circle, Shape::Triangle];
        let colours = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];
        let dirs = [
            Direction::Left,
            Direction::Right,
            Direction::Up,
            Direction::Down,
        ];
        Self {
            shape: shapes[i % 3],
            colour: colours[(i / 3) % 4],
            direction: dirs[(i / 12) % 4],
            count: 1 + (i / 48) % 3,
        }
    }
}

fn uniform(state: &mut u64) -> f32 {
    *state = mix(*state);
    (*state >> 40) as f32 / (1u64 << 24) as f32
}

fn inside(shape: Shape, dx: f32, dy: f32, r: f32) -> bool {
    match shape {
        Shape::Square => dx.abs() <= r && dy.abs() <= r,
        Shape::Circle => dx * dx + dy * dy <= r * r,
        // Apex at (0, -r), base from (-r, r) to (r, r).
        Shape::Triangle => dy <= r && dy >= -r && dx.abs() <= (dy + r) / 2.0,
    }
}

/// A `size × size` clip of `frames` frames showing `label`, from `seed`: objects of radius
/// `size / 10` start at random places and move `size / 32` pixels per frame.
pub fn generate(label: &Label, size: usize, frames: usize, seed: u64) -> Result<Clip> {
    if size < 16 {
        return Err(invalid("size", format!("must be at least 16, got {size}")));
    }
    if frames == 0 {
        return Err(invalid("frames", "must be at least 1"));
    }
    if !(1..=3).contains(&label.count) {
        return Err(invalid(
            "count",
            format!("must be 1 to 3, got {}", label.count),
        ));
    }
    let mut state = mix(seed);
    let s = size as f32;
    let r = s / 10.0;
    let speed = s / 32.0;
    let (sx, sy) = label.direction.step();
    // Start positions leave room for the whole path inside the frame.
    let travel = speed * (frames - 1) as f32;
    let span = |step: f32, u: f32| {
        let (lo, hi) = if step > 0.0 {
            (r, s - r - travel)
        } else if step < 0.0 {
            (r + travel, s - r)
        } else {
            (r, s - r)
        };
        if hi > lo { lo + u * (hi - lo) } else { s / 2.0 }
    };
    // Objects keep apart (their bounding boxes at least 2 px from each other; they all move
    // together, so they never touch), so a caption's count is what the clip shows. Where the
    // frame is too small for that after 100 draws, the last draw stands.
    let mut starts: Vec<(f32, f32)> = Vec::with_capacity(label.count);
    for _ in 0..label.count {
        let mut at = (s / 2.0, s / 2.0);
        for _ in 0..100 {
            let (u, v) = (uniform(&mut state), uniform(&mut state));
            at = (span(sx, u), span(sy, v));
            let apart = starts
                .iter()
                .all(|&(x, y)| (x - at.0).abs().max((y - at.1).abs()) >= 2.0 * r + 2.0);
            if apart {
                break;
            }
        }
        starts.push(at);
    }
    let background: Vec<f32> = (0..size * size)
        .map(|_| 0.08 + 0.06 * uniform(&mut state))
        .collect();
    let colour = label.colour.rgb();
    let clip = (0..frames)
        .map(|t| {
            let mut px = Vec::with_capacity(size * size * 3);
            for y in 0..size {
                for x in 0..size {
                    let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                    let hit = starts.iter().any(|&(cx, cy)| {
                        let (cx, cy) = (cx + sx * speed * t as f32, cy + sy * speed * t as f32);
                        inside(label.shape, fx - cx, fy - cy, r)
                    });
                    if hit {
                        px.extend_from_slice(&colour);
                    } else {
                        let b = background[y * size + x];
                        px.extend_from_slice(&[b, b, b]);
                    }
                }
            }
            Frame::new(size, size, 3, px)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Clip::new(clip)
}
