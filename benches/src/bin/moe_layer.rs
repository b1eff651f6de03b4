//! `moe_layer T H F E K ITERS`: one MoE layer forward + backward (top-k softmax router, SwiGLU
//! experts, dropless) on the default CPU backend; prints `tokens_per_s=<number>`.

use std::process::ExitCode;

use benches::{LayerShape, layer_and_input};
use burn::tensor::Device;
use burn_moe::timing::time_forward_backward;

fn parse(args: &[String]) -> Result<(LayerShape, usize), String> {
    const NAMES: [&str; 6] = ["T", "H", "F", "E", "K", "ITERS"];
    const DEFAULTS: [usize; 6] = [2048, 512, 1408, 8, 2, 5];
    let mut v = DEFAULTS;
    if args.len() > NAMES.len() {
        return Err(format!("usage: moe_layer {}", NAMES.join(" ")));
    }
    for (i, a) in args.iter().enumerate() {
        v[i] = a.parse().ok().filter(|x| *x > 0).ok_or(format!(
            "argument {} must be a positive integer, got `{a}`",
            NAMES[i]
        ))?;
    }
    let shape = LayerShape {
        tokens: v[0],
        hidden: v[1],
        ffn: v[2],
        experts: v[3],
        topk: v[4],
    };
    Ok((shape, v[5]))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = || -> Result<(), String> {
        let (shape, iters) = parse(&args)?;
        let device = Device::flex().autodiff();
        let (layer, x) = layer_and_input(shape, &device).map_err(|e| e.to_string())?;
        let timing = time_forward_backward(&layer, x, iters).map_err(|e| e.to_string())?;
        println!("backend=flex median_ms={:.2}", timing.median() * 1e3);
        println!("tokens_per_s={:.1}", shape.tokens as f64 / timing.median());
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
