//! DiT recipes: `burn-recipes train` on a recipe with a `[dit]` table trains burn-video's DiT
//! with rectified flow on cached VAE latents (`burn-recipes data cache`) through curriculum
//! stages (`[[stage]]`: images only, then short clips, then longer ones, each with its own
//! steps, learning rate, batch and image/video mix), logging every stage switch and a
//! flow-matching validation loss at fixed timesteps after each stage; `burn-recipes sample`
//! generates clips for captions.
//!
//! Images are the first latent frame of a clip (a causal VAE encodes the first frame alone),
//! a clip of `f` latent frames is the first `f` of its cache; a batch holds one shape (bucket).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn_parallel::prelude::{AdamWConfig, DistributedAdamW, GradientBuffer, Group};
use burn_video::dit::{Condition, Dit, DitConfig};
use burn_video::flow::{self, Rng};
use burn_video::text::Vocabulary;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Meta};
use crate::error::{RecipeError, Result};
use crate::latents::{CacheMeta, CachedClip, read_cache, read_latent};
use crate::recipe::{RunConfig, apply_override, bad, from_serde};

/// `[dit]`: the transformer (latent channels and vocabulary come from the data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitModel {
    /// Width.
    pub hidden: usize,
    /// Blocks.
    pub depth: usize,
    /// Heads (`hidden / heads` a multiple of 6).
    pub heads: usize,
    /// MLP width / hidden.
    #[serde(default = "four")]
    pub mlp_ratio: usize,
    /// Longest caption in words.
    #[serde(default = "eight")]
    pub text_len: usize,
}

fn four() -> usize {
    4
}

fn eight() -> usize {
    8
}

/// `[data]`: the latent cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitData {
    /// A latent cache folder (`burn-recipes data cache`); its clips need captions.
    pub latents: PathBuf,
    /// Share of captions replaced by the null caption in training (classifier-free guidance).
    #[serde(default = "dropout")]
    pub caption_dropout: f64,
    /// Every this-many-th clip is held out for the validation loss.
    pub holdout_every: usize,
}

fn dropout() -> f64 {
    0.1
}

/// `[flow]`: timestep sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// Mean of the logit-normal.
    #[serde(default)]
    pub logit_mean: f64,
    /// Standard deviation of the logit-normal.
    #[serde(default = "one_f")]
    pub logit_std: f64,
    /// Latent side at which the resolution shift is 1 (for one latent frame).
    #[serde(default = "base")]
    pub shift_base: usize,
}

fn one_f() -> f64 {
    1.0
}

fn base() -> usize {
    8
}

/// One `[[stage]]` of the curriculum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Name (logged).
    pub name: String,
    /// Optimizer steps.
    pub steps: usize,
    /// Learning rate (constant after `warmup_steps`).
    pub lr: f64,
    /// Linear warm-up steps at the start of the stage.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Samples per batch.
    pub batch: usize,
    /// Latent frames of the video batches (1: images only).
    pub frames: usize,
    /// Share of batches that are images (the first latent frame) in a video stage.
    #[serde(default)]
    pub image_ratio: f64,
}

/// A DiT recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitRecipe {
    /// Run folder and seed.
    pub run: RunConfig,
    /// The transformer.
    pub dit: DitModel,
    /// The latents.
    pub data: DitData,
    /// Timestep sampling.
    #[serde(default = "FlowConfig::default_values")]
    pub flow: FlowConfig,
    /// The curriculum.
    pub stage: Vec<Stage>,
}

impl FlowConfig {
    fn default_values() -> Self {
        Self {
            logit_mean: 0.0,
            logit_std: 1.0,
            shift_base: base(),
        }
    }
}

/// Whether recipe text is a DiT recipe (it has a `[dit]` table).
pub fn is_dit_recipe(text: &str) -> bool {
    text.parse::<toml::Table>()
        .is_ok_and(|t| t.contains_key("dit"))
}

