//! Latent caching for the DiT (`burn-recipes data cache`): every clip of a folder, or every
//! accepted clip of a pipeline manifest (cut to its bucket's length), encoded once by a trained
//! VAE run (posterior means, encoded in chunks with the causal state carried between them),
//! normalised per channel by the run's latent statistics, and written as one safetensors file
//! per clip, with `index.jsonl` (clip, file, latent shape, caption when the clip folder has a
//! `captions.jsonl`) and `meta.json` (the VAE run, its factors and statistics). The folder is
//! written under a temporary name and renamed when complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use burn_video::clip::{Clip, list_clips};
use burn_video::pipeline::read_manifest;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{RecipeError, Result};
use crate::recipe::bad;
use burn_video::tensor::{clip_tensor, usable};

use crate::video::load_vae;

/// `meta.json` of a latent cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// The VAE run.
    pub vae_run: PathBuf,
    /// The checkpoint used.
    pub checkpoint: PathBuf,
    /// Latent channels.
    pub latent_channels: usize,
    /// Temporal compression factor.
    pub time_factor: usize,
    /// Spatial compression factor.
    pub space_factor: usize,
    /// Per-channel mean subtracted from the cached latents.
    pub latent_mean: Vec<f64>,
    /// Per-channel standard deviation they were divided by.
    pub latent_std: Vec<f64>,
    /// Clips cached.
    pub clips: usize,
}

/// One line of `index.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedClip {
    /// The source clip.
    pub clip: PathBuf,
    /// Its latent file, relative to the cache folder.
    pub file: String,
    /// Frames encoded.
    pub frames: usize,
    /// Latent shape `[channels, t, h, w]`.
    pub shape: [usize; 4],
    /// The caption from the clip folder's `captions.jsonl`, if any.
    pub caption: Option<String>,
}

/// The clips named by `source` with the frames to encode: a manifest file (its accepted
/// entries, cut to their bucket length) or a folder (every clip, cut to the longest length the
/// VAE takes).
fn sources(source: &Path, time_factor: usize) -> Result<Vec<(PathBuf, Option<usize>)>> {
    if source.is_file() {
        let entries = read_manifest(source).map_err(|e| bad("SOURCE", e.to_string()))?;
        let accepted: Vec<_> = entries
            .into_iter()
            .filter(|e| e.accepted)
            .map(|e| (e.clip, e.bucket.map(|b| b.frames)))
            .collect();
        if accepted.is_empty() {
            return Err(bad(
                "SOURCE",
                format!("{}: the manifest accepts no clip", source.display()),
            ));
        }
        for (clip, frames) in &accepted {
            if let Some(f) = frames
                && (*f == 0 || !(f - 1).is_multiple_of(time_factor))
            {
                return Err(bad(
                    "SOURCE",
                    format!(
                        "{}: bucket length {f} is not 1 + a multiple of the VAE's temporal factor {time_factor}",
                        clip.display()
                    ),
                ));
            }
        }
        return Ok(accepted);
    }
    let clips = list_clips(source).map_err(|e| bad("SOURCE", e.to_string()))?;
    if clips.is_empty() {
        return Err(bad(
            "SOURCE",
            format!("{}: no clips (PNG-frame folders or GIFs)", source.display()),
        ));
    }
    Ok(clips.into_iter().map(|c| (c, None)).collect())
}

