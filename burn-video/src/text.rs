//! Captions to token ids for the DiT's text encoder: a word vocabulary built from the
//! captions (lower case, split on whitespace and punctuation), with padding, null-caption and
//! unknown-word tokens.

use std::collections::BTreeSet;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::dit::{NULL, PAD, Text, UNK};
use crate::error::{Result, invalid};

/// A word vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vocabulary {
    words: Vec<String>,
}

fn words(caption: &str) -> impl Iterator<Item = String> + '_ {
    caption
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

impl Vocabulary {
    /// Every word of `captions`, sorted.
    pub fn from_captions<S: AsRef<str>>(captions: &[S]) -> Self {
        let set: BTreeSet<String> = captions.iter().flat_map(|c| words(c.as_ref())).collect();
        Self {
            words: set.into_iter().collect(),
        }
    }

    /// Token ids, the special tokens included.
    pub fn len(&self) -> usize {
        self.words.len() + 3
    }

    /// Whether there are no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The ids of `caption` padded to `len`, and which are real.
    pub fn encode(&self, caption: &str, len: usize) -> Result<(Vec<usize>, Vec<bool>)> {
        let ids: Vec<usize> = words(caption)
            .map(|w| self.words.binary_search(&w).map_or(UNK, |i| i + 3))
            .collect();
        if ids.len() > len {
            return Err(invalid(
                "caption",
                format!("{} words, at most {len}: {caption:?}", ids.len()),
            ));
        }
        let mut mask = vec![true; ids.len()];
        let mut ids = ids;
        if ids.is_empty() {
            ids.push(NULL);
            mask.push(true);
        }
        mask.resize(len, false);
        ids.resize(len, PAD);
        Ok((ids, mask))
    }

    /// A batch of captions (`None`: the null caption).
    pub fn batch(&self, captions: &[Option<&str>], len: usize, device: &Device) -> Result<Text> {
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for c in captions {
            let (i, m) = self.encode(c.unwrap_or(""), len)?;
            ids.extend(i.into_iter().map(|v| v as i64));
            mask.extend(m);
        }
        let b = captions.len();
        Ok(Text {
            ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [b, len]), device),
            mask: Tensor::<2, Bool>::from_data(TensorData::new(mask, [b, len]), device),
        })
    }
}
