//! Bad recipes: each must fail with exit code 2, a one-line message naming the offending key,
//! and nothing written (the run directory must not exist afterwards).

use std::path::Path;
use std::process::Command;

const TINY: &str = include_str!("../moe-tiny.toml");

/// Runs `burn-recipes ARGS` on `recipe_text` with the run directory inside a fresh temporary
/// folder; asserts the failure contract and that `key` is named.
fn refuses(recipe_text: &str, extra: &[&str], key: &str) {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let file = tmp.path().join("recipe.toml");
    std::fs::write(&file, recipe_text).expect("write recipe");
    let run = tmp.path().join("run");
    let mut args = vec!["train".to_string(), file.display().to_string()];
    args.push("--set".into());
    args.push(format!("run.dir=\"{}\"", run.display()));
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
        .args(&args)
        .output()
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: stderr {stderr}");
    assert!(
        stderr.contains(key),
        "{args:?}: `{key}` not named in: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(!run.exists(), "{args:?}: {} was written", run.display());
    assert_empty(tmp.path(), &file);
}

fn assert_empty(dir: &Path, recipe: &Path) {
    let others: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p != recipe)
        .collect();
    assert!(others.is_empty(), "written: {others:?}");
}

fn set(assignment: &str, key: &str) {
    refuses(TINY, &["--set", assignment], key);
}

fn with_text(replace: (&str, &str), key: &str) {
    assert!(
        TINY.contains(replace.0),
        "the recipe has no `{}`",
        replace.0
    );
    refuses(&TINY.replace(replace.0, replace.1), &[], key);
}

#[test]
fn unknown_key_in_a_section() {
    set("model.hiden=64", "hiden");
}

#[test]
fn unknown_section() {
    refuses(
        &format!("{TINY}\n[optimizer]\nlr = 1.0\n"),
        &[],
        "optimizer",
    );
}

#[test]
fn wrong_type() {
    set("model.heads=\"four\"", "heads");
}

#[test]
fn zero_hidden() {
    set("model.hidden=0", "model.hidden");
}

#[test]
fn heads_not_dividing_hidden() {
    set("model.heads=5", "model.heads");
}

#[test]
fn attention_options_out_of_range_name_their_key() {
    set("model.head_dim=7", "model.head_dim");
    set("model.dense_layers=[5]", "model.dense_layers");
    set("model.qk_norm=\"sideways\"", "model.qk_norm");
    refuses(
        TINY,
        &["--set", "model.qk_norm=\"whole\"", "--set", "parallel.tp=2"],
        "model.qk_norm",
    );
}

#[test]
fn kv_heads_not_dividing_heads() {
    set("model.kv_heads=3", "model.kv_heads");
}

#[test]
fn topk_above_experts() {
    set("model.topk=5", "model.topk");
}

#[test]
fn negative_aux_coefficient() {
    set("model.aux_loss_coeff=-1.0", "model.aux_loss_coeff");
}

#[test]
fn zero_capacity_factor() {
    set("model.capacity_factor=0.0", "model.capacity_factor");
}

#[test]
fn small_rope_base() {
    set("model.rope_theta=0.5", "model.rope_theta");
}

#[test]
fn unknown_source() {
    set("data.source=\"video\"", "source");
}

#[test]
fn zero_branching() {
    set("data.branching=0", "data.branching");
}

#[test]
fn zero_sequence_length() {
    set("data.seq_len=0", "data.seq_len");
}

#[test]
fn bytes_without_a_path() {
    refuses(
        TINY,
        &["--set", "data.source=\"bytes\"", "--set", "model.vocab=256"],
        "data.path",
    );
}

#[test]
fn bytes_with_a_missing_path() {
    refuses(
        TINY,
        &[
            "--set",
            "data.source=\"bytes\"",
            "--set",
            "model.vocab=256",
            "--set",
            "data.path=\"/nonexistent/corpus.txt\"",
        ],
        "data.path",
    );
}

#[test]
fn zero_learning_rate() {
    set("training.lr=0.0", "training.lr");
}

#[test]
fn min_lr_above_lr() {
    set("training.min_lr=1.0", "training.min_lr");
}

