//! The MoE transformer language model that Burn users build on: [`MoeLmConfig`] (sizes, the
//! MoE layer's own [`MoeLayerConfig`](crate::layer::MoeLayerConfig)) → [`MoeLm`] (a Burn
//! `Module` with `forward(ids) -> logits`), its parts ([`Attention`], [`DenseFfn`], [`Block`])
//! as public modules, parallel layouts applied by [`MoeLm::parallelize`] (or drawn per rank
//! by [`MoeLmConfig::init_stage`]) over a [`StageLayout`], the [`TokenSource`]s the
//! recipes train on, and [`LmTrainer`], one rank's share of training under any layout.

pub mod attention;
pub mod config;
pub mod data;
pub mod ffn;
pub mod hf;
pub mod model;
pub mod precision;
pub mod reshard;
pub mod split;
pub mod trainer;

pub use attention::Attention;
pub use config::{MoeLmConfig, QkNorm};
pub use data::{TokenSource, sequence_index};
pub use ffn::DenseFfn;
pub use model::{Block, Forward, FullTensors, MoeLm};
pub use precision::Precision;
pub use split::{LayerSplit, StageLayout};
pub use trainer::{
    Backward, CheckpointPolicy, FitEnd, FitObserver, FitOptions, FitOutcome, LmTrainer,
    LmTrainingConfig, Reported, StepRecord, save_initial,
};
