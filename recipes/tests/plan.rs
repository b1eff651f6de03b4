//! The planner: calibration on the seed paper's Table 1 only, then every row within 10% and
//! folding ranked ahead; parameter and memory counts against the models this project builds
//! and against hand-computed sizes; the layout search; the command line.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::Module;
use burn::tensor::Device;
use burn_recipes::plan::{self, Kernels, Layout, Problem};
use burn_recipes::recipe::{Precision, Recipe};
use burn_recipes::train::parameter_count;

fn anchors() -> PathBuf {
    std::env::var_os("PLAN_ANCHORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/anchors/moe_parallel_folding_table1.json")
        })
}

fn recipe(name: &str, overrides: &[&str]) -> Recipe {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Recipe::load(&path, &o).expect("recipe")
}

#[test]
fn calibrated_on_table_1_every_row_is_within_10_percent_and_folding_ranks_first() {
    let rows = plan::load_anchors(&anchors()).expect("anchors");
    assert_eq!(rows.len(), 8);
    let measurements: Vec<_> = rows.iter().map(|(_, _, m)| m.clone()).collect();
    let (cal, worst) = plan::calibrate(&measurements);
    assert!(worst <= 0.10, "largest error {worst}");
    let mut predicted = std::collections::HashMap::new();
    for (model, system, m) in &rows {
        let mut p = m.problem.clone();
        p.calibration = cal;
        let mfu = p.estimate(&m.layout).expect("estimate").mfu;
        assert!(
            (mfu / m.mfu - 1.0).abs() <= 0.10,
            "{model} {system}: {mfu} vs {}",
            m.mfu
        );
        predicted.insert((model.clone(), system.clone()), mfu);
    }
    for (model, _, _) in &rows {
        let folding = predicted[&(model.clone(), "mcore-folding".to_string())];
        let plain = predicted[&(model.clone(), "mcore".to_string())];
        assert!(
            folding > plain,
            "{model}: folding {folding} not ahead of {plain}"
        );
    }
    // The shipped defaults are that fit.
    assert!(plan::worst_error(&measurements, plan::Calibration::default()) <= 0.10);
}

#[test]
fn parameter_and_state_bytes_equal_the_built_models() {
    for overrides in [
        vec![],
        vec!["model.moe_every=2", "model.layers=4", "model.kv_heads=4"],
        vec![
            "model.shared_expert_ffn_hidden=32",
            "model.experts=8",
            "model.topk=1",
        ],
    ] {
        let r = recipe("moe-tiny.toml", &overrides);
        let model = r.model.lm_config().init(1, &Device::flex()).expect("model");
        let built = model.num_params() as u64;
        assert_eq!(parameter_count(&r.model).0, built, "{overrides:?}");
        let (problem, layout) = Problem::from_recipe(&r).expect("problem");
        let mut problem = problem;
        problem.cluster.gpus = 1;
        let e = problem.estimate(&layout).expect("estimate");
        // One GPU: the recipe's f32 weights, f32 gradients, f32 master + two moments.
        assert_eq!(e.memory.weights, 4 * built, "{overrides:?}");
        assert_eq!(e.memory.gradients, 4 * built, "{overrides:?}");
        assert_eq!(e.memory.optimizer, 12 * built, "{overrides:?}");
        problem.precision = Precision::Bf16;
        let e = problem.estimate(&layout).expect("estimate");
        assert_eq!(e.memory.weights, 2 * built, "{overrides:?}");
        assert_eq!(e.memory.gradients, 4 * built, "{overrides:?}");
    }
}

#[test]
fn memory_shards_match_a_hand_computed_case() {
    // hidden 8, 2 layers, 2 heads (kv 2, head dim 4), vocab 16, 4 experts of FFN 4, top-1.
    let r = recipe(
        "moe-tiny.toml",
        &[
            "model.hidden=8",
            "model.layers=2",
            "model.heads=2",
            "model.kv_heads=2",
            "model.vocab=16",
            "model.ffn_hidden=4",
            "model.expert_ffn_hidden=4",
            "model.experts=4",
            "model.topk=1",
            "data.seq_len=8",
            "training.micro_batch=1",
            "training.global_batch=4",
            "training.precision=\"bf16\"",
        ],
    );
    // Per layer: qkv 8·(2+2·2)·4 = 192, out 8·8 = 64, two norms 16, router 4·8 = 32,
    // experts 4·3·8·4 = 384. Embedding 128, head 128, final norm 8.
    let dense = 2 * (192 + 64 + 16 + 32) + 128 + 128 + 8; // 872
    let expert = 2 * 384; // 768
    assert_eq!(parameter_count(&r.model).0, (dense + expert) as u64);
    let (mut problem, _) = Problem::from_recipe(&r).expect("problem");
    problem.cluster.gpus = 4;
    // TP1 PP2 → DP2; EP2 ETP1 PP2 → EDP1.
    let layout = Layout {
        tp: 1,
        cp: 1,
        pp: 2,
        vpp: 1,
        ep: 2,
        etp: 1,
        micro_batch: 1,
    };
    let e = problem.estimate(&layout).expect("estimate");
    let dense_gpu = dense as f64 / 2.0; // / (tp·pp)
    let expert_gpu = expert as f64 / 4.0; // / (etp·ep·pp)
    assert_eq!(e.memory.weights, (2.0 * (dense_gpu + expert_gpu)) as u64);
    assert_eq!(e.memory.gradients, (4.0 * (dense_gpu + expert_gpu)) as u64);
    assert_eq!(
        e.memory.optimizer,
        (12.0 * (dense_gpu / 2.0 + expert_gpu / 1.0)) as u64
    );
    // Activations: s·b·h·34 per layer, one layer per stage, two micro-batches in flight.
    assert_eq!(e.memory.activations, (8.0 * 8.0 * 34.0 * 1.0 * 2.0) as u64);

    // The same in f32 with eager kernels (this project's CPU trainer).
    problem.precision = Precision::F32;
    problem.cluster.kernels = Kernels::Eager;
    let e = problem.estimate(&layout).expect("estimate");
    assert_eq!(e.memory.weights, (4.0 * (dense_gpu + expert_gpu)) as u64);
    // The f32 buffer and one micro-batch's gradients in flight.
    assert_eq!(e.memory.gradients, (8.0 * (dense_gpu + expert_gpu)) as u64);
    // Per layer 10·T·h + 2·heads·s²·b = 640 + 256 elements; one MoE layer on the first stage
    // (no head), two micro-batches in flight, 4 bytes.
    assert_eq!(e.memory.activations, 4 * (640 + 256) * 2);
    // Rows on this GPU: 8 tokens × top-1 over 2 EP ranks' tokens onto 2 of 4 experts = 8,
    // each keeping 2·h + 5·F = 36 values; two micro-batches in flight.
    assert_eq!(e.memory.dispatcher, 4 * 8 * 36 * 2);
}