impl DitRecipe {
    /// Reads a recipe file and applies `--set` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut value: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| RecipeError::Syntax(e.message().replace('\n', " ")))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let recipe = DitRecipe::deserialize(toml::Value::Table(value))
            .map_err(|e| from_serde(&e.to_string()))?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Checks every value that does not need the data; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.stage.is_empty() {
            return Err(bad("stage", "needs at least one [[stage]]"));
        }
        for (i, s) in self.stage.iter().enumerate() {
            let key = |k: &str| format!("stage[{i}].{k}");
            for (k, v) in [("steps", s.steps), ("batch", s.batch), ("frames", s.frames)] {
                if v == 0 {
                    return Err(bad(&key(k), "must be at least 1"));
                }
            }
            if !(s.lr.is_finite() && s.lr > 0.0) {
                return Err(bad(&key("lr"), "must be a positive number"));
            }
            if s.warmup_steps > s.steps {
                return Err(bad(&key("warmup_steps"), "exceeds the stage's steps"));
            }
            if !(0.0..=1.0).contains(&s.image_ratio) {
                return Err(bad(&key("image_ratio"), "must be in [0, 1]"));
            }
        }
        if !(0.0..1.0).contains(&self.data.caption_dropout) {
            return Err(bad("data.caption_dropout", "must be in [0, 1)"));
        }
        if self.data.holdout_every < 2 {
            return Err(bad(
                "data.holdout_every",
                "must be at least 2 (every n-th clip is held out)",
            ));
        }
        if !(self.flow.logit_std.is_finite() && self.flow.logit_std > 0.0) {
            return Err(bad("flow.logit_std", "must be a positive number"));
        }
        if self.flow.shift_base == 0 {
            return Err(bad("flow.shift_base", "must be at least 1"));
        }
        let probe = DitConfig {
            latent: 1,
            hidden: self.dit.hidden,
            depth: self.dit.depth,
            heads: self.dit.heads,
            mlp_ratio: self.dit.mlp_ratio,
            vocab: 3,
            text_len: self.dit.text_len,
            rope_base: 10_000.0,
        };
        probe.validate().map_err(|e| match e {
            burn_video::VideoError::InvalidArgument { name, reason } => {
                bad(&format!("dit.{name}"), reason)
            }
            other => bad("dit", other.to_string()),
        })
    }

    /// The stage and step within it of global step `step`.
    pub fn stage_at(&self, step: usize) -> Option<(usize, usize)> {
        let mut start = 0;
        for (i, s) in self.stage.iter().enumerate() {
            if step < start + s.steps {
                return Some((i, step - start));
            }
            start += s.steps;
        }
        None
    }

    /// Total steps of the curriculum.
    pub fn total_steps(&self) -> usize {
        self.stage.iter().map(|s| s.steps).sum()
    }
}

/// A clip's latent `[C, t, h, w]` and caption, in memory.
#[derive(Debug, Clone)]
pub struct LatentClip {
    /// The normalised latent.
    pub latent: Tensor<4>,
    /// Caption.
    pub caption: String,
}

/// The batches of a stage: which latent frames (a bucket keeps one shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// The first latent frame of each clip.
    Images,
    /// The first `n` latent frames.
    Video(usize),
}

impl BatchKind {
    /// Latent frames.
    pub fn frames(self) -> usize {
        match self {
            Self::Images => 1,
            Self::Video(n) => n,
        }
    }
}

/// The kind of batch `step` of `stage` draws (images with probability `image_ratio`, always
/// when the stage has one frame), from the seeded generator.
pub fn batch_kind(stage: &Stage, rng: &mut Rng) -> BatchKind {
    if stage.frames == 1 || rng.uniform() < stage.image_ratio {
        BatchKind::Images
    } else {
        BatchKind::Video(stage.frames)
    }
}

/// `[B, C, f, h, w]` from the first `f` latent frames of `clips`.
fn stack(clips: &[&LatentClip], frames: usize) -> Tensor<5> {
    let parts = clips
        .iter()
        .map(|c| c.latent.clone().narrow(1, 0, frames).unsqueeze_dim::<5>(0))
        .collect();
    Tensor::cat(parts, 0)
}

/// Reads the cache: clips split into training and held out, the vocabulary of every caption.
pub fn load_latents(
    data: &DitData,
    device: &Device,
) -> Result<(CacheMeta, Vec<LatentClip>, Vec<LatentClip>, Vocabulary)> {
    let (meta, index) =
        read_cache(&data.latents).map_err(|e| bad("data.latents", e.to_string()))?;
    let missing: Vec<&CachedClip> = index.iter().filter(|c| c.caption.is_none()).collect();
    if let Some(c) = missing.first() {
        return Err(bad(
            "data.latents",
            format!(
                "{} clips have no caption (first: {}); cache clips with a captions.jsonl",
                missing.len(),
                c.clip.display()
            ),
        ));
    }
    let vocab = Vocabulary::from_captions(
        &index
            .iter()
            .filter_map(|c| c.caption.clone())
            .collect::<Vec<_>>(),
    );
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, entry) in index.iter().enumerate() {
        let clip = LatentClip {
            latent: read_latent(&data.latents, entry, device)?,
            caption: entry.caption.clone().unwrap_or_default(),
        };
        if i % data.holdout_every == data.holdout_every - 1 {
            held.push(clip);
        } else {
            train.push(clip);
        }
    }
    if train.is_empty() || held.is_empty() {
        return Err(bad(
            "data.holdout_every",
            format!("{} clips leave no training or held-out clip", index.len()),
        ));
    }
    Ok((meta, train, held, vocab))
}

