//! How a model is laid out over pipeline stages: [`LayerSplit`] and [`StageLayout`].

use burn_parallel::context::CpAttention;

use crate::error::{Result, invalid};
use crate::layer::DispatcherKind;

/// Which layers each virtual pipeline stage holds: virtual stage `chunk · stages + stage` is
/// model chunk `chunk` of pipeline stage `stage`, and virtual stages hold consecutive layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSplit {
    stages: usize,
    chunks: usize,
    /// Layers of each virtual stage.
    counts: Vec<usize>,
}

impl LayerSplit {
    /// Every layer on one stage.
    pub fn single(layers: usize) -> Self {
        Self {
            stages: 1,
            chunks: 1,
            counts: vec![layers],
        }
    }

    /// Equal shares of `layers` over `stages × chunks` virtual stages (field `pp`).
    pub fn uniform(layers: usize, stages: usize, chunks: usize) -> Result<Self> {
        let n = stages * chunks;
        if n == 0 || !layers.is_multiple_of(n) {
            return Err(invalid(
                "pp",
                format!(
                    "{layers} layers do not split into pp × virtual_pp = {n} equal shares \
                     (give parallel.pp_layers for an uneven split)"
                ),
            ));
        }
        Ok(Self {
            stages,
            chunks,
            counts: vec![layers / n; n],
        })
    }

    /// `counts[v]` layers on virtual stage `v` (Megatron's uneven first / last stages; field
    /// `pp_layers`).
    pub fn given(layers: usize, stages: usize, chunks: usize, counts: &[usize]) -> Result<Self> {
        if counts.len() != stages * chunks {
            return Err(invalid(
                "pp_layers",
                format!(
                    "has {} entries, one per virtual stage (pp × virtual_pp = {}) is needed",
                    counts.len(),
                    stages * chunks
                ),
            ));
        }
        let total: usize = counts.iter().sum();
        if total != layers {
            return Err(invalid(
                "pp_layers",
                format!("sums to {total}, the model has {layers} layers"),
            ));
        }
        Ok(Self {
            stages,
            chunks,
            counts: counts.to_vec(),
        })
    }

    /// Pipeline stages.
    pub fn stages(&self) -> usize {
        self.stages
    }

    /// Model chunks per stage.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Layers of each virtual stage (virtual stage `chunk · stages + stage`).
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// The global layers of model chunk `chunk` on pipeline stage `stage`.
    pub fn layers(&self, stage: usize, chunk: usize) -> std::ops::Range<usize> {
        let vs = chunk * self.stages + stage;
        let start: usize = self.counts[..vs].iter().sum();
        start..start + self.counts[vs]
    }
}

/// How a rank's stage of the model is laid out beyond the process groups: the MoE token
/// dispatcher, the pipeline layer split and the context-parallel attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageLayout {
    /// Token dispatcher of the MoE layers.
    pub dispatcher: DispatcherKind,
    /// Layers of each virtual pipeline stage.
    pub split: LayerSplit,
    /// Ring or all-gather attention under context parallelism.
    pub cp_attention: CpAttention,
}

impl StageLayout {
    /// One stage holding every layer, the all-to-all dispatcher, ring attention.
    pub fn single(layers: usize) -> Self {
        Self {
            dispatcher: DispatcherKind::AllToAll,
            split: LayerSplit::single(layers),
            cp_attention: CpAttention::Ring,
        }
    }
}
