//! Host ↔ device transfers of one MoE layer, counted: the exact list of device-to-host reads
//! and host-to-device uploads a forward and a backward pass make (what the README states), and
//! a scan of the sources showing that no tensor crosses between host and device except
//! through the counted helpers.

use burn::tensor::{Device, Tensor, TensorData};
use burn_moe::prelude::*;
use burn_parallel::transfers::{self, Direction, Transfer};

const S: usize = 6;
const B: usize = 2;
const H: usize = 8;
const F: usize = 6;
const E: usize = 4;

fn tensor<const D: usize>(shape: [usize; D], seed: u64, d: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((seed as f32 * 12.9898 + i as f32 * 78.233).sin() * 43758.547).fract() - 0.5)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), d)
}

fn layer(router: RouterConfig, d: &Device) -> MoeLayer {
    let router = Router::from_weight(router, tensor([E, H], 1, d)).unwrap();
    let experts = Experts::from_weights(
        ExpertsConfig::new(E, H, F),
        tensor([E, H, 2 * F], 2, d),
        tensor([E, F, H], 3, d),
    )
    .unwrap();
    MoeLayer::new(router, experts, None).unwrap()
}

fn describe(log: &[Transfer]) -> Vec<(Direction, &'static str)> {
    log.iter().map(|t| (t.direction, t.what)).collect()
}

/// Forward and backward transfer lists of one step.
fn step(router: RouterConfig) -> (Vec<Transfer>, Vec<Transfer>, MoeOutput) {
    let d = Device::flex().autodiff();
    let layer = layer(router, &d);
    let x = tensor([S, B, H], 4, &d).require_grad();
    let (out, forward) = transfers::measure(|| layer.forward(x.clone()).unwrap());
    let loss = match out.total_aux_loss() {
        Some(aux) => out.output.clone().sum() + aux,
        None => out.output.clone().sum(),
    };
    let (_grads, backward) = transfers::measure(|| loss.backward());
    (forward, backward, out)
}

const FINITE: (Direction, &str) = (Direction::Read, "checking router logits");
const COUNTS: (Direction, &str) = (Direction::Read, "reading the tokens per expert");

#[test]
fn dropless_layer_reads_once_forward_and_never_backward_on_one_rank() {
    let router = RouterConfig::new(H, E, 2)
        .with_aux_loss_coeff(1e-2)
        .with_z_loss_coeff(Some(1e-3));
    let (forward, backward, out) = step(router);
    // The dropless count sync alone (as Megatron's dropless dispatch): the router's
    // finiteness check stays on the device for the caller. On the CPU backend the MoE
    // operations work on tensor memory in place: no index table is uploaded.
    assert_eq!(describe(&forward), [COUNTS]);
    assert_eq!(out.transfers, transfers::totals(&forward));
    assert_eq!(out.stats.transfers, transfers::totals(&forward));
    let count_bytes = E * out.tokens_per_expert.dtype().size();
    assert_eq!(forward[0].bytes, count_bytes as u64);
    assert!(describe(&backward).is_empty(), "{backward:?}");
    // The deferred check: one read when asked, and it passes on finite inputs.
    let ((), check) = transfers::measure(|| out.check_finite().unwrap());
    assert_eq!(describe(&check), [FINITE]);
}

#[test]
fn padded_layer_reads_nothing_and_builds_its_index_tables_on_the_device() {
    let router = RouterConfig::new(H, E, 2)
        .with_capacity_factor(Some(1.0))
        .with_pad_to_capacity(true);
    let (forward, backward, out) = step(router);
    // Drop-and-pad needs no count: the shapes are static, and its dispatch order is computed
    // on the device (token positions and the expert of each row are device ranges). The
    // finiteness check stays on the device for the caller.
    assert!(describe(&forward).is_empty(), "{forward:?}");
    assert_eq!(out.stats.transfers, transfers::HostTransfers::default());
    assert!(describe(&backward).is_empty(), "{backward:?}");
    assert!(out.router.nonfinite_logits.is_some());
    let ((), check) = transfers::measure(|| out.check_finite().unwrap());
    assert_eq!(describe(&check), [FINITE]);
    // Without the finiteness check there is nothing to check.
    let router = RouterConfig::new(H, E, 2)
        .with_capacity_factor(Some(1.0))
        .with_pad_to_capacity(true)
        .with_check_finite(false);
    let (forward, _, out) = step(router);
    assert!(describe(&forward).is_empty(), "{forward:?}");
    assert!(out.router.nonfinite_logits.is_none());
}