/// The DiT configuration of a recipe for a cache.
pub fn dit_config(recipe: &DitRecipe, meta: &CacheMeta, vocab: &Vocabulary) -> DitConfig {
    DitConfig {
        latent: meta.latent_channels,
        hidden: recipe.dit.hidden,
        depth: recipe.dit.depth,
        heads: recipe.dit.heads,
        mlp_ratio: recipe.dit.mlp_ratio,
        vocab: vocab.len(),
        text_len: recipe.dit.text_len,
        rope_base: 10_000.0,
    }
}

/// Validation: the flow-matching loss averaged over fixed timesteps (0.1 … 0.9) with fixed
/// noise on the held-out clips, for batches of `frames` latent frames.
pub fn validation_loss(
    dit: &Dit,
    held: &[LatentClip],
    vocab: &Vocabulary,
    text_len: usize,
    frames: usize,
    device: &Device,
) -> Result<f64> {
    let refs: Vec<&LatentClip> = held.iter().collect();
    let x0 = stack(&refs, frames);
    let captions: Vec<Option<&str>> = held.iter().map(|c| Some(c.caption.as_str())).collect();
    let text = vocab
        .batch(&captions, text_len, device)
        .map_err(|e| bad("data.latents", e.to_string()))?;
    let cond = Condition {
        text,
        first_frame: None,
    };
    let mut rng = Rng::new(0x5EED);
    let noise: Vec<f32> = (0..x0.dims().iter().product::<usize>())
        .map(|_| rng.normal() as f32)
        .collect();
    let eps = Tensor::<5>::from_data(TensorData::new(noise, x0.dims()), device);
    let mut total = 0.0;
    let steps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
    for t in steps {
        let tt = Tensor::<1>::full([held.len()], t, device);
        let xt = flow::interpolate(x0.clone(), eps.clone(), tt.clone());
        let v = dit
            .forward(xt, tt, &cond)
            .map_err(|e| bad("dit", e.to_string()))?;
        total += scalar(flow::loss(v, x0.clone(), eps.clone()));
    }
    Ok(total / steps.len() as f64)
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f64::NAN)
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Serialize)]
struct DitMetrics<'a> {
    step: usize,
    stage: &'a str,
    frames: usize,
    loss: f64,
    lr: f64,
    seconds: f64,
}

/// What a DiT run reports per stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Mean training loss of its last 10 steps.
    pub final_loss: f64,
    /// Validation loss at its end (its frames).
    pub validation_loss: f64,
    /// Latent frames of its video batches.
    pub frames: usize,
}

/// What a DiT run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DitSummary {
    /// Per stage.
    pub stages: Vec<StageReport>,
    /// Seconds of training.
    pub seconds: f64,
    /// The vocabulary (for sampling).
    pub vocabulary: Vocabulary,
}

