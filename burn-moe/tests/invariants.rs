//! Invariants of the router, the dispatcher and the layer beyond the golden cases.

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_moe::dispatch::permute::routing_permutation;
use burn_moe::prelude::*;

fn device() -> Device {
    Device::flex().autodiff()
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    burn_parallel::rng::uniform_values(n, seed, scale)
}

fn tensor<const D: usize>(shape: [usize; D], seed: u64, scale: f32, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed, scale), shape), device)
}

fn scalar(t: Tensor<1>) -> f64 {
    f64::from(t.into_scalar::<f32>())
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn ints(t: Tensor<1, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

fn router(config: RouterConfig, device: &Device) -> Router {
    let (e, h) = (config.num_experts, config.hidden);
    Router::from_weight(config, Tensor::zeros([e, h], device)).unwrap()
}

#[test]
fn uniform_router_gives_aux_loss_equal_to_the_coefficient() {
    let d = device();
    let (s, b, e) = (12, 3, 8);
    let logits = Tensor::<2>::zeros([s * b, e], &d);
    for topk in [1, 2, 4] {
        let base = RouterConfig::new(4, e, topk).with_pre_softmax(topk == 1);
        let aux = router(base.clone().with_aux_loss_coeff(0.03), &d)
            .route(logits.clone(), s, b, RouteOptions::default())
            .unwrap();
        assert!(
            (scalar(aux.aux_loss.unwrap()) - 0.03).abs() < 1e-7,
            "aux, k = {topk}"
        );
        let seq = router(base.with_seq_aux_loss_coeff(0.03), &d)
            .route(logits.clone(), s, b, RouteOptions::default())
            .unwrap();
        assert!(
            (scalar(seq.seq_aux_loss.unwrap()) - 0.03).abs() < 1e-7,
            "seq aux, k = {topk}"
        );
    }
}

#[test]
fn seq_aux_loss_equals_aux_loss_for_one_sequence() {
    let d = device();
    let (s, e) = (20, 8);
    let logits = tensor([s, e], 3, 2.0, &d);
    for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
        let base = RouterConfig::new(4, e, 2).with_score_function(score);
        let aux = router(base.clone().with_aux_loss_coeff(0.01), &d)
            .route(logits.clone(), s, 1, RouteOptions::default())
            .unwrap();
        let seq = router(base.with_seq_aux_loss_coeff(0.01), &d)
            .route(logits.clone(), s, 1, RouteOptions::default())
            .unwrap();
        let (a, q) = (
            scalar(aux.aux_loss.unwrap()),
            scalar(seq.seq_aux_loss.unwrap()),
        );
        assert!(
            (a - q).abs() <= 1e-7 + 1e-5 * a.abs(),
            "{score:?}: aux {a} vs seq aux {q}"
        );
    }
}

/// Router-weight gradient of `sum(probs * u) + aux` for one aux coefficient.
fn router_grad(coeff: f64) -> (Vec<f32>, bool) {
    let d = device();
    let (t, h, e) = (24, 6, 8);
    let x = tensor([t, 1, h], 5, 1.0, &d);
    let u = tensor([t, e], 6, 1.0, &d);
    let config = RouterConfig::new(h, e, 2).with_aux_loss_coeff(coeff);
    let r = Router::from_weight(config, tensor([e, h], 7, 1.0, &d)).unwrap();
    let out = r.forward(x).unwrap();
    let has_aux = out.aux_loss.is_some();
    let mut loss = (out.probs.clone() * u).sum();
    if let Some(aux) = out.total_loss() {
        loss = loss + aux;
    }
    let grads = loss.backward();
    (floats(r.weight.val().grad(&grads).unwrap()), has_aux)
}

#[test]
fn aux_coefficient_zero_gives_no_aux_gradient() {
    let (g0, has0) = router_grad(0.0);
    assert!(!has0, "coefficient 0 must not compute an aux loss");
    let (g1, has1) = router_grad(0.05);
    let (g2, _) = router_grad(0.1);
    assert!(has1);
    // The aux term's gradient is linear in its coefficient, so it vanishes at 0.
    let diff1: Vec<f32> = g1.iter().zip(&g0).map(|(a, b)| a - b).collect();
    assert!(
        diff1.iter().any(|v| v.abs() > 1e-6),
        "the aux loss must reach the router"
    );
    for ((a, b), c) in g2.iter().zip(&g0).zip(&diff1) {
        assert!(
            ((a - b) - 2.0 * c).abs() < 1e-5,
            "aux gradient not linear in the coefficient"
        );
    }
}

#[test]
fn permute_unpermute_with_probs_one_over_k_is_identity_with_identity_gradient() {
    let d = device();
    let (t, h, e) = (30, 5, 6);
    for k in [1, 2, 3] {
        let x = tensor([t, h], 11, 1.0, &d).require_grad();
        let config = RouterConfig::new(h, e, k).with_pre_softmax(true);
        let out = router(config, &d)
            .route(tensor([t, e], 12, 3.0, &d), t, 1, RouteOptions::default())
            .unwrap();
        let map = out.routing_map.clone();
        let probs = map.clone().float().div_scalar(k as f64);
        let dispatcher = LocalDispatcher;
        let dispatched = dispatcher.dispatch(x.clone(), probs, map, None).unwrap();
        let n = dispatched.tokens.dims()[0];
        assert_eq!(n, t * k);
        let weighted = dispatched.tokens.clone() * dispatched.probs.clone().reshape([n, 1]);
        let (y, _) = dispatcher.combine(weighted, dispatched.plan).unwrap();
        let diff: f32 = floats((y.clone() - x.clone()).abs())
            .into_iter()
            .fold(0.0, f32::max);
        assert!(diff < 1e-6, "k = {k}: max |y - x| = {diff}");
        let u = tensor([t, h], 13, 1.0, &d);
        let grads = (y * u.clone()).sum().backward();
        let gx = floats(x.grad(&grads).unwrap());
        let gu = floats(u);
        let err = gx
            .iter()
            .zip(&gu)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            err < 1e-6,
            "k = {k}: input gradient differs from upstream by {err}"
        );
    }
}

