//! Multi-rank check (run under `mpirun -np N`, N ∈ {2, 4, 8}): the MoE layer with expert
//! parallelism, expert-tensor parallelism and MoE Parallel Folding, both dispatchers, dropless
//! and drop-and-pad (capacity 1.0), against the single-rank layer (Megatron's
//! `test_moe_layer_discrepancy.py` in spirit).
//!
//! Each rank holds its own tokens. The reference, computed on every rank with the single-rank
//! layer from the same full weights: the layer on each rank's tokens (routing and dropping are
//! per rank in Megatron) and the router's aux and z losses on each attention TP×CP group's
//! tokens (Megatron reduces their counts over that group). Compared within 1e-5 (norm-wise
//! relative): every rank's output, the sum of the aux and z losses over each TP×CP group, the
//! input gradients, the router gradient summed over all ranks and each expert shard's
//! gradient summed over its expert-data-parallel group. Also checked: dispatch → combine with
//! probs 1/k returns the input; with padding every local expert gets capacity × EP × ETP
//! rows; padded and unpadded runs agree; a rank whose experts receive no token works; the
//! dropless all-to-all moves exactly the theoretical number of bytes; dropless dispatch counts
//! one host synchronisation and padded dispatch none; the global aux loss (TP×DP×CP counts,
//! accumulated over two micro-batches) and the expert-bias update match one router over every
//! rank's tokens.

use std::process::ExitCode;
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use burn_moe::prelude::*;
use burn_parallel::comm::mpi::MpiWorld;
use burn_parallel::comm::{Communicator, ReduceOp};
use burn_parallel::launch::{check_program, rel_error};
use burn_parallel::prelude::{GroupKind, Mesh, MoeDims, ParallelDims, ProcessGroups};

const H: usize = 16;
const F: usize = 16;
const E: usize = 8;
const K: usize = 2;
const S: usize = 4;
const B: usize = 2;
const T: usize = S * B;
const TOL: f64 = 1e-5;

type Res<T> = Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Deterministic values in [-scale, scale].
fn values(seed: usize, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| scale * ((seed as f32 * 12.9898 + i as f32 * 78.233).sin() * 43758.547).fract())
        .collect()
}

fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D], d: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), d)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Dropless,
    Padded,
    Dropped,
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    tp: usize,
    cp: usize,
    etp: usize,
    ep: usize,
}

fn layouts(n: usize) -> Vec<Layout> {
    let l = |tp, cp, etp, ep| Layout { tp, cp, etp, ep };
    match n {
        2 => vec![l(1, 1, 1, 2), l(2, 1, 1, 2), l(1, 1, 2, 1)],
        4 => vec![l(1, 1, 1, 4), l(2, 1, 1, 2), l(1, 1, 2, 2), l(2, 2, 1, 4)],
        8 => vec![l(1, 1, 2, 4), l(2, 1, 1, 4), l(2, 2, 1, 4), l(2, 1, 2, 2)],
        _ => vec![],
    }
}

fn router_config(mode: Mode, aux: bool) -> RouterConfig {
    let c = RouterConfig::new(H, E, K)
        .with_aux_loss_coeff(if aux { 1e-1 } else { 0.0 })
        .with_z_loss_coeff(if aux { Some(1e-2) } else { None });
    match mode {
        Mode::Dropless => c,
        Mode::Padded => c.with_capacity_factor(Some(1.0)).with_pad_to_capacity(true),
        Mode::Dropped => c.with_capacity_factor(Some(1.0)),
    }
}

