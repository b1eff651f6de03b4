//! Checkpoints across layouts (`burn_moe::lm::reshard`), in one process: every rank of a
//! layout laid out from a model's full state (detached process groups), written as that
//! layout's checkpoint, reads back as the same full state; a rank of another layout reads
//! only what it holds; damaged or mismatched checkpoints are refused naming what is wrong.
//! The multi-rank runs (resume under another layout with the next losses of the
//! uninterrupted run) are `burn-recipes`' launch tests.

use burn::tensor::{Device, TensorData};
use burn_moe::lm::reshard::{
    FullState, Needed, read_full_state, saved_layout, shard_state, stage_layout,
};
use burn_moe::lm::{FullTensors, LayerSplit, MoeLmConfig, QkNorm, StageLayout};
use burn_moe::prelude::*;
use burn_parallel::checkpoint::{SavedLayout, TrainingMeta, finish, write_rank};
use burn_parallel::prelude::{Mesh, MoeDims, ParallelDims, ProcessGroups};

fn config(sigmoid: bool) -> MoeLmConfig {
    let mut moe = MoeLayerConfig::swiglu(16, 12, 4, 2)
        .with_shared(Some(SharedExpertsConfig::new(16, 8).with_gate(true)));
    if sigmoid {
        moe.router = moe
            .router
            .with_score_function(ScoreFunction::Sigmoid)
            .with_expert_bias(true);
    }
    MoeLmConfig::new(24, 16, 4, 4, 20)
        .with_kv_heads(Some(2))
        .with_moe(Some(moe))
        .with_dense_layers(vec![1])
        .with_qkv_bias(true)
        .with_qk_norm(QkNorm::PerHead)
        .with_tie_embeddings(true)
        .with_init_std(0.3)
}

/// Distinct values for every element: `scale · (tensor index + element / n)`.
fn numbered(shapes: &FullTensors, scale: f32) -> FullTensors {
    shapes
        .iter()
        .enumerate()
        .map(|(t, (name, data))| {
            let n = data.num_elements();
            let shape: Vec<usize> = data.shape().iter().copied().collect();
            let v: Vec<f32> = (0..n)
                .map(|i| scale * (t as f32 + 1.0 + i as f32 / n as f32))
                .collect();
            (name.clone(), TensorData::new(v, shape))
        })
        .collect()
}

/// A full training state: the model's weights (an expert bias made non-zero) and made-up
/// optimizer state (distinct values everywhere) after 3 steps.
fn full_state(config: &MoeLmConfig) -> FullState {
    let model = config.init(5, &Device::flex()).expect("model");
    let mut params = model.full_tensors(None).expect("full tensors");
    for (name, t) in params.iter_mut() {
        if name.ends_with("expert_bias") {
            let n = t.num_elements();
            *t = TensorData::new((0..n).map(|i| 0.1 * i as f32).collect(), [n]);
        }
    }
    let trained: FullTensors = params
        .iter()
        .filter(|(n, _)| !n.ends_with("expert_bias"))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    FullState {
        step: 3,
        classes: 2,
        params,
        optimizer: [
            numbered(&trained, 1.0),
            numbered(&trained, -0.01),
            numbered(&trained, 1e-4),
        ],
    }
}

/// `(tp, cp, dp, pp, virtual_pp)` and `(etp, ep, edp)`.
type Dims = ((usize, usize, usize, usize, usize), (usize, usize, usize));

fn layout(config: &MoeLmConfig, ((tp, cp, dp, pp, vpp), (etp, ep, edp)): Dims) -> SavedLayout {
    let world = tp * cp * dp * pp;
    let mesh = Mesh::new(
        world,
        ParallelDims::new(tp, cp, dp, pp),
        MoeDims::new(etp, ep, edp),
    )
    .expect("mesh");
    let split = LayerSplit::uniform(config.layers, pp, vpp).expect("split");
    SavedLayout::new(&mesh, vpp, split.counts().to_vec())
}

fn stage(saved: &SavedLayout, layers: usize) -> StageLayout {
    stage_layout(saved, layers).expect("split")
}

