//! The data pipeline: read every clip of a folder, score it, filter it, put the accepted ones in
//! buckets of one resolution and length, and write a JSONL manifest that records each clip's
//! scores and, for a rejected clip, every reason.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clip::{Clip, list_clips};
use crate::error::{Result, invalid, io};
use crate::filter::{Filters, Rejection, Scores, assess, scores};

/// The buckets clips are sorted into: batches hold clips of one bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buckets {
    /// Allowed clip lengths (a clip is cut to the longest one it reaches); the default `1 + 4k`
    /// lengths suit a causal VAE with 4× temporal compression.
    pub lengths: Vec<usize>,
    /// Allowed `(width, height)`; empty: any resolution is its own bucket.
    pub resolutions: Vec<(usize, usize)>,
}

impl Default for Buckets {
    fn default() -> Self {
        Self {
            lengths: vec![17, 9, 5, 1],
            resolutions: Vec::new(),
        }
    }
}

/// A bucket: clips of one resolution and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bucket {
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
    /// Frames (the clip is cut to this length).
    pub frames: usize,
}

impl Buckets {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        if self.lengths.is_empty() || self.lengths.contains(&0) {
            return Err(invalid("lengths", "needs at least one length, all above 0"));
        }
        Ok(())
    }

    /// The bucket of a `width × height` clip of `frames` frames, if any takes it.
    pub fn assign(&self, width: usize, height: usize, frames: usize) -> Option<Bucket> {
        if !self.resolutions.is_empty() && !self.resolutions.contains(&(width, height)) {
            return None;
        }
        let frames = self
            .lengths
            .iter()
            .copied()
            .filter(|&l| l <= frames)
            .max()?;
        Some(Bucket {
            width,
            height,
            frames,
        })
    }
}

/// One line of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The clip (folder or file).
    pub clip: PathBuf,
    /// Frames read (0 when unreadable).
    pub frames: usize,
    /// Width (0 when unreadable).
    pub width: usize,
    /// Height (0 when unreadable).
    pub height: usize,
    /// Scores (absent when unreadable).
    pub scores: Option<Scores>,
    /// Whether the clip passed every filter and has a bucket.
    pub accepted: bool,
    /// Why it was rejected (empty when accepted).
    pub rejections: Vec<Rejection>,
    /// The rejections in words.
    pub reasons: Vec<String>,
    /// Its bucket when accepted.
    pub bucket: Option<Bucket>,
}

/// Scores and filters one clip.
pub fn examine(path: &Path, filters: &Filters, buckets: &Buckets) -> Entry {
    let clip = match Clip::read(path) {
        Ok(c) => c,
        Err(e) => {
            let r = Rejection::Unreadable {
                error: e.to_string(),
            };
            return Entry {
                clip: path.to_path_buf(),
                frames: 0,
                width: 0,
                height: 0,
                scores: None,
                accepted: false,
                reasons: vec![r.to_string()],
                rejections: vec![r],
                bucket: None,
            };
        }
    };
    let s = scores(&clip);
    let (width, height) = clip.size();
    let mut rejections = assess(&s, clip.len(), filters);
    let bucket = buckets.assign(width, height, clip.len());
    if bucket.is_none() {
        rejections.push(Rejection::NoBucket { width, height });
    }
    Entry {
        clip: path.to_path_buf(),
        frames: clip.len(),
        width,
        height,
        scores: Some(s),
        accepted: rejections.is_empty(),
        reasons: rejections.iter().map(ToString::to_string).collect(),
        bucket: if rejections.is_empty() { bucket } else { None },
        rejections,
    }
}

/// Examines every clip under `dir` ([`list_clips`]).
pub fn scan(dir: &Path, filters: &Filters, buckets: &Buckets) -> Result<Vec<Entry>> {
    buckets.validate()?;
    Ok(list_clips(dir)?
        .iter()
        .map(|p| examine(p, filters, buckets))
        .collect())
}

/// Writes the manifest as JSONL through a temporary file.
pub fn write_manifest(path: &Path, entries: &[Entry]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        for e in entries {
            let line = serde_json::to_string(e).map_err(|e| io(&tmp, e))?;
            writeln!(file, "{line}").map_err(|e| io(&tmp, e))?;
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Reads a manifest written by [`write_manifest`].
pub fn read_manifest(path: &Path) -> Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| io(path, format!("line {}: {e}", i + 1))))
        .collect()
}