/// The full layer; `starve` makes the router avoid experts 0..E/4 (nothing reaches them).
fn full_layer(mode: Mode, aux: bool, starve: bool, d: &Device) -> Res<MoeLayer> {
    let mut w = values(1, E * H, 0.5);
    if starve {
        for e in 0..E / 4 {
            w[e * H..(e + 1) * H].fill(-3.0);
        }
    }
    let router = Router::from_weight(router_config(mode, aux), tensor(w, [E, H], d)).map_err(s)?;
    let experts = Experts::from_weights(
        ExpertsConfig::new(E, H, F),
        tensor(values(2, E * H * 2 * F, 0.3), [E, H, 2 * F], d),
        tensor(values(3, E * F * H, 0.3), [E, F, H], d),
    )
    .map_err(s)?;
    MoeLayer::new(router, experts, None).map_err(s)
}

/// Rank r's tokens `[S, B, H]` (positive when starving, so the avoided experts stay avoided).
fn tokens(r: usize, starve: bool) -> Vec<f32> {
    let v = values(100 + r, T * H, 1.0);
    if starve {
        v.iter().map(|x| x.abs() + 0.1).collect()
    } else {
        v
    }
}

struct Checker {
    label: String,
    failures: Vec<String>,
    passed: usize,
}

impl Checker {
    fn close(&mut self, what: &str, got: &[f32], want: &[f32]) {
        let err = rel_error(got, want);
        if err.is_nan() || err > TOL {
            self.failures
                .push(format!("{}: {what} (rel {err:.2e})", self.label));
        } else {
            self.passed += 1;
        }
    }
}

struct Reference {
    outputs: Vec<Vec<f32>>,
    x_grads: Vec<Vec<f32>>,
    aux: Vec<f32>,
    z: Vec<f32>,
    router_grad: Vec<f32>,
    w1_grad: Tensor<3>,
    w2_grad: Tensor<3>,
}

/// The single-rank reference over all ranks' tokens (see the module docs).
fn reference(
    n: usize,
    tp_cp_groups: &[Vec<usize>],
    mode: Mode,
    starve: bool,
    d: &Device,
) -> Res<Reference> {
    let layer = full_layer(mode, false, starve, d)?;
    let router = full_layer(mode, true, starve, d)?.router;
    let xs: Vec<Tensor<3>> = (0..n)
        .map(|r| tensor(tokens(r, starve), [S, B, H], d).require_grad())
        .collect();
    let mut loss: Option<Tensor<1>> = None;
    let mut outputs = Vec::new();
    let add = |loss: &mut Option<Tensor<1>>, t: Tensor<1>| {
        *loss = Some(match loss.take() {
            Some(l) => l + t,
            None => t,
        });
    };
    for (r, x) in xs.iter().enumerate() {
        let out = layer.forward(x.clone()).map_err(s)?.output;
        outputs.push(host(out.clone()));
        let w = tensor(values(200 + r, T * H, 1.0), [S, B, H], d);
        add(&mut loss, (out * w).sum());
    }
    let (mut aux, mut z) = (Vec::new(), Vec::new());
    for group in tp_cp_groups {
        // The group's tokens, in group order, as one batch of sequences.
        let x = Tensor::cat(group.iter().map(|&r| xs[r].clone()).collect(), 1);
        let routed = router.forward(x).map_err(s)?;
        let a = routed.aux_loss.clone().ok_or("no aux loss")?;
        let zl = routed.z_loss.clone().ok_or("no z loss")?;
        aux.push(host(a.clone())[0]);
        z.push(host(zl.clone())[0]);
        add(&mut loss, a + zl);
    }
    let grads = loss.ok_or("no loss")?.backward();
    let x_grads = xs
        .iter()
        .map(|x| x.grad(&grads).map(host).unwrap_or_default())
        .collect();
    let rg = |t: Tensor<2>| t.grad(&grads).map(host).unwrap_or_default();
    let mut router_grad = rg(layer.router.weight.val());
    for (a, b) in router_grad.iter_mut().zip(rg(router.weight.val())) {
        *a += b;
    }
    let zeros3 = |t: Tensor<3>| t.zeros_like();
    let w1 = layer.experts.w1.val();
    let w2 = layer.experts.w2.val();
    Ok(Reference {
        outputs,
        x_grads,
        aux,
        z,
        router_grad,
        w1_grad: w1.grad(&grads).unwrap_or_else(|| zeros3(w1.clone())),
        w2_grad: w2.grad(&grads).unwrap_or_else(|| zeros3(w2.clone())),
    })
}