/// Writes `full` as the checkpoint of every rank of `saved` into `dir` (one process laying
/// out each rank in turn).
fn write_layout(
    dir: &std::path::Path,
    config: &MoeLmConfig,
    full: &FullState,
    saved: &SavedLayout,
) {
    std::fs::create_dir_all(dir).expect("folder");
    let mesh = saved.mesh().expect("mesh");
    let device = Device::flex().autodiff();
    for rank in 0..saved.world_size() {
        let groups = ProcessGroups::detached(mesh.clone(), rank).expect("groups");
        let layout = stage(saved, config.layers);
        let needed = Needed::of(config, &groups, &layout).expect("needed");
        let (model, state) =
            shard_state(full, config, &groups, &layout, &needed, &device).expect("shard");
        assert_eq!(saved_layout(&groups, &stage(saved, config.layers)), *saved);
        write_rank(dir, &model, &state, rank).expect("write");
    }
    let meta = TrainingMeta {
        step: full.step as usize,
        world: saved.world_size(),
        next_sequence: 0,
        seed: 5,
        layout: Some(saved.clone()),
    };
    finish(dir, &meta).expect("finish");
}

const LAYOUTS: [Dims; 6] = [
    ((1, 1, 1, 1, 1), (1, 1, 1)),
    ((2, 1, 2, 1, 1), (1, 2, 2)),
    ((1, 1, 4, 1, 1), (1, 4, 1)),
    ((2, 1, 2, 1, 1), (2, 2, 1)),
    ((1, 1, 1, 2, 1), (1, 1, 1)),
    ((2, 2, 1, 2, 2), (1, 2, 2)),
];

#[test]
fn every_layouts_checkpoint_reads_back_as_the_full_state_it_was_laid_out_from() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    for sigmoid in [false, true] {
        let config = config(sigmoid);
        let full = full_state(&config);
        for (i, dims) in LAYOUTS.iter().enumerate() {
            let saved = layout(&config, *dims);
            let dir = tmp.path().join(format!("{sigmoid}-{i}"));
            write_layout(&dir, &config, &full, &saved);
            let back = read_full_state(&dir, &config, &saved, None).expect("read");
            assert_eq!(back.step, full.step, "{dims:?}");
            assert_eq!(back.classes, full.classes, "{dims:?}");
            assert_eq!(back.params, full.params, "{dims:?}: parameters");
            for (k, which) in ["master", "m", "v"].iter().enumerate() {
                assert_eq!(back.optimizer[k], full.optimizer[k], "{dims:?}: {which}");
            }
        }
    }
}

#[test]
fn a_rank_of_another_layout_reads_exactly_what_it_holds() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let config = config(false);
    let full = full_state(&config);
    let written = layout(&config, LAYOUTS[1]);
    write_layout(tmp.path(), &config, &full, &written);
    // Rank 3 of EP4: its model and optimizer shards equal those laid out from the full state
    // directly, although it read only the values it holds.
    let target = layout(&config, LAYOUTS[2]);
    let groups = ProcessGroups::detached(target.mesh().expect("mesh"), 3).expect("groups");
    let layout3 = stage(&target, config.layers);
    let needed = Needed::of(&config, &groups, &layout3).expect("needed");
    let partial = read_full_state(tmp.path(), &config, &written, Some(&needed)).expect("read");
    assert_ne!(partial.params, full.params, "everything was read");
    let device = Device::flex().autodiff();
    let (a, sa) =
        shard_state(&partial, &config, &groups, &layout3, &needed, &device).expect("shard");
    let (b, sb) = shard_state(&full, &config, &groups, &layout3, &needed, &device).expect("shard");
    assert_eq!(sa, sb, "optimizer shards");
    let values = |m: &burn_moe::lm::MoeLm| burn_parallel::checkpoint::named_params(m);
    assert_eq!(values(&a), values(&b), "parameters");
}

#[test]
fn a_checkpoint_read_under_a_layout_it_was_not_written_under_is_refused() {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let config = config(false);
    let full = full_state(&config);
    let written = layout(&config, LAYOUTS[1]);
    write_layout(tmp.path(), &config, &full, &written);
    // Claiming EP4 for a TP2·EP2 checkpoint: the expert tensors do not have the sizes EP4 puts
    // there.
    let claimed = layout(&config, LAYOUTS[2]);
    let err = read_full_state(tmp.path(), &config, &claimed, None).expect_err("refused");
    assert!(err.to_string().contains("recorded layout"), "{err}");
    // A rank file missing: named.
    std::fs::remove_file(tmp.path().join("rank-00003.safetensors")).expect("remove");
    let err = read_full_state(tmp.path(), &config, &written, None).expect_err("refused");
    assert!(err.to_string().contains("rank-00003"), "{err}");
}
