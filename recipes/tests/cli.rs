//! Smoke tests of the command line.

mod common;

use common::bin;

#[test]
fn layer_runs_and_reports_throughput() {
    let out = bin()
        .args([
            "layer",
            "--tokens",
            "64",
            "--hidden",
            "16",
            "--ffn",
            "32",
            "--experts",
            "4",
        ])
        .args(["--topk", "2", "--iters", "1", "--z-loss-coeff", "0.001"])
        .output()
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tokens_per_s="), "{stdout}");
    // 64 tokens × top-2 = 128 assignments, dropless.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("tokens per expert"))
        .expect("counts line");
    let total: i64 = line
        .trim_start_matches("tokens per expert: [")
        .trim_end_matches(']')
        .split(", ")
        .map(|v| v.parse::<i64>().unwrap())
        .sum();
    assert_eq!(total, 128);
}

#[test]
fn bad_layer_config_exits_2_naming_the_field() {
    let out = bin()
        .args([
            "layer",
            "--experts",
            "4",
            "--topk",
            "5",
            "--hidden",
            "8",
            "--ffn",
            "8",
            "--tokens",
            "8",
        ])
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`topk`"), "{stderr}");
}

/// Runs the binary with `args`; asserts success and returns stdout.
fn ok(args: &[&str]) -> String {
    let out = bin().args(args).output().expect("binary runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn data_synth_then_scan_writes_clips_captions_and_a_manifest() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let clips = tmp.path().join("synth").display().to_string();
    let manifest = tmp.path().join("manifest.jsonl").display().to_string();
    ok(&["data", "synth", &clips, "--count", "6"]);
    let captions =
        std::fs::read_to_string(tmp.path().join("synth/captions.jsonl")).expect("captions");
    assert_eq!(captions.lines().count(), 6);
    assert!(captions.contains("1 red square moving left"), "{captions}");
    // The output folder exists now: a second run refuses and leaves it alone.
    let again = bin()
        .args(["data", "synth", &clips])
        .output()
        .expect("binary runs");
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let stdout = ok(&["data", "scan", &clips, "--out", &manifest]);
    assert!(stdout.contains("6 clips: 6 accepted"), "{stdout}");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    assert_eq!(text.lines().count(), 6);
    // A stricter filter rejects them all, and says why.
    let stdout = ok(&[
        "data",
        "scan",
        &clips,
        "--out",
        &manifest,
        "--min-motion",
        "1000",
    ]);
    assert!(stdout.contains("6 clips: 0 accepted") && stdout.contains("static (motion"));
    let nothing = tmp.path().join("nothing").display().to_string();
    let missing = bin()
        .args(["data", "scan", &nothing])
        .output()
        .expect("binary runs");
    assert_eq!(missing.status.code(), Some(2));
}

/// `eval hf` on a hub checkpoint: its reference passes (JSON verdict, exit 0); the same
/// weights against a reference whose greedy continuation was altered fail (exit 1); a folder
/// without a checkpoint is an error naming the file (exit 2).
#[test]
fn eval_hf_checks_a_hub_checkpoint_against_its_reference() {
    let dir = common::hf_models().join("qwen2-moe-tiny");
    let out = bin()
        .args(["eval", "hf", &dir.display().to_string(), "--json"])
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(verdict["pass"], true, "{verdict}");
    assert_eq!(verdict["greedy_match"], true, "{verdict}");
    assert!(
        verdict["max_abs_err"].as_f64().is_some_and(|e| e < 1e-4),
        "{verdict}"
    );

    let tmp = tempfile::tempdir().expect("temporary folder");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).expect("copy");
    }
    let mut reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference.json")).expect("reference"),
    )
    .expect("JSON");
    let first = reference["greedy_continuation"][0].as_i64().expect("id");
    reference["greedy_continuation"][0] = serde_json::json!((first + 1) % 256);
    std::fs::write(tmp.path().join("reference.json"), reference.to_string()).expect("write");
    let out = bin()
        .args(["eval", "hf", &tmp.path().display().to_string()])
        .output()
        .expect("binary runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAIL"));

    std::fs::remove_file(tmp.path().join("model.safetensors")).expect("remove");
    let out = bin()
        .args(["eval", "hf", &tmp.path().display().to_string()])
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.safetensors"));
}

/// `export hf RUN --out HUB --f32`, then the exported folder read back (`MoeLm::from_hf`)
/// against the run's own model (`load_run`): the same logits bit for bit on `ids` (a
/// sequence-first `[8, 2]` batch). Returns the exported `config.json`.
fn export_f32_and_compare(
    run: &std::path::Path,
    hub: &std::path::Path,
    ids: Vec<i64>,
) -> serde_json::Value {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    let out = bin()
        .args(["export", "hf", &run.display().to_string(), "--f32", "--out"])
        .arg(hub)
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = Device::flex();
    let trained = burn_recipes::model::load_run(run, &d).expect("run");
    let exported = burn_moe::lm::MoeLm::from_hf(hub, &d).expect("hub");
    let logits = |m: &burn_moe::lm::MoeLm| -> Vec<f32> {
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [8, 2]), &d);
        m.forward(input)
            .expect("forward")
            .into_data()
            .iter::<f32>()
            .collect()
    };
    assert!(
        logits(&trained) == logits(&exported),
        "the exported model differs"
    );
    serde_json::from_str(&std::fs::read_to_string(hub.join("config.json")).expect("config"))
        .expect("JSON")
}