fn sum_over(comm: &Arc<dyn Communicator>, v: &mut [f32]) -> Res<()> {
    comm.all_reduce(v, ReduceOp::Sum).map_err(s)
}

fn run_case(
    world: &Arc<dyn Communicator>,
    layout: Layout,
    kind: DispatcherKind,
    mode: Mode,
    starve: bool,
    c: &mut Checker,
    d: &Device,
) -> Res<Option<(MoeOutput, Vec<f32>)>> {
    let n = world.size();
    let r = world.rank();
    let dp = n / (layout.tp * layout.cp);
    let edp = n / (layout.etp * layout.ep);
    let mesh = Mesh::new(
        n,
        ParallelDims::new(layout.tp, layout.cp, dp, 1),
        MoeDims::new(layout.etp, layout.ep, edp),
    )
    .map_err(s)?;
    let groups = ProcessGroups::new(mesh.clone(), world.clone()).map_err(s)?;
    let layer = full_layer(mode, true, starve, d)?
        .parallelize(&groups, kind)
        .map_err(s)?;
    let x = tensor(tokens(r, starve), [S, B, H], d).require_grad();
    let out = layer.forward(x.clone()).map_err(s)?;
    let w = tensor(values(200 + r, T * H, 1.0), [S, B, H], d);
    let aux = out.aux_loss.clone().ok_or("no aux loss")?;
    let z = out.z_loss.clone().ok_or("no z loss")?;
    let loss = (out.output.clone() * w).sum() + aux.clone() + z.clone();
    let (grads, backward) = burn_parallel::transfers::measure(|| loss.backward());
    burn_parallel::group::check().map_err(s)?;

    let tp_cp_groups = mesh.groups(GroupKind::TpCp).to_vec();
    let reference = reference(n, &tp_cp_groups, mode, starve, d)?;
    c.close("output", &host(out.output.clone()), &reference.outputs[r]);
    let gi = tp_cp_groups
        .iter()
        .position(|g| g.contains(&r))
        .ok_or("no TP×CP group")?;
    let tp_cp = groups.group(GroupKind::TpCp).communicator().map_err(s)?;
    let mut losses = [host(aux)[0], host(z)[0]];
    sum_over(&tp_cp, &mut losses)?;
    c.close(
        "aux loss (sum over TP×CP)",
        &losses[..1],
        &reference.aux[gi..gi + 1],
    );
    c.close(
        "z loss (sum over TP×CP)",
        &losses[1..],
        &reference.z[gi..gi + 1],
    );
    let x_grad = x.grad(&grads).map(host).unwrap_or_default();
    c.close("input gradient", &x_grad, &reference.x_grads[r]);
    let mut rg = layer
        .router
        .weight
        .val()
        .grad(&grads)
        .map(host)
        .unwrap_or(vec![0.0; E * H]);
    sum_over(world, &mut rg)?;
    c.close(
        "router gradient (sum over ranks)",
        &rg,
        &reference.router_grad,
    );
    let expert_groups = ExpertGroups::new(&groups).map_err(s)?;
    let local = expert_groups.local_experts(E);
    let want = Experts::from_weights(
        ExpertsConfig::new(E, H, F),
        reference.w1_grad,
        reference.w2_grad,
    )
    .map_err(s)?
    .shard(
        local,
        expert_groups.etp().rank(),
        expert_groups.etp().size(),
    )
    .map_err(s)?;
    let edp_comm = groups
        .group(GroupKind::ExpertDp)
        .communicator()
        .map_err(s)?;
    for (name, got, want) in [
        ("w1", layer.experts.w1.val(), want.w1.val()),
        ("w2", layer.experts.w2.val(), want.w2.val()),
    ] {
        let mut g = got
            .clone()
            .grad(&grads)
            .map(host)
            .unwrap_or(vec![0.0; want.dims().iter().product()]);
        sum_over(&edp_comm, &mut g)?;
        c.close(
            &format!("expert {name} gradient (sum over EDP)"),
            &g,
            &host(want),
        );
    }
    if kind == DispatcherKind::AllToAll && mode == Mode::Dropless && !starve {
        // Dropless all-to-all volume: every (token, expert) pair whose expert lives on another
        // EP rank sends its row and probability there and gets its output row back.
        let map = host(out.router.routing_map.clone().float());
        let local = ExpertGroups::new(&groups).map_err(s)?.local_experts(E);
        let remote = (0..T * E)
            .filter(|i| map[*i] > 0.5 && !local.contains(&(i % E)))
            .count() as f32;
        let per_pair = ((H + 1) * 4 + H * 4) as f32;
        let mut totals = [
            remote * per_pair,
            out.stats.bytes_sent as f32,
            out.stats.bytes_received as f32,
        ];
        sum_over(world, &mut totals)?;
        if layout.etp == 1 {
            c.close(
                "all-to-all bytes sent (all ranks)",
                &totals[1..2],
                &totals[..1],
            );
            c.close(
                "all-to-all bytes received (all ranks)",
                &totals[2..3],
                &totals[..1],
            );
        }
    }
    // Device-to-host reads of the dispatch and combine: every collective of a group larger
    // than one rank is staged through host memory (one read each), and dropless dispatch reads
    // the tokens per expert once more; padded dispatch reads nothing else.
    let expert_groups = ExpertGroups::new(&groups).map_err(s)?;
    let big = |g: &burn_parallel::group::Group| u64::from(g.size() > 1);
    let staged = match kind {
        DispatcherKind::AllGather => 2 * big(groups.group(GroupKind::ExpertTpEp)),
        DispatcherKind::AllToAll => 2 * big(expert_groups.ep()) + 2 * big(expert_groups.etp()),
    };
    let want_reads = staged + u64::from(mode != Mode::Padded);
    c.close(
        &format!("{mode:?} dispatch+combine device-to-host reads"),
        &[out.stats.transfers.reads as f32],
        &[want_reads as f32],
    );
    // The whole forward adds, over a TP×CP group of more than one rank, the aux loss's count
    // reduction (the router's NaN/inf check stays on the device for the caller); the backward
    // runs each staged collective's conjugate (one read each) and nothing else.
    let router_reads = big(groups.group(GroupKind::TpCp));
    c.close(
        &format!("{mode:?} forward device-to-host reads"),
        &[out.transfers.reads as f32],
        &[(want_reads + router_reads) as f32],
    );
    c.close(
        &format!("{mode:?} backward device-to-host reads"),
        &[burn_parallel::transfers::totals(&backward).reads as f32],
        &[staged as f32],
    );
    Ok(Some((out, x_grad)))
}

