//! `burn-recipes data cache`: burn-video's latent cache ([`burn_video::latent_cache`]) written
//! with a trained VAE run — its latest (or a given) checkpoint and the latent statistics of its
//! `summary.json`; errors name the command's arguments.

use std::path::Path;

pub use burn_video::latent_cache::{CacheMeta, CachedClip};
use burn_video::latent_cache::{LatentStats, VaeOrigin};

use crate::error::{RecipeError, Result, bad};
use crate::video::load_vae;

/// A latent-cache error named by the command's argument (`SOURCE`, `--out`, `--chunk`,
/// `--run`) or its file.
fn argument(e: burn_video::VideoError) -> RecipeError {
    match e {
        burn_video::VideoError::InvalidArgument { name, reason } => {
            let key = match name {
                "source" => "SOURCE",
                "out" => "--out",
                "chunk" => "--chunk",
                _ => "--run",
            };
            bad(key, reason)
        }
        burn_video::VideoError::Io { path, reason }
        | burn_video::VideoError::Decode { path, reason } => RecipeError::Io { path, reason },
        other => RecipeError::Refused(other.to_string()),
    }
}

/// Encodes the clips of `source` with the VAE of `run` (latest checkpoint or `checkpoint`),
/// `chunk` latent steps at a time, into the new folder `out`.
pub fn cache_latents(
    run: &Path,
    checkpoint: Option<&Path>,
    source: &Path,
    out: &Path,
    chunk: usize,
) -> Result<CacheMeta> {
    let summary_path = run.join("summary.json");
    let stats: LatentStats = std::fs::read_to_string(&summary_path)
        .map_err(|e| bad("--run", format!("{}: {e}", summary_path.display())))
        .and_then(|t| {
            serde_json::from_str(&t)
                .map_err(|e| bad("--run", format!("{}: {e}", summary_path.display())))
        })?;
    let (recipe, vae, dir) = load_vae(run, checkpoint)?;
    let origin = VaeOrigin {
        run: run.to_path_buf(),
        checkpoint: dir,
    };
    burn_video::latent_cache::cache_latents(
        (&vae, &recipe.vae, &origin),
        &stats,
        source,
        out,
        chunk,
    )
    .map_err(|e| match e {
        burn_video::VideoError::InvalidArgument {
            name: "stats",
            reason,
        } => bad(
            "--run",
            format!("{} holds {reason}", summary_path.display()),
        ),
        other => argument(other),
    })
}

/// Reads a latent cache: its metadata and index.
pub fn read_cache(dir: &Path) -> Result<(CacheMeta, Vec<CachedClip>)> {
    burn_video::latent_cache::read_cache(dir).map_err(argument)
}

/// One cached latent `[channels, t, h, w]` (normalised) as a tensor.
pub fn read_latent(
    dir: &Path,
    entry: &CachedClip,
    device: &burn::tensor::Device,
) -> Result<burn::tensor::Tensor<4>> {
    burn_video::latent_cache::read_latent(dir, entry, device).map_err(argument)
}