#[test]
fn capacity_is_exact_with_padding_and_an_upper_bound_without() {
    let d = device();
    let (t, e) = (40, 8);
    let logits = tensor([t, e], 21, 3.0, &d);
    for k in [1, 2, 3] {
        for cf in [0.5, 0.75, 1.0, 1.5] {
            for policy in [DropPolicy::Probs, DropPolicy::Position] {
                for pad in [false, true] {
                    let config = RouterConfig::new(4, e, k)
                        .with_pre_softmax(k == 1)
                        .with_capacity_factor(Some(cf))
                        .with_drop_policy(policy)
                        .with_pad_to_capacity(pad);
                    let cap = config.capacity(t).unwrap();
                    let out = router(config, &d)
                        .route(logits.clone(), t, 1, RouteOptions::default())
                        .unwrap();
                    assert_eq!(out.capacity, Some(cap));
                    for (expert, c) in ints(out.tokens_per_expert.clone()).into_iter().enumerate() {
                        let what = format!("k={k} cf={cf} {policy:?} pad={pad} expert {expert}");
                        if pad {
                            assert_eq!(c as usize, cap.min(t), "{what}");
                        } else {
                            assert!(c as usize <= cap, "{what}: {c} > capacity {cap}");
                        }
                    }
                    // Dropped assignments carry no probability.
                    let probs = floats(out.probs.clone());
                    let map = floats(out.routing_map.clone().float());
                    assert!(probs.iter().zip(&map).all(|(p, m)| *m == 1.0 || *p == 0.0));
                }
            }
        }
    }
}

#[test]
fn position_policy_keeps_the_first_routed_tokens() {
    let d = device();
    let (t, e) = (24, 4);
    let logits = tensor([t, e], 31, 3.0, &d);
    let base = RouterConfig::new(4, e, 2);
    let dropless = router(base.clone(), &d)
        .route(logits.clone(), t, 1, RouteOptions::default())
        .unwrap();
    let config = base
        .with_capacity_factor(Some(0.5))
        .with_drop_policy(DropPolicy::Position);
    let cap = config.capacity(t).unwrap();
    let dropped = router(config, &d)
        .route(logits, t, 1, RouteOptions::default())
        .unwrap();
    let (full, full_counts) = routing_permutation(dropless.routing_map).unwrap();
    let (kept, _) = routing_permutation(dropped.routing_map).unwrap();
    let mut start = 0;
    let mut expected = Vec::new();
    for count in full_counts {
        expected.extend_from_slice(&full[start..start + count.min(cap)]);
        start += count;
    }
    assert_eq!(kept, expected);
}

