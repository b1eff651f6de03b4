//! The library LM (`burn_moe::lm`): logits against the loss it trains on, parameter counts
//! against the built modules, the full tensors round trip, configuration errors, and the
//! trainer: a run stopped on request resumes to the uninterrupted run bit for bit.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_moe::lm::{
    CheckpointPolicy, FitEnd, FitObserver, FitOptions, LmTrainer, LmTrainingConfig, MoeLm,
    MoeLmConfig, StageLayout, StepRecord, TokenSource,
};
use burn_moe::prelude::*;
use burn_parallel::checkpoint::{self, TrainingMeta};
use burn_parallel::lr_schedule::LrSchedule;
use burn_parallel::prelude::ProcessGroups;

fn moe_config() -> MoeLmConfig {
    let mut moe = MoeLayerConfig::swiglu(16, 12, 4, 2)
        .with_shared(Some(SharedExpertsConfig::new(16, 8).with_gate(true)));
    moe.router = moe
        .router
        .with_aux_loss_coeff(1e-2)
        .with_z_loss_coeff(Some(1e-3));
    MoeLmConfig::new(24, 16, 3, 4, 20)
        .with_kv_heads(Some(2))
        .with_moe_every(2)
        .with_moe(Some(moe))
        .with_init_std(0.3)
}

