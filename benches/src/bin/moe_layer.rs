//! `moe_layer T H F E K ITERS`: one MoE layer forward + backward (top-k softmax router, SwiGLU
//! experts, dropless) on the default CPU backend (Flex, reference dispatch and per-expert
//! matmuls) and, in a build with `--features wgpu` or `--features cuda`, on the kernel backend
//! (CubeCL dispatch kernels and grouped GEMM). Prints one `backend=… tokens_per_s=<number>`
//! line per backend. `MOE_BENCH_DTYPE=bf16` (or `f16`) runs the experts and the input in that
//! type, the router in f32.

use std::process::ExitCode;

use benches::{bench_devices, bench_dtype, layer_and_input_in, parse_shape_args};
use burn_moe::timing::time_forward_backward;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = || -> Result<(), String> {
        let (shape, iters) = parse_shape_args("moe_layer", &args)?;
        let dtype = bench_dtype().map_err(|e| e.to_string())?;
        for (name, device) in bench_devices().map_err(|e| e.to_string())? {
            let device = device.autodiff();
            let (layer, x) =
                layer_and_input_in(shape, &device, dtype).map_err(|e| e.to_string())?;
            let timing = time_forward_backward(&layer, x, iters).map_err(|e| e.to_string())?;
            println!(
                "backend={name} dtype={dtype:?} median_ms={:.2} tokens_per_s={:.1}",
                timing.median() * 1e3,
                shape.tokens as f64 / timing.median()
            );
        }
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
