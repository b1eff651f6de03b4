//! Smoke tests of the command line.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_burn-recipes"))
}

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