#[test]
fn global_aux_loss_averages_counts_over_micro_batches() {
    let d = device();
    let (t, e, k) = (16, 4, 2);
    let config = RouterConfig::new(4, e, k).with_global_aux_loss_coeff(0.1);
    let r = router(config, &d);
    let l1 = tensor([t, e], 41, 2.0, &d);
    let l2 = tensor([t, e], 42, 2.0, &d);
    let first = r.route(l1.clone(), t, 1, RouteOptions::default()).unwrap();
    let state = first.global_aux_state.clone().unwrap();
    assert_eq!(state.steps, 1);
    let second = r
        .route(l2.clone(), t, 1, RouteOptions::default().global_aux(state))
        .unwrap();
    let state2 = second.global_aux_state.clone().unwrap();
    assert_eq!(state2.steps, 2);
    // Independent computation on the host: the second loss uses the mean of both batches'
    // top-k counts (softmax scores, plain top-k) with this batch's scores.
    let host_counts = |logits: &Tensor<2>| -> Vec<f64> {
        let v = floats(logits.clone());
        let mut counts = vec![0.0; e];
        for row in v.chunks(e) {
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for &j in &idx[..k] {
                counts[j] += 1.0;
            }
        }
        counts
    };
    let (c1, c2) = (host_counts(&l1), host_counts(&l2));
    let v2 = floats(l2.clone());
    let mut expected = 0.0;
    for j in 0..e {
        let mut p_sum = 0.0;
        for row in v2.chunks(e) {
            let m = row.iter().copied().fold(f32::MIN, f32::max);
            let z: f64 = row.iter().map(|x| f64::from((x - m).exp())).sum();
            p_sum += f64::from((row[j] - m).exp()) / z;
        }
        expected += p_sum * (c1[j] + c2[j]) / 2.0;
    }
    expected *= e as f64 * 0.1 / (k as f64 * (t * t) as f64);
    let got = scalar(second.global_aux_loss.unwrap());
    assert!(
        (got - expected).abs() < 1e-6,
        "global aux {got} vs {expected}"
    );
}

#[test]
fn expert_bias_update_moves_toward_balance() {
    let d = device();
    let config = RouterConfig::new(4, 4, 1)
        .with_score_function(ScoreFunction::Sigmoid)
        .with_expert_bias(true)
        .with_bias_update_rate(0.5);
    let mut r = router(config, &d);
    let counts = Tensor::<1>::from_floats([10.0, 2.0, 4.0, 4.0], &d);
    r.update_expert_bias(counts).unwrap();
    // mean = 5: overloaded expert 0 goes down, the others up.
    let bias = floats(r.expert_bias.as_ref().unwrap().val());
    assert_eq!(bias, vec![-0.5, 0.5, 0.5, 0.5]);
    // The bias changes selection, not probabilities: with equal logits the biased expert wins.
    let logits = Tensor::<2>::zeros([3, 4], &d);
    let r = r
        .with_expert_bias(Tensor::from_floats([0.0, 0.0, 1.0, 0.0], &d))
        .unwrap();
    let out = r.route(logits, 3, 1, RouteOptions::default()).unwrap();
    assert_eq!(ints(out.tokens_per_expert), vec![0, 0, 3, 0]);
    assert!(
        floats(out.probs)
            .iter()
            .all(|p| *p == 0.0 || (*p - 0.5).abs() < 1e-7)
    );
}

#[test]
fn sinkhorn_spreads_tokens_that_all_prefer_one_expert() {
    let d = device();
    let (t, e) = (32, 4);
    let mut v = values(t * e, 51, 0.1);
    for row in v.chunks_mut(e) {
        row[0] += 2.0; // every token prefers expert 0
    }
    let logits = Tensor::<2>::from_data(TensorData::new(v, [t, e]), &d);
    let base = RouterConfig::new(4, e, 1)
        .with_routing(RoutingType::Sinkhorn)
        .with_pre_softmax(true);
    let top = router(RouterConfig::new(4, e, 1).with_pre_softmax(true), &d)
        .route(logits.clone(), t, 1, RouteOptions::default())
        .unwrap();
    assert_eq!(ints(top.tokens_per_expert)[0], t as i64);
    let balanced = router(base, &d)
        .route(logits, t, 1, RouteOptions::default())
        .unwrap();
    let counts = ints(balanced.tokens_per_expert);
    assert_eq!(counts.iter().sum::<i64>(), t as i64);
    // Sinkhorn balances the assignment plan; the per-token argmax of that plan is close to,
    // not exactly, uniform (as in Megatron-Core).
    let fair = (t / e) as i64;
    assert!(
        counts.iter().all(|&c| c >= fair / 2 && c <= fair * 3 / 2),
        "sinkhorn counts {counts:?}"
    );
}

