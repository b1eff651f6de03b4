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

#[test]
fn recomputation_gives_the_same_losses() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let (plain, recompute) = (tmp.path().join("plain"), tmp.path().join("recompute"));
    let short = [
        "--set",
        "training.steps=5",
        "--set",
        "training.warmup_steps=2",
    ];
    train(&plain, &short);
    let mut args = short.to_vec();
    args.extend(["--set", "training.recompute=true"]);
    train(&recompute, &args);
    assert_eq!(losses(&plain), losses(&recompute));
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
