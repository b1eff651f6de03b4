//! Autodiff against finite differences: for every parameter of a full MoE layer (softmax top-2
//! router with aux and z losses, SwiGLU experts, gated shared expert), found by visiting the
//! module rather than listed by hand, and for its input, the directional derivative
//! `<grad, v>` equals the central difference `(L(p + εv) - L(p - εv)) / 2ε` of
//! `L = sum(y * u) + aux + z`.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use burn_moe::prelude::*;
use tests::{seeded_tensor, seeded_values};

const S: usize = 8;
const B: usize = 4;
const H: usize = 8;
const F: usize = 6;
const FS: usize = 5;
const E: usize = 4;

fn layer(device: &Device) -> MoeLayer {
    let router = RouterConfig::new(H, E, 2)
        .with_aux_loss_coeff(0.1)
        .with_z_loss_coeff(Some(0.01));
    let router = Router::from_weight(router, seeded_tensor([E, H], 2, 0.8, device)).unwrap();
    let experts = Experts::from_weights(
        ExpertsConfig::new(E, H, F),
        seeded_tensor([E, H, 2 * F], 3, 0.5, device),
        seeded_tensor([E, F, H], 4, 0.5, device),
    )
    .unwrap();
    let shared = SharedExperts::from_weights(
        SharedExpertsConfig::new(H, FS).with_gate(true),
        seeded_tensor([H, 2 * FS], 5, 0.5, device),
        seeded_tensor([FS, H], 6, 0.5, device),
        Some(seeded_tensor([1, H], 7, 0.5, device)),
    )
    .unwrap();
    MoeLayer::new(router, experts, Some(shared)).unwrap()
}

fn loss(layer: &MoeLayer, x: Tensor<3>, upstream: &Tensor<3>) -> Tensor<1> {
    let out = layer.forward(x).unwrap();
    (out.output.clone() * upstream.clone()).sum() + out.total_aux_loss().unwrap()
}

fn value(t: Tensor<1>) -> f64 {
    f64::from(t.into_scalar::<f32>())
}

fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Every float parameter in visiting order: its module path, element count and (with
/// gradients given) its gradient.
struct Params<'a> {
    grads: Option<&'a Gradients>,
    path: Vec<String>,
    found: Vec<(String, usize, Option<Vec<f32>>)>,
}

impl ModuleVisitor for Params<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let grad = self.grads.and_then(|g| value.grad(g)).map(flat);
        let name = format!("{} #{}", self.path.join("."), self.found.len());
        self.found.push((name, value.shape().num_elements(), grad));
    }
}

fn params(layer: &MoeLayer, grads: Option<&Gradients>) -> Vec<(String, usize, Option<Vec<f32>>)> {
    let mut visit = Params {
        grads,
        path: Vec::new(),
        found: Vec::new(),
    };
    layer.visit(&mut visit);
    visit.found
}

/// Adds `scale · direction` to the `target`-th float parameter (visiting order).
struct Shift<'a> {
    target: usize,
    index: usize,
    direction: &'a [f32],
    scale: f64,
}

impl ModuleMapper for Shift<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let index = self.index;
        self.index += 1;
        if index != self.target {
            return param;
        }
        let (direction, scale) = (self.direction.to_vec(), self.scale);
        param.map(|t| {
            let d = Tensor::<D>::from_data(TensorData::new(direction, t.shape()), &t.device());
            t + d.mul_scalar(scale)
        })
    }
}

fn check(name: &str, analytic: &[f32], direction: &[f32], plus: f64, minus: f64, eps: f64) {
    assert_eq!(analytic.len(), direction.len(), "{name}: gradient size");
    let analytic: f64 = analytic
        .iter()
        .zip(direction)
        .map(|(g, v)| f64::from(*g) * f64::from(*v))
        .sum();
    let numeric = (plus - minus) / (2.0 * eps);
    let err = (analytic - numeric).abs();
    assert!(
        err <= 2e-3 + 1e-2 * numeric.abs(),
        "{name}: autodiff {analytic} vs finite difference {numeric}"
    );
}

#[test]
fn moe_layer_gradients_match_finite_differences() {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let upstream = seeded_tensor([S, B, H], 9, 1.0, &plain);
    let x = seeded_tensor([S, B, H], 1, 1.0, &plain);
    let eps = 1e-3f64;

    // Autodiff gradients of the input and of every parameter.
    let trained = layer(&ad);
    let x_ad = seeded_tensor([S, B, H], 1, 1.0, &ad).require_grad();
    let upstream_ad = seeded_tensor([S, B, H], 9, 1.0, &ad);
    let grads = loss(&trained, x_ad.clone(), &upstream_ad).backward();
    let found = params(&trained, Some(&grads));

    let base = layer(&plain);
    let dx = seeded_tensor([S, B, H], 11, 1.0, &plain);
    check(
        "x",
        &flat(x_ad.grad(&grads).unwrap()),
        &flat(dx.clone()),
        value(loss(
            &base,
            x.clone() + dx.clone().mul_scalar(eps),
            &upstream,
        )),
        value(loss(&base, x.clone() - dx.mul_scalar(eps), &upstream)),
        eps,
    );

    let mut checked_elements = 0;
    for (i, (name, numel, grad)) in found.iter().enumerate() {
        let grad = grad
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let direction = seeded_values(*numel, 100 + i as u64, 1.0);
        let shifted = |scale: f64| {
            base.clone().map(&mut Shift {
                target: i,
                index: 0,
                direction: &direction,
                scale,
            })
        };
        let plus = value(loss(&shifted(eps), x.clone(), &upstream));
        let minus = value(loss(&shifted(-eps), x.clone(), &upstream));
        check(name, grad, &direction, plus, minus, eps);
        checked_elements += numel;
    }
    // Every parameter the module has was perturbed: router, both expert weights, both shared
    // expert weights and the shared gate, counted by Burn itself.
    assert_eq!(checked_elements, trained.num_params());
}
