//! Single-process tests: the single-rank engine, the tensor mappings on a group of one, the
//! ZeRO-1 AdamW (tensor operations on the device) against the textbook AdamW formula in f64
//! on the host, with the host transfers of a step counted, vocab-parallel cross-entropy against a
//! log-softmax computed on the host, and the errors of bad arguments.

use std::sync::Arc;
use std::time::Duration;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_parallel::comm::{self, Communicator, ReduceOp, SingleRank};
use burn_parallel::mappings;
use burn_parallel::prelude::*;
use burn_parallel::transfers;

/// Flex by default; `BURN_TEST_DEVICE=cuda` (with `--features cuda`, on a GPU machine: what
/// `scripts/gpu-check` runs) puts the tensors, the optimizer's included, on GPU 0.
fn device() -> Device {
    match std::env::var("BURN_TEST_DEVICE").as_deref() {
        Err(_) | Ok("flex") => Device::flex().autodiff(),
        Ok("cuda") => cuda(),
        Ok(other) => panic!("BURN_TEST_DEVICE={other}: use flex or cuda"),
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> Device {
    Device::cuda(0).autodiff()
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Device {
    panic!("BURN_TEST_DEVICE=cuda needs `--features cuda`")
}

fn vals(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + seed * 11) % 29) as f32 - 14.0) * 0.05)
        .collect()
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 tensor")
}

#[test]
fn single_rank_collectives_follow_their_definitions_for_one_rank() {
    let c = SingleRank::new();
    let mut buf = vec![1.0, -2.0, 3.5];
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        c.all_reduce(&mut buf, op).unwrap();
        assert_eq!(buf, [1.0, -2.0, 3.5]);
    }
    assert_eq!(c.all_gather(&buf).unwrap(), buf);
    assert_eq!(c.all_gather_v(&buf, &[3]).unwrap(), buf);
    assert_eq!(c.reduce_scatter(&buf, ReduceOp::Sum).unwrap(), buf);
    assert_eq!(c.all_to_all_v(&buf, &[3], &[3]).unwrap(), buf);
    assert_eq!(c.all_to_all_v(&[], &[0], &[0]).unwrap(), Vec::<f32>::new());
    c.barrier().unwrap();
    let sub = c.split(Some(3), 0).unwrap().expect("a member");
    assert_eq!((sub.rank(), sub.size()), (0, 1));
    assert!(c.split(None, 0).unwrap().is_none());
}

#[test]
fn single_rank_rejects_bad_arguments_naming_them() {
    let c = SingleRank::new();
    let err = c.all_to_all_v(&[1.0, 2.0], &[1], &[1]).unwrap_err();
    assert!(err.to_string().contains("send_counts"), "{err}");
    let err = c.all_gather_v(&[1.0], &[1, 1]).unwrap_err();
    assert!(err.to_string().contains("counts"), "{err}");
    let err = c.send(&[1.0], 0, 0).unwrap_err();
    assert!(err.to_string().contains("dest"), "{err}");
    let err = c.recv(1, 2, 0).unwrap_err();
    assert!(err.to_string().contains("src"), "{err}");
    let err = c.broadcast(&mut [0.0], 1).unwrap_err();
    assert!(err.to_string().contains("root"), "{err}");
}

#[test]
fn timeouts_parse_or_name_the_variable() {
    assert_eq!(
        comm::parse_timeout("2.5").unwrap(),
        Duration::from_millis(2500)
    );
    for bad in ["0", "-1", "abc", "inf", ""] {
        let err = comm::parse_timeout(bad).unwrap_err();
        assert!(err.to_string().contains(comm::TIMEOUT_ENV), "{err}");
    }
}