#[test]
fn batched_and_sequential_experts_agree_on_uneven_and_empty_groups() {
    let d = device();
    let (h, f, e) = (6, 4, 4);
    let counts = [3usize, 0, 7, 1];
    let n: usize = counts.iter().sum();
    let tokens = tensor([n, h], 61, 1.0, &d);
    let probs = tensor([n], 62, 1.0, &d);
    let w1 = tensor([e, h, 2 * f], 63, 0.5, &d);
    let w2 = tensor([e, f, h], 64, 0.5, &d);
    let run = |compute| {
        let experts = Experts::from_weights(
            ExpertsConfig::new(e, h, f).with_compute(compute),
            w1.clone(),
            w2.clone(),
        )
        .unwrap();
        floats(
            experts
                .forward(tokens.clone(), &counts, probs.clone())
                .unwrap(),
        )
    };
    let a = run(ExpertsCompute::Sequential);
    let b = run(ExpertsCompute::Batched);
    let err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(err < 1e-5, "batched vs sequential: {err}");
}

#[test]
fn eval_mode_computes_no_losses_and_a_layer_output_of_input_shape() {
    let d = device();
    let mut config = MoeLayerConfig::swiglu(8, 8, 4, 2);
    config.router = config
        .router
        .with_aux_loss_coeff(0.01)
        .with_z_loss_coeff(Some(0.001));
    let layer = config.init(&d).unwrap();
    let x = tensor([5, 3, 8], 71, 1.0, &d);
    let out = layer.forward_with(x.clone(), RouteOptions::eval()).unwrap();
    assert_eq!(out.output.dims(), [5, 3, 8]);
    assert!(out.aux_loss.is_none() && out.z_loss.is_none());
    let train = layer.forward(x).unwrap();
    assert!(train.aux_loss.is_some() && train.z_loss.is_some());
    assert_eq!(ints(train.tokens_per_expert).iter().sum::<i64>(), 30);
}

#[test]
fn input_jitter_perturbs_training_logits_only() {
    let d = device();
    let (h, e) = (6, 4);
    let config = RouterConfig::new(h, e, 2).with_input_jitter_eps(Some(0.1));
    let r = Router::from_weight(config, tensor([e, h], 81, 1.0, &d)).unwrap();
    let x = tensor([10, 2, h], 82, 1.0, &d);
    let clean = floats(r.gating(x.clone().reshape([20, h])).unwrap());
    let eval = floats(
        r.forward_with(x.clone(), RouteOptions::eval())
            .unwrap()
            .logits,
    );
    assert_eq!(eval, clean, "evaluation applies no jitter");
    let train = floats(r.forward(x).unwrap().logits);
    let max_rel = train
        .iter()
        .zip(&clean)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
        .fold(0.0, f32::max);
    assert!(max_rel > 0.0, "training applies jitter");
    // logit = sum_h x_h w_h (1 + d_h) with |d_h| <= 0.1: the change is at most
    // 0.1 * sum_h |x_h| |w_h|.
    let xa = tensor([10, 2, h], 82, 1.0, &d).reshape([20, h]).abs();
    let wa = tensor([e, h], 81, 1.0, &d).abs();
    let bound = floats(xa.matmul(wa.transpose()).mul_scalar(0.1));
    for ((t, c), b) in train.iter().zip(&clean).zip(&bound) {
        assert!(
            (t - c).abs() <= b + 1e-6,
            "jitter beyond eps: {t} vs {c} (bound {b})"
        );
    }
}

