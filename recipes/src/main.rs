//! `burn-recipes`: the project's command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use burn_moe::prelude::*;
use burn_moe::timing::time_forward_backward;
use burn_parallel::launch::{Hosts, MpiRun};
use burn_parallel::world::World;
use burn_recipes::error::{RecipeError, Result};
use burn_recipes::plan::{self, Estimate};
use burn_recipes::recipe::Recipe;
use burn_recipes::train::{TrainOptions, train};
use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc keeps freed tensor buffers for reuse; glibc's malloc returns large ones to the
/// kernel and faults them in again every step (millions of page faults per step on moe-small).
/// Counted for the per-step `peak_memory_bytes` of the metrics.
#[global_allocator]
static GLOBAL: burn_recipes::memory::Counting<mimalloc::MiMalloc> =
    burn_recipes::memory::Counting(mimalloc::MiMalloc);

/// mimalloc's `mi_option_purge_delay`: its place in the `mi_option_e` enum of `mimalloc.h`, the
/// same in the v2 and v3 sources libmimalloc-sys builds (the crate's named constants stop
/// before it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to purge: by default it hands pages it has kept free for a while back to
/// the kernel, which zeroes them again when they are taken back (100 steps of the VAE recipe
/// fault 254 thousand pages with purging, 2.4 thousand without). Kept, a process's resident
/// memory stays at its peak, which the next step needs anyway. A `MIMALLOC_PURGE_DELAY` in the
/// environment is left to mimalloc.
fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's integer options; mimalloc reads it at each purge, and
    // setting an option is allowed at any time from any thread. (The workspace's `unsafe_code`
    // lint is lifted for this foreign call alone.)
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "burn-recipes",
    version,
    about = "Megatron-style MoE recipes on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model from a TOML recipe (alone, or on every rank under mpirun).
    Train(TrainArgs),
    /// Run a recipe on N local processes (wraps `mpirun -np N burn-recipes train …`).
    Launch(LaunchArgs),
    /// Estimate memory per GPU, step time and MFU of a recipe's layout on its cluster.
    Plan(PlanArgs),
    /// Write PNG plots (loss, expert load) of a run directory's metrics.
    Plot(PlotArgs),
    /// Run one MoE layer forward + backward on random tokens and report routing and speed.
    Layer(LayerArgs),
    /// The video clip pipeline: score, filter and bucket clips; generate labelled clips.
    #[command(subcommand)]
    Data(DataCommand),
    /// Evaluate a trained model.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Generate clips for captions with a trained DiT run (GIFs).
    Sample(SampleArgs),
    /// Write a trained model in another format.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Make a training run of a model in another format.
    #[command(subcommand)]
    Import(ImportCommand),
}

#[derive(Subcommand, Debug)]
enum ImportCommand {
    /// A Hugging Face checkpoint folder (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE) as a run folder
    /// (recipe.toml from its config.json, a step-0 checkpoint) that `train RUN/recipe.toml
    /// --resume` fine-tunes under any `--set parallel.*` layout.
    Hf(ImportHfArgs),
}

#[derive(clap::Args, Debug)]
struct ImportHfArgs {
    /// The hub checkpoint folder (config.json, model.safetensors or a sharded index).
    dir: PathBuf,
    /// The run folder to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Set a value of the derived recipe (repeatable; e.g. the data source, the schedule).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
}

fn run_import_hf(args: &ImportHfArgs) -> Result<()> {
    let recipe = burn_recipes::hf::import_hf(&args.dir, &args.out, &args.overrides)?;
    println!(
        "{}: recipe.toml, checkpoints/step-000000; fine-tune with `burn-recipes train {} \
         --resume` (any --set parallel.* layout)",
        recipe.run.dir.display(),
        recipe.run.dir.join("recipe.toml").display()
    );
    Ok(())
}

#[derive(Subcommand, Debug)]
enum ExportCommand {
    /// A training run's model (newest checkpoint, written under any layout) as a Hugging Face
    /// checkpoint folder (config.json, model.safetensors) of the architecture that holds it.
    Hf(ExportHfArgs),
}

#[derive(clap::Args, Debug)]
struct ExportHfArgs {
    /// The run folder.
    run: PathBuf,
    /// The checkpoint folder to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Write float32 weights instead of bfloat16.
    #[arg(long)]
    f32: bool,
}

