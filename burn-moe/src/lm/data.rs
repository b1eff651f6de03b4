//! Token sources for language-model training: a seeded sparse Markov chain with a known
//! entropy rate (the loss floor), and byte-level text.
//!
//! A sequence is a pure function of (seed, index): nothing else is needed to resume a run
//! exactly, and every data-parallel rank reads its own sequences ([`sequence_index`]).

use burn_parallel::rng::{mix, unit};

use crate::error::{Result, invalid};

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
    /// A Markov chain over `vocab` states, each with `branching` successors drawn from `seed`
    /// with Zipf probabilities ∝ 1, 1/2, 1/3, …: a non-uniform, known entropy rate.
    pub fn markov(vocab: usize, branching: usize, seed: u64) -> Result<Self> {
        if branching == 0 || branching > vocab {
            return Err(invalid(
                "branching",
                format!("must be in 1..={vocab} (the vocabulary), got {branching}"),
            ));
        }
        let raw: Vec<f64> = (1..=branching).map(|i| 1.0 / i as f64).collect();
        let total: f64 = raw.iter().sum();
        let probs = raw.iter().map(|p| p / total).collect();
        let successors = (0..vocab)
            .map(|s| {
                // `branching` distinct successors drawn by a seeded partial shuffle.
                let mut pool: Vec<u32> = (0..vocab as u32).collect();
                for i in 0..branching {
                    let key = seed ^ ((s as u64) << 20) ^ i as u64;
                    let j = i + (mix(key) % (vocab - i) as u64) as usize;
                    pool.swap(i, j);
                }
                pool.truncate(branching);
                pool
            })
            .collect();
        Ok(TokenSource::Markov {
            successors,
            probs,
            seed,
        })
    }

    /// Byte-level tokens (vocabulary 256) of `bytes`, windows placed from `seed`; `seq_len`
    /// tokens per sequence need at least `seq_len + 2` bytes.
    pub fn bytes(bytes: Vec<u8>, seq_len: usize, seed: u64) -> Result<Self> {
        if bytes.len() <= seq_len + 1 {
            return Err(invalid(
                "bytes",
                format!(
                    "{} bytes, fewer than seq_len + 2 = {}",
                    bytes.len(),
                    seq_len + 2
                ),
            ));
        }
        Ok(TokenSource::Bytes { bytes, seed })
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