/// dispatch → identity experts (rows × probs) → combine with probs 1/k returns the input
/// (ETP ranks each return their rows, so the ETP sum is `etp ×` the input).
fn identity_roundtrip(
    groups: &ProcessGroups,
    kind: DispatcherKind,
    c: &mut Checker,
    d: &Device,
) -> Res<()> {
    let eg = ExpertGroups::new(groups).map_err(s)?;
    let etp = eg.etp().size() as f32;
    let dispatcher: Box<dyn TokenDispatcher> = match kind {
        DispatcherKind::AllGather => Box::new(AllGatherDispatcher::new(eg)),
        DispatcherKind::AllToAll => Box::new(AllToAllDispatcher::new(eg)),
    };
    let r = groups.rank();
    let x = tensor(values(300 + r, T * H, 1.0), [T, H], d);
    let logits = tensor(values(400 + r, T * E, 1.0), [T, E], d);
    let idx = logits.argtopk(K, 1);
    let map = Tensor::<2>::zeros([T, E], d)
        .scatter(
            1,
            idx,
            Tensor::ones([T, K], d),
            burn::tensor::IndexingUpdateOp::Add,
        )
        .bool();
    let probs = map.clone().float() / K as f64;
    let disp = dispatcher
        .dispatch(x.clone(), probs, map, None)
        .map_err(s)?;
    let rows = disp.tokens.clone() * disp.probs.clone().unsqueeze_dim::<2>(1);
    let (back, _) = dispatcher.combine(rows, disp.plan).map_err(s)?;
    let want: Vec<f32> = host(x).iter().map(|v| v * etp).collect();
    c.close("dispatch → combine with probs 1/k", &host(back), &want);
    Ok(())
}