fn run_export_hf(args: &ExportHfArgs) -> Result<()> {
    use burn_moe::lm::hf::HubDtype;
    if args.out.exists() {
        return Err(RecipeError::invalid(
            "--out",
            format!("{} already exists", args.out.display()),
        ));
    }
    let model = burn_recipes::model::load_run(&args.run, &burn::tensor::Device::flex())?;
    let dtype = if args.f32 {
        HubDtype::F32
    } else {
        HubDtype::Bf16
    };
    model
        .save_hf(&args.out, dtype)
        .map_err(|e| RecipeError::invalid("RUN", e.to_string()))?;
    println!("{}: config.json, model.safetensors", args.out.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
struct SampleArgs {
    /// The DiT run folder.
    #[arg(long)]
    run: PathBuf,
    /// A caption (repeatable).
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// Folder to write `sample_NN.gif` into (created).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(clap::Args, Debug, Clone, Copy)]
struct SamplingArgs {
    /// Latent frames (1 + (video frames − 1) / the VAE's temporal factor).
    #[arg(long, default_value_t = 5)]
    frames: usize,
    /// Euler steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (1: none).
    #[arg(long, default_value_t = 4.0)]
    guidance: f64,
    /// Noise seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args, Debug)]
struct EvalDitArgs {
    /// The DiT run folder (trained on captions of `data synth` clips).
    #[arg(long)]
    run: PathBuf,
    /// Captions of the first N synthetic labels are sampled and checked.
    #[arg(long, default_value_t = 48)]
    prompts: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Loads a DiT run and the VAE of its cache, and hands `f` their sampler.
fn with_sampler<T>(
    run: &std::path::Path,
    SamplingArgs {
        frames,
        steps,
        guidance,
        ..
    }: SamplingArgs,
    f: impl FnOnce(
        &burn_recipes::dit::Sampler<'_>,
        &burn_video::dit::Dit,
    ) -> burn_recipes::error::Result<T>,
) -> Result<T> {
    use burn_recipes::dit::{Sampler, load_dit};
    if frames == 0 {
        return Err(RecipeError::invalid("--frames", "must be at least 1"));
    }
    if steps == 0 {
        return Err(RecipeError::invalid("--steps", "must be at least 1"));
    }
    if !(guidance.is_finite() && guidance >= 0.0) {
        return Err(RecipeError::invalid(
            "--guidance",
            format!("is {guidance}; it must be a finite scale >= 0 (1: none)"),
        ));
    }
    let loaded = load_dit(run)?;
    let (_, vae, _) =
        burn_recipes::video::load_vae(&loaded.meta.vae_run, Some(&loaded.meta.checkpoint))?;
    let (h, w) = loaded.latent_size;
    let sampler = Sampler {
        vae: &vae,
        vocab: &loaded.summary.vocabulary,
        meta: &loaded.meta,
        config: &loaded.config,
        shift_base: loaded.recipe.flow.shift_base,
        shape: (frames, h, w),
        steps,
        guidance,
    };
    f(&sampler, &loaded.dit)
}

fn run_sample(args: &SampleArgs) -> Result<()> {
    if args.out.exists() {
        return Err(RecipeError::invalid(
            "--out",
            format!("{} already exists", args.out.display()),
        ));
    }
    let captions: Vec<&str> = args.prompts.iter().map(String::as_str).collect();
    let clips = with_sampler(&args.run, args.sampling, |s, dit| {
        s.sample(dit, &captions, args.sampling.seed)
            .map(|(_, c)| c)
            .map_err(burn_recipes::dit::sampling_key)
    })?;
    let tmp = args.out.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| RecipeError::io(&tmp, e))?;
    for (i, clip) in clips.iter().enumerate() {
        clip.write_gif(&tmp.join(format!("sample_{i:02}.gif")), 100)?;
    }
    std::fs::rename(&tmp, &args.out).map_err(|e| RecipeError::io(&args.out, e))?;
    println!("{} clips in {}", clips.len(), args.out.display());
    Ok(())
}

fn run_eval_dit(args: &EvalDitArgs) -> Result<()> {
    if args.prompts == 0 {
        return Err(RecipeError::invalid("--prompts", "must be at least 1"));
    }
    let a = with_sampler(&args.run, args.sampling, |s, dit| {
        s.accuracy(dit, args.prompts, args.sampling.seed)
            .map_err(burn_recipes::dit::sampling_key)
    })?;
    println!(
        "{} prompts: direction {:.1}% (chance 25%), colour {:.1}% (chance 25%), count {:.1}% (chance 33%)",
        a.prompts,
        100.0 * a.direction,
        100.0 * a.colour,
        100.0 * a.count
    );
    Ok(())
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// Mean PSNR and SSIM of a video VAE run's reconstructions over every frame of every clip
    /// of a folder, next to the same-size resize baseline; writes a side-by-side preview GIF.
    Vae(EvalVaeArgs),
    /// Sample the synthetic generator's captions with a DiT run and check the clips by rules:
    /// motion direction, colour and object count accuracy.
    Dit(EvalDitArgs),
    /// Run a Hugging Face MoE checkpoint folder (config.json, safetensors): against its
    /// reference.json (transformers' logits, loss and greedy continuation) when it has one,
    /// otherwise the loss and greedy continuation of `--ids`.
    Hf(EvalHfArgs),
}

#[derive(clap::Args, Debug)]
struct EvalHfArgs {
    /// The checkpoint folder.
    dir: PathBuf,
    /// Print one JSON object (pass, max_abs_err, loss, reference_loss, greedy, greedy_match).
    #[arg(long)]
    json: bool,
    /// Token ids (comma-separated) for a folder without reference.json.
    #[arg(long, value_delimiter = ',')]
    ids: Vec<i64>,
    /// Tokens of the greedy continuation without reference.json.
    #[arg(long, default_value_t = 8)]
    tokens: usize,
}

/// `eval hf`: exit 1 on a mismatch with the reference, 2 on an error.
fn run_eval_hf(args: &EvalHfArgs) -> Result<(), Failure> {
    use burn_moe::lm::MoeLm;
    use burn_moe::lm::hf::{check_reference, greedy, logits_and_loss, read_reference};
    let model = MoeLm::from_hf(&args.dir, &burn::tensor::Device::flex())
        .map_err(|e| Failure::from(RecipeError::invalid("DIR", e.to_string())))?;
    let name = args.dir.display();
    let Some(reference) = read_reference(&args.dir).map_err(RecipeError::from)? else {
        let ids = if args.ids.is_empty() {
            (0..16.min(model.config().vocab) as i64).collect()
        } else {
            args.ids.clone()
        };
        let bad =
            |e: burn_moe::MoeError| Failure::from(RecipeError::invalid("--ids", e.to_string()));
        let (_, loss) = logits_and_loss(&model, std::slice::from_ref(&ids)).map_err(bad)?;
        let next = greedy(&model, &ids, args.tokens).map_err(bad)?;
        if args.json {
            println!("{}", serde_json::json!({ "loss": loss, "greedy": next }));
        } else {
            println!(
                "{name}: loss {loss:.4} on {} ids; greedy continuation {next:?}",
                ids.len()
            );
        }
        return Ok(());
    };
    let c = check_reference(&model, &reference).map_err(RecipeError::from)?;
    if args.json {
        let line = serde_json::json!({
            "pass": c.pass,
            "max_abs_err": c.max_abs_err,
            "logits_failed": c.logits_failed,
            "loss": c.loss,
            "reference_loss": reference.loss,
            "greedy": c.greedy,
            "greedy_match": c.greedy_match,
        });
        println!("{line}");
    } else {
        println!(
            "{}: {name}: max |logit − transformers'| {:.2e} ({} beyond rtol {}, atol {}), loss \
             {:.6} (transformers {:.6}), greedy continuation {}",
            if c.pass { "PASS" } else { "FAIL" },
            c.max_abs_err,
            c.logits_failed,
            reference.rtol,
            reference.atol,
            c.loss,
            reference.loss,
            if c.greedy_match { "equal" } else { "differs" },
        );
    }
    if c.pass {
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            message: format!("{name} does not match its reference.json"),
        })
    }
}

#[derive(clap::Args, Debug)]
struct EvalVaeArgs {
    /// The run folder (its recipe.toml and checkpoints).
    #[arg(long)]
    run: PathBuf,
    /// Folder of clips to score.
    #[arg(long)]
    clips: PathBuf,
    /// A checkpoint folder instead of the run's latest.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Where to write the preview (original | VAE | baseline of the first clip).
    #[arg(long, default_value = "vae_preview.gif")]
    preview: PathBuf,
    /// Refine each clip's latent by this many Adam steps against the decoder before decoding
    /// (semi-amortised inference; each step is a decoder pass forward and back). 0: the
    /// encoder's posterior mean.
    #[arg(long, default_value_t = 0)]
    refine: usize,
    /// Step size of the refinement.
    #[arg(long, default_value_t = 0.02)]
    refine_lr: f64,
}

fn run_eval_vae(args: &EvalVaeArgs) -> Result<()> {
    use burn_recipes::video::{Refine, evaluate_groups, held_out_sources, load_vae_on};
    if !(args.refine_lr.is_finite() && args.refine_lr > 0.0) {
        return Err(RecipeError::invalid(
            "--refine-lr",
            format!("{} must be a finite number > 0", args.refine_lr),
        ));
    }
    let refine = (args.refine > 0).then_some(Refine {
        steps: args.refine,
        lr: args.refine_lr,
    });
    // Refinement differentiates through the decoder.
    let device = if refine.is_some() {
        Device::flex().autodiff()
    } else {
        Device::flex()
    };
    let (recipe, vae, _) = load_vae_on(&args.run, args.checkpoint.as_deref(), &device)?;
    // A corpus: its held-out sources, one by one; a plain folder: every clip.
    let sources = held_out_sources(&args.clips)
        .map_err(|e| RecipeError::invalid("--clips", e.to_string()))?;
    let by_source = sources.is_some();
    let groups = match sources {
        Some(groups) => groups,
        None => {
            let paths = burn_video::clip::list_clips(&args.clips)?;
            if paths.is_empty() {
                return Err(RecipeError::invalid(
                    "--clips",
                    format!("{}: no clips", args.clips.display()),
                ));
            }
            let clips = paths
                .iter()
                .map(|p| burn_video::clip::Clip::read(p))
                .collect::<Result<Vec<_>, _>>()?;
            vec![(String::new(), clips)]
        }
    };
    let (report, per_source) = evaluate_groups(
        &vae,
        &recipe.vae,
        &groups,
        Some(&args.preview),
        &device,
        refine,
    )?;
    if by_source {
        println!(
            "| held-out source | clips | VAE PSNR | baseline PSNR | lead | VAE SSIM | baseline SSIM |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (source, r) in &per_source {
            println!(
                "| {source} | {} | {:.2} dB | {:.2} dB | {:+.2} dB | {:.4} | {:.4} |",
                r.clips,
                r.vae_psnr,
                r.baseline_psnr,
                r.vae_psnr - r.baseline_psnr,
                r.vae_ssim,
                r.baseline_ssim
            );
        }
    }
    let how = match refine {
        Some(r) => format!(" (latents refined by {} steps)", r.steps),
        None => String::new(),
    };
    println!(
        "{} clips: VAE{how} PSNR {:.2} dB, SSIM {:.4}; baseline (resize to the latent's size and back) PSNR {:.2} dB, SSIM {:.4}; preview {}",
        report.clips,
        report.vae_psnr,
        report.vae_ssim,
        report.baseline_psnr,
        report.baseline_ssim,
        args.preview.display()
    );
    Ok(())
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Score every clip of a folder (PNG-frame folders, GIFs), filter and bucket them, and write
    /// a JSONL manifest with each clip's scores and the reasons for every rejection.
    Scan(ScanArgs),
    /// Write labelled synthetic clips (moving shapes) and their captions.
    Synth(SynthArgs),
    /// Encode clips with a trained VAE run into a latent cache for the DiT (one safetensors
    /// file per clip, normalised by the run's latent statistics; index.jsonl, meta.json).
    Cache(CacheArgs),
    /// Cut camera clips (pans, zooms, small turns, camera-like changes) from every image of a
    /// folder (PNG, JPEG, GIF; `scripts/fetch-sources` fetches photographs from PyPI and
    /// Debian) into a corpus whose manifest (corpus.jsonl) records each clip's source and
    /// split: the sources of `--holdout` are held out whole.
    Corpus(CorpusArgs),
}

#[derive(clap::Args, Debug)]
struct CorpusArgs {
    /// Folder of source images.
    sources: PathBuf,
    /// The corpus folder to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Sources held out whole (file stems, comma-separated).
    #[arg(long, value_delimiter = ',')]
    holdout: Vec<String>,
    /// Clips cut from each source.
    #[arg(long, default_value_t = 8)]
    per_source: usize,
    /// Frame width and height.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Frames per clip.
    #[arg(long, default_value_t = 17)]
    frames: usize,
    /// Without the camera-like changes (mirror, exposure, contrast, noise, defocus, reversal,
    /// speed).
    #[arg(long)]
    no_augment: bool,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn run_corpus(args: &CorpusArgs) -> Result<()> {
    use burn_video::camera::{CameraConfig, Split, build_corpus, read_sources};
    let name = |flag: &'static str| {
        move |e: burn_video::VideoError| RecipeError::invalid(flag, e.to_string())
    };
    let sources = read_sources(&args.sources).map_err(name("SOURCES"))?;
    let config = CameraConfig {
        size: args.size,
        frames: args.frames,
        augment: !args.no_augment,
        ..CameraConfig::default()
    };
    let entries = build_corpus(
        &sources,
        &args.out,
        &args.holdout,
        (args.per_source, args.seed),
        &config,
    )
    .map_err(|e| match &e {
        burn_video::VideoError::InvalidArgument { name, .. } => {
            RecipeError::invalid(format!("--{}", name.replace('_', "-")), e.to_string())
        }
        _ => RecipeError::invalid("--out", e.to_string()),
    })?;
    let held = entries.iter().filter(|e| e.split == Split::Holdout).count();
    println!(
        "{} clips from {} sources into {} ({} held out from {:?}); manifest {}",
        entries.len(),
        sources.len(),
        args.out.display(),
        held,
        args.holdout,
        args.out.join(burn_video::camera::MANIFEST).display()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
struct CacheArgs {
    /// A folder of clips, or a manifest from `data scan` (its accepted clips, cut to their
    /// bucket length).
    source: PathBuf,
    /// The VAE training run.
    #[arg(long)]
    run: PathBuf,
    /// A checkpoint folder of that run (default: the latest).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// The cache folder to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Latent steps encoded at a time (the causal state is carried between chunks).
    #[arg(long, default_value_t = 4)]
    chunk: usize,
}

fn run_cache(args: &CacheArgs) -> Result<()> {
    let meta = burn_recipes::latents::cache_latents(
        &args.run,
        args.checkpoint.as_deref(),
        &args.source,
        &args.out,
        args.chunk,
    )?;
    println!(
        "{} clips encoded ({} latent channels, {}x{}x{} compression) into {}",
        meta.clips,
        meta.latent_channels,
        meta.time_factor,
        meta.space_factor,
        meta.space_factor,
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
struct ScanArgs {
    /// Folder of clips.
    clips: PathBuf,
    /// Manifest to write.
    #[arg(long, default_value = "manifest.jsonl")]
    out: PathBuf,
    /// Histogram distance between consecutive frames above which a scene cut is found.
    #[arg(long)]
    max_cut: Option<f64>,
    /// Smallest sharpness (variance of the Laplacian of 8-bit luma).
    #[arg(long)]
    min_sharpness: Option<f64>,
    /// Smallest motion (mean absolute 8-bit luma difference of consecutive frames).
    #[arg(long)]
    min_motion: Option<f64>,
    /// Largest motion.
    #[arg(long)]
    max_motion: Option<f64>,
    /// Allowed clip lengths, longest first used (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "17,9,5,1")]
    lengths: Vec<usize>,
}

#[derive(clap::Args, Debug)]
struct SynthArgs {
    /// Folder to write `clip_NNNN/` folders and `captions.jsonl` into (must not exist).
    out: PathBuf,
    /// Number of clips.
    #[arg(long, default_value_t = 48)]
    count: usize,
    /// Frame width and height.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Frames per clip.
    #[arg(long, default_value_t = 17)]
    frames: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn run_scan(args: &ScanArgs) -> Result<()> {
    use burn_video::filter::Filters;
    use burn_video::pipeline::{Buckets, scan, write_manifest};
    for (flag, v) in [
        ("--max-cut", args.max_cut),
        ("--min-sharpness", args.min_sharpness),
        ("--min-motion", args.min_motion),
        ("--max-motion", args.max_motion),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v >= 0.0)
        {
            return Err(RecipeError::invalid(
                flag,
                format!("is {v}; it must be a finite number >= 0"),
            ));
        }
    }
    if args.lengths.is_empty() || args.lengths.contains(&0) {
        return Err(RecipeError::invalid(
            "--lengths",
            "give clip lengths of at least 1 frame",
        ));
    }
    let d = Filters::default();
    let filters = Filters {
        max_cut: args.max_cut.unwrap_or(d.max_cut),
        min_sharpness: args.min_sharpness.unwrap_or(d.min_sharpness),
        min_motion: args.min_motion.unwrap_or(d.min_motion),
        max_motion: args.max_motion.unwrap_or(d.max_motion),
        min_frames: d.min_frames,
    };
    let buckets = Buckets {
        lengths: args.lengths.clone(),
        resolutions: Vec::new(),
    };
    let entries = scan(&args.clips, &filters, &buckets)?;
    if entries.is_empty() {
        return Err(RecipeError::invalid(
            "CLIPS",
            format!(
                "{}: no clips (PNG-frame folders or GIFs)",
                args.clips.display()
            ),
        ));
    }
    write_manifest(&args.out, &entries)?;
    let accepted = entries.iter().filter(|e| e.accepted).count();
    println!(
        "{} clips: {accepted} accepted, {} rejected; manifest {}",
        entries.len(),
        entries.len() - accepted,
        args.out.display()
    );
    let mut buckets = std::collections::BTreeMap::new();
    for b in entries.iter().filter_map(|e| e.bucket) {
        *buckets.entry(b).or_insert(0usize) += 1;
    }
    for (b, n) in buckets {
        println!("  bucket {}x{}x{}: {n}", b.frames, b.height, b.width);
    }
    for e in entries.iter().filter(|e| !e.accepted) {
        println!("  rejected {}: {}", e.clip.display(), e.reasons.join("; "));
    }
    Ok(())
}

fn run_synth(args: &SynthArgs) -> Result<()> {
    use burn_video::synthetic::{Label, generate};
    if args.out.exists() {
        return Err(RecipeError::invalid(
            "OUT",
            format!("{} already exists", args.out.display()),
        ));
    }
    for (flag, v) in [
        ("--count", args.count),
        ("--size", args.size),
        ("--frames", args.frames),
    ] {
        if v == 0 {
            return Err(RecipeError::invalid(flag, "must be at least 1"));
        }
    }
    // Everything is generated before anything is written.
    let clips = (0..args.count)
        .map(|i| {
            let label = Label::nth(i);
            generate(
                &label,
                args.size,
                args.frames,
                args.seed.wrapping_add(i as u64),
            )
            .map(|c| (label, c))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tmp = args.out.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut captions = String::new();
    for (i, (label, clip)) in clips.iter().enumerate() {
        let name = format!("clip_{i:04}");
        clip.write_dir(&tmp.join(&name))?;
        let line = serde_json::json!({ "clip": name, "caption": label.caption(), "label": label });
        captions.push_str(&line.to_string());
        captions.push('\n');
    }
    std::fs::write(tmp.join("captions.jsonl"), captions)
        .map_err(|e| RecipeError::io(&tmp.join("captions.jsonl"), e))?;
    std::fs::rename(&tmp, &args.out).map_err(|e| RecipeError::io(&args.out, e))?;
    println!(
        "{} clips and captions.jsonl in {}",
        clips.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
struct PlanArgs {
    /// The recipe file (omit with --calibrate).
    recipe: Option<PathBuf>,
    /// Override a recipe value, e.g. `cluster.gpus=512`, `parallel.tp=4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the estimate as one JSON object.
    #[arg(long)]
    json: bool,
    /// Rank every layout that fits and print the best ones.
    #[arg(long)]
    search: bool,
    /// How many layouts --search prints.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Fit the four efficiency numbers to the MFUs of an anchors file and report the fit.
    #[arg(long, value_name = "ANCHORS_JSON")]
    calibrate: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct PlotArgs {
    /// The run directory (holds metrics.jsonl).
    run_dir: PathBuf,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// The recipe file.
    recipe: PathBuf,
    /// Override a recipe value: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest checkpoint in the run directory.
    #[arg(long)]
    resume: bool,
    /// Stop after this step, with a checkpoint (continue later with `--resume`).
    #[arg(long, value_name = "STEP")]
    stop_at: Option<usize>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    device: Backend,
}

#[derive(clap::Args, Debug)]
struct LaunchArgs {
    /// Number of processes.
    #[arg(short = 'n', long = "nproc")]
    nproc: usize,
    /// The recipe file.
    recipe: PathBuf,
    /// Override a recipe value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the newest checkpoint in the run directory (under any `[parallel]`
    /// layout when the checkpoint recorded its own).
    #[arg(long)]
    resume: bool,
    /// Stop after this step, with a checkpoint (continue later with `--resume`).
    #[arg(long, value_name = "STEP")]
    stop_at: Option<usize>,
    /// Backend of every rank; with `cuda` each rank takes the GPU of its local rank on its
    /// node (`OMPI_COMM_WORLD_LOCAL_RANK`, modulo the GPUs in `CUDA_VISIBLE_DEVICES`).
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    device: Backend,
    /// Run on the hosts of this OpenMPI hostfile (`mpirun --hostfile`); the one-machine MCA
    /// defaults are then not added.
    #[arg(long, value_name = "FILE", conflicts_with = "host")]
    hostfile: Option<PathBuf>,
    /// Run on these hosts, `host1:slots,host2:slots` (`mpirun --host`).
    #[arg(long, value_name = "LIST")]
    host: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// Burn's Flex CPU backend.
    Flex,
    /// Burn's CUDA backend (build with `--features cuda`).
    Cuda,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Score {
    Softmax,
    Sigmoid,
}

#[derive(clap::Args, Debug)]
struct LayerArgs {
    /// Tokens per step (sequence length × batch).
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// FFN width of one expert.
    #[arg(long, default_value_t = 1408)]
    ffn: usize,
    /// Number of experts.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    topk: usize,
    /// Score function.
    #[arg(long, value_enum, default_value_t = Score::Softmax)]
    score: Score,
    /// Capacity factor (dropless when absent).
    #[arg(long)]
    capacity_factor: Option<f64>,
    /// Switch aux-loss coefficient.
    #[arg(long, default_value_t = 1e-2)]
    aux_loss_coeff: f64,
    /// z-loss coefficient.
    #[arg(long)]
    z_loss_coeff: Option<f64>,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    device: Backend,
}

fn device(backend: Backend) -> Result<Device> {
    let kind = match backend {
        Backend::Flex => BackendKind::Flex,
        Backend::Cuda => BackendKind::Cuda,
    };
    Ok(burn_moe::backend::device(kind)?)
}

fn run_layer(args: &LayerArgs) -> Result<()> {
    if args.tokens == 0 {
        return Err(RecipeError::invalid("--tokens", "must be at least 1"));
    }
    burn_recipes::train::check_layer_memory(
        (args.tokens, args.hidden, args.ffn),
        (args.experts, args.topk),
    )?;
    let device = device(args.device)?.autodiff();
    let score = match args.score {
        Score::Softmax => ScoreFunction::Softmax,
        Score::Sigmoid => ScoreFunction::Sigmoid,
    };
    let mut config = MoeLayerConfig::swiglu(args.hidden, args.ffn, args.experts, args.topk);
    config.router = config
        .router
        .with_score_function(score)
        .with_pre_softmax(args.topk == 1 && score == ScoreFunction::Softmax)
        .with_capacity_factor(args.capacity_factor)
        .with_aux_loss_coeff(args.aux_loss_coeff)
        .with_z_loss_coeff(args.z_loss_coeff);
    let layer = config.init(&device)?;
    println!(
        "MoE layer: T={} H={} F={} E={} k={} ({:?}, {}), {} parameters",
        args.tokens,
        args.hidden,
        args.ffn,
        args.experts,
        args.topk,
        score,
        match args.capacity_factor {
            Some(c) => format!("capacity factor {c}"),
            None => "dropless".into(),
        },
        layer.num_params()
    );
    let x = Tensor::<3>::random(
        [args.tokens, 1, args.hidden],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let timing = time_forward_backward(&layer, x, args.iters)?;
    let median = timing.median();
    let out = timing.last;
    let counts: Vec<i64> = out
        .tokens_per_expert
        .clone()
        .into_data()
        .iter::<i64>()
        .collect();
    println!("tokens per expert: {counts:?}");
    if let Some(aux) = out.aux_loss.clone() {
        println!("aux loss: {:.6}", aux.into_scalar::<f32>());
    }
    if let Some(z) = out.z_loss.clone() {
        println!("z loss: {:.6}", z.into_scalar::<f32>());
    }
    println!(
        "forward+backward: {:.1} ms median of {} (forward: {} device-to-host reads, {} \
         host-to-device uploads)",
        median * 1e3,
        timing.seconds.len(),
        out.transfers.reads,
        out.transfers.uploads
    );
    println!("tokens_per_s={:.0}", args.tokens as f64 / median);
    Ok(())
}

fn run_train_vae(args: &TrainArgs) -> Result<()> {
    use burn_recipes::video::{VaeRecipe, train_vae};
    if args.resume || args.stop_at.is_some() || args.device != Backend::Flex {
        return Err(RecipeError::Refused(
            "video VAE recipes train from scratch on the CPU (no --resume, --stop-at, --device)"
                .into(),
        ));
    }
    let recipe = VaeRecipe::load(&args.recipe, &args.overrides)?;
    let s = train_vae(&recipe)?;
    let h = &s.holdout;
    println!(
        "trained in {:.0} s, final loss {:.4}; {} held-out clips: VAE PSNR {:.2} dB, SSIM {:.4}; baseline PSNR {:.2} dB, SSIM {:.4} ({:+.2} dB)",
        s.seconds,
        s.final_loss,
        h.clips,
        h.vae_psnr,
        h.vae_ssim,
        h.baseline_psnr,
        h.baseline_ssim,
        h.vae_psnr - h.baseline_psnr
    );
    if let Some(r) = &s.holdout_refined {
        println!(
            "with the latents refined by {} steps: VAE PSNR {:.2} dB, SSIM {:.4} ({:+.2} dB over the baseline)",
            recipe.eval.refine,
            r.vae_psnr,
            r.vae_ssim,
            r.vae_psnr - r.baseline_psnr
        );
    }
    for e in &s.holdout_sources {
        let lead = |r: &burn_recipes::video::VaeEval| r.vae_psnr - r.baseline_psnr;
        let refined = e
            .refined
            .as_ref()
            .map(|r| format!(", refined {:.2} dB ({:+.2})", r.vae_psnr, lead(r)))
            .unwrap_or_default();
        println!(
            "held-out source {}: {} clips, VAE {:.2} dB against the baseline's {:.2} ({:+.2}){refined}",
            e.source,
            e.encoder.clips,
            e.encoder.vae_psnr,
            e.encoder.baseline_psnr,
            lead(&e.encoder)
        );
    }
    println!(
        "run directory: {} (metrics.jsonl, summary.json, holdout_preview.gif, checkpoints/)",
        recipe.run.dir.display()
    );
    Ok(())
}

fn run_train_dit(args: &TrainArgs) -> Result<()> {
    use burn_recipes::dit::{DitRecipe, train_dit};
    if args.resume || args.stop_at.is_some() || args.device != Backend::Flex {
        return Err(RecipeError::Refused(
            "DiT recipes train from scratch on the CPU (no --resume, --stop-at, --device)".into(),
        ));
    }
    let recipe = DitRecipe::load(&args.recipe, &args.overrides)?;
    let s = train_dit(&recipe, |stage| {
        println!(
            "stage {}: {} steps, lr {}, batch {}, {} latent frames, image ratio {}",
            stage.name, stage.steps, stage.lr, stage.batch, stage.frames, stage.image_ratio
        );
    })?;
    for r in &s.stages {
        println!(
            "stage {}: final loss {:.4}, validation loss {:.4} ({} latent frames)",
            r.name, r.final_loss, r.validation_loss, r.frames
        );
    }
    if let Some(p) = &s.post {
        let line = |name: &str, a: &burn_recipes::dit::Accuracy| {
            println!(
                "  {name}: direction {:.1}%, colour {:.1}%, count {:.1}% of {} prompts",
                100.0 * a.direction,
                100.0 * a.colour,
                100.0 * a.count,
                a.prompts
            );
        };
        println!(
            "post-training: SFT on {} clips (loss {:.4}), DPO on {} pairs (loss {:.4}); checker accuracy (chance: direction 25%, colour 25%, count 33%):",
            p.sft_clips, p.sft_loss, p.pairs, p.dpo_loss
        );
        line("after the curriculum", &p.before);
        line("after SFT", &p.after_sft);
        line("after DPO", &p.after_dpo);
    }
    println!(
        "trained in {:.0} s; run directory: {} (metrics.jsonl, summary.json, checkpoints/)",
        s.seconds,
        recipe.run.dir.display()
    );
    Ok(())
}

/// What a failed command reports: a one-line message and its exit status.
struct Failure {
    code: u8,
    message: String,
}

impl From<RecipeError> for Failure {
    /// Exit 128 + the signal for a run stopped by one, 2 for everything else.
    fn from(e: RecipeError) -> Self {
        let code = match &e {
            RecipeError::Interrupted { signal, .. } => burn_recipes::interrupt::describe(*signal).1,
            _ => 2,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

fn run_train(args: &TrainArgs) -> Result<(), Failure> {
    let text = burn_recipes::recipe::read_recipe_text(&args.recipe)?;
    if burn_recipes::video::is_vae_recipe(&text) {
        return run_train_vae(args).map_err(Failure::from);
    }
    if burn_recipes::dit::is_dit_recipe(&text) {
        return run_train_dit(args).map_err(Failure::from);
    }
    let recipe = Recipe::load(&args.recipe, &args.overrides)?;
    recipe.validate()?;
    let run_device = device(args.device)?;
    // CUDA tensors exchange over NCCL on their device memory (MPI carries its start-up).
    let gpu = match args.device {
        Backend::Cuda => {
            Some(burn_parallel::launch::local_device_index().map_err(RecipeError::from)?)
        }
        Backend::Flex => None,
    };
    let world = World::from_env_on(gpu).map_err(RecipeError::from)?;
    let main = world.is_main();
    if main {
        // `tracing` logs go to RUN_DIR/train.log (appended; nothing is written before the run
        // directory exists, which is only after every check passed).
        let log = recipe.run.dir.join("train.log");
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || -> Box<dyn std::io::Write> {
                match std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&log)
                {
                    Ok(f) if log.parent().is_some_and(|p| p.exists()) => Box::new(f),
                    _ => Box::new(std::io::sink()),
                }
            })
            .try_init();
    }
    let options = TrainOptions {
        resume: args.resume,
        device: run_device,
        progress: main && std::io::stderr().is_terminal(),
        stop_at: args.stop_at,
        interrupts: Some(burn_recipes::interrupt::Interrupts::install()?),
    };
    let summary = match train(&recipe, &options, &world) {
        Ok(s) => s,
        // Every rank stops after the same step: they leave together.
        Err(e @ RecipeError::Interrupted { .. }) => return Err(e.into()),
        Err(e) if world.size() > 1 => {
            // Only this rank may have failed (a damaged shard, a full disk): the others must
            // not wait for it inside a collective until their timeout.
            eprintln!("error: rank {}: {e}", world.rank());
            world.exit_after_failure(2)
        }
        Err(e) => return Err(e.into()),
    };
    if main {
        match summary.entropy_floor {
            Some(floor) => println!(
                "final loss {:.4} nats/token (mean of the last steps); entropy floor of the \
                 source {:.4} ({:+.1}%)",
                summary.final_loss,
                floor,
                100.0 * (summary.final_loss / floor - 1.0)
            ),
            None => println!("final loss {:.4} nats/token", summary.final_loss),
        }
        println!(
            "run directory: {} (metrics.jsonl, loss.png, expert_load.png, checkpoints/)",
            summary.run_dir.display()
        );
    }
    Ok(())
}

/// `println!` into a `String`.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

fn describe(e: &Estimate) -> String {
    let l = &e.layout;
    let t = &e.time;
    let m = &e.memory;
    let gib = |b: u64| {
        let b = b as f64;
        match b {
            b if b >= (1u64 << 30) as f64 => format!("{:.1} GiB", b / (1u64 << 30) as f64),
            b if b >= (1u64 << 20) as f64 => format!("{:.2} MiB", b / (1u64 << 20) as f64),
            b => format!("{:.1} KiB", b / 1024.0),
        }
    };
    format!(
        "TP{} CP{} PP{}×{} EP{} ETP{} mb{}: MFU {:.1}%, step {:.2} s ({} micro-batches), {}/GPU{}\n  \
         time: compute {:.2} s, TP comm {:.2}, EP all-to-all {:.2}, ETP comm {:.2}, PP {:.2}, DP {:.2}, overhead {:.2}, bubble {:.2}\n  \
         memory: weights {}, gradients {}, optimizer {}, activations {}, dispatcher {}",
        l.tp,
        l.cp,
        l.pp,
        l.vpp,
        l.ep,
        l.etp,
        l.micro_batch,
        100.0 * e.mfu,
        e.step_time_s,
        e.micro_batches,
        gib(e.memory_per_gpu_bytes),
        if e.fits { "" } else { " (does not fit)" },
        t.compute_s,
        t.tp_comm_s,
        t.ep_comm_s,
        t.etp_comm_s,
        t.pp_comm_s,
        t.dp_comm_s,
        t.overhead_s,
        t.bubble_s,
        gib(m.weights),
        gib(m.gradients),
        gib(m.optimizer),
        gib(m.activations),
        gib(m.dispatcher),
    )
}

fn run_plan(args: &PlanArgs) -> Result<()> {
    let mut out = String::new();
    let result = plan_report(args, &mut out);
    // A closed pipe (`plan … | head`) is not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    result
}

fn plan_report(args: &PlanArgs, out: &mut String) -> Result<()> {
    if args.top == 0 {
        return Err(RecipeError::invalid("--top", "must be at least 1"));
    }
    if let Some(anchors) = &args.calibrate {
        let rows = plan::load_anchors(anchors)?;
        let measurements: Vec<_> = rows.iter().map(|(_, _, m)| m.clone()).collect();
        let (cal, worst) = plan::calibrate(&measurements);
        say!(
            out,
            "fitted: gemm_efficiency = {:.4}, alltoall_efficiency = {:.4}, overlap = {:.4}, layer_overhead_s = {:.4e} (largest error {:.1}%)",
            cal.gemm_efficiency,
            cal.alltoall_efficiency,
            cal.overlap,
            cal.layer_overhead_s,
            100.0 * worst
        );
        say!(
            out,
            "| model | GPUs | system | TP | EP | PP | ETP | paper MFU | predicted | error |"
        );
        say!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for (name, system, m) in &rows {
            let mut p = m.problem.clone();
            p.calibration = cal;
            let e = p.estimate(&m.layout)?;
            let l = m.layout;
            say!(
                out,
                "| {name} | {} | {system} | {} | {} | {} | {} | {:.1}% | {:.1}% | {:+.1}% |",
                p.cluster.gpus,
                l.tp,
                l.ep,
                l.pp,
                l.etp,
                100.0 * m.mfu,
                100.0 * e.mfu,
                100.0 * (e.mfu / m.mfu - 1.0)
            );
        }
        return Ok(());
    }
    let path = args.recipe.as_ref().ok_or_else(|| {
        RecipeError::invalid("RECIPE", "give a recipe file (or --calibrate ANCHORS_JSON)")
    })?;
    let recipe = Recipe::load(path, &args.overrides)?;
    recipe.validate()?;
    let (problem, layout) = plan::Problem::from_recipe(&recipe)?;
    if args.search {
        let ranked = problem.search();
        if ranked.is_empty() {
            return Err(RecipeError::invalid(
                "cluster.gpus",
                format!("no layout of {} GPUs fits this model", problem.cluster.gpus),
            ));
        }
        if args.json {
            let top: Vec<_> = ranked.iter().take(args.top).collect();
            say!(
                out,
                "{}",
                serde_json::to_string(&top).map_err(|e| RecipeError::Refused(e.to_string()))?
            );
        } else {
            say!(
                out,
                "{} layouts fit on {} GPUs; the best {}:",
                ranked.len(),
                problem.cluster.gpus,
                args.top.min(ranked.len())
            );
            for (i, e) in ranked.iter().take(args.top).enumerate() {
                say!(out, "{}. {}", i + 1, describe(e));
            }
        }
        return Ok(());
    }
    let estimate = problem.estimate(&layout)?;
    if args.json {
        say!(
            out,
            "{}",
            serde_json::to_string(&estimate).map_err(|e| RecipeError::Refused(e.to_string()))?
        );
    } else {
        say!(out, "{}", describe(&estimate));
    }
    Ok(())
}

fn run_plot(args: &PlotArgs) -> Result<()> {
    // The entropy floor, when the run recorded one.
    let floor = std::fs::read_to_string(args.run_dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["entropy_floor"].as_f64());
    let written = burn_recipes::plot::plot(&args.run_dir, floor)?;
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// A failure of the launcher itself (mpirun missing, a signal handler), exit 2.
fn refused(message: String) -> Failure {
    RecipeError::Refused(message).into()
}

fn run_launch(args: &LaunchArgs) -> Result<(), Failure> {
    if args.nproc == 0 {
        return Err(RecipeError::invalid("--nproc", "must be at least 1").into());
    }
    // Check the recipe here, so a bad one fails once and writes nothing.
    let recipe = Recipe::load(&args.recipe, &args.overrides)?;
    recipe.validate()?;
    recipe.check_world(args.nproc)?;
    let exe =
        std::env::current_exe().map_err(|e| refused(format!("cannot find this program: {e}")))?;
    let mut program = vec![
        exe.display().to_string(),
        "train".to_string(),
        args.recipe.display().to_string(),
    ];
    for o in &args.overrides {
        program.push("--set".into());
        program.push(o.clone());
    }
    if args.resume {
        program.push("--resume".into());
    }
    if let Some(step) = args.stop_at {
        program.extend(["--stop-at".into(), step.to_string()]);
    }
    if args.device == Backend::Cuda {
        program.extend(["--device".into(), "cuda".into()]);
    }
    let hosts = match (&args.hostfile, &args.host) {
        (Some(file), _) => {
            if !file.is_file() {
                return Err(RecipeError::invalid(
                    "--hostfile",
                    format!("{} is not a file", file.display()),
                )
                .into());
            }
            Hosts::Hostfile(file.clone())
        }
        (None, Some(list)) if list.trim().is_empty() => {
            return Err(RecipeError::invalid("--host", "is empty").into());
        }
        (None, Some(list)) => Hosts::List(list.clone()),
        (None, None) => Hosts::Local,
    };
    // mpirun and the ranks run in their own process group: a Ctrl-C reaches this process
    // alone, which hands the first SIGINT or SIGTERM to mpirun (mpirun passes it to every
    // rank, which stop after the same step with a checkpoint); a second one kills the job at
    // once.
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| refused(format!("installing signal handlers: {e}")))?;
    let mut command = MpiRun::new(args.nproc, program).hosts(hosts).command();
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().map_err(|e| {
        refused(format!(
            "cannot start mpirun ({e}); install OpenMPI with scripts/setup-mpi"
        ))
    })?;
    let pid = child.id().to_string();
    let mut signal = None;
    // The ranks mpirun started here, to wait for after it exits (it may exit before the ranks
    // it told to stop are gone, and a rank left behind holds the run's lock).
    let mut ranks: Vec<burn_parallel::launch::LocalProcess> = Vec::new();
    let mut polls = 0usize;
    let status = loop {
        if polls.is_multiple_of(10) {
            for rank in burn_parallel::launch::children(child.id()) {
                if !ranks.contains(&rank) {
                    ranks.push(rank);
                }
            }
        }
        polls += 1;
        if let Some(status) = child
            .try_wait()
            .map_err(|e| refused(format!("waiting for mpirun: {e}")))?
        {
            break status;
        }
        for sig in signals.pending() {
            let (number, target) = if signal.is_none() {
                // mpirun passes it on to the ranks.
                (sig, pid.clone())
            } else {
                // The second: the whole process group, now.
                (9, format!("-{pid}"))
            };
            signal.get_or_insert(sig);
            let _ = std::process::Command::new("kill")
                .args([format!("-{number}"), "--".into(), target])
                .status();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let killed = burn_parallel::launch::reap(&ranks, std::time::Duration::from_secs(10));
    if !killed.is_empty() {
        eprintln!("warning: killed ranks that outlived mpirun (pids {killed:?})");
    }
    if status.success() {
        return Ok(());
    }
    if let Some(sig) = signal {
        let (name, code) = burn_recipes::interrupt::describe(sig);
        let step = burn_recipes::checkpoint::latest(&recipe.run.dir)
            .ok()
            .flatten()
            .map_or_else(
                || "no checkpoint".to_string(),
                |(_, m)| format!("step {}", m.step),
            );
        return Err(Failure {
            code,
            message: format!(
                "{name} received: the ranks stopped (newest checkpoint: {step} in {}); continue \
                 with `burn-recipes launch -n {} RECIPE --resume` (the same --set options)",
                recipe.run.dir.display(),
                args.nproc
            ),
        });
    }
    Err(refused(format!("mpirun exited with {status}")))
}

fn main() -> ExitCode {
    keep_freed_pages();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Train(args) => run_train(args),
        Command::Launch(args) => run_launch(args),
        Command::Plot(args) => run_plot(args).map_err(Failure::from),
        Command::Plan(args) => run_plan(args).map_err(Failure::from),
        Command::Layer(args) => run_layer(args).map_err(Failure::from),
        Command::Data(DataCommand::Scan(args)) => run_scan(args).map_err(Failure::from),
        Command::Data(DataCommand::Synth(args)) => run_synth(args).map_err(Failure::from),
        Command::Data(DataCommand::Cache(args)) => run_cache(args).map_err(Failure::from),
        Command::Data(DataCommand::Corpus(args)) => run_corpus(args).map_err(Failure::from),
        Command::Eval(EvalCommand::Vae(args)) => run_eval_vae(args).map_err(Failure::from),
        Command::Eval(EvalCommand::Dit(args)) => run_eval_dit(args).map_err(Failure::from),
        Command::Eval(EvalCommand::Hf(args)) => run_eval_hf(args),
        Command::Sample(args) => run_sample(args).map_err(Failure::from),
        Command::Export(ExportCommand::Hf(args)) => run_export_hf(args).map_err(Failure::from),
        Command::Import(ImportCommand::Hf(args)) => run_import_hf(args).map_err(Failure::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option's number is right: before it is set, it holds the purge delay's default (1000
    /// ms in the mimalloc this crate builds; no other option defaults to 1000), and afterwards -1.
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        assert!(
            std::env::var_os("MIMALLOC_PURGE_DELAY").is_none(),
            "run without MIMALLOC_PURGE_DELAY"
        );
        // SAFETY: reads one of mimalloc's integer options.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(get(), 1000);
        keep_freed_pages();
        assert_eq!(get(), -1);
    }
}