fn ids(seed: i64, [s, b]: [usize; 2], vocab: usize, d: &Device) -> Tensor<2, Int> {
    let v: Vec<i64> = (0..s * b)
        .map(|i| (i as i64 * 7 + seed * 13 + 5) % vocab as i64)
        .collect();
    Tensor::from_data(TensorData::new(v, [s, b]), d)
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[test]
fn the_cross_entropy_of_the_logits_is_the_loss_the_model_trains_on() {
    let d = Device::flex();
    for config in [moe_config(), moe_config().with_tie_embeddings(true)] {
        let model = config.init(3, &d).expect("model");
        let (s, b, v) = (6, 2, config.vocab);
        let x = ids(1, [s, b], v, &d);
        let y = ids(2, [s, b], v, &d);
        let logits = floats(model.forward(x.clone()).expect("logits"));
        assert_eq!(logits.len(), s * b * v);
        let targets: Vec<i64> = y.clone().into_data().iter::<i64>().collect();
        // Mean over tokens of log Σ exp(logit) − logit[target], in f64 on the host.
        let ce: f64 = logits
            .chunks(v)
            .zip(&targets)
            .map(|(row, &t)| {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&x| (x as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                lse - row[t as usize] as f64
            })
            .sum::<f64>()
            / (s * b) as f64;
        let out = model.forward_loss(x, y).expect("loss");
        let got = f64::from(out.ce.expect("ce").into_scalar::<f32>());
        assert!((got - ce).abs() < 1e-5 * ce, "{got} vs {ce}");
        assert!(out.aux.is_some() && out.z.is_some());
        assert_eq!(out.expert_load.len(), 1, "one MoE layer of three");
    }
}

#[test]
fn parameter_counts_equal_the_built_models() {
    let d = Device::flex();
    for config in [
        moe_config(),
        moe_config().with_tie_embeddings(true),
        moe_config().with_moe(None),
        moe_config().with_moe_every(1).with_kv_heads(None),
    ] {
        let model = config.init(1, &d).expect("model");
        assert_eq!(
            config.parameter_count().0,
            model.num_params() as u64,
            "{config}"
        );
    }
    let (total, active) = moe_config().parameter_count();
    // Top-2 of 4 experts: the active count leaves out two experts' 3·16·12 weights.
    assert_eq!(total - active, 2 * 3 * 16 * 12);
}

#[test]
fn full_tensors_round_trip_and_parallelize_on_one_rank_is_the_same_model() {
    let d = Device::flex();
    let config = moe_config();
    let model = config.init(5, &d).expect("model");
    let x = ids(4, [5, 3], config.vocab, &d);
    let want = floats(model.forward(x.clone()).expect("logits"));
    let tensors = model.full_tensors(None).expect("tensors");
    assert!(
        tensors.contains_key("layers.1.moe.shared.gate"),
        "{:?}",
        tensors.keys()
    );
    let groups = ProcessGroups::single().expect("groups");
    let layout = StageLayout::single(config.layers);
    let again = MoeLm::from_tensors(&config, &tensors, &groups, &layout, &d).expect("rebuild");
    assert_eq!(floats(again.forward(x.clone()).expect("logits")), want);
    let laid_out = model.parallelize(&groups, &layout).expect("parallelize");
    assert_eq!(floats(laid_out.forward(x).expect("logits")), want);
    // A missing tensor is named.
    let mut partial = tensors.clone();
    partial.remove("layers.2.attn.out");
    let err = MoeLm::from_tensors(&config, &partial, &groups, &layout, &d).unwrap_err();
    assert!(err.to_string().contains("layers.2.attn.out"), "{err}");
}

#[test]
fn bad_configs_name_the_field() {
    let d = Device::flex();
    for (config, field) in [
        (moe_config().with_kv_heads(Some(3)), "kv_heads"),
        (MoeLmConfig::new(24, 18, 1, 4, 8), "heads"),
        (MoeLmConfig::new(24, 12, 1, 4, 8), "heads"), // head dimension 3 is odd
        (moe_config().with_rope_theta(0.5), "rope_theta"),
        (MoeLmConfig::new(0, 16, 1, 4, 8), "vocab"),
        (
            moe_config().with_moe(Some(MoeLayerConfig::swiglu(8, 8, 4, 2))),
            "moe.router.hidden",
        ),
    ] {
        let err = config.init(0, &d).unwrap_err();
        assert!(
            matches!(&err, MoeError::InvalidConfig { field: f, .. } if *f == field),
            "{field}: {err}"
        );
    }
}

#[test]
fn the_model_prints_as_a_module_tree() {
    let model = moe_config().init(0, &Device::flex()).expect("model");
    let text = format!("{model}");
    for part in ["MoeLm", "blocks", "attn", "moe", "router"] {
        assert!(text.contains(part), "no {part} in:\n{text}");
    }
}

fn trainer(steps: usize) -> LmTrainer {
    let mut t = LmTrainingConfig::new(8, 2, 4, steps);
    t.lr_schedule = LrSchedule {
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 2,
        steps,
    };
    t.seed = 5;
    let source = TokenSource::markov(24, 3, 5).expect("source");
    let groups = ProcessGroups::single().expect("groups");
    let device = Device::flex().autodiff();
    LmTrainer::new(
        &moe_config(),
        &StageLayout::single(3),
        &t,
        source,
        groups,
        &device,
    )
    .expect("trainer")
}

/// Asks to stop (as a signal would) after step `at`.
struct StopAfter(usize, usize);

impl FitObserver for StopAfter {
    type Error = burn_moe::MoeError;

    fn on_step(&mut self, record: &StepRecord) -> Result<(), Self::Error> {
        self.1 = record.step;
        Ok(())
    }

    fn stop_request(&mut self) -> Option<i32> {
        (self.1 == self.0).then_some(15)
    }
}

#[test]
fn fit_stopped_on_request_resumes_to_the_uninterrupted_run_bit_for_bit() {
    let mut seen = Vec::new();
    let full = trainer(6)
        .fit(&FitOptions::default(), &mut |r: &StepRecord| {
            seen.push((r.step, r.loss, r.last))
        })
        .expect("fit");
    assert_eq!(full.end, FitEnd::Finished);
    assert_eq!(full.losses.len(), 6);
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert!(seen.iter().all(|s| s.2 == (s.0 == 6)), "{seen:?}");
    assert!(full.losses[5] < full.losses[0], "{:?}", full.losses);

    let tmp = tempfile::tempdir().expect("temporary folder");
    let policy = CheckpointPolicy {
        run_dir: tmp.path().to_path_buf(),
        every: 0,
        keep: 2,
    };
    let with = |start_step, stop_at| FitOptions {
        start_step,
        stop_at,
        checkpoints: Some(policy.clone()),
    };
    let first = trainer(6)
        .fit(&with(0, None), &mut StopAfter(3, 0))
        .expect("fit");
    assert_eq!(first.end, FitEnd::Requested { request: 15 });
    assert_eq!(first.step, 3);
    let (dir, meta): (_, TrainingMeta) = checkpoint::latest(tmp.path())
        .expect("read")
        .expect("a checkpoint after the stop");
    assert_eq!((meta.step, meta.world, meta.seed), (3, 1, 5));

    let mut resumed = trainer(6);
    let start = resumed.resume(&dir, &meta).expect("resume");
    let rest = resumed
        .fit(&with(start, Some(5)), &mut |_: &StepRecord| {})
        .expect("fit");
    assert_eq!(rest.end, FitEnd::Stopped);
    let joined: Vec<f64> = first.losses.iter().chain(&rest.losses).copied().collect();
    assert_eq!(joined, full.losses[..5], "bit for bit");
    let (dir5, meta5): (_, TrainingMeta) = checkpoint::latest(tmp.path())
        .expect("read")
        .expect("a checkpoint at stop_at");
    assert_eq!(meta5.step, 5);

    // A checkpoint whose optimizer state disagrees with the step, and stops outside the run.
    let wrong = TrainingMeta {
        step: 4,
        ..meta5.clone()
    };
    let err = trainer(6).resume(&dir5, &wrong).expect_err("refused");
    assert!(err.to_string().contains("optimizer state"), "{err}");
    let err = trainer(6)
        .fit(&with(5, Some(5)), &mut |_: &StepRecord| {})
        .expect_err("refused");
    assert!(err.to_string().contains("stop_at"), "{err}");
}

/// The presets against their published sizes: Mixtral 8x22B "141B parameters, 39B active"
/// (Mistral AI), Qwen2-57B-A14B 57 B total and 14 B activated (Qwen2 technical report), and
/// Llama-3-8×70B with one expert is Llama-3-70B (70.6 B).
#[test]
fn presets_have_their_published_sizes() {
    let near = |got: u64, want: f64, tol: f64| (got as f64 / want - 1.0).abs() < tol;
    let (total, active) = MoeLmConfig::mixtral_8x22b().parameter_count();
    assert!(
        near(total, 141e9, 0.01) && near(active, 39e9, 0.01),
        "{total} {active}"
    );
    let (total, active) = MoeLmConfig::qwen2_57b_a14b().parameter_count();
    assert!(
        near(total, 57e9, 0.02) && near(active, 14e9, 0.02),
        "{total} {active}"
    );
    let mut dense = MoeLmConfig::llama3_8x70b();
    if let Some(moe) = dense.moe.as_mut() {
        *moe = MoeLayerConfig::swiglu(8192, 28672, 1, 1);
    }
    let (total, _) = dense.parameter_count();
    assert!(near(total, 70.6e9, 0.005), "{total}");
    for preset in [
        MoeLmConfig::mixtral_8x22b(),
        MoeLmConfig::qwen2_57b_a14b(),
        MoeLmConfig::llama3_8x70b(),
    ] {
        preset.validate().expect("a valid preset");
    }
}

/// The tiny hub checkpoints beside the repository (`HF_MODELS_DIR` overrides).
fn hf_models() -> std::path::PathBuf {
    std::env::var_os("HF_MODELS_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/hf-models"),
        Into::into,
    )
}

/// Mixtral, Qwen3-MoE, OLMoE and Qwen2-MoE read from the hub's files give transformers' own
/// logits (within the reference's tolerance), its loss and its greedy continuation.
#[test]
fn hub_checkpoints_give_the_logits_of_transformers() {
    for name in [
        "mixtral-tiny",
        "qwen3-moe-tiny",
        "olmoe-tiny",
        "qwen2-moe-tiny",
    ] {
        matches_transformers(&hf_models().join(name));
    }
}

fn matches_transformers(dir: &std::path::Path) {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"),
    )
    .expect("JSON");
    let d = Device::flex();
    let model = MoeLm::from_hf(dir, &d).expect("model");
    let ints = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_i64().expect("int"))
            .collect()
    };
    let shape = ints(&reference["input_ids"]["shape"]);
    let (b, s) = (shape[0] as usize, shape[1] as usize);
    let ids = ints(&reference["input_ids"]["data"]);
    // Batch-major in the file, sequence-first in the model.
    let seq_first: Vec<i64> = (0..s)
        .flat_map(|t| (0..b).map(move |r| (r, t)))
        .map(|(r, t)| ids[r * s + t])
        .collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(seq_first, [s, b]), &d);
    let logits = model.forward(input).expect("forward");
    let v = model.config().vocab;
    let got = floats(logits.permute([1, 0, 2]).reshape([b * s * v]));
    let want: Vec<f64> = reference["logits"]["data"]
        .as_array()
        .expect("logits")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect();
    let (rtol, atol) = (
        reference["tolerance"]["rtol"].as_f64().expect("rtol"),
        reference["tolerance"]["atol"].as_f64().expect("atol"),
    );
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(&g, &w)| (f64::from(g) - w).abs() - (atol + rtol * w.abs()))
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(
        worst <= 0.0,
        "{}: a logit is {worst} beyond the tolerance",
        dir.display()
    );
    // The mean next-token cross-entropy of both rows, from the logits.
    let mut loss = 0.0;
    for r in 0..b {
        for t in 0..s - 1 {
            let row = &got[(r * s + t) * v..(r * s + t + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let lse = f64::from(max)
                + row
                    .iter()
                    .map(|&x| f64::from(x - max).exp())
                    .sum::<f64>()
                    .ln();
            loss += lse - f64::from(row[ids[r * s + t + 1] as usize]);
        }
    }
    loss /= (b * (s - 1)) as f64;
    let want_loss = reference["loss"].as_f64().expect("loss");
    assert!(
        (loss - want_loss).abs() < 1e-4 * want_loss,
        "{loss} vs {want_loss}"
    );
    // Greedy decoding from the prompt.
    let mut seq = ints(&reference["greedy_prompt"]);
    let want_next = ints(&reference["greedy_continuation"]);
    for _ in 0..want_next.len() {
        let n = seq.len();
        let input = Tensor::<2, Int>::from_data(TensorData::new(seq.clone(), [n, 1]), &d);
        let last = floats(
            model
                .forward(input)
                .expect("forward")
                .slice([n - 1..n, 0..1, 0..v])
                .reshape([v]),
        );
        let best = (0..v)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .expect("vocab");
        seq.push(best as i64);
    }
    assert_eq!(seq[seq.len() - want_next.len()..], want_next[..]);
}

/// Each hub checkpoint read and written again (`save_hf`, bf16) gives the same file: every
/// tensor under the same name with the same shape and the same bytes, and nothing else; the
/// written folder passes its reference as the original does.
#[test]
fn hub_checkpoints_exported_again_are_the_same_tensors() {
    use burn_moe::lm::hf::HubDtype;
    use safetensors::SafeTensors;
    let tmp = tempfile::tempdir().expect("temporary folder");
    for name in [
        "mixtral-tiny",
        "qwen3-moe-tiny",
        "olmoe-tiny",
        "qwen2-moe-tiny",
    ] {
        let dir = hf_models().join(name);
        let model = MoeLm::from_hf(&dir, &Device::flex()).expect("model");
        let out = tmp.path().join(name);
        model.save_hf(&out, HubDtype::Bf16).expect("export");
        let (a, b) = (
            std::fs::read(dir.join("model.safetensors")).expect("original"),
            std::fs::read(out.join("model.safetensors")).expect("exported"),
        );
        let (a, b) = (
            SafeTensors::deserialize(&a).expect("original"),
            SafeTensors::deserialize(&b).expect("exported"),
        );
        let mut names = a.names();
        names.sort();
        let mut exported = b.names();
        exported.sort();
        assert_eq!(names, exported, "{name}");
        for t in names {
            let (x, y) = (a.tensor(t).expect("tensor"), b.tensor(t).expect("tensor"));
            assert_eq!(
                (x.dtype(), x.shape()),
                (y.dtype(), y.shape()),
                "{name}: {t}"
            );
            assert!(x.data() == y.data(), "{name}: {t} differs");
        }
        std::fs::copy(dir.join("reference.json"), out.join("reference.json")).expect("copy");
        matches_transformers(&out);
    }
    // An existing folder is not overwritten.
    let model = MoeLm::from_hf(&hf_models().join("mixtral-tiny"), &Device::flex()).expect("model");
    let err = model
        .save_hf(&tmp.path().join("mixtral-tiny"), HubDtype::F32)
        .expect_err("exists");
    assert!(err.to_string().contains("already exists"), "{err}");
}

/// The MoE layers' finiteness checks cost a training step no extra host synchronisation: the
/// count of non-finite router logits stays on the device and is read with the micro-batch's
/// losses, and a router fed NaN still stops the step with `NonFiniteLogits`.
#[test]
fn nan_router_logits_stop_a_training_step_through_the_losses_read() {
    let mut t = trainer(2);
    // The trainer's own model with NaN router weights, through a checkpoint.
    let mut model = t.model().expect("model").clone();
    for block in &mut model.blocks {
        if let Some(moe) = &mut block.moe {
            moe.router.weight = moe.router.weight.clone().map(|w| w.mul_scalar(f32::NAN));
        }
    }
    let tmp = tempfile::tempdir().expect("temporary folder");
    let meta = TrainingMeta {
        step: 0,
        world: 1,
        next_sequence: 0,
        seed: 5,
        layout: Some(t.saved_layout()),
    };
    let comm = burn_parallel::comm::SingleRank::new();
    let state = burn_parallel::prelude::OptimizerState {
        step: 0,
        shards: vec![[Vec::new(), Vec::new(), Vec::new()]; 2],
    };
    let dir = checkpoint::save(tmp.path(), &meta, &model, &state, &comm, 1).expect("save");
    t.load(&dir).expect("load");
    let (result, log) = burn_parallel::transfers::measure(|| t.backward(0));
    let err = result.expect_err("NaN logits");
    assert!(
        matches!(err, burn_moe::MoeError::NonFiniteLogits { count } if count > 0),
        "{err}"
    );
    assert!(
        !log.iter().any(|x| x.what == "checking router logits"),
        "the check made its own read: {log:?}"
    );
    // The same model, finite: the step runs.
    assert!(trainer(2).backward(0).is_ok());
}
