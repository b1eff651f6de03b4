//! Running the `burn-recipes` binary from the integration tests.
// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
}

/// A recipe file of the crate.
pub fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// `burn-recipes train RECIPE --set run.dir="RUN" --set S …`.
pub fn train(recipe: &Path, run: &Path, sets: &[&str]) -> Output {
    let mut cmd = bin();
    cmd.args(["train", &recipe.display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", run.display())]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().expect("binary runs")
}

/// `../shared/hf-models` (or `$HF_MODELS_DIR`): the tiny hub checkpoints with transformers'
/// reference outputs.
pub fn hf_models() -> PathBuf {
    std::env::var_os("HF_MODELS_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/hf-models"),
        Into::into,
    )
}