#[test]
fn mappings_on_a_group_of_one_are_identities_forward_and_backward() {
    let d = device();
    let g = Group::single();
    let x = Tensor::<2>::from_data(TensorData::new(vals(12, 1), [3, 4]), &d).require_grad();
    let w = Tensor::<2>::from_data(TensorData::new(vals(12, 2), [3, 4]), &d);
    let y = mappings::copy_to_region(x.clone(), &g).unwrap();
    let y = mappings::reduce_from_region(y, &g).unwrap();
    let y = mappings::scatter_to_region(y, &g).unwrap();
    let y = mappings::gather_from_region(y, &g).unwrap();
    let y = mappings::gather_from_sequence_region(y, &g, GatherGrad::ReduceScatter).unwrap();
    let y = mappings::reduce_scatter_to_sequence_region(y, &g).unwrap();
    let y = mappings::all_to_all_v(y, &g, &[3], &[3]).unwrap();
    assert_eq!(host(y.clone()), vals(12, 1));
    let grads = (y * w).sum().backward();
    burn_parallel::group::check().unwrap();
    assert_eq!(host(x.grad(&grads).unwrap()), vals(12, 2));
    let err = mappings::all_to_all_v(x, &g, &[2], &[2]).unwrap_err();
    assert!(err.to_string().contains("send_counts"), "{err}");
}

#[test]
fn process_groups_of_a_single_rank_are_all_of_size_one() {
    let groups = ProcessGroups::single().unwrap();
    for kind in GroupKind::ALL {
        assert_eq!(groups.group(kind).size(), 1, "{}", kind.name());
        assert_eq!(groups.group(kind).world_ranks(), &[0]);
    }
    let world = World::single();
    assert!(world.is_main());
    let mesh = Mesh::new(2, ParallelDims::new(2, 1, 1, 1), MoeDims::new(1, 1, 2)).unwrap();
    let err = ProcessGroups::new(mesh, Arc::new(SingleRank::new())).unwrap_err();
    assert!(err.to_string().contains("world_size"), "{err}");
}

#[test]
fn vocab_parallel_cross_entropy_on_one_rank_is_the_log_softmax_loss() {
    let d = device();
    let (n, v) = (5, 7);
    let logits_v = vals(n * v, 3).iter().map(|x| x * 8.0).collect::<Vec<_>>();
    let targets_v = [0i64, 6, 3, 3, 1];
    let logits =
        Tensor::<2>::from_data(TensorData::new(logits_v.clone(), [n, v]), &d).require_grad();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets_v.to_vec(), [n]), &d);
    let loss = vocab_parallel_cross_entropy(logits.clone(), targets, &Group::single()).unwrap();
    let got = host(loss.clone());
    let grads = loss.sum().backward();
    let grad = host(logits.grad(&grads).unwrap());
    for i in 0..n {
        let row: Vec<f64> = logits_v[i * v..(i + 1) * v]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
        let t = targets_v[i] as usize;
        let want = z.ln() + max - row[t];
        assert!(
            (f64::from(got[i]) - want).abs() < 1e-5,
            "row {i}: {} vs {want}",
            got[i]
        );
        for j in 0..v {
            let p = (row[j] - max).exp() / z - if j == t { 1.0 } else { 0.0 };
            assert!(
                (f64::from(grad[i * v + j]) - p).abs() < 1e-5,
                "grad [{i},{j}]"
            );
        }
    }
}

#[derive(Module, Debug)]
struct Small {
    norm: RmsNorm,
    proj: ColumnParallelLinear,
}

struct Read(Vec<Vec<f32>>);

impl ModuleVisitor for Read {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(host(param.val()));
    }
}

fn params(m: &Small) -> Vec<Vec<f32>> {
    let mut r = Read(Vec::new());
    m.visit(&mut r);
    r.0
}

/// An optimizer step on one rank moves no parameter or gradient between host and device: its
/// only transfer is the read of the squared gradient norm (4 bytes), for clipping and the log.
fn steps_read_only_the_norm(step: i32, log: &[transfers::Transfer]) {
    let seen: Vec<_> = log.iter().map(|t| (t.direction, t.what, t.bytes)).collect();
    assert_eq!(
        seen,
        [(
            transfers::Direction::Read,
            "optimizer: the squared gradient norm",
            4
        )],
        "step {step}"
    );
}

