//! The recipe's `[data]` table as a library token source ([`burn_moe::lm::TokenSource`]).

use std::path::Path;

use burn_moe::lm::TokenSource;

use crate::error::{RecipeError, Result};
use crate::recipe::{DataConfig, Source};

/// The token source of a recipe's `[data]` table for a `vocab`-token model.
pub fn token_source(config: &DataConfig, vocab: usize, seed: u64) -> Result<TokenSource> {
    match config.source {
        Source::Markov => {
            TokenSource::markov(vocab, config.branching, seed).map_err(|e| RecipeError::Invalid {
                key: "data.branching".into(),
                reason: e.to_string(),
            })
        }
        Source::Bytes => {
            let path = config.path.as_deref().ok_or_else(|| RecipeError::Invalid {
                key: "data.path".into(),
                reason: "is required by source = \"bytes\"".into(),
            })?;
            let bytes = read_bytes(path)?;
            let n = bytes.len();
            TokenSource::bytes(bytes, config.seq_len, seed).map_err(|_| RecipeError::Invalid {
                key: "data.path".into(),
                reason: format!(
                    "{} has {n} bytes, fewer than data.seq_len + 2",
                    path.display()
                ),
            })
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