fn io(path: &Path, e: impl std::fmt::Display) -> RecipeError {
    RecipeError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Trains a DiT recipe from scratch in its (new) run folder; `on_stage` hears every switch.
pub fn train_dit(recipe: &DitRecipe, mut on_stage: impl FnMut(&Stage)) -> Result<DitSummary> {
    let run = &recipe.run.dir;
    if run.join("metrics.jsonl").exists() || checkpoint::latest(run)?.is_some() {
        return Err(bad(
            "run.dir",
            format!(
                "{} already holds a run; choose another run.dir",
                run.display()
            ),
        ));
    }
    let device = Device::flex().autodiff();
    let (meta, train, held, vocab) = load_latents(&recipe.data, &device)?;
    let longest = train
        .iter()
        .chain(&held)
        .map(|c| c.latent.dims()[1])
        .min()
        .unwrap_or(0);
    for (i, s) in recipe.stage.iter().enumerate() {
        if s.frames > longest {
            return Err(bad(
                &format!("stage[{i}].frames"),
                format!(
                    "{} latent frames; the shortest cached clip has {longest}",
                    s.frames
                ),
            ));
        }
    }
    for c in train.iter().chain(&held) {
        vocab
            .encode(&c.caption, recipe.dit.text_len)
            .map_err(|e| bad("dit.text_len", e.to_string()))?;
    }
    let cfg = dit_config(recipe, &meta, &vocab);
    let mut dit = cfg.init(&device).map_err(|e| bad("dit", e.to_string()))?;
    let single = Group::single();
    let mut opt = DistributedAdamW::new(
        AdamWConfig {
            lr: recipe.stage[0].lr,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            ..AdamWConfig::default()
        },
        single.clone(),
        single.clone(),
        single,
    )?;
    std::fs::create_dir_all(run).map_err(|e| io(run, e))?;
    let copy = run.join("recipe.toml");
    std::fs::write(
        &copy,
        toml::to_string_pretty(recipe).map_err(|e| io(&copy, e))?,
    )
    .map_err(|e| io(&copy, e))?;
    let metrics_path = run.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path).map_err(|e| io(&metrics_path, e))?;
    let mut rng = Rng::new(recipe.run.seed);
    let began = Instant::now();
    let mut reports = Vec::new();
    let mut step = 0;
    let eval_device = Device::flex();
    for stage in &recipe.stage {
        on_stage(stage);
        tracing::info!(stage = %stage.name, frames = stage.frames, steps = stage.steps, "stage");
        let mut losses = Vec::new();
        for s in 0..stage.steps {
            let kind = batch_kind(stage, &mut rng);
            let picked: Vec<&LatentClip> = (0..stage.batch)
                .map(|_| &train[(rng.uniform() * train.len() as f64) as usize % train.len()])
                .collect();
            let x0 = stack(&picked, kind.frames());
            let [b, _, f, h, w] = x0.dims();
            let r = flow::resolution_shift(h, w, f, recipe.flow.shift_base);
            let ts: Vec<f32> = flow::logit_normal(
                b,
                recipe.flow.logit_mean,
                recipe.flow.logit_std,
                r,
                &mut rng,
            )
            .into_iter()
            .map(|t| t as f32)
            .collect();
            let t = Tensor::<1>::from_data(TensorData::new(ts, [b]), &device);
            let eps = Tensor::<5>::random(x0.dims(), Distribution::Normal(0.0, 1.0), &device);
            let captions: Vec<Option<&str>> = picked
                .iter()
                .map(|c| {
                    (rng.uniform() >= recipe.data.caption_dropout).then_some(c.caption.as_str())
                })
                .collect();
            let text = vocab
                .batch(&captions, recipe.dit.text_len, &device)
                .map_err(|e| bad("dit.text_len", e.to_string()))?;
            let cond = Condition {
                text,
                first_frame: None,
            };
            let xt = flow::interpolate(x0.clone(), eps.clone(), t.clone());
            let v = dit
                .forward(xt, t, &cond)
                .map_err(|e| bad("dit", e.to_string()))?;
            let loss = flow::loss(v, x0, eps);
            let value = scalar(loss.clone());
            if !value.is_finite() {
                return Err(RecipeError::Refused(format!(
                    "the loss became {value} at step {step} (stage {}); lower its lr",
                    stage.name
                )));
            }
            let lr = stage.lr * ((s + 1) as f64 / (stage.warmup_steps + 1) as f64).min(1.0);
            let mut grads = GradientBuffer::new();
            grads.add(&dit, &loss.backward())?;
            opt.set_lr(lr);
            dit = opt.step_buffered(dit, grads, &[])?.0;
            losses.push(value);
            let line = DitMetrics {
                step: step + 1,
                stage: &stage.name,
                frames: kind.frames(),
                loss: value,
                lr,
                seconds: began.elapsed().as_secs_f64(),
            };
            let text = serde_json::to_string(&line).map_err(|e| io(&metrics_path, e))?;
            writeln!(metrics, "{text}").map_err(|e| io(&metrics_path, e))?;
            step += 1;
        }
        let valid = dit.valid();
        let held_eval: Vec<LatentClip> = held
            .iter()
            .map(|c| LatentClip {
                latent: Tensor::from_data(c.latent.to_data(), &eval_device),
                caption: c.caption.clone(),
            })
            .collect();
        let validation = validation_loss(
            &valid,
            &held_eval,
            &vocab,
            recipe.dit.text_len,
            stage.frames,
            &eval_device,
        )?;
        tracing::info!(stage = %stage.name, validation, "stage done");
        let tail = &losses[losses.len().saturating_sub(10)..];
        reports.push(StageReport {
            name: stage.name.clone(),
            final_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
            validation_loss: validation,
            frames: stage.frames,
        });
    }
    let seconds = began.elapsed().as_secs_f64();
    let meta_ck = Meta {
        step,
        world: 1,
        next_sequence: 0,
        seed: recipe.run.seed,
    };
    let comm = burn_parallel::comm::SingleRank::new();
    checkpoint::save(run, &meta_ck, &dit, &opt.state(), &comm, 1)?;
    let summary = DitSummary {
        stages: reports,
        seconds,
        vocabulary: vocab,
    };
    let path = run.join("summary.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&summary).map_err(|e| io(&path, e))?,
    )
    .map_err(|e| io(&path, e))?;
    Ok(summary)
}