#[test]
fn warmup_longer_than_training() {
    set("training.warmup_steps=100000", "training.warmup_steps");
}

#[test]
fn beta1_of_one() {
    set("training.beta1=1.0", "training.beta1");
}

#[test]
fn global_batch_not_a_multiple() {
    set("training.global_batch=12", "training.global_batch");
}

#[test]
fn negative_clip() {
    set("training.grad_clip=-1.0", "training.grad_clip");
}

#[test]
fn unknown_precision() {
    set("training.precision=\"fp8\"", "precision");
}

#[test]
fn recompute_of_the_wrong_type() {
    set("training.recompute=\"yes\"", "recompute");
}

#[test]
fn tp_not_dividing_heads() {
    set("parallel.tp=3", "parallel.tp");
}

#[test]
fn ep_not_dividing_experts() {
    set("parallel.ep=3", "parallel.ep");
}

#[test]
fn etp_not_dividing_the_expert_ffn() {
    set("parallel.etp=3", "parallel.etp");
}

#[test]
fn context_parallel_needs_the_sequence_in_2cp_chunks() {
    set("parallel.cp=3", "data.seq_len");
}

#[test]
fn pipeline_stages_must_split_the_layers() {
    set("parallel.pp=3", "parallel.pp");
    set("parallel.virtual_pp=4", "parallel.pp");
}

#[test]
fn uneven_pipeline_split_must_cover_the_layers() {
    set("parallel.pp_layers=[1, 2]", "parallel.pp_layers");
    set("parallel.pp_layers=[3]", "parallel.pp_layers");
}

#[test]
fn unknown_context_parallel_exchange() {
    set("parallel.cp_comm=\"a2a\"", "parallel.cp_comm");
}

#[test]
fn microbatches_must_match_the_batch() {
    set("parallel.microbatches=3", "parallel.microbatches");
}

#[test]
fn world_not_a_multiple_of_the_layout() {
    // On one process, tp = 2 cannot be laid out.
    set("parallel.tp=2", "parallel.tp");
}

#[test]
fn missing_seed() {
    with_text(("seed = 42\n", ""), "seed");
}

#[test]
fn zero_peak_flops() {
    set("run.peak_tflops=0.0", "run.peak_tflops");
}

#[test]
fn malformed_override() {
    set("model.hidden", "--set");
}

#[test]
fn launch_world_not_fitting_the_layout() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let file = tmp.path().join("recipe.toml");
    std::fs::write(&file, TINY).expect("write recipe");
    let run = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
        .args(["launch", "-n", "3", &file.display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", run.display())])
        .args(["--set", "parallel.tp=2"])
        .output()
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("parallel.tp"), "{stderr}");
    assert!(!run.exists());
}

#[test]
fn full_scale_recipes_state_their_memory_and_refuse() {
    for name in ["mixtral-8x22b.toml", "qwen2-57b-a14b.toml"] {
        let tmp = tempfile::tempdir().expect("temporary folder");
        let run = tmp.path().join("run");
        let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
        let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
            .args(["train", &recipe.display().to_string()])
            .args(["--set", &format!("run.dir=\"{}\"", run.display())])
            .output()
            .expect("binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains("GiB"),
            "{name}: no memory figure in {stderr}"
        );
        assert!(!run.exists(), "{name}: the run directory was written");
    }
}

#[test]
fn a_fresh_run_into_a_used_run_directory_is_refused() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let file = tmp.path().join("recipe.toml");
    std::fs::write(&file, TINY).expect("write recipe");
    let run = tmp.path().join("run");
    // A run with a checkpoint (a folder without one is started afresh: see reliability.rs).
    let step = run.join("checkpoints/step-000005");
    std::fs::create_dir_all(&step).expect("run dir");
    std::fs::write(
        step.join("meta.json"),
        r#"{"step": 5, "world": 1, "next_sequence": 80, "seed": 42}"#,
    )
    .expect("old checkpoint");
    let out = Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
        .args(["train", &file.display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", run.display())])
        .output()
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("run.dir") && stderr.contains("--resume"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&run).expect("list").collect();
    assert_eq!(
        left.len(),
        1,
        "something was written next to the old checkpoint"
    );
}