/// Global aux loss over TP×DP×CP accumulated over two micro-batches, and the expert-bias update
/// from TP×DP×CP-summed counts, against one router over every rank's tokens.
fn global_losses(groups: &ProcessGroups, c: &mut Checker, d: &Device) -> Res<()> {
    let n = groups.mesh().world_size();
    let config = RouterConfig::new(H, E, K)
        .with_score_function(ScoreFunction::Sigmoid)
        .with_global_aux_loss_coeff(1e-1)
        .with_expert_bias(true);
    let weight = || tensor(values(1, E * H, 0.5), [E, H], d);
    let local = Router::from_weight(config.clone(), weight())
        .map_err(s)?
        .with_reduce(Arc::new(GroupReduce::new(groups)));
    let single = Router::from_weight(config, weight()).map_err(s)?;
    let r = groups.rank();
    let xs = |mb: usize, p: usize| tensor(values(500 + 10 * mb + p, T * H, 1.0), [S, B, H], d);
    let all = |mb: usize| Tensor::cat((0..n).map(|p| xs(mb, p)).collect(), 1);
    let (mut state, mut ref_state) = (None, None);
    let (mut counts, mut ref_counts) = (Tensor::<1>::zeros([E], d), Tensor::<1>::zeros([E], d));
    let (mut got, mut want) = (0.0, 0.0);
    for mb in 0..2 {
        let mut opts = RouteOptions::default();
        if let Some(st) = state.take() {
            opts = opts.global_aux(st);
        }
        let out = local.forward_with(xs(mb, r), opts).map_err(s)?;
        let mut ref_opts = RouteOptions::default();
        if let Some(st) = ref_state.take() {
            ref_opts = ref_opts.global_aux(st);
        }
        let reference = single.forward_with(all(mb), ref_opts).map_err(s)?;
        got = host(out.global_aux_loss.clone().ok_or("no global aux loss")?)[0];
        want = host(
            reference
                .global_aux_loss
                .clone()
                .ok_or("no global aux loss")?,
        )[0];
        counts = counts + out.tokens_per_expert.clone().float();
        ref_counts = ref_counts + reference.tokens_per_expert.clone().float();
        state = out.global_aux_state.clone();
        ref_state = reference.global_aux_state.clone();
    }
    let mut sum = [got];
    groups
        .group(GroupKind::TpDpCp)
        .communicator()
        .map_err(s)?
        .all_reduce(&mut sum, ReduceOp::Sum)
        .map_err(s)?;
    c.close(
        "global aux loss, 2nd micro-batch (sum over TP×DP×CP)",
        &sum,
        &[want],
    );
    let bias = local.updated_expert_bias(counts).map_err(s)?;
    let ref_bias = single.updated_expert_bias(ref_counts).map_err(s)?;
    c.close("expert bias after the update", &host(bias), &host(ref_bias));
    Ok(())
}

