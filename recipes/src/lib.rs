#![warn(missing_docs)]
//! # burn-recipes
//!
//! TOML recipes for training MoE transformer language models with burn-moe and burn-parallel:
//! [`recipe`] (parsing, `--set` overrides, validation), [`data`] (a Markov source with a known
//! entropy rate, byte-level text), [`model`] (the decoder-only MoE transformer), [`train`] (the
//! loop, metrics, progress), [`plan`] (memory, step time and MFU of a layout; layout search),
//! [`video`] (video VAE recipes: training and evaluation), [`checkpoint`] (the recipes'
//! `meta.json` over burn-parallel's checkpoints), [`memory`] (heap accounting for the
//! per-step memory report), [`hf`] (Hugging Face checkpoints as runs) and [`plot`] (PNG plots
//! of a run). The
//! `burn-recipes` binary is the command line over them.

pub mod checkpoint;
pub mod cluster;
pub mod data;
pub mod dit;
pub mod error;
pub mod hf;
pub mod interrupt;
pub mod latents;
/// Heap accounting (from burn-parallel).
pub use burn_parallel::memory;
pub mod model;
pub mod notebook;
pub mod plan;
pub mod plot;
pub mod recipe;
mod rundir;
pub mod train;
pub mod video;

pub use error::{RecipeError, Result};

/// What a notebook (or a program) imports in one line: Burn, burn-moe's prelude and language
/// model, the parallel world, the recipes and their runs, the planner, the video VAE's
/// training, and the inline pictures of [`notebook`].
pub mod prelude {
    pub use burn;
    pub use burn::tensor::{Bool, Device, Distribution, Int, Tensor, TensorData};
    pub use burn_moe::lm::{
        CheckpointPolicy, FitOptions, LmTrainer, LmTrainingConfig, StepRecord, hf as hub,
    };
    pub use burn_moe::prelude::*;
    pub use burn_parallel::prelude::{ProcessGroups, World};
    pub use burn_video::metrics::{Frame, psnr, ssim};
    pub use burn_video::prelude::{Clip, Vae, VaeConfig, VaeTrainer};
    pub use burn_video::vae_training::reconstruct;
    pub use serde_json;

    pub use crate::model::load_run;
    pub use crate::notebook::{Html, Png, bar_chart, frames, heatmap, image, line_chart, table};
    pub use crate::plan::{Estimate, Layout, Problem};
    pub use crate::recipe::Recipe;
    pub use crate::train::{Summary, TrainOptions, train};
    pub use crate::video::{VaeRecipe, split_clips};
}
