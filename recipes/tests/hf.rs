//! Hugging Face checkpoints as training runs: `import hf` of the four tiny hub models, then
//! `export hf` gives every tensor back bit for bit; an imported model fine-tuned for 20 steps
//! exports as the fine-tuned model (its own logits, checked by `eval hf`); bad hub folders are
//! refused naming the key or tensor, exit 2, nothing written. (Resuming an import under other
//! layouts: the launch tests.)

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{bin, hf_models};

const MODELS: [&str; 4] = ["mixtral", "qwen3-moe", "olmoe", "qwen2-moe"];

fn cli(args: &[&str]) -> std::process::Output {
    bin().args(args).output().expect("binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The `loss` of every line of a run's `metrics.jsonl`.
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON")["loss"]
                .as_f64()
                .expect("loss")
        })
        .collect()
}

/// Every tensor of a `model.safetensors`: name → (dtype, shape, bytes).
fn tensors(file: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(file).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let dtype = format!("{:?}", v.dtype());
            (n, (dtype, v.shape().to_vec(), v.data().to_vec()))
        })
        .collect()
}

/// The model configuration of a hub folder, with its head width stated (an export states it;
/// the original may leave it to `hidden / heads`).
fn config_of(dir: &Path) -> burn_moe::lm::MoeLmConfig {
    let c = burn_moe::lm::hf::read_config(dir).expect("config.json");
    let config = burn_moe::lm::hf::config_from_hub(&c).expect("a model");
    let d = config.head_dim();
    config.with_head_dim(Some(d))
}

#[test]
fn import_then_export_gives_back_the_four_hub_checkpoints_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    for m in MODELS {
        let hub = hf_models().join(format!("{m}-tiny"));
        let run = tmp.path().join(m);
        let out = tmp.path().join(format!("{m}-hub"));
        ok(&["import", "hf", &path(&hub), "--out", &path(&run)]);
        ok(&["export", "hf", &path(&run), "--out", &path(&out)]);
        let (want, got) = (
            tensors(&hub.join("model.safetensors")),
            tensors(&out.join("model.safetensors")),
        );
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>(),
            "{m}: tensor names"
        );
        for (name, t) in &want {
            assert!(got[name] == *t, "{m}: `{name}` differs");
        }
        // The exported config.json reads as the same model, of the same architecture.
        assert_eq!(
            format!("{:?}", config_of(&hub)),
            format!("{:?}", config_of(&out)),
            "{m}: config"
        );
        let arch =
            |d: &Path| burn_moe::lm::hf::read_config(d).expect("config")["architectures"].clone();
        assert_eq!(arch(&hub), arch(&out), "{m}");
    }
}

#[test]
fn an_imported_model_fine_tunes_and_exports_as_the_fine_tuned_model() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let hub = hf_models().join("qwen3-moe-tiny");
    let run = tmp.path().join("run");
    ok(&["import", "hf", &path(&hub), "--out", &path(&run)]);
    let recipe = path(&run.join("recipe.toml"));
    ok(&["train", &recipe, "--resume", "--set", "training.steps=20"]);
    let losses = losses(&run);
    assert_eq!(losses.len(), 20);
    assert!(losses[19] < losses[0], "{losses:?}");

    let out = tmp.path().join("hub");
    ok(&["export", "hf", &path(&run), "--f32", "--out", &path(&out)]);
    // The transformers reference of the model before fine-tuning no longer holds …
    std::fs::copy(hub.join("reference.json"), out.join("reference.json")).expect("copy");
    let before = cli(&["eval", "hf", &path(&out)]);
    assert_eq!(
        before.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&before.stdout)
    );
    // … the fine-tuned run's own outputs do (the run's model, read from its checkpoint).
    let d = burn::tensor::Device::flex();
    let tuned = burn_recipes::model::load_run(&run, &d).expect("run");
    let reference = burn_moe::lm::hf::read_reference(&out)
        .expect("read")
        .expect("reference");
    let (logits, loss) =
        burn_moe::lm::hf::logits_and_loss(&tuned, &reference.input_ids).expect("logits");
    let prompt = reference.greedy_prompt.clone();
    let greedy = burn_moe::lm::hf::greedy(&tuned, &prompt, 8).expect("greedy");
    let (b, s) = (reference.input_ids.len(), reference.input_ids[0].len());
    let own = serde_json::json!({
        "input_ids": {"shape": [b, s], "data": reference.input_ids.concat()},
        "logits": {"shape": [b, s, 256], "data": logits},
        "loss": loss,
        "greedy_prompt": prompt,
        "greedy_continuation": greedy,
        "tolerance": {"rtol": 0.0, "atol": 1e-6},
    });
    std::fs::write(out.join("reference.json"), own.to_string()).expect("write");
    let verdict: serde_json::Value =
        serde_json::from_str(&ok(&["eval", "hf", &path(&out), "--json"])).expect("JSON");
    assert_eq!(verdict["pass"], true, "{verdict}");
}

