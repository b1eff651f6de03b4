//! A run survives its user (issue 24's defects, each a test that failed before its fix):
//! stranded run folders, changed recipes and steps on resume, inconsistent checkpoints,
//! duplicated metrics after a lost checkpoint, `log_every` beyond the run, `--stop-at 0`,
//! `moe_every` beyond the layers, unbounded recipe files.

mod common;

use std::path::Path;
use std::process::Output;

use common::{bin, recipe};

fn run(dir: &Path, extra: &[&str]) -> Output {
    let mut cmd = bin();
    cmd.args(["train", &recipe("moe-tiny.toml").display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", dir.display())])
        .args([
            "--set",
            "training.steps=20",
            "--set",
            "training.warmup_steps=2",
            "--set",
            "training.checkpoint_every=5",
            "--set",
            "training.keep_checkpoints=3",
        ]);
    cmd.args(extra).output().expect("binary runs")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Exit 2 with a one-line error containing `key`.
fn refused(out: &Output, key: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(key), "expected {key} in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

/// `(step, loss)` of every line of `metrics.jsonl`.
fn metrics(dir: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            (v["step"].as_u64().expect("step"), v["loss"].to_string())
        })
        .collect()
}

#[test]
fn a_folder_left_by_a_run_that_died_before_its_first_checkpoint_is_started_afresh() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("run");
    std::fs::create_dir_all(&dir).expect("folder");
    for (file, text) in [
        ("metrics.jsonl", "{\"step\": 1, \"loss\": 9.0}\n"),
        ("recipe.toml", "stale"),
        ("train.log", "stale\n"),
    ] {
        std::fs::write(dir.join(file), text).expect("write");
    }
    ok(&run(&dir, &[]));
    let m = metrics(&dir);
    assert_eq!(m.len(), 20, "{m:?}");
    assert_eq!(m[0].0, 1);
    assert_ne!(m[0].1, "9.0");
}

#[test]
fn resume_refuses_a_changed_recipe_and_keeps_the_runs_record() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("run");
    ok(&run(&dir, &["--stop-at", "10"]));
    let record = std::fs::read(dir.join("recipe.toml")).expect("recipe.toml");
    let summary = std::fs::read(dir.join("summary.json")).expect("summary");
    for (set, key) in [
        ("run.seed=7", "run.seed"),
        ("training.micro_batch=4", "training.micro_batch"),
        ("training.lr=1e-3", "training.lr"),
        ("data.seq_len=16", "data"),
        ("model.hidden=32", "model"),
        // Nothing left to train: the checkpoint is at step 10.
        ("training.steps=10", "training.steps"),
    ] {
        let out = run(&dir, &["--resume", "--set", set]);
        refused(&out, key);
        assert_eq!(
            std::fs::read(dir.join("recipe.toml")).unwrap(),
            record,
            "{set}"
        );
        assert_eq!(
            std::fs::read(dir.join("summary.json")).unwrap(),
            summary,
            "{set}"
        );
    }
    // What may change does: more steps, another logging cadence.
    ok(&run(
        &dir,
        &[
            "--resume",
            "--set",
            "training.steps=25",
            "--set",
            "training.log_every=5",
        ],
    ));
}

#[test]
fn resume_after_a_lost_checkpoint_drops_the_metrics_it_did_not_keep() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let straight = tmp.path().join("straight");
    ok(&run(&straight, &[]));
    let dir = tmp.path().join("run");
    ok(&run(&dir, &["--stop-at", "10"]));
    // A run killed after logging step 10 but before writing its checkpoint: the newest
    // checkpoint is step 5 and metrics.jsonl holds 10 steps.
    std::fs::remove_dir_all(dir.join("checkpoints/step-000010")).expect("remove");
    assert_eq!(metrics(&dir).len(), 10);
    ok(&run(&dir, &["--resume"]));
    let m = metrics(&dir);
    let steps: Vec<u64> = m.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        steps,
        (1..=20).collect::<Vec<_>>(),
        "duplicated or missing steps"
    );
    assert_eq!(m, metrics(&straight), "the resumed curve differs");
}

#[test]
fn an_inconsistent_checkpoint_is_refused_naming_it() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("run");
    ok(&run(&dir, &["--stop-at", "10"]));
    // Without its checksums (as checkpoints before them), so the edits below reach the
    // consistency checks.
    std::fs::remove_file(dir.join("checkpoints/step-000010/SHA256SUMS")).expect("remove");
    // meta.json disagrees with its folder.
    let meta = dir.join("checkpoints/step-000010/meta.json");
    let text = std::fs::read_to_string(&meta).expect("meta");
    std::fs::write(&meta, text.replace("\"step\": 10", "\"step\": 5")).expect("write");
    refused(&run(&dir, &["--resume"]), "meta.json");
    // Folder and meta.json agree, the optimizer state does not.
    std::fs::rename(
        dir.join("checkpoints/step-000010"),
        dir.join("checkpoints/step-000006"),
    )
    .expect("rename");
    let meta = dir.join("checkpoints/step-000006/meta.json");
    let text = std::fs::read_to_string(&meta).expect("meta");
    std::fs::write(&meta, text.replace("\"step\": 5", "\"step\": 6")).expect("write");
    refused(&run(&dir, &["--resume"]), "optimizer state");
}