#[test]
fn search_on_mixtral_128_gpus_puts_a_folded_layout_in_the_top_three() {
    let r = recipe("mixtral-8x22b.toml", &[]);
    let (problem, _) = Problem::from_recipe(&r).expect("problem");
    let ranked = problem.search();
    assert!(ranked.len() >= 3);
    // Without folding ETP = TP, and EP is limited by the ranks left after TP.
    let folded = ranked[..3]
        .iter()
        .any(|e| e.layout.etp < e.layout.tp || e.layout.ep * e.layout.tp > 8);
    assert!(
        folded,
        "{:?}",
        ranked[..3].iter().map(|e| e.layout).collect::<Vec<_>>()
    );
    assert!(ranked.windows(2).all(|w| w[0].mfu >= w[1].mfu));
    assert!(ranked.iter().all(|e| e.fits));
}

/// `burn-recipes plan RECIPE --json --set …` as JSON.
fn plan_json(recipe: &Path, sets: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burn-recipes"));
    cmd.args(["plan", &recipe.display().to_string(), "--json"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// The planner's memory estimate of moe-tiny (eager kernels, one rank) against the peak training
/// memory the trainer measures with its counting allocator.
#[test]
fn moe_tiny_memory_estimate_is_within_20_percent_of_the_measured_peak() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let run = tmp.path().join("run");
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("moe-tiny.toml");
    // One CPU thread: each extra thread holds its own GEMM packing buffers (about 1 MB at two
    // threads here), which belong to the CPU backend, not to what the planner models.
    let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
        .env("RAYON_NUM_THREADS", "1")
        .args(["train", &tiny.display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", run.display())])
        .args([
            "--set",
            "training.steps=3",
            "--set",
            "training.warmup_steps=1",
        ])
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("summary.json")).expect("summary.json"),
    )
    .expect("JSON");
    let measured = summary["peak_memory_bytes"].as_f64().expect("peak memory");
    let estimate = plan_json(&tiny, &["cluster.gpus=1", "cluster.kernels=\"eager\""]);
    let estimated = estimate["memory_per_gpu_bytes"].as_f64().expect("memory");
    let rel = (estimated - measured) / measured;
    println!("moe-tiny memory: estimated {estimated} B, measured {measured} B ({rel:+.3})");
    assert!(
        rel.abs() < 0.2,
        "estimated {estimated}, measured {measured}"
    );
}

#[test]
fn plan_prints_json_with_overrides() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("mixtral-8x22b.toml");
    let v = plan_json(&path, &["cluster.gpus=256", "parallel.tp=4"]);
    for key in ["mfu", "step_time_s", "memory_per_gpu_bytes"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert_eq!(v["layout"]["tp"], 4);
    assert!(v["time"]["ep_comm_s"].as_f64().is_some());
    assert!(v["memory"]["optimizer"].as_f64().is_some());
    // 256 GPUs with TP4 PP8: 8-way data parallel, 32 micro-batches of one sequence.
    assert_eq!(v["micro_batches"], 32);
}

#[test]
fn plan_rejects_a_layout_that_does_not_divide() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("mixtral-8x22b.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
        .args([
            "plan",
            &path.display().to_string(),
            "--set",
            "parallel.ep=3",
        ])
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("parallel.ep"));
}

/// The GPU recipe `moe-1b.toml` (run by `scripts/gpu-check` for MFU): its size counted by hand
/// — per layer the fused QKV (16 query and 2 × 8 key/value heads of 128), the output
/// projection, 8 SwiGLU experts of 2048, the router and two norms; the embedding, the head and
/// the final norm — against the library's count, and bf16 with recomputation as the recipe
/// says.
#[test]
fn the_gpu_recipe_has_the_size_it_states() {
    let r = recipe("moe-1b.toml", &[]);
    let (h, f, e, v, layers) = (2048u64, 2048u64, 8u64, 32000u64, 16u64);
    let attention = h * (16 + 2 * 8) * 128 + 16 * 128 * h;
    let experts = e * (h * 2 * f + f * h);
    let per_layer = attention + experts + h * e + 2 * h;
    let total = layers * per_layer + 2 * v * h + h;
    let active = layers * (attention + 2 * (h * 2 * f + f * h) + h * e + 2 * h) + 2 * v * h + h;
    assert_eq!(parameter_count(&r.model), (total, active));
    assert!((1.8e9..2.0e9).contains(&(total as f64)), "{total}");
    assert_eq!(r.training.precision, Precision::Bf16);
    assert!(r.training.recompute);
    assert_eq!(r.data.seq_len, 4096);
}
