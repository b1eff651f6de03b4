//! The latent cache a DiT trains on: every clip of a folder, or every accepted clip of a
//! pipeline manifest (cut to its bucket's length), encoded once by a trained VAE (posterior
//! means, encoded in chunks with the causal state carried between them), normalised per
//! channel by the VAE's latent statistics, and written as one safetensors file per clip, with
//! `index.jsonl` (clip, file, latent shape, caption when the clip folder has a
//! `captions.jsonl`) and `meta.json` (where the VAE came from, its factors and statistics).
//! The folder is written under a temporary name and renamed when complete.
//! `burn-recipes data cache` drives [`cache_latents`] with a VAE run's checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::clip::{Clip, list_clips};
use crate::pipeline::read_manifest;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid, io};
use crate::tensor::{clip_tensor, usable};
use crate::vae::{Vae, VaeConfig};

/// `meta.json` of a latent cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// The VAE's run folder.
    pub vae_run: PathBuf,
    /// The VAE's checkpoint folder.
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
pub fn sources(source: &Path, time_factor: usize) -> Result<Vec<(PathBuf, Option<usize>)>> {
    if source.is_file() {
        let entries = read_manifest(source)?;
        let accepted: Vec<_> = entries
            .into_iter()
            .filter(|e| e.accepted)
            .map(|e| (e.clip, e.bucket.map(|b| b.frames)))
            .collect();
        if accepted.is_empty() {
            return Err(invalid(
                "source",
                format!("{}: the manifest accepts no clip", source.display()),
            ));
        }
        for (clip, frames) in &accepted {
            if let Some(f) = frames
                && (*f == 0 || !(f - 1).is_multiple_of(time_factor))
            {
                return Err(invalid(
                    "source",
                    format!(
                        "{}: bucket length {f} is not 1 + a multiple of the VAE's temporal factor {time_factor}",
                        clip.display()
                    ),
                ));
            }
        }
        return Ok(accepted);
    }
    let clips = list_clips(source)?;
    if clips.is_empty() {
        return Err(invalid(
            "source",
            format!("{}: no clips (PNG-frame folders or GIFs)", source.display()),
        ));
    }
    Ok(clips.into_iter().map(|c| (c, None)).collect())
}

/// Captions of the clips in `dir` from its `captions.jsonl` (`{"clip": NAME, "caption": …}`
/// lines, as `data synth` writes), keyed by clip name.
pub fn captions(dir: &Path) -> Result<HashMap<String, String>> {
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
        let line: Line =
            serde_json::from_str(l).map_err(|e| io(&path, format!("line {}: {e}", i + 1)))?;
        out.insert(line.clip, line.caption);
    }
    Ok(out)
}

/// The per-channel statistics the cached latents are normalised by (as
/// [`crate::vae_training::latent_statistics`] measures them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentStats {
    /// Per-channel mean.
    pub latent_mean: Vec<f64>,
    /// Per-channel standard deviation.
    pub latent_std: Vec<f64>,
}

/// Where a cache's VAE came from, recorded in its `meta.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeOrigin {
    /// The VAE's run folder.
    pub run: PathBuf,
    /// The checkpoint folder its weights were read from.
    pub checkpoint: PathBuf,
}

/// Encodes the clips of `source` (a folder, or a manifest's accepted clips; see [`sources`])
/// with `vae` (on the CPU), `chunk` latent steps at a time, normalised by `stats`, into the
/// new folder `out`. Errors name `out`, `chunk`, `stats` or `source`, or the file.
pub fn cache_latents(
    (vae, cfg, origin): (&Vae, &VaeConfig, &VaeOrigin),
    stats: &LatentStats,
    source: &Path,
    out: &Path,
    chunk: usize,
) -> Result<CacheMeta> {
    if out.exists() {
        return Err(invalid("out", format!("{} already exists", out.display())));
    }
    if chunk == 0 {
        return Err(invalid("chunk", "must be at least 1"));
    }
    if stats.latent_mean.len() != cfg.latent || stats.latent_std.len() != cfg.latent {
        return Err(invalid(
            "stats",
            format!(
                "statistics of {} channels for a VAE of {}",
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
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let mut caption_cache: HashMap<PathBuf, HashMap<String, String>> = HashMap::new();
    let mut index = String::new();
    let result = (|| -> Result<()> {
        for (i, (path, frames)) in list.iter().enumerate() {
            let clip = Clip::read(path).map_err(|e| io(path, e))?;
            let clip = match frames {
                Some(f) if *f <= clip.len() => clip.trim(*f),
                Some(f) => {
                    return Err(io(
                        path,
                        format!("has {} frames, its bucket {f}", clip.len()),
                    ));
                }
                None => usable(&clip, ft),
            };
            let (w, h) = clip.size();
            cfg.latent_shape(clip.len(), h, w)
                .map_err(|e| io(path, e.to_string()))?;
            let z = vae.encode_chunked(clip_tensor(&clip, &device), chunk).mean;
            let z = (z - mean.clone()) / std.clone();
            let [_, zc, zt, zh, zw] = z.dims();
            let values = z
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| io(path, format!("{e:?}")))?;
            let file = format!("latent_{i:06}.safetensors");
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let view = TensorView::new(Dtype::F32, vec![zc, zt, zh, zw], &bytes)
                .map_err(|e| io(path, e))?;
            let data = safetensors::serialize([("latent", view)], None)
                .map_err(|e| io(tmp.join(&file), e))?;
            std::fs::write(tmp.join(&file), data).map_err(|e| io(tmp.join(&file), e))?;
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
            index.push_str(&serde_json::to_string(&entry).map_err(|e| io(&tmp, e))?);
            index.push('\n');
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let meta = CacheMeta {
        vae_run: origin.run.clone(),
        checkpoint: origin.checkpoint.clone(),
        latent_channels: c,
        time_factor: ft,
        space_factor: cfg.space_factor(),
        latent_mean: stats.latent_mean.clone(),
        latent_std: stats.latent_std.clone(),
        clips: list.len(),
    };
    let write = || -> Result<()> {
        std::fs::write(tmp.join("index.jsonl"), &index).map_err(|e| io(&tmp, e))?;
        let text = serde_json::to_string_pretty(&meta).map_err(|e| io(&tmp, e))?;
        std::fs::write(tmp.join("meta.json"), text).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| io(out, e))
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
        .map_err(|e| io(&meta_path, e))
        .and_then(|t| serde_json::from_str(&t).map_err(|e| io(&meta_path, e)))?;
    let index_path = dir.join("index.jsonl");
    let text = std::fs::read_to_string(&index_path).map_err(|e| io(&index_path, e))?;
    let index = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| io(&index_path, format!("line {}: {e}", i + 1)))
        })
        .collect::<Result<Vec<CachedClip>>>()?;
    Ok((meta, index))
}

/// One cached latent `[channels, t, h, w]` (normalised) as a tensor.
pub fn read_latent(dir: &Path, entry: &CachedClip, device: &Device) -> Result<Tensor<4>> {
    let path = dir.join(&entry.file);
    let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| io(&path, e))?;
    let view = st.tensor("latent").map_err(|e| io(&path, e))?;
    if view.dtype() != Dtype::F32 || view.shape() != entry.shape {
        return Err(io(
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