#[test]
fn bad_run_arguments_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("run");
    refused(&run(&dir, &["--stop-at", "0"]), "--stop-at");
    refused(&run(&dir, &["--stop-at", "21"]), "--stop-at");
    refused(
        &run(&dir, &["--set", "model.moe_every=3"]),
        "model.moe_every",
    );
    assert!(!dir.exists());
    let out = bin().args(["train", "/dev/zero"]).output().expect("binary");
    refused(&out, "larger than");
}

#[test]
fn log_every_beyond_the_run_still_logs_and_plots_the_last_step() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("run");
    ok(&run(&dir, &["--set", "training.log_every=50"]));
    assert_eq!(metrics(&dir).iter().map(|m| m.0).collect::<Vec<_>>(), [20]);
    assert!(dir.join("loss.png").exists());
}

#[test]
fn a_byte_flipped_in_any_checkpoint_file_is_detected_naming_the_file() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("run");
    ok(&run(&dir, &["--stop-at", "10"]));
    let step = dir.join("checkpoints/step-000010");
    let mut files: Vec<String> = std::fs::read_dir(&step)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["SHA256SUMS", "meta.json", "rank-00000.safetensors"]);
    let record: Vec<Vec<u8>> = ["recipe.toml", "metrics.jsonl", "summary.json"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("record"))
        .collect();
    for name in &files {
        let path = step.join(name);
        let original = std::fs::read(&path).expect("file");
        // The first byte, one in the middle (the optimizer state, for the tensors) and the
        // last.
        for at in [0, original.len() / 2, original.len() - 2] {
            let mut flipped = original.clone();
            flipped[at] ^= 0x01;
            std::fs::write(&path, &flipped).expect("write");
            refused(&run(&dir, &["--resume"]), name);
            let now: Vec<Vec<u8>> = ["recipe.toml", "metrics.jsonl", "summary.json"]
                .iter()
                .map(|f| std::fs::read(dir.join(f)).expect("record"))
                .collect();
            assert_eq!(now, record, "{name} byte {at}: the run's record changed");
        }
        std::fs::write(&path, &original).expect("restore");
    }
    ok(&run(&dir, &["--resume"]));
}

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("run");
    let out = run(
        &dir,
        &[
            "--set",
            "training.lr=1e30",
            "--set",
            "training.min_lr=1e30",
            "--set",
            "training.grad_clip=1e30",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // The router's finiteness check or the loss check, with the step.
    assert!(
        err.starts_with("error: step ")
            && (err.contains("the loss is") || err.contains("non-finite")),
        "{err}"
    );
    let m = metrics(&dir);
    assert!(m.iter().all(|(_, loss)| loss != "null"), "{m:?}");
}

#[test]
fn bad_command_line_values_exit_2_naming_the_flag() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let lm = tmp.path().join("lm");
    ok(&run(
        &lm,
        &[
            "--set",
            "training.steps=3",
            "--set",
            "training.warmup_steps=1",
        ],
    ));
    let s = |p: &str| p.to_string();
    let mixtral = recipe("mixtral-8x22b.toml").display().to_string();
    let clips = recipe("../../shared/data/video-clips")
        .display()
        .to_string();
    let lm_run = lm.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                s("plan"),
                mixtral.clone(),
                s("--search"),
                s("--top"),
                s("0"),
            ],
            "--top",
        ),
        (
            vec![
                s("plan"),
                mixtral.clone(),
                s("--set"),
                s("cluster.memory_gib=-1"),
            ],
            "cluster.memory_gib",
        ),
        (
            vec![
                s("plan"),
                mixtral.clone(),
                s("--set"),
                s("cluster.ib_gbits_per_s=0"),
            ],
            "cluster.ib_gbits_per_s",
        ),
        (
            vec![
                s("plan"),
                mixtral.clone(),
                s("--set"),
                s("cluster.peak_tflops=nan"),
            ],
            "cluster.peak_tflops",
        ),
        (
            vec![
                s("plan"),
                mixtral.clone(),
                s("--set"),
                s("cluster.gpus_per_node=3"),
            ],
            "cluster.gpus_per_node",
        ),
        (
            vec![
                s("data"),
                s("scan"),
                clips.clone(),
                s("--max-cut"),
                s("nan"),
            ],
            "--max-cut",
        ),
        (
            vec![s("data"), s("scan"), clips, s("--min-motion=-1")],
            "--min-motion",
        ),
        (
            vec![
                s("data"),
                s("synth"),
                tmp.path().join("synth").display().to_string(),
                s("--count"),
                s("0"),
            ],
            "--count",
        ),
        (
            vec![
                s("eval"),
                s("dit"),
                s("--run"),
                lm_run.clone(),
                s("--prompts"),
                s("0"),
            ],
            "--prompts",
        ),
        (
            vec![
                s("eval"),
                s("dit"),
                s("--run"),
                lm_run.clone(),
                s("--guidance"),
                s("nan"),
            ],
            "--guidance",
        ),
        // A run of another kind is named as such.
        (
            vec![s("eval"), s("dit"), s("--run"), lm_run.clone()],
            "is a MoE LM run",
        ),
        (
            vec![
                s("eval"),
                s("vae"),
                s("--run"),
                lm_run,
                s("--clips"),
                s("."),
            ],
            "is a MoE LM run",
        ),
    ];
    for (args, key) in cases {
        let out = bin().args(&args).output().expect("binary");
        refused(&out, key);
    }
    assert!(!tmp.path().join("synth").exists());
}