/// `export hf` writes a one-rank run's model as a hub checkpoint (moe-tiny is a Mixtral):
/// read back, it is the run's model (float32: the same logits bit for bit); `eval hf` runs it.
#[test]
fn export_hf_writes_a_run_as_a_hub_checkpoint_that_reads_back_the_same() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let run = tmp.path().join("run");
    let out = common::train(
        &common::recipe("moe-tiny.toml"),
        &run,
        &["training.steps=3", "training.warmup_steps=1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hub = tmp.path().join("hub");
    let ids = (0..16).map(|i| (i * 7 + 3) % 64).collect();
    let config = export_f32_and_compare(&run, &hub, ids);
    assert_eq!(config["architectures"][0], "MixtralForCausalLM");
    let out = bin()
        .args(["eval", "hf"])
        .arg(&hub)
        .args(["--json", "--ids", "1,2,3,4,5"])
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{v}");
    // An existing folder is refused.
    let out = bin()
        .args(["export", "hf", &run.display().to_string(), "--out"])
        .arg(&hub)
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
}

/// A recipe with Qwen3's attention and layer options (per-head QK norms, a head width other
/// than hidden / heads, a dense layer between MoE layers) trains with a falling loss and
/// exports as a Qwen3-MoE checkpoint that reads back with bit-identical logits (f32).
#[test]
fn a_qwen3_style_recipe_trains_and_exports_as_qwen3_moe() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let run = tmp.path().join("run");
    let out = common::train(
        &common::recipe("moe-tiny.toml"),
        &run,
        &[
            "training.steps=20",
            "model.qk_norm=\"per_head\"",
            "model.head_dim=32",
            "model.dense_layers=[0]",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
            .expect("JSON");
    let losses: Vec<f64> = summary["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    assert!(losses[losses.len() - 1] < losses[0], "{losses:?}");
    let hub = tmp.path().join("hub");
    let ids = (0..16).map(|i| (i * 5 + 1) % 64).collect();
    let config = export_f32_and_compare(&run, &hub, ids);
    assert_eq!(config["architectures"][0], "Qwen3MoeForCausalLM");
    assert_eq!(config["head_dim"], 32);
    assert_eq!(config["mlp_only_layers"], serde_json::json!([0]));
}

/// `launch --help` names the device and host options.
#[test]
fn launch_help_shows_the_device_and_host_options() {
    let help = ok(&["launch", "--help"]);
    for option in ["--device", "--hostfile", "--host"] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
}

/// What `launch` hands `mpirun`: a stand-in `mpirun` first on `PATH` records its arguments and
/// environment. The user's MCA variables arrive untouched; the one-machine defaults fill only
/// what the user left unset, and none are added for a hostfile; `--device cuda` reaches every
/// rank's `train`.
#[test]
fn launch_passes_user_mca_settings_hosts_and_device_to_mpirun_untouched() {
    let dir = std::env::temp_dir().join(format!("burn-recipes-fake-mpirun-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let record = dir.join("record.txt");
    let script = dir.join("mpirun");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{{ echo \"ARGS $*\"; env | grep '^OMPI_MCA_' | sort; }} > '{}'\n",
            record.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", &script.display().to_string()])
        .status()
        .unwrap();
    let hostfile = dir.join("hosts.txt");
    std::fs::write(&hostfile, "node1 slots=2\nnode2 slots=2\n").unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/moe-tiny.toml");
    let launch = |extra: &[&str], env: &[(&str, &str)]| -> String {
        let mut cmd = bin();
        cmd.args(["launch", "-n", "2", recipe]).args(extra);
        cmd.env("PATH", &path);
        for key in [
            "OMPI_MCA_btl",
            "OMPI_MCA_rmaps_base_oversubscribe",
            "OMPI_MCA_pml",
        ] {
            cmd.env_remove(key);
        }
        cmd.envs(env.iter().copied());
        let out = cmd.output().expect("launch runs");
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(&record).expect("the stand-in mpirun ran")
    };
    // The user's settings, untouched; the oversubscription default still added.
    let seen = launch(
        &["--device", "cuda"],
        &[("OMPI_MCA_btl", "tcp,self"), ("OMPI_MCA_pml", "ob1")],
    );
    assert!(seen.contains("OMPI_MCA_btl=tcp,self\n"), "{seen}");
    assert!(seen.contains("OMPI_MCA_pml=ob1\n"), "{seen}");
    assert!(!seen.contains("vader"), "{seen}");
    assert!(
        seen.contains("OMPI_MCA_rmaps_base_oversubscribe=1\n"),
        "{seen}"
    );
    let args = seen.lines().next().unwrap_or_default();
    assert!(args.starts_with("ARGS -np 2 "), "{args}");
    assert!(
        args.contains(" train ") && args.ends_with("--device cuda"),
        "{args}"
    );
    // Nothing set by the user, one machine: the defaults.
    let seen = launch(&[], &[]);
    assert!(seen.contains("OMPI_MCA_btl=self,vader\n"), "{seen}");
    assert!(!seen.contains("--device"), "{seen}");
    // A hostfile: passed on, no one-machine defaults.
    let seen = launch(&["--hostfile", &hostfile.display().to_string()], &[]);
    assert!(
        seen.starts_with(&format!("ARGS -np 2 --hostfile {} ", hostfile.display())),
        "{seen}"
    );
    assert!(!seen.contains("OMPI_MCA_"), "{seen}");
    let seen = launch(&["--host", "node1:2,node2:2"], &[]);
    assert!(
        seen.starts_with("ARGS -np 2 --host node1:2,node2:2 "),
        "{seen}"
    );
    // A hostfile that is not there is refused before mpirun runs.
    let out = bin()
        .args([
            "launch",
            "-n",
            "2",
            recipe,
            "--hostfile",
            "/nonexistent/hosts",
        ])
        .env("PATH", &path)
        .output()
        .expect("launch runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hostfile"));
    let _ = std::fs::remove_dir_all(&dir);
}
