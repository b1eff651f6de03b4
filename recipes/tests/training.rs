//! Training runs of the tiny recipe: exact resume, checkpoint pruning, recomputation, and (with
//! `--features mpi`) 4- and 8-rank launches that reproduce the single-rank loss curve and the
//! CP / PP / TP / EP equivalence check program.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("moe-tiny.toml")
}

fn train(run: &Path, extra: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
        .args(["train", &tiny().display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", run.display())])
        .args([
            "--set",
            "training.steps=20",
            "--set",
            "training.checkpoint_every=0",
        ])
        .args(extra)
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{extra:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `loss` field of every line of `metrics.jsonl`, as written.
fn losses(run: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            v["loss"].to_string()
        })
        .collect()
}

#[test]
fn ten_steps_then_resume_is_bit_identical_to_twenty_steps() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let straight = tmp.path().join("straight");
    let resumed = tmp.path().join("resumed");
    train(&straight, &[]);
    train(&resumed, &["--stop-at", "10"]);
    assert_eq!(losses(&resumed).len(), 10);
    train(&resumed, &["--resume"]);
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "losses differ after resume");
    assert!(straight.join("checkpoints/step-000020/meta.json").exists());
    assert!(straight.join("recipe.toml").exists());
    for file in ["loss.png", "expert_load.png", "summary.json", "train.log"] {
        assert!(straight.join(file).exists(), "no {file}");
    }
}

/// The same in bf16: the checkpoint holds the bf16 parameters (exactly, as f32) and the f32
/// master weights and moments, and the resumed run casts the parameters back to bf16.
#[test]
fn bf16_ten_steps_then_resume_is_bit_identical_to_twenty_steps() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let straight = tmp.path().join("straight");
    let resumed = tmp.path().join("resumed");
    let bf16 = ["--set", "training.precision=\"bf16\""];
    train(&straight, &bf16);
    train(&resumed, &[&bf16[..], &["--stop-at", "10"]].concat());
    train(&resumed, &[&bf16[..], &["--resume"]].concat());
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "losses differ after resume");
}

/// Rewrites a checkpoint file with `rename` applied to every parameter's tensor name (and
/// drops the folder's checksums, which the rewrite invalidates).
fn rename_tensors(file: &Path, rename: impl Fn(&str) -> String) {
    use safetensors::SafeTensors;
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(file).expect("checkpoint file");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("metadata");
    let renamed: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let n = if n.starts_with("model.") {
                rename(&n)
            } else {
                n
            };
            (n, v)
        })
        .collect();
    let out = safetensors::serialize(renamed, meta.metadata().clone()).expect("serialize");
    std::fs::write(file, out).expect("write");
    // As a checkpoint of the earlier formats: without checksums.
    let sums = file.with_file_name("SHA256SUMS");
    if sums.exists() {
        std::fs::remove_file(sums).expect("remove the checksums");
    }
}

