//! Autodiff against finite differences: for every parameter and the input of a full MoE layer
//! (softmax top-2 router with aux and z losses, SwiGLU experts, gated shared expert), the
//! directional derivative `<grad, v>` equals the central difference
//! `(L(p + εv) - L(p - εv)) / 2ε` of `L = sum(y * u) + aux + z`.

use burn::tensor::{Device, Tensor};
use burn_moe::prelude::*;
use tests::lcg_tensor;

const S: usize = 8;
const B: usize = 4;
const H: usize = 8;
const F: usize = 6;
const FS: usize = 5;
const E: usize = 4;

#[derive(Clone)]
struct Weights {
    x: Tensor<3>,
    router: Tensor<2>,
    w1: Tensor<3>,
    w2: Tensor<3>,
    s1: Tensor<2>,
    s2: Tensor<2>,
    gate: Tensor<2>,
}

fn weights(device: &Device) -> Weights {
    Weights {
        x: lcg_tensor([S, B, H], 1, 1.0, device),
        router: lcg_tensor([E, H], 2, 0.8, device),
        w1: lcg_tensor([E, H, 2 * F], 3, 0.5, device),
        w2: lcg_tensor([E, F, H], 4, 0.5, device),
        s1: lcg_tensor([H, 2 * FS], 5, 0.5, device),
        s2: lcg_tensor([FS, H], 6, 0.5, device),
        gate: lcg_tensor([1, H], 7, 0.5, device),
    }
}

fn layer(w: &Weights) -> MoeLayer {
    let router = RouterConfig::new(H, E, 2)
        .with_aux_loss_coeff(0.1)
        .with_z_loss_coeff(Some(0.01));
    let router = Router::from_weight(router, w.router.clone()).unwrap();
    let experts =
        Experts::from_weights(ExpertsConfig::new(E, H, F), w.w1.clone(), w.w2.clone()).unwrap();
    let shared = SharedExperts::from_weights(
        SharedExpertsConfig::new(H, FS).with_gate(true),
        w.s1.clone(),
        w.s2.clone(),
        Some(w.gate.clone()),
    )
    .unwrap();
    MoeLayer::new(router, experts, Some(shared)).unwrap()
}

fn loss(w: &Weights, upstream: &Tensor<3>) -> Tensor<1> {
    let out = layer(w).forward(w.x.clone()).unwrap();
    (out.output.clone() * upstream.clone()).sum() + out.total_aux_loss().unwrap()
}

fn value(t: Tensor<1>) -> f64 {
    f64::from(t.into_scalar::<f32>())
}

#[test]
fn moe_layer_gradients_match_finite_differences() {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let base = weights(&plain);
    let upstream = lcg_tensor([S, B, H], 9, 1.0, &plain);

    // Autodiff gradients.
    let w = weights(&ad);
    let x = w.x.clone().require_grad();
    let w = Weights { x: x.clone(), ..w };
    let l = layer(&w);
    let out = l.forward(x.clone()).unwrap();
    let total = (out.output.clone() * upstream.clone().to_device(&ad)).sum()
        + out.total_aux_loss().unwrap();
    let grads = total.backward();

    let eps = 1e-3f64;
    let mut checked = 0;
    let directional =
        |name: &str, grad: Vec<f32>, shift: &dyn Fn(&Weights, f64) -> Weights, dir: Vec<f32>| {
            let analytic: f64 = grad
                .iter()
                .zip(&dir)
                .map(|(g, v)| f64::from(*g) * f64::from(*v))
                .sum();
            let plus = value(loss(&shift(&base, eps), &upstream));
            let minus = value(loss(&shift(&base, -eps), &upstream));
            let numeric = (plus - minus) / (2.0 * eps);
            let err = (analytic - numeric).abs();
            assert!(
                err <= 2e-3 + 1e-2 * numeric.abs(),
                "{name}: autodiff {analytic} vs finite difference {numeric}"
            );
        };
    let vec3 = |t: Tensor<3>| -> Vec<f32> { t.into_data().iter::<f32>().collect() };
    let vec2 = |t: Tensor<2>| -> Vec<f32> { t.into_data().iter::<f32>().collect() };

    let dx = lcg_tensor([S, B, H], 11, 1.0, &plain);
    directional(
        "x",
        vec3(x.grad(&grads).unwrap()),
        &|w, e| Weights {
            x: w.x.clone() + dx.clone().mul_scalar(e),
            ..w.clone()
        },
        vec3(dx.clone()),
    );
    checked += 1;
    let dr = lcg_tensor([E, H], 12, 1.0, &plain);
    directional(
        "router weight",
        vec2(l.router.weight.val().grad(&grads).unwrap()),
        &|w, e| Weights {
            router: w.router.clone() + dr.clone().mul_scalar(e),
            ..w.clone()
        },
        vec2(dr.clone()),
    );
    checked += 1;
    let d1 = lcg_tensor([E, H, 2 * F], 13, 1.0, &plain);
    directional(
        "w1",
        vec3(l.experts.w1.val().grad(&grads).unwrap()),
        &|w, e| Weights {
            w1: w.w1.clone() + d1.clone().mul_scalar(e),
            ..w.clone()
        },
        vec3(d1.clone()),
    );
    checked += 1;
    let d2 = lcg_tensor([E, F, H], 14, 1.0, &plain);
    directional(
        "w2",
        vec3(l.experts.w2.val().grad(&grads).unwrap()),
        &|w, e| Weights {
            w2: w.w2.clone() + d2.clone().mul_scalar(e),
            ..w.clone()
        },
        vec3(d2.clone()),
    );
    checked += 1;
    let shared = l.shared.as_ref().unwrap();
    let ds1 = lcg_tensor([H, 2 * FS], 15, 1.0, &plain);
    directional(
        "shared w1",
        vec2(shared.w1.val().grad(&grads).unwrap()),
        &|w, e| Weights {
            s1: w.s1.clone() + ds1.clone().mul_scalar(e),
            ..w.clone()
        },
        vec2(ds1.clone()),
    );
    checked += 1;
    let dg = lcg_tensor([1, H], 16, 1.0, &plain);
    directional(
        "shared gate",
        vec2(shared.gate.as_ref().unwrap().val().grad(&grads).unwrap()),
        &|w, e| Weights {
            gate: w.gate.clone() + dg.clone().mul_scalar(e),
            ..w.clone()
        },
        vec2(dg.clone()),
    );
    checked += 1;
    assert_eq!(checked, 6);
}