/// A copy of the Mixtral hub folder with `edit` applied to its config.json.
fn edited(tmp: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> std::path::PathBuf {
    let hub = hf_models().join("mixtral-tiny");
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).expect("folder");
    std::fs::copy(hub.join("model.safetensors"), dir.join("model.safetensors")).expect("copy");
    let mut c = burn_moe::lm::hf::read_config(&hub).expect("config");
    edit(&mut c);
    std::fs::write(dir.join("config.json"), c.to_string()).expect("write");
    dir
}

#[test]
fn import_refuses_bad_hub_folders_naming_the_key_or_tensor_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let t = tmp.path();
    let cases = [
        (
            edited(t, "arch", |c| {
                c["architectures"] = serde_json::json!(["LlamaForCausalLM"])
            }),
            "LlamaForCausalLM",
        ),
        (
            edited(t, "window", |c| c["sliding_window"] = 64.into()),
            "sliding_window",
        ),
        (
            edited(t, "rope", |c| {
                c["rope_parameters"]["rope_type"] = "yarn".into()
            }),
            "rope_parameters.rope_type",
        ),
        (
            edited(t, "act", |c| c["hidden_act"] = "gelu".into()),
            "hidden_act",
        ),
        // A shape the tensors do not have.
        (
            edited(t, "shape", |c| c["intermediate_size"] = 80.into()),
            "model.layers.0.block_sparse_moe.experts.0.w1.weight",
        ),
    ];
    for (dir, named) in &cases {
        let out = t.join("run");
        let got = cli(&["import", "hf", &path(dir), "--out", &path(&out)]);
        let err = String::from_utf8_lossy(&got.stderr);
        assert_eq!(got.status.code(), Some(2), "{named}: {err}");
        assert!(err.contains(named), "{named} is not named: {err}");
        assert!(!out.exists(), "{named}: something was written");
    }
    // A tensor missing from the checkpoint: named.
    let hub = hf_models().join("mixtral-tiny");
    let dir = t.join("missing");
    std::fs::create_dir_all(&dir).expect("folder");
    std::fs::copy(hub.join("config.json"), dir.join("config.json")).expect("copy");
    let bytes = std::fs::read(hub.join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let gone = "model.layers.1.self_attn.k_proj.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != gone)
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).expect("write");
    let out = t.join("run");
    let got = cli(&["import", "hf", &path(&dir), "--out", &path(&out)]);
    let err = String::from_utf8_lossy(&got.stderr);
    assert_eq!(got.status.code(), Some(2), "{err}");
    assert!(err.contains(gone), "{err}");
    assert!(!out.exists());
}

/// `import hf` of Qwen2-MoE (shared expert behind a gate, query/key/value biases, 60
/// experts), fine-tuned on four ranks (TP2 · EP2, each reading its shards of the imported
/// checkpoint by offset) and on one: the same 12 losses within 1e-4.
#[cfg(feature = "mpi")]
#[test]
fn an_imported_model_fine_tunes_under_launch_with_tp2_ep2_as_on_one_rank() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let hub = hf_models().join("qwen2-moe-tiny");
    let (one, four) = (tmp.path().join("one"), tmp.path().join("four"));
    for run in [&one, &four] {
        ok(&["import", "hf", &path(&hub), "--out", &path(run)]);
    }
    let steps = ["--set", "training.steps=12"];
    ok(&[
        &["train", &path(&one.join("recipe.toml")), "--resume"],
        &steps[..],
    ]
    .concat());
    ok(&[
        &[
            "launch",
            "-n",
            "4",
            &path(&four.join("recipe.toml")),
            "--resume",
        ],
        &steps[..],
        &["--set", "parallel.tp=2", "--set", "parallel.ep=2"],
    ]
    .concat());
    let (a, b) = (losses(&one), losses(&four));
    assert_eq!((a.len(), b.len()), (12, 12));
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs(),
            "step {}: {x} vs {y}",
            step + 1
        );
    }
}