fn run(world: &MpiWorld) -> Res<(usize, Vec<String>)> {
    let d = Device::flex().autodiff();
    let comm = world.communicator();
    let mut c = Checker {
        label: String::new(),
        failures: Vec::new(),
        passed: 0,
    };
    for layout in layouts(comm.size()) {
        for kind in [DispatcherKind::AllGather, DispatcherKind::AllToAll] {
            for mode in [Mode::Dropless, Mode::Padded] {
                c.label = format!("{layout:?} {kind:?} {mode:?}");
                let out = run_case(&comm, layout, kind, mode, false, &mut c, &d)?;
                if mode == Mode::Padded
                    && let Some((out, x_grad)) = out
                {
                    // Every local expert gets capacity × EP × ETP rows (capacity per rank).
                    let cap = out.router.capacity.ok_or("no capacity")?;
                    let per = cap * layout.ep * layout.etp;
                    let groups = ProcessGroups::new(
                        Mesh::new(
                            comm.size(),
                            ParallelDims::new(
                                layout.tp,
                                layout.cp,
                                comm.size() / (layout.tp * layout.cp),
                                1,
                            ),
                            MoeDims::new(
                                layout.etp,
                                layout.ep,
                                comm.size() / (layout.etp * layout.ep),
                            ),
                        )
                        .map_err(s)?,
                        comm.clone(),
                    )
                    .map_err(s)?;
                    let layer = full_layer(mode, false, false, &d)?
                        .parallelize(&groups, kind)
                        .map_err(s)?;
                    let x = tensor(tokens(comm.rank(), false), [T, H], &d);
                    let routed = layer
                        .router
                        .forward(x.clone().reshape([S, B, H]))
                        .map_err(s)?;
                    let eg = ExpertGroups::new(&groups).map_err(s)?;
                    let disp: Box<dyn TokenDispatcher> = match kind {
                        DispatcherKind::AllGather => Box::new(AllGatherDispatcher::new(eg)),
                        DispatcherKind::AllToAll => Box::new(AllToAllDispatcher::new(eg)),
                    };
                    let got = disp
                        .dispatch(x, routed.probs, routed.routing_map, Some(cap))
                        .map_err(s)?
                        .tokens_per_expert;
                    let want = vec![per; E / layout.ep];
                    let as_f = |v: &[usize]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
                    c.close("padded rows per local expert", &as_f(&got), &as_f(&want));
                    // Padding adds only zero-probability rows: same output as dropping.
                    let mut c2 = Checker {
                        label: c.label.clone(),
                        failures: Vec::new(),
                        passed: 0,
                    };
                    let (dropped, dropped_grad) =
                        run_case(&comm, layout, kind, Mode::Dropped, false, &mut c2, &d)?
                            .ok_or("no output")?;
                    c.close(
                        "padded output = dropped output",
                        &host(out.output.clone()),
                        &host(dropped.output),
                    );
                    c.close(
                        "padded input gradient = dropped input gradient",
                        &x_grad,
                        &dropped_grad,
                    );
                    c.failures.extend(c2.failures);
                    c.passed += c2.passed;
                }
            }
            c.label = format!("{layout:?} {kind:?} starved experts");
            run_case(&comm, layout, kind, Mode::Dropless, true, &mut c, &d)?;
            let n = comm.size();
            let groups = ProcessGroups::new(
                Mesh::new(
                    n,
                    ParallelDims::new(layout.tp, layout.cp, n / (layout.tp * layout.cp), 1),
                    MoeDims::new(layout.etp, layout.ep, n / (layout.etp * layout.ep)),
                )
                .map_err(s)?,
                comm.clone(),
            )
            .map_err(s)?;
            c.label = format!("{layout:?} {kind:?}");
            identity_roundtrip(&groups, kind, &mut c, &d)?;
            if kind == DispatcherKind::AllToAll {
                global_losses(&groups, &mut c, &d)?;
            }
        }
    }
    Ok((c.passed, c.failures))
}

fn main() -> ExitCode {
    check_program(|world| {
        let (passed, failures) = run(world)?;
        let line = format!(
            "expert parallel ({} ranks): {passed} checks passed",
            world.size()
        );
        Ok((line, failures))
    })
}