#[test]
fn zero1_adamw_on_one_rank_is_textbook_adamw_with_clipping_decay_masks_and_accumulation() {
    let d = device();
    let g = Group::single();
    let (h, o) = (6, 4);
    let mut model = Small {
        norm: RmsNorm::from_full(
            Tensor::from_data(TensorData::new(vals(h, 4), [h]), &d).add_scalar(1.0),
            1e-6,
            false,
        ),
        proj: ColumnParallelLinear::from_full(
            Tensor::from_data(TensorData::new(vals(h * o, 5), [h, o]), &d),
            Some(Tensor::from_data(TensorData::new(vals(o, 6), [o]), &d)),
            g.clone(),
            false,
            false,
        )
        .unwrap(),
    };
    let config = AdamWConfig {
        lr: 0.05,
        beta1: 0.8,
        beta2: 0.9,
        eps: 1e-6,
        weight_decay: 0.3,
        max_grad_norm: Some(0.1),
    };
    let mut opt = DistributedAdamW::new(config, g.clone(), g.clone(), g).unwrap();
    let x = Tensor::<3>::from_data(TensorData::new(vals(3 * 2 * h, 7), [3, 2, h]), &d);
    // Textbook state, f64: (param, m, v) per parameter in module order.
    let mut state: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = params(&model)
        .into_iter()
        .map(|p| {
            let n = p.len();
            (
                p.into_iter().map(f64::from).collect(),
                vec![0.0; n],
                vec![0.0; n],
            )
        })
        .collect();
    let decays = [false, true, false]; // norm weight, proj weight, proj bias
    let mut roles = Vec::new();
    model.norm.param_roles(&mut roles);
    model.proj.param_roles(&mut roles);
    let mut clipped_any = false;
    for step in 1..=3 {
        let loss = model
            .proj
            .forward(model.norm.forward(x.clone()))
            .unwrap()
            .square()
            .mean();
        let grads = loss.backward();
        let mut gs: Vec<Vec<f64>> = Vec::new();
        {
            struct Grads<'a>(&'a burn::tensor::Gradients, &'a mut Vec<Vec<f64>>);
            impl ModuleVisitor for Grads<'_> {
                fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                    let g = p.val().grad(self.0).expect("gradient");
                    self.1.push(host(g).into_iter().map(f64::from).collect());
                }
            }
            model.visit(&mut Grads(&grads, &mut gs));
        }
        let norm = gs.iter().flatten().map(|g| g * g).sum::<f64>().sqrt();
        let coef = (0.1 / (norm + 1e-6)).min(1.0);
        clipped_any |= coef < 1.0;
        let (bc1, bc2) = (1.0 - 0.8f64.powi(step), 1.0 - 0.9f64.powi(step));
        for ((p, m, v), (grad, decay)) in state.iter_mut().zip(gs.iter().zip(decays)) {
            for i in 0..p.len() {
                let gi = grad[i] * coef;
                if decay {
                    p[i] -= 0.05 * 0.3 * p[i];
                }
                m[i] = 0.8 * m[i] + 0.2 * gi;
                v[i] = 0.9 * v[i] + 0.1 * gi * gi;
                p[i] -= 0.05 * (m[i] / bc1) / ((v[i] / bc2).sqrt() + 1e-6);
            }
        }
        let (next, stats) = if step == 2 {
            // Gradient accumulation: the same loss as two micro-batches of 2 and 1 rows.
            let n = (3 * 2 * o) as f64;
            let mut buffer = GradientBuffer::new();
            for rows in [0..2, 2..3] {
                let part = x.clone().slice([rows, 0..2, 0..h]);
                let loss = model
                    .proj
                    .forward(model.norm.forward(part))
                    .unwrap()
                    .square()
                    .sum()
                    / n;
                buffer.add(&model, &loss.backward()).unwrap();
            }
            assert_eq!(buffer.micro_batches(), 2);
            let (stepped, log) =
                transfers::measure(|| opt.step_buffered(model, buffer, &roles).unwrap());
            steps_read_only_the_norm(step, &log);
            stepped
        } else {
            let (stepped, log) = transfers::measure(|| opt.step(model, &grads, &roles).unwrap());
            steps_read_only_the_norm(step, &log);
            stepped
        };
        assert!(
            (stats.grad_norm - norm).abs() <= 1e-5 * norm,
            "step {step}: norm"
        );
        model = next;
        // The step runs in f32 tensor operations on the device; the reference in f64.
        for (got, (want, _, _)) in params(&model).iter().zip(&state) {
            for (a, b) in got.iter().zip(want) {
                assert!((f64::from(*a) - b).abs() <= 1e-6, "step {step}: {a} vs {b}");
            }
        }
    }
    assert!(clipped_any, "the test should exercise clipping");
    assert_eq!(opt.steps(), 3);
}