/// On one rank the expert-parallel dispatchers are the local dispatcher: same output and input
/// gradient, dropless and padded; padded dispatch reads nothing back from the device.
#[test]
fn expert_parallel_dispatchers_on_one_rank_equal_the_local_dispatcher() {
    let d = device();
    let groups = burn_parallel::group::ProcessGroups::single().unwrap();
    for pad in [false, true] {
        let mut config = MoeLayerConfig::swiglu(8, 6, 4, 2);
        if pad {
            config.router = config
                .router
                .with_capacity_factor(Some(1.0))
                .with_pad_to_capacity(true);
        }
        let run = |kind: Option<DispatcherKind>| {
            let router =
                Router::from_weight(config.router.clone(), tensor([4, 8], 1, 0.5, &d)).unwrap();
            let experts = Experts::from_weights(
                config.experts.clone(),
                tensor([4, 8, 12], 2, 0.3, &d),
                tensor([4, 6, 8], 3, 0.3, &d),
            )
            .unwrap();
            let mut layer = MoeLayer::new(router, experts, None).unwrap();
            if let Some(kind) = kind {
                layer = layer.parallelize(&groups, kind).unwrap();
            }
            let x = tensor([5, 2, 8], 4, 1.0, &d).require_grad();
            let out = layer.forward(x.clone()).unwrap();
            let grads = (out.output.clone() * tensor([5, 2, 8], 5, 1.0, &d))
                .sum()
                .backward();
            (
                floats(out.output),
                floats(x.grad(&grads).unwrap()),
                out.stats,
            )
        };
        let (want_out, want_grad, _) = run(None);
        for kind in [DispatcherKind::AllGather, DispatcherKind::AllToAll] {
            let (out, grad, stats) = run(Some(kind));
            for (a, b) in out.iter().zip(&want_out).chain(grad.iter().zip(&want_grad)) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{kind:?} pad={pad}: {a} vs {b}"
                );
            }
            // One rank: no collective is staged; dropless reads the tokens per expert once.
            assert_eq!(stats.transfers.reads, u64::from(!pad), "{kind:?} pad={pad}");
            assert_eq!((stats.bytes_sent, stats.bytes_received), (0, 0), "{kind:?}");
        }
    }
}

/// Selecting every expert (`topk == num_experts`, what a recipe gets when it leaves both out:
/// 1 of 1) is dense routing, not a panic; so are a group top-k that takes whole groups and a
/// capacity that keeps every token.
#[test]
fn selecting_every_expert_or_every_token_is_dense_not_a_panic() {
    let d = device();
    let (s, b, h) = (3, 2, 8);
    let t = s * b;
    for (e, k, groups, capacity) in [
        (4, 4, None, None),
        (2, 2, None, None),
        (1, 1, None, None),
        (4, 2, Some((2, 1)), None),
        (4, 4, Some((2, 2)), None),
        // capacity = T · k / E · factor = T exactly.
        (4, 2, None, Some(2.0)),
    ] {
        let mut config = RouterConfig::new(h, e, k)
            .with_pre_softmax(k == 1)
            .with_aux_loss_coeff(1e-2);
        if let Some((g, gk)) = groups {
            config = config.with_num_groups(Some(g)).with_group_topk(Some(gk));
        }
        if let Some(c) = capacity {
            config = config
                .with_capacity_factor(Some(c))
                .with_pad_to_capacity(true);
        }
        let layer = MoeLayerConfig::new(config, ExpertsConfig::new(e, h, 4))
            .init(&d)
            .unwrap();
        let x = tensor([s, b, h], 11, 1.0, &d).require_grad();
        let out = layer.forward(x.clone()).unwrap();
        let label = format!("E={e} k={k} groups={groups:?} capacity={capacity:?}");
        let load = ints(out.tokens_per_expert.clone());
        if capacity.is_none() {
            assert_eq!(
                load.iter().sum::<i64>(),
                (t * k) as i64,
                "{label}: {load:?}"
            );
        }
        // Every expert takes every token: all of them selected, or padded to a capacity of T.
        if k == e || capacity.is_some() {
            assert!(load.iter().all(|&n| n == t as i64), "{label}: {load:?}");
        }
        let loss = out.output.clone().sum() + out.total_aux_loss().unwrap();
        let grads = loss.backward();
        let gx = floats(x.grad(&grads).unwrap());
        assert!(gx.iter().all(|g| g.is_finite()), "{label}");
        assert!(floats(out.output).iter().all(|v| v.is_finite()), "{label}");
    }
}
