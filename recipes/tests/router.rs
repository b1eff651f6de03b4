//! `[model.router]`: every option of burn-moe's `RouterConfig` reachable from a recipe by its
//! library name. Each one on trains moe-tiny for 20 steps with a falling loss and a run that
//! differs from the one without it; invalid values
//! and combinations exit 2 naming `model.router.<key>` and write nothing; the DeepSeek-V3-style
//! recipe trains.

mod common;

use std::path::{Path, PathBuf};

use common::{recipe, train};

/// moe-tiny without its flat router keys (so `[model.router]` may set them), 20 steps.
fn base_recipe(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(recipe("moe-tiny.toml")).expect("moe-tiny");
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("aux_loss_coeff") && !l.starts_with("z_loss_coeff"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.join("moe-tiny-router.toml");
    std::fs::write(&path, text).expect("write recipe");
    path
}

fn losses(run: &Path) -> Vec<f64> {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
            .expect("JSON");
    summary["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|v| v.as_f64().expect("finite loss"))
        .collect()
}

const SHORT: [&str; 3] = [
    "training.steps=20",
    "training.warmup_steps=2",
    "training.checkpoint_every=0",
];

#[test]
fn every_router_option_trains_moe_tiny_with_a_falling_loss() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let base = base_recipe(tmp.path());
    let cases: &[(&str, &[&str])] = &[
        (
            "sigmoid scores",
            &["model.router.score_function=\"sigmoid\""],
        ),
        ("pre-softmax", &["model.router.pre_softmax=true"]),
        ("sinkhorn", &["model.router.routing=\"sinkhorn\""]),
        (
            "group-limited",
            &["model.router.num_groups=2", "model.router.group_topk=1"],
        ),
        ("scaling factor", &["model.router.scaling_factor=2.5"]),
        (
            "expert bias",
            &[
                "model.router.score_function=\"sigmoid\"",
                "model.router.expert_bias=true",
                "model.router.bias_update_rate=1e-2",
            ],
        ),
        ("capacity (drop)", &["model.router.capacity_factor=1.0"]),
        (
            "position drop policy",
            &[
                "model.router.capacity_factor=1.0",
                "model.router.drop_policy=\"position\"",
            ],
        ),
        (
            "pad to capacity",
            &[
                "model.router.capacity_factor=1.25",
                "model.router.pad_to_capacity=true",
            ],
        ),
        ("aux loss", &["model.router.aux_loss_coeff=1e-2"]),
        (
            "sequence aux loss",
            &["model.router.seq_aux_loss_coeff=1e-2"],
        ),
        (
            "global aux loss",
            &["model.router.global_aux_loss_coeff=1e-2"],
        ),
        ("z-loss", &["model.router.z_loss_coeff=1e-3"]),
        ("input jitter", &["model.router.input_jitter_eps=1e-2"]),
        (
            "gated shared expert",
            &[
                "model.shared_expert_ffn_hidden=32",
                "model.shared_expert_gate=true",
            ],
        ),
        ("GELU experts", &["model.expert_activation=\"gelu\""]),
        ("ReLU experts", &["model.expert_activation=\"relu\""]),
    ];
    // The recipe without any option: each option must change the run.
    let plain = tmp.path().join("plain");
    assert!(train(&base, &plain, &SHORT).status.success());
    let baseline = losses(&plain);
    let mut runs = std::collections::HashMap::new();
    for (i, (name, sets)) in cases.iter().enumerate() {
        let run = tmp.path().join(format!("run-{i}"));
        let all: Vec<&str> = SHORT.iter().chain(sets.iter()).copied().collect();
        let out = train(&base, &run, &all);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let l = losses(&run);
        assert_eq!(l.len(), 20, "{name}");
        let head: f64 = l[..5].iter().sum::<f64>() / 5.0;
        let tail: f64 = l[15..].iter().sum::<f64>() / 5.0;
        assert!(tail < head - 0.3, "{name}: loss {head:.3} -> {tail:.3}");
        assert_ne!(l, baseline, "{name} did not change the run");
        runs.insert(*name, l);
    }
    // Options that refine another: each changes the run of the one it refines (the expert
    // bias is updated after every step and changes later routing).
    for (refined, base) in [
        ("expert bias", "sigmoid scores"),
        ("position drop policy", "capacity (drop)"),
    ] {
        assert_ne!(runs[refined], runs[base], "{refined} = {base}");
    }
}

#[test]
fn invalid_router_options_name_the_key_exit_2_and_write_nothing() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let base = base_recipe(tmp.path());
    let cases: &[(&[&str], &str)] = &[
        (
            &["model.router.expert_bias=true"],
            "model.router.expert_bias",
        ),
        (&["model.router.num_groups=2"], "model.router.group_topk"),
        (
            &["model.router.num_groups=2", "model.router.group_topk=3"],
            "model.router.group_topk",
        ),
        (
            &["model.router.num_groups=3", "model.router.group_topk=1"],
            "model.router.num_groups",
        ),
        (
            &["model.router.pad_to_capacity=true"],
            "model.router.pad_to_capacity",
        ),
        (
            &[
                "model.router.routing=\"sinkhorn\"",
                "model.router.aux_loss_coeff=1e-2",
            ],
            "model.router.routing",
        ),
        (
            &["model.topk=1", "model.router.pre_softmax=false"],
            "model.router.pre_softmax",
        ),
        (
            &["model.router.scaling_factor=-1.0"],
            "model.router.scaling_factor",
        ),
        (
            &["model.router.bias_update_rate=-1.0"],
            "model.router.bias_update_rate",
        ),
        (
            &["model.router.capacity_factor=0.0"],
            "model.router.capacity_factor",
        ),
        (
            &["model.router.aux_loss_coeff=nan"],
            "model.router.aux_loss_coeff",
        ),
        (
            &["model.router.seq_aux_loss_coeff=-1.0"],
            "model.router.seq_aux_loss_coeff",
        ),
        (
            &["model.router.global_aux_loss_coeff=inf"],
            "model.router.global_aux_loss_coeff",
        ),
        (
            &["model.router.z_loss_coeff=-1.0"],
            "model.router.z_loss_coeff",
        ),
        (
            &["model.router.input_jitter_eps=1.5"],
            "model.router.input_jitter_eps",
        ),
        (
            &["model.router.score_function=\"tanh\""],
            "model.router.score_function",
        ),
        (&["model.router.routing=\"greedy\""], "model.router.routing"),
        (
            &["model.router.drop_policy=\"random\""],
            "model.router.drop_policy",
        ),
        (&["model.router.bogus=1"], "model.router.bogus"),
        (
            &["model.router.num_groups=\"two\""],
            "model.router.num_groups",
        ),
        // A key given both flat and in the table.
        (
            &[
                "model.aux_loss_coeff=1e-2",
                "model.router.aux_loss_coeff=1e-2",
            ],
            "model.router.aux_loss_coeff",
        ),
        (
            &["model.shared_expert_gate=true"],
            "model.shared_expert_gate",
        ),
        (
            &["model.expert_activation=\"tanh\""],
            "model.expert_activation",
        ),
    ];
    for (sets, key) in cases {
        let run = tmp.path().join("run");
        let out = train(&base, &run, sets);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sets:?}: {err}");
        assert!(err.contains(key), "{sets:?}: expected {key} in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{sets:?}: one line: {err}");
        assert!(!run.exists(), "{sets:?} wrote {}", run.display());
    }
}