#[test]
fn a_trained_parameter_without_a_role_is_an_error_not_a_guess() {
    let d = device();
    let g = Group::single();
    let h = 4;
    let model = Small {
        norm: RmsNorm::from_full(Tensor::ones([h], &d), 1e-6, false),
        proj: ColumnParallelLinear::from_full(
            Tensor::from_data(TensorData::new(vals(h * h, 3), [h, h]), &d),
            Some(Tensor::zeros([h], &d)),
            g.clone(),
            false,
            false,
        )
        .unwrap(),
    };
    let x = Tensor::<3>::from_data(TensorData::new(vals(2 * h, 4), [2, 1, h]), &d);
    let loss = || {
        model
            .proj
            .forward(model.norm.forward(x.clone()))
            .unwrap()
            .square()
            .mean()
    };
    // The projection's roles only: the norm's weight is missing.
    let mut roles = Vec::new();
    model.proj.param_roles(&mut roles);
    let mut opt =
        DistributedAdamW::new(AdamWConfig::default(), g.clone(), g.clone(), g.clone()).unwrap();
    let err = opt
        .step(model.clone(), &loss().backward(), &roles)
        .unwrap_err();
    assert!(
        matches!(&err, ParallelError::InvalidArgument { name: "roles", reason } if reason.contains("#0")),
        "{err}"
    );
    assert_eq!(opt.steps(), 0, "a refused step changes nothing");
    // Every parameter listed (here: all replicated) steps.
    let all = replicated_roles(&model);
    assert_eq!(all.len(), 3);
    opt.step(model.clone(), &loss().backward(), &all).unwrap();
    assert_eq!(opt.steps(), 1);
}

#[test]
fn adamw_config_errors_name_the_field() {
    let g = Group::single();
    for (config, field) in [
        (
            AdamWConfig {
                lr: f64::NAN,
                ..AdamWConfig::default()
            },
            "lr",
        ),
        (
            AdamWConfig {
                beta1: 1.0,
                ..AdamWConfig::default()
            },
            "beta1",
        ),
        (
            AdamWConfig {
                beta2: -0.1,
                ..AdamWConfig::default()
            },
            "beta2",
        ),
        (
            AdamWConfig {
                eps: 0.0,
                ..AdamWConfig::default()
            },
            "eps",
        ),
        (
            AdamWConfig {
                weight_decay: -1.0,
                ..AdamWConfig::default()
            },
            "weight_decay",
        ),
        (
            AdamWConfig {
                max_grad_norm: Some(0.0),
                ..AdamWConfig::default()
            },
            "max_grad_norm",
        ),
    ] {
        let err = DistributedAdamW::new(config, g.clone(), g.clone(), g.clone()).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn layers_reject_shapes_that_do_not_split() {
    let d = Device::flex();
    // A group of one splits anything; the error path needs a size that does not divide: the
    // attention heads must divide the hidden size.
    let err = ParallelAttention::from_full(
        Tensor::zeros([6, 18], &d),
        Tensor::zeros([6, 6], &d),
        4,
        Group::single(),
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("heads"), "{err}");
    let err = ParallelAttention::from_full(
        Tensor::zeros([6, 12], &d),
        Tensor::zeros([6, 6], &d),
        2,
        Group::single(),
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("wqkv"), "{err}");
}

/// Whether this machine has an NVIDIA GPU, read from the kernel driver rather than from the
/// libraries the engine loads (so the test does not take the engine's word for it).
#[cfg(feature = "nccl")]
fn machine_has_nvidia_gpu() -> bool {
    std::fs::read_dir("/proc/driver/nvidia/gpus").is_ok_and(|mut d| d.next().is_some())
}

#[cfg(feature = "nccl")]
#[test]
fn nccl_without_a_gpu_is_an_error_not_a_panic() {
    use burn_parallel::comm::nccl::NcclComm;
    let result = NcclComm::new(Arc::new(SingleRank::new()), 0);
    if machine_has_nvidia_gpu() {
        // A GPU machine (scripts/gpu-check installs NCCL there): a one-rank communicator forms.
        assert!(result.is_ok(), "{:?}", result.err());
    } else {
        match result {
            Err(ParallelError::Unavailable {
                engine: "nccl",
                reason,
            }) => assert!(
                reason.contains("CUDA driver") && reason.contains("libnccl.so"),
                "{reason}"
            ),
            other => panic!("without a GPU NCCL must be unavailable, got {other:?}"),
        }
    }
}