/// Loads a DiT run: its recipe, summary (vocabulary) and latest checkpoint, on the CPU.
pub fn load_dit(run: &Path) -> Result<(DitRecipe, DitSummary, Dit, CacheMeta)> {
    let recipe = DitRecipe::load(&run.join("recipe.toml"), &[])?;
    let path = run.join("summary.json");
    let summary: DitSummary = std::fs::read_to_string(&path)
        .map_err(|e| bad("--run", format!("{}: {e}", path.display())))
        .and_then(|t| {
            serde_json::from_str(&t).map_err(|e| bad("--run", format!("{}: {e}", path.display())))
        })?;
    let (meta, _) =
        read_cache(&recipe.data.latents).map_err(|e| bad("data.latents", e.to_string()))?;
    let device = Device::flex();
    let dit = dit_config(&recipe, &meta, &summary.vocabulary)
        .init(&device)
        .map_err(|e| bad("dit", e.to_string()))?;
    let (dir, _) = checkpoint::latest(run)?
        .ok_or_else(|| bad("--run", format!("{} has no checkpoint", run.display())))?;
    let (dit, _) = checkpoint::load(&dir, dit, 0)?;
    Ok((recipe, summary, dit, meta))
}

/// Samples normalised latents `[B, C, frames, h, w]` for `captions` with `steps` Euler steps
/// and classifier-free guidance `guidance` (1: none), from `seed`.
#[allow(clippy::too_many_arguments)]
pub fn sample_latents(
    dit: &Dit,
    vocab: &Vocabulary,
    text_len: usize,
    captions: &[&str],
    shape: (usize, usize, usize),
    (steps, guidance, shift_base): (usize, f64, usize),
    seed: u64,
    device: &Device,
) -> Result<Tensor<5>> {
    let (frames, h, w) = shape;
    let b = captions.len();
    let c = dit.latent_channels();
    let mut rng = Rng::new(seed);
    let noise: Vec<f32> = (0..b * c * frames * h * w)
        .map(|_| rng.normal() as f32)
        .collect();
    let x1 = Tensor::<5>::from_data(TensorData::new(noise, [b, c, frames, h, w]), device);
    let texts: Vec<Option<&str>> = captions.iter().map(|c| Some(*c)).collect();
    let cond = Condition {
        text: vocab
            .batch(&texts, text_len, device)
            .map_err(|e| bad("--prompt", e.to_string()))?,
        first_frame: None,
    };
    let null = Condition {
        text: vocab
            .batch(&vec![None; b], text_len, device)
            .map_err(|e| bad("--prompt", e.to_string()))?,
        first_frame: None,
    };
    let r = flow::resolution_shift(h, w, frames, shift_base);
    flow::euler(x1, steps, r, |x, t| {
        let tt = Tensor::<1>::full([b], t, device);
        let vc = dit.forward(x.clone(), tt.clone(), &cond)?;
        if (guidance - 1.0).abs() < f64::EPSILON {
            return Ok(vc);
        }
        let vu = dit.forward(x, tt, &null)?;
        Ok(flow::guided(vc, vu, guidance))
    })
    .map_err(|e| bad("--steps", e.to_string()))
}

/// Decodes normalised latents `[B, C, t, h, w]` to clips with the VAE that made the cache
/// (its run and checkpoint are in the cache's `meta.json`), `chunk` latent steps at a time.
pub fn decode_latents(
    meta: &CacheMeta,
    z: Tensor<5>,
    chunk: usize,
) -> Result<Vec<burn_video::clip::Clip>> {
    let (_, vae, _) = crate::video::load_vae(&meta.vae_run, Some(&meta.checkpoint))?;
    let device = z.device();
    let c = meta.latent_channels;
    let stat = |v: &[f64]| {
        Tensor::<1>::from_data(
            TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), [c]),
            &device,
        )
        .reshape([1, c, 1, 1, 1])
    };
    let z = z * stat(&meta.latent_std) + stat(&meta.latent_mean);
    let b = z.dims()[0];
    (0..b)
        .map(|i| {
            let x = vae.decode_chunked(z.clone().narrow(0, i, 1), chunk);
            crate::video::to_clip(x)
        })
        .collect()
}
