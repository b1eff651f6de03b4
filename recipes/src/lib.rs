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
pub mod plan;
pub mod plot;
pub mod recipe;
mod rundir;
pub mod train;
pub mod video;

pub use error::{RecipeError, Result};