#[test]
fn checkpoints_name_parameters_by_module_path_and_old_positional_ones_still_resume() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let straight = tmp.path().join("straight");
    train(&straight, &[]);
    let file = straight.join("checkpoints/step-000020/rank-00000.safetensors");
    let bytes = std::fs::read(&file).expect("checkpoint");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    for name in [
        "model.embed.weight",
        "model.blocks.0.attn.qkv.weight",
        "model.blocks.1.moe.router.weight",
        "model.blocks.1.moe.experts.w1",
        "model.norm_f.weight",
        "model.head.weight",
    ] {
        assert!(names.iter().any(|n| n == name), "no {name} in {names:?}");
    }
    // A checkpoint in the earlier format (parameters by position) resumes exactly.
    let resumed = tmp.path().join("resumed");
    train(&resumed, &["--stop-at", "10"]);
    let recipe = burn_recipes::recipe::Recipe::load(&tiny(), &[]).expect("recipe");
    let model = recipe
        .model
        .lm_config()
        .init(0, &burn::tensor::Device::flex())
        .expect("model");
    let order: Vec<String> = burn_recipes::checkpoint::named_params(&model)
        .into_iter()
        .map(|(path, _, _)| format!("model.{path}"))
        .collect();
    rename_tensors(
        &resumed.join("checkpoints/step-000010/rank-00000.safetensors"),
        |n| {
            let i = order.iter().position(|p| p == n).expect("a parameter");
            format!("param.{i:05}")
        },
    );
    train(&resumed, &["--resume"]);
    assert_eq!(
        losses(&straight),
        losses(&resumed),
        "losses differ after resume"
    );
    // A tensor under a name the model does not have is refused, naming it.
    let broken = tmp.path().join("broken");
    train(&broken, &["--stop-at", "10"]);
    rename_tensors(
        &broken.join("checkpoints/step-000010/rank-00000.safetensors"),
        |n| n.replace("model.head.weight", "model.lm_head.weight"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
        .args(["train", &tiny().display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", broken.display())])
        .args([
            "--set",
            "training.steps=20",
            "--set",
            "training.checkpoint_every=0",
        ])
        .arg("--resume")
        .output()
        .expect("binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("head.weight"), "{err}");
}

#[test]
fn recomputation_gives_the_same_losses() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    // In f32 and in bf16 (the parameters cast to bf16 keep the checkpointing strategy).
    for precision in ["f32", "bf16"] {
        let plain = tmp.path().join(format!("plain-{precision}"));
        let recompute = tmp.path().join(format!("recompute-{precision}"));
        let precision = format!("training.precision=\"{precision}\"");
        let short = [
            "--set",
            "training.steps=5",
            "--set",
            "training.warmup_steps=2",
            "--set",
            &precision,
        ];
        train(&plain, &short);
        let mut args = short.to_vec();
        args.extend(["--set", "training.recompute=true"]);
        train(&recompute, &args);
        assert_eq!(losses(&plain), losses(&recompute), "{precision}");
    }
}

#[test]
fn byte_level_text_trains_and_old_checkpoints_are_pruned() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let run = tmp.path().join("run");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let args = [
        "--set".to_string(),
        "data.source=\"bytes\"".to_string(),
        "--set".to_string(),
        format!("data.path=\"{}\"", corpus.display()),
        "--set".to_string(),
        "model.vocab=256".to_string(),
        "--set".to_string(),
        "training.steps=6".to_string(),
        "--set".to_string(),
        "training.warmup_steps=2".to_string(),
        "--set".to_string(),
        "training.checkpoint_every=2".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    train(&run, &args);
    assert_eq!(losses(&run).len(), 6);
    let mut kept: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .expect("checkpoints")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    kept.sort();
    // Checkpoints at steps 2, 4 and 6; keep_checkpoints = 2 keeps the newest two.
    assert_eq!(kept, ["step-000004", "step-000006"]);
}

/// The whole tiny recipe (300 steps) in bf16 against f32 (the two run side by side): the final
/// loss (mean of the last steps, as `summary.json` reports it) within 3%, and the loss at every
/// 50th step within 5%.
#[test]
fn bf16_training_of_the_tiny_recipe_follows_the_f32_curve() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let run = |precision: &str| {
        let dir = tmp.path().join(precision);
        let child = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
            .args(["train", &tiny().display().to_string()])
            .args(["--set", &format!("run.dir=\"{}\"", dir.display())])
            .args(["--set", &format!("training.precision=\"{precision}\"")])
            .env("RAYON_NUM_THREADS", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("binary runs");
        (dir, child)
    };
    let runs = [run("f32"), run("bf16")];
    let summaries: Vec<serde_json::Value> = runs
        .into_iter()
        .map(|(dir, child)| {
            let out = child.wait_with_output().expect("binary runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
            serde_json::from_str(&text).expect("JSON")
        })
        .collect();
    let (f32_run, bf16_run) = (&summaries[0], &summaries[1]);
    let final_of = |s: &serde_json::Value| s["final_loss"].as_f64().expect("final_loss");
    let curve = |s: &serde_json::Value| -> Vec<f64> {
        s["losses"]
            .as_array()
            .expect("losses")
            .iter()
            .map(|v| v.as_f64().expect("a loss"))
            .collect()
    };
    let (a, b) = (curve(f32_run), curve(bf16_run));
    assert_eq!(a.len(), 300);
    assert_eq!(b.len(), 300);
    let rel = |x: f64, y: f64| (y - x).abs() / x.abs();
    let (fa, fb) = (final_of(f32_run), final_of(bf16_run));
    println!(
        "final loss: f32 {fa:.4}, bf16 {fb:.4} ({:+.4})",
        (fb - fa) / fa
    );
    assert!(rel(fa, fb) <= 0.03, "final loss f32 {fa} vs bf16 {fb}");
    for step in (50..=300).step_by(50) {
        let (x, y) = (a[step - 1], b[step - 1]);
        println!("step {step}: f32 {x:.4}, bf16 {y:.4} ({:+.4})", (y - x) / x);
        assert!(rel(x, y) <= 0.05, "step {step}: f32 {x} vs bf16 {y}");
    }
}

/// `burn-recipes launch -n N` with `layout` reproduces the single-rank loss curve of 10 steps
/// within `tol` (relative).
#[cfg(feature = "mpi")]
fn launch_matches_one_rank(n: usize, layout: &[&str], extra: &[&str], tol: f64) {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let single = tmp.path().join("single");
    let multi = tmp.path().join("multi");
    let mut steps = vec![
        "--set",
        "training.steps=10",
        "--set",
        "training.warmup_steps=5",
        "--set",
        "training.checkpoint_every=0",
    ];
    for e in extra {
        steps.extend(["--set", e]);
    }
    train(&single, &steps);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burn-recipes"));
    cmd.args([
        "launch",
        "-n",
        &n.to_string(),
        &tiny().display().to_string(),
    ])
    .args(["--set", &format!("run.dir=\"{}\"", multi.display())])
    .args(&steps)
    .env("BURN_PARALLEL_TIMEOUT_S", "120");
    for l in layout {
        cmd.args(["--set", &format!("parallel.{l}")]);
    }
    let out = cmd.output().expect("binary runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let parse = |v: Vec<String>| -> Vec<f64> { v.iter().map(|s| s.parse().unwrap()).collect() };
    let (a, b) = (parse(losses(&single)), parse(losses(&multi)));
    assert_eq!(a.len(), 10);
    assert_eq!(b.len(), 10);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x.abs())
        .fold(0.0, f64::max);
    println!("{n} ranks {layout:?} {extra:?}: largest relative difference {worst:.2e}");
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= tol * x.abs(),
            "{layout:?} step {step}: {x} vs {y}"
        );
    }
}

#[cfg(feature = "mpi")]
#[test]
fn four_rank_launch_with_folding_reproduces_the_single_rank_curve() {
    launch_matches_one_rank(4, &["tp=2", "ep=2"], &[], 1e-4);
}

/// bf16 under the folded layout against bf16 on one rank: the reductions run in another order
/// (TP all-reduces and the EP exchange in bf16), so the curves agree to bf16's precision, not
/// to f32's.
#[cfg(feature = "mpi")]
#[test]
fn four_rank_tp_pp_folded_ep_launch_in_bf16_reproduces_the_single_rank_bf16_curve() {
    // Pipeline activations and gradients travel as bf16 between the two stages.
    launch_matches_one_rank(
        4,
        &["tp=2", "pp=2", "ep=2", "microbatches=2"],
        &["training.precision=\"bf16\""],
        2e-2,
    );
}

#[cfg(feature = "mpi")]
#[test]
fn eight_rank_launch_with_tp_cp_interleaved_pp_and_folded_ep_reproduces_the_single_rank_curve() {
    launch_matches_one_rank(
        8,
        &[
            "tp=2",
            "cp=2",
            "pp=2",
            "virtual_pp=2",
            "ep=2",
            "microbatches=4",
        ],
        &["model.layers=4", "training.global_batch=32"],
        1e-4,
    );
}

/// The check program `burn-recipes-equivalence`: every CP / PP / TP + folded EP layout of 2, 4
/// and 8 ranks against one rank (losses, every gradient, every parameter after 3 steps).
#[cfg(feature = "mpi")]
#[test]
fn context_pipeline_tensor_and_expert_layouts_match_one_rank_on_2_4_8_ranks() {
    let out = burn_parallel::launch::run_check_program(
        env!("CARGO_BIN_EXE_burn-recipes-equivalence"),
        "recipes equivalence",
        &[2, 4, 8],
        120,
        std::time::Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    print!("{out}");
}

/// `train` (one rank) or `launch -n N` of the tiny recipe into `run`, seven steps of four
/// sequences per micro-batch (so that every layout below divides the batch), and `extra`.
#[cfg(feature = "mpi")]
fn run_on(n: usize, run: &Path, extra: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burn-recipes"));
    match n {
        1 => cmd.arg("train"),
        n => cmd.args(["launch", "-n", &n.to_string()]),
    };
    cmd.arg(tiny())
        .args(["--set", &format!("run.dir=\"{}\"", run.display())])
        .args([
            "--set",
            "training.steps=7",
            "--set",
            "training.warmup_steps=2",
        ])
        .args([
            "--set",
            "training.micro_batch=4",
            "--set",
            "training.checkpoint_every=0",
        ])
        .args(extra)
        .env("BURN_PARALLEL_TIMEOUT_S", "120");
    let out = cmd.output().expect("binary runs");
    assert!(
        out.status.success(),
        "{n} ranks {extra:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Steps `from..to` (0-based) of `resumed` against the uninterrupted run: the first within
/// 1e-5, the later ones within 1e-4 (relative; other layouts round differently).
#[cfg(feature = "mpi")]
fn same_losses(straight: &Path, resumed: &Path, from: usize, to: usize, what: &str) {
    let parse = |v: Vec<String>| -> Vec<f64> { v.iter().map(|s| s.parse().unwrap()).collect() };
    let (a, b) = (parse(losses(straight)), parse(losses(resumed)));
    assert!(b.len() >= to, "{what}: {} steps", b.len());
    for step in from..to {
        let tol = if step == from {
            1e-5
        } else {
            1e-4 * a[step].abs()
        };
        assert!(
            (a[step] - b[step]).abs() <= tol,
            "{what}, step {}: {} uninterrupted, {} resumed",
            step + 1,
            a[step],
            b[step]
        );
    }
}

/// `export hf RUN` (float32) into `RUN/../NAME-hub`, then `eval hf` of the export on a
/// fixed sequence: its loss.
#[cfg(feature = "mpi")]
fn hub_loss(run: &Path) -> f64 {
    let hub = run.with_extension("hub");
    let bin = || Command::new(env!("CARGO_BIN_EXE_burn-recipes"));
    let out = bin()
        .args(["export", "hf", &run.display().to_string(), "--f32", "--out"])
        .arg(&hub)
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = (0..24).map(|i| ((i * 11 + 5) % 64).to_string()).collect();
    let out = bin()
        .args(["eval", "hf"])
        .arg(&hub)
        .args(["--json", "--ids", &ids.join(",")])
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["loss"].as_f64().expect("loss")
}

/// Checkpoints reshard: a TP2·EP2 run on four ranks stopped after step 3 resumes on EP4 (four
/// ranks) to step 5, whose checkpoint resumes on one rank to the end; a PP2 run stopped after
/// step 3 resumes on one rank. Every resumed step matches the uninterrupted run; the four
/// ranks' checkpoint exports as the model of a one-rank run.
#[cfg(feature = "mpi")]
#[test]
fn launch_checkpoints_reshard_from_tp2_ep2_to_ep4_to_one_rank_and_from_pp2_to_pp1() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let folded = ["--set", "parallel.tp=2", "--set", "parallel.ep=2"];
    let straight = tmp.path().join("straight");
    run_on(4, &straight, &folded);
    let run = tmp.path().join("run");
    run_on(4, &run, &[&folded[..], &["--stop-at", "3"]].concat());
    // Exported from the four ranks' shards: the model of a one-rank run of the same steps.
    let single = tmp.path().join("single");
    run_on(1, &single, &["--stop-at", "3"]);
    let (four, one) = (hub_loss(&run), hub_loss(&single));
    assert!(
        (four - one).abs() <= 1e-5,
        "exported: {four} from 4 ranks, {one} from one"
    );
    run_on(
        4,
        &run,
        &["--resume", "--set", "parallel.ep=4", "--stop-at", "5"],
    );
    same_losses(&straight, &run, 3, 5, "TP2·EP2 → EP4");
    run_on(1, &run, &["--resume"]);
    same_losses(&straight, &run, 5, 7, "EP4 → one rank");

    let piped = ["--set", "parallel.pp=2"];
    let straight = tmp.path().join("straight-pp");
    run_on(2, &straight, &piped);
    let run = tmp.path().join("run-pp");
    run_on(2, &run, &[&piped[..], &["--stop-at", "3"]].concat());
    run_on(1, &run, &["--resume"]);
    same_losses(&straight, &run, 3, 7, "PP2 → PP1");
}

/// Sharded initialisation: `moe-small` (experts about 65% of its 4.9 M parameters) with EP 4
/// on 4 ranks builds each rank's model in at most 0.6× the memory of the one-rank build (its
/// shard alone is about 0.51×; drawing the full model and slicing it would be ≥ 1×), and its
/// training steps peak below the one-rank run's; both as `summary.json` reports them (the
/// largest of any rank's), with equal losses.
#[cfg(feature = "mpi")]
#[test]
fn moe_small_under_launch_with_ep4_builds_each_rank_in_at_most_0_6_of_the_one_rank_memory() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let small = Path::new(env!("CARGO_MANIFEST_DIR")).join("moe-small.toml");
    let run = |n: usize, dir: &Path, extra: &[&str]| -> serde_json::Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_burn-recipes"));
        match n {
            1 => cmd.arg("train"),
            n => cmd.args(["launch", "-n", &n.to_string()]),
        };
        cmd.arg(&small)
            .args(["--set", &format!("run.dir=\"{}\"", dir.display())])
            .args([
                "--set",
                "training.steps=2",
                "--set",
                "training.warmup_steps=1",
            ])
            .args(["--set", "training.checkpoint_every=0"])
            .args(extra)
            .env("BURN_PARALLEL_TIMEOUT_S", "120");
        let out = cmd.output().expect("binary runs");
        assert!(
            out.status.success(),
            "{n} ranks: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
        serde_json::from_str(&text).expect("JSON")
    };
    let one = run(1, &tmp.path().join("one"), &[]);
    let ep4 = run(4, &tmp.path().join("ep4"), &["--set", "parallel.ep=4"]);
    let bytes = |s: &serde_json::Value, key: &str| s[key].as_f64().expect(key);
    let build = bytes(&ep4, "build_peak_memory_bytes") / bytes(&one, "build_peak_memory_bytes");
    println!("build peak EP4 / one rank: {build:.3}");
    assert!(
        build <= 0.6,
        "each EP4 rank built in {build:.3}× the one-rank memory"
    );
    let steps = bytes(&ep4, "peak_memory_bytes") / bytes(&one, "peak_memory_bytes");
    println!("step peak EP4 / one rank: {steps:.3}");
    assert!(
        steps < 1.0,
        "EP4 steps peak at {steps:.3}× the one-rank run's"
    );
    let (a, b) = (bytes(&one, "final_loss"), bytes(&ep4, "final_loss"));
    assert!((a - b).abs() <= 1e-4 * a, "losses {a} and {b}");
}
