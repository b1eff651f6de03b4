//! `burn-recipes`: the project's command line.

use std::process::ExitCode;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use burn_moe::prelude::*;
use burn_moe::timing::time_forward_backward;
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Run one MoE layer forward + backward on random tokens and report routing and speed.
    Layer(LayerArgs),
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

fn device(backend: Backend) -> Result<Device, String> {
    let kind = match backend {
        Backend::Flex => BackendKind::Flex,
        Backend::Cuda => BackendKind::Cuda,
    };
    burn_moe::backend::device(kind).map_err(|e| e.to_string())
}

fn run_layer(args: &LayerArgs) -> Result<(), String> {
    if args.tokens == 0 {
        return Err("--tokens must be > 0".into());
    }
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
    let layer = config.init(&device).map_err(|e| e.to_string())?;
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
    let timing = time_forward_backward(&layer, x, args.iters).map_err(|e| e.to_string())?;
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
        "forward+backward: {:.1} ms median of {} ({} host syncs per dispatch)",
        median * 1e3,
        timing.seconds.len(),
        out.stats.host_syncs
    );
    println!("tokens_per_s={:.0}", args.tokens as f64 / median);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Layer(args) => run_layer(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