#[test]
fn recipe_syntax_errors_give_their_line_and_a_cluster_without_gpus_takes_the_layouts() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[run]\ndir = \"x\"\nseed = 99999999999999999999999\n").expect("write");
    let out = bin()
        .args(["train", &bad.display().to_string()])
        .output()
        .expect("binary");
    refused(&out, "line 3, column 8");
    std::fs::write(&bad, "[run]\ndir = [1,\n").expect("write");
    let out = bin()
        .args(["train", &bad.display().to_string()])
        .output()
        .expect("binary");
    refused(&out, "line 3");
    // `--set cluster.KEY` on a recipe whose [cluster] omits gpus keeps parallel.gpus.
    let plan = |extra: &[&str]| -> serde_json::Value {
        let out = bin()
            .args([
                "plan",
                &recipe("mixtral-8x22b.toml").display().to_string(),
                "--json",
            ])
            .args(["--set", "parallel.gpus=256", "--set", "parallel.ep=4"])
            .args(extra)
            .output()
            .expect("plan");
        ok(&out);
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let with = plan(&["--set", "cluster.memory_gib=80"]);
    let without = plan(&[]);
    assert_eq!(with["step_time_s"], without["step_time_s"], "{with}");
}

/// Starts a long training run (150 steps, a checkpoint every 25) in the background.
fn spawn_long(dir: &Path) -> std::process::Child {
    bin()
        .args(["train", &recipe("moe-tiny.toml").display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", dir.display())])
        .args([
            "--set",
            "training.checkpoint_every=25",
            "--set",
            "training.steps=150",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Waits until `metrics.jsonl` of `dir` has at least `n` lines.
fn wait_for_steps(dir: &Path, n: usize) {
    let began = std::time::Instant::now();
    while std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < n {
        assert!(
            began.elapsed().as_secs() < 120,
            "the run did not reach step {n}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// The uninterrupted run (as `spawn_long` runs it).
fn straight_run(dir: &Path) -> Vec<(u64, String)> {
    let out = bin()
        .args(["train", &recipe("moe-tiny.toml").display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", dir.display())])
        .args([
            "--set",
            "training.checkpoint_every=25",
            "--set",
            "training.steps=150",
        ])
        .output()
        .expect("binary");
    ok(&out);
    metrics(dir)
}

fn resume_long(dir: &Path) -> Output {
    bin()
        .args(["train", &recipe("moe-tiny.toml").display().to_string()])
        .args(["--set", &format!("run.dir=\"{}\"", dir.display())])
        .args([
            "--set",
            "training.checkpoint_every=25",
            "--set",
            "training.steps=150",
        ])
        .arg("--resume")
        .output()
        .expect("binary")
}

#[test]
fn interrupts_stop_with_a_checkpoint_and_kills_resume_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let want = straight_run(&tmp.path().join("straight"));
    assert_eq!(want.len(), 150);
    for (name, code) in [("INT", 130), ("TERM", 143)] {
        let dir = tmp.path().join(format!("sig{name}"));
        let child = spawn_long(&dir);
        wait_for_steps(&dir, 30);
        // A second process into the same folder is refused while the first one runs.
        let second = resume_long(&dir);
        refused(&second, "is training into");
        signal(&child, name);
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{name}: {err}");
        assert!(
            err.contains(&format!("SIG{name} received: stopped after step"))
                && err.contains("--resume"),
            "{err}"
        );
        let step = metrics(&dir).len();
        assert!(
            dir.join(format!("checkpoints/step-{step:06}/meta.json"))
                .exists(),
            "no checkpoint at step {step}"
        );
        assert!(!dir.join(".lock").exists(), "the lock was left behind");
        ok(&resume_long(&dir));
        assert_eq!(metrics(&dir), want, "SIG{name}: the resumed curve differs");
    }
    // SIGKILL: no checkpoint at the kill, a lock left behind by a dead process; the resumed
    // run starts from the last checkpoint, drops the metrics after it, and ends on the same
    // curve.
    let dir = tmp.path().join("sigkill");
    let mut child = spawn_long(&dir);
    wait_for_steps(&dir, 40);
    signal(&child, "KILL");
    let _ = child.wait();
    assert!(dir.join(".lock").exists());
    ok(&resume_long(&dir));
    assert_eq!(metrics(&dir), want, "SIGKILL: the resumed curve differs");
}

#[test]
fn a_step_that_cannot_fit_in_memory_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("run");
    for sets in [
        vec!["--set", "data.seq_len=100000000"],
        vec![
            "--set",
            "training.micro_batch=100000000",
            "--set",
            "training.global_batch=100000000",
        ],
    ] {
        let began = std::time::Instant::now();
        refused(&run(&dir, &sets), "GiB available");
        assert!(
            began.elapsed().as_secs() < 30,
            "{sets:?} took {:?}",
            began.elapsed()
        );
        assert!(!dir.exists());
    }
    let out = bin()
        .args(["layer", "--tokens", "100000000"])
        .output()
        .expect("layer");
    refused(&out, "GiB available");
}

/// `launch -n 4` (TP2 × EP2) of the long run.
#[cfg(feature = "mpi")]
fn launch(dir: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = bin();
    cmd.args([
        "launch",
        "-n",
        "4",
        &recipe("moe-tiny.toml").display().to_string(),
    ])
    .args(["--set", &format!("run.dir=\"{}\"", dir.display())])
    .args(["--set", "parallel.tp=2", "--set", "parallel.ep=2"])
    .args([
        "--set",
        "training.checkpoint_every=25",
        "--set",
        "training.steps=150",
    ])
    .args(extra);
    cmd
}

/// [`launch`] of the long run into `dir`, running in the background with its output piped.
#[cfg(feature = "mpi")]
fn spawn_launch(dir: &Path) -> std::process::Child {
    launch(dir, &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("launch")
}

/// The pid of world rank `rank` of the run into `dir` (its environment names the rank).
#[cfg(feature = "mpi")]
fn rank_pid(dir: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            let is_rank = cmdline.starts_with(&*bin().get_program().to_string_lossy())
                && cmdline.contains(&dir.display().to_string())
                && cmdline.contains("train");
            (is_rank && environ.split(|&b| b == 0).any(|v| v == want.as_bytes())).then_some(pid)
        })
}

#[cfg(feature = "mpi")]
#[test]
fn under_launch_a_signal_checkpoints_every_rank_and_a_killed_rank_stops_the_others() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let straight = tmp.path().join("straight");
    ok(&launch(&straight, &[]).output().expect("launch"));
    let want = metrics(&straight);
    assert_eq!(want.len(), 150);
    // SIGINT to `launch`: every rank stops after the same step with one checkpoint.
    let dir = tmp.path().join("int");
    let child = spawn_launch(&dir);
    wait_for_steps(&dir, 30);
    signal(&child, "INT");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("SIGINT received") && err.contains("--resume"),
        "{err}"
    );
    let step = metrics(&dir).len();
    assert!(
        dir.join(format!("checkpoints/step-{step:06}/meta.json"))
            .exists(),
        "{err}"
    );
    ok(&launch(&dir, &["--resume"]).output().expect("resume"));
    assert_eq!(metrics(&dir), want, "the resumed 4-rank curve differs");
    // One rank SIGKILLed mid-run: the launch stops, non-zero, within 60 s, naming the rank;
    // the newest checkpoint is intact and resumes to the same curve.
    let dir = tmp.path().join("kill");
    let child = spawn_launch(&dir);
    wait_for_steps(&dir, 40);
    let victim = rank_pid(&dir, 3).expect("rank 3's process");
    let killed = std::time::Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        killed.elapsed().as_secs() < 60,
        "took {:?}",
        killed.elapsed()
    );
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rank 3"), "the dead rank is not named: {err}");
    // `launch` returns only when no rank it started is left (one would hold the run's lock).
    for rank in 0..4 {
        assert_eq!(
            rank_pid(&dir, rank),
            None,
            "rank {rank} outlived launch: {err}"
        );
    }
    ok(&launch(&dir, &["--resume"]).output().expect("resume"));
    assert_eq!(
        metrics(&dir),
        want,
        "the 4-rank curve after a killed rank differs"
    );
}