#[test]
fn the_deepseek_v3_style_recipe_trains() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let run = tmp.path().join("run");
    let out = train(&recipe("moe-deepseek-tiny.toml"), &run, &SHORT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = losses(&run);
    assert!(
        l[15..].iter().sum::<f64>() < l[..5].iter().sum::<f64>() - 1.5,
        "{l:?}"
    );
}

/// Selecting every expert is dense routing (`topk == experts`, which a recipe without those
/// keys gets: 1 of 1): `train` and `layer` run instead of panicking.
#[test]
fn topk_equal_to_the_experts_trains_and_runs() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    for (e, k) in [(4, 4), (2, 2), (1, 1)] {
        let run = tmp.path().join(format!("run-{e}-{k}"));
        let (experts, topk) = (format!("model.experts={e}"), format!("model.topk={k}"));
        let mut sets = SHORT.to_vec();
        sets.extend([experts.as_str(), topk.as_str()]);
        let out = train(&recipe("moe-tiny.toml"), &run, &sets);
        assert!(
            out.status.success(),
            "{e}/{k}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(losses(&run).len(), 20);
        let out = common::bin()
            .args(["layer", "--tokens", "64", "--hidden", "16", "--ffn", "16"])
            .args(["--experts", &e.to_string(), "--topk", &k.to_string()])
            .output()
            .expect("layer");
        assert!(
            out.status.success(),
            "layer {e}/{k}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