/// Captions of the clips in `dir` from its `captions.jsonl` (`{"clip": NAME, "caption": …}`
/// lines, as `data synth` writes), keyed by clip name.
fn captions(dir: &Path) -> Result<HashMap<String, String>> {
    let path = dir.join("captions.jsonl");
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(out);
    };
    #[derive(Deserialize)]
    struct Line {
        clip: String,
        caption: String,
    }
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line: Line = serde_json::from_str(l)
            .map_err(|e| RecipeError::io(&path, format!("line {}: {e}", i + 1)))?;
        out.insert(line.clip, line.caption);
    }
    Ok(out)
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
    if out.exists() {
        return Err(bad("--out", format!("{} already exists", out.display())));
    }
    if chunk == 0 {
        return Err(bad("--chunk", "must be at least 1"));
    }
    let summary_path = run.join("summary.json");
    #[derive(Deserialize)]
    struct Stats {
        latent_mean: Vec<f64>,
        latent_std: Vec<f64>,
    }
    let stats: Stats = std::fs::read_to_string(&summary_path)
        .map_err(|e| bad("--run", format!("{}: {e}", summary_path.display())))
        .and_then(|t| {
            serde_json::from_str(&t)
                .map_err(|e| bad("--run", format!("{}: {e}", summary_path.display())))
        })?;
    let (recipe, vae, dir) = load_vae(run, checkpoint)?;
    let cfg = &recipe.vae;
    if stats.latent_mean.len() != cfg.latent || stats.latent_std.len() != cfg.latent {
        return Err(bad(
            "--run",
            format!(
                "{} holds statistics of {} channels, the VAE has {}",
                summary_path.display(),
                stats.latent_mean.len(),
                cfg.latent
            ),
        ));
    }
    let ft = cfg.time_factor();
    let list = sources(source, ft)?;
    let device = Device::flex();
    let c = cfg.latent;
    let mean = Tensor::<1>::from_data(
        TensorData::new(stats.latent_mean.iter().map(|&v| v as f32).collect(), [c]),
        &device,
    )
    .reshape([1, c, 1, 1, 1]);
    let std = Tensor::<1>::from_data(
        TensorData::new(
            stats
                .latent_std
                .iter()
                .map(|&v| v.max(1e-6) as f32)
                .collect(),
            [c],
        ),
        &device,
    )
    .reshape([1, c, 1, 1, 1]);
    let tmp = out.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| RecipeError::io(&tmp, e))?;
    let mut caption_cache: HashMap<PathBuf, HashMap<String, String>> = HashMap::new();
    let mut index = String::new();
    let result = (|| -> Result<()> {
        for (i, (path, frames)) in list.iter().enumerate() {
            let clip = Clip::read(path).map_err(|e| RecipeError::io(path, e))?;
            let clip = match frames {
                Some(f) if *f <= clip.len() => clip.trim(*f),
                Some(f) => {
                    return Err(RecipeError::io(
                        path,
                        format!("has {} frames, its bucket {f}", clip.len()),
                    ));
                }
                None => usable(&clip, ft),
            };
            let (w, h) = clip.size();
            cfg.latent_shape(clip.len(), h, w)
                .map_err(|e| RecipeError::io(path, e.to_string()))?;
            let z = vae.encode_chunked(clip_tensor(&clip, &device), chunk).mean;
            let z = (z - mean.clone()) / std.clone();
            let [_, zc, zt, zh, zw] = z.dims();
            let values = z
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| RecipeError::io(path, format!("{e:?}")))?;
            let file = format!("latent_{i:06}.safetensors");
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let view = TensorView::new(Dtype::F32, vec![zc, zt, zh, zw], &bytes)
                .map_err(|e| RecipeError::io(path, e))?;
            let data = safetensors::serialize([("latent", view)], None)
                .map_err(|e| RecipeError::io(&tmp.join(&file), e))?;
            std::fs::write(tmp.join(&file), data)
                .map_err(|e| RecipeError::io(&tmp.join(&file), e))?;
            let parent = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            if !caption_cache.contains_key(&parent) {
                caption_cache.insert(parent.clone(), captions(&parent)?);
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let entry = CachedClip {
                clip: path.clone(),
                file,
                frames: clip.len(),
                shape: [zc, zt, zh, zw],
                caption: caption_cache[&parent].get(&name).cloned(),
            };
            index.push_str(&serde_json::to_string(&entry).map_err(|e| RecipeError::io(&tmp, e))?);
            index.push('\n');
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let meta = CacheMeta {
        vae_run: run.to_path_buf(),
        checkpoint: dir,
        latent_channels: c,
        time_factor: ft,
        space_factor: cfg.space_factor(),
        latent_mean: stats.latent_mean,
        latent_std: stats.latent_std,
        clips: list.len(),
    };
    let write = || -> Result<()> {
        std::fs::write(tmp.join("index.jsonl"), &index).map_err(|e| RecipeError::io(&tmp, e))?;
        let text = serde_json::to_string_pretty(&meta).map_err(|e| RecipeError::io(&tmp, e))?;
        std::fs::write(tmp.join("meta.json"), text).map_err(|e| RecipeError::io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| RecipeError::io(out, e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(meta)
}

/// Reads a latent cache: its metadata and index.
pub fn read_cache(dir: &Path) -> Result<(CacheMeta, Vec<CachedClip>)> {
    let meta_path = dir.join("meta.json");
    let meta: CacheMeta = std::fs::read_to_string(&meta_path)
        .map_err(|e| RecipeError::io(&meta_path, e))
        .and_then(|t| serde_json::from_str(&t).map_err(|e| RecipeError::io(&meta_path, e)))?;
    let index_path = dir.join("index.jsonl");
    let text = std::fs::read_to_string(&index_path).map_err(|e| RecipeError::io(&index_path, e))?;
    let index = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| RecipeError::io(&index_path, format!("line {}: {e}", i + 1)))
        })
        .collect::<Result<Vec<CachedClip>>>()?;
    Ok((meta, index))
}

/// One cached latent `[channels, t, h, w]` (normalised) as a tensor.
pub fn read_latent(dir: &Path, entry: &CachedClip, device: &Device) -> Result<Tensor<4>> {
    let path = dir.join(&entry.file);
    let bytes = std::fs::read(&path).map_err(|e| RecipeError::io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| RecipeError::io(&path, e))?;
    let view = st.tensor("latent").map_err(|e| RecipeError::io(&path, e))?;
    if view.dtype() != Dtype::F32 || view.shape() != entry.shape {
        return Err(RecipeError::io(
            &path,
            format!(
                "holds {:?} {:?}, the index says F32 {:?}",
                view.dtype(),
                view.shape(),
                entry.shape
            ),
        ));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Tensor::from_data(
        TensorData::new(values, entry.shape),
        device,
    ))
}
