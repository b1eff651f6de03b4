//! Token sources: a seeded sparse Markov chain with a known entropy rate, and byte-level text.
//!
//! Batches are a pure function of (seed, step, micro-batch, data-parallel rank): nothing else
//! is needed to resume a run exactly, and every data-parallel rank reads its own sequences.

use std::path::Path;

use crate::error::{RecipeError, Result};
use crate::recipe::{DataConfig, Source};

/// SplitMix64: a counter-based generator, so any sample can be drawn without history.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) from a key.
fn unit(key: u64) -> f64 {
    (mix(key) >> 11) as f64 / (1u64 << 53) as f64
}

/// A token stream.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// Markov chain: state `s` moves to `successors[s][i]` with probability `probs[i]`.
    Markov {
        /// Successor states of each state.
        successors: Vec<Vec<u32>>,
        /// Transition probabilities (the same for every state, permuted successors).
        probs: Vec<f64>,
        /// Seed of the sequences.
        seed: u64,
    },
    /// Byte-level text.
    Bytes {
        /// All bytes.
        bytes: Vec<u8>,
        /// Seed of the window positions.
        seed: u64,
    },
}

impl TokenSource {
    /// Builds the source of a recipe.
    pub fn new(config: &DataConfig, vocab: usize, seed: u64) -> Result<Self> {
        match config.source {
            Source::Markov => {
                let b = config.branching;
                // Probabilities ∝ 1, 1/2, 1/3, … (Zipf): a non-uniform known entropy.
                let raw: Vec<f64> = (1..=b).map(|i| 1.0 / i as f64).collect();
                let total: f64 = raw.iter().sum();
                let probs = raw.iter().map(|p| p / total).collect();
                let successors = (0..vocab)
                    .map(|s| {
                        // `b` distinct successors drawn by a seeded partial shuffle.
                        let mut pool: Vec<u32> = (0..vocab as u32).collect();
                        for i in 0..b {
                            let key = seed ^ ((s as u64) << 20) ^ i as u64;
                            let j = i + (mix(key) % (vocab - i) as u64) as usize;
                            pool.swap(i, j);
                        }
                        pool.truncate(b);
                        pool
                    })
                    .collect();
                Ok(TokenSource::Markov {
                    successors,
                    probs,
                    seed,
                })
            }
            Source::Bytes => {
                let path = config.path.as_deref().ok_or_else(|| RecipeError::Invalid {
                    key: "data.path".into(),
                    reason: "is required by source = \"bytes\"".into(),
                })?;
                let bytes = read_bytes(path)?;
                if bytes.len() <= config.seq_len + 1 {
                    return Err(RecipeError::Invalid {
                        key: "data.path".into(),
                        reason: format!(
                            "{} has {} bytes, fewer than data.seq_len + 2",
                            path.display(),
                            bytes.len()
                        ),
                    });
                }
                Ok(TokenSource::Bytes { bytes, seed })
            }
        }
    }

    /// Entropy rate in nats per token (the loss floor), when known.
    pub fn entropy_rate(&self) -> Option<f64> {
        match self {
            TokenSource::Markov { probs, .. } => {
                Some(-probs.iter().map(|p| p * p.ln()).sum::<f64>())
            }
            TokenSource::Bytes { .. } => None,
        }
    }

    /// Sequence number `index` of the stream: `len + 1` tokens (inputs and shifted targets).
    pub fn sequence(&self, index: u64, len: usize) -> Vec<i64> {
        match self {
            TokenSource::Markov {
                successors,
                probs,
                seed,
            } => {
                let key = mix(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
                let mut state = (mix(key) % successors.len() as u64) as usize;
                let mut out = Vec::with_capacity(len + 1);
                out.push(state as i64);
                for t in 0..len {
                    let u = unit(key.wrapping_add(t as u64 + 1));
                    let mut acc = 0.0;
                    let mut pick = probs.len() - 1;
                    for (i, p) in probs.iter().enumerate() {
                        acc += p;
                        if u < acc {
                            pick = i;
                            break;
                        }
                    }
                    state = successors[state][pick] as usize;
                    out.push(state as i64);
                }
                out
            }
            TokenSource::Bytes { bytes, seed } => {
                let span = (bytes.len() - len - 1) as u64;
                let start = (mix(seed ^ index) % (span + 1)) as usize;
                bytes[start..start + len + 1]
                    .iter()
                    .map(|&b| i64::from(b))
                    .collect()
            }
        }
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| RecipeError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let mut all = Vec::new();
        for f in files {
            all.extend(std::fs::read(&f).map_err(io)?);
        }
        Ok(all)
    } else {
        std::fs::read(path).map_err(io)
    }
}

/// Index of the `i`-th sequence of micro-batch `micro` of step `step` on data-parallel rank
/// `dp_rank`: consecutive, disjoint blocks per step, micro-batch and rank.
pub fn sequence_index(
    step: usize,
    micro: usize,
    dp_rank: usize,
    i: usize,
    (micro_batch, micro_batches, dp): (usize, usize, usize),
) -> u64 {
    let per_step = micro_batch * micro_batches * dp;
    (step * per_step + (micro * dp + dp_rank) * micro_batch + i) as u64
}