#[test]
fn a_layer_fed_nan_reports_it_at_the_deferred_check() {
    let d = Device::flex();
    for router in [
        RouterConfig::new(H, E, 2),
        RouterConfig::new(H, E, 2)
            .with_capacity_factor(Some(1.0))
            .with_pad_to_capacity(true),
    ] {
        let layer = layer(router, &d);
        let mut x = tensor([S, B, H], 4, &d);
        x = x.slice_assign([0..1, 0..1, 0..1], Tensor::from_floats([[[f32::NAN]]], &d));
        let out = layer.forward(x).expect("the forward pass does not read");
        assert!(
            matches!(out.check_finite(), Err(MoeError::NonFiniteLogits { count }) if count == E),
            "one token's logits are all NaN"
        );
    }
}

/// Lines of `src` (a crate's source folder) that move tensor data between host and device
/// directly, outside the files allowed to.
fn direct_transfers(src: &std::path::Path, allowed: &[&str]) -> Vec<String> {
    let patterns = [
        "into_data(",
        "to_data(",
        "from_data(",
        "try_into_vec",
        "into_scalar",
        ">::arange(",
        "Tensor::arange(",
        "from_ints(",
        "try_read_sync",
    ];
    let mut found = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("source folder") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(src)
                .expect("prefix")
                .display()
                .to_string();
            if path.is_dir() {
                // Check programs are not library code.
                if rel != "bin" {
                    stack.push(path);
                }
                continue;
            }
            if allowed.contains(&rel.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            // Unit tests at the end of a file may read tensors freely.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for (i, line) in code.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                if patterns.iter().any(|p| line.contains(p)) {
                    found.push(format!("{rel}:{}: {}", i + 1, line.trim()));
                }
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_host_device_transfer_of_the_moe_code_goes_through_the_counted_helpers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // host.rs holds the counted helpers; flex.rs is the CPU implementation of the MoE
    // operations (tensor memory is host memory there).
    let found = direct_transfers(&root.join("src"), &["host.rs", "kernels/flex.rs"]);
    // Each remaining site counts its transfer on the line before.
    let uncounted: Vec<&String> = found
        .iter()
        .filter(|l| {
            !(l.starts_with("kernels/cube.rs:") && l.contains("int_from_data(")
                || l.starts_with("experts/mod.rs:")
                    && l.contains("Tensor::<3>::from_data(t.to_data()"))
        })
        .collect();
    assert!(uncounted.is_empty(), "uncounted transfers: {uncounted:#?}");
    let parallel = root.join("../burn-parallel/src");
    let found = direct_transfers(&parallel, &["transfers.rs"]);
    let counted_files = [
        "ops/host.rs",
        "optim.rs",
        "pipeline.rs",
        "context.rs",
        "checkpoint.rs",
    ];
    // The NCCL path on device memory waits for CubeCL's queue (a synchronisation that moves
    // no data) before NCCL reads the tensor.
    let uncounted: Vec<&String> = found
        .iter()
        .filter(|l| {
            !(counted_files
                .iter()
                .any(|f| l.starts_with(&format!("{f}:")))
                || l.starts_with("ops/device.rs:") && l.contains("try_read_sync(x.client.sync())"))
        })
        .collect();
    assert!(uncounted.is_empty(), "uncounted transfers: {uncounted:#?}");
}

/// On a CubeCL device the kernels upload their launch tables: the expert offsets of the
/// routing index and one tile table per grouped GEMM (two forward, four backward); the forward
/// reads the tokens per expert once, as on the CPU.
#[cfg(feature = "wgpu")]
#[test]
fn on_a_cubecl_device_the_kernels_upload_their_offsets_and_tile_tables() {
    let d = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    assert!(burn_moe::kernels::kernels_available(&d));
    let d = d.autodiff();
    let router = RouterConfig::new(H, E, 2)
        .with_aux_loss_coeff(1e-2)
        .with_z_loss_coeff(Some(1e-3));
    let layer = layer(router, &d);
    let x = tensor([S, B, H], 4, &d).require_grad();
    let (out, forward) = transfers::measure(|| layer.forward(x.clone()).unwrap());
    let loss = out.output.clone().sum() + out.total_aux_loss().unwrap();
    let (grads, backward) = transfers::measure(|| loss.backward());
    // Wait for the device before the process ends (lavapipe's threads crash when the process
    // exits under queued work).
    let _ = x.grad(&grads).unwrap().into_data();
    let tiles = (Direction::Upload, "uploading a grouped-GEMM tile table");
    assert_eq!(
        describe(&forward),
        [
            COUNTS,
            (Direction::Upload, "uploading expert offsets"),
            tiles,
            tiles
        ]
    );
    assert_eq!(describe(&backward), [tiles; 4]);
}
