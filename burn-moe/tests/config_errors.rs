//! Bad configurations and inputs give typed errors naming the field.

use burn::tensor::{Device, Tensor};
use burn_moe::prelude::*;

fn field_of(err: MoeError) -> &'static str {
    match err {
        MoeError::InvalidConfig { field, .. } => field,
        MoeError::ShapeMismatch { name, .. } => name,
        MoeError::InvalidArgument { name, .. } => name,
        other => panic!("unexpected error kind: {other}"),
    }
}

fn config_error(config: RouterConfig) -> &'static str {
    field_of(config.validate().expect_err("config must be rejected"))
}

fn base() -> RouterConfig {
    RouterConfig::new(8, 8, 2)
}

#[test]
fn topk_out_of_range() {
    assert_eq!(config_error(RouterConfig::new(8, 8, 0)), "topk");
    assert_eq!(config_error(RouterConfig::new(8, 8, 9)), "topk");
}

#[test]
fn num_groups_must_divide_experts() {
    assert_eq!(
        config_error(base().with_num_groups(Some(3)).with_group_topk(Some(1))),
        "num_groups"
    );
    assert_eq!(
        config_error(base().with_num_groups(Some(0)).with_group_topk(Some(1))),
        "num_groups"
    );
}

#[test]
fn group_topk_bounds_and_divisibility() {
    // More groups selected than exist.
    assert_eq!(
        config_error(base().with_num_groups(Some(2)).with_group_topk(Some(3))),
        "group_topk"
    );
    // group_topk must divide topk.
    let c = RouterConfig::new(8, 8, 3)
        .with_num_groups(Some(4))
        .with_group_topk(Some(2));
    assert_eq!(config_error(c), "group_topk");
    // One without the other.
    assert_eq!(config_error(base().with_num_groups(Some(4))), "group_topk");
    assert_eq!(config_error(base().with_group_topk(Some(2))), "num_groups");
}

#[test]
fn capacity_factor_must_be_positive() {
    for cf in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            config_error(base().with_capacity_factor(Some(cf))),
            "capacity_factor",
            "{cf}"
        );
    }
    assert_eq!(
        config_error(base().with_pad_to_capacity(true)),
        "pad_to_capacity"
    );
}

#[test]
fn expert_bias_needs_sigmoid() {
    assert_eq!(config_error(base().with_expert_bias(true)), "expert_bias");
    assert!(
        base()
            .with_expert_bias(true)
            .with_score_function(ScoreFunction::Sigmoid)
            .validate()
            .is_ok()
    );
}

#[test]
fn top1_softmax_needs_pre_softmax() {
    assert_eq!(config_error(RouterConfig::new(8, 8, 1)), "pre_softmax");
    assert!(
        RouterConfig::new(8, 8, 1)
            .with_pre_softmax(true)
            .validate()
            .is_ok()
    );
    assert!(
        RouterConfig::new(8, 8, 1)
            .with_score_function(ScoreFunction::Sigmoid)
            .validate()
            .is_ok()
    );
}

#[test]
fn negative_loss_coefficients_and_sinkhorn_with_aux() {
    assert_eq!(
        config_error(base().with_aux_loss_coeff(-0.1)),
        "aux_loss_coeff"
    );
    assert_eq!(
        config_error(base().with_z_loss_coeff(Some(f64::NAN))),
        "z_loss_coeff"
    );
    assert_eq!(
        config_error(
            base()
                .with_routing(RoutingType::Sinkhorn)
                .with_aux_loss_coeff(0.01)
        ),
        "routing"
    );
    assert_eq!(
        config_error(base().with_scaling_factor(Some(0.0))),
        "scaling_factor"
    );
}

#[test]
fn shape_mismatches_between_input_and_weights() {
    let d = Device::flex();
    let config = RouterConfig::new(8, 4, 2);
    let err = Router::from_weight(config.clone(), Tensor::zeros([4, 7], &d)).unwrap_err();
    assert_eq!(field_of(err), "router weight");
    let router = Router::from_weight(config, Tensor::zeros([4, 8], &d)).unwrap();
    let err = router.forward(Tensor::zeros([3, 2, 5], &d)).unwrap_err();
    assert_eq!(field_of(err), "router input");
    let err = router
        .route(Tensor::zeros([6, 5], &d), 6, 1, RouteOptions::default())
        .unwrap_err();
    assert_eq!(field_of(err), "logits");
    let err = router
        .route(Tensor::zeros([6, 4], &d), 4, 2, RouteOptions::default())
        .unwrap_err();
    assert_eq!(field_of(err), "seq_len");

    let experts = ExpertsConfig::new(4, 8, 6);
    let err = Experts::from_weights(
        experts.clone(),
        Tensor::zeros([4, 8, 6], &d),
        Tensor::zeros([4, 6, 8], &d),
    )
    .unwrap_err();
    assert_eq!(field_of(err), "w1", "SwiGLU needs fc1 width 2F");
    let err = Experts::from_weights(
        experts,
        Tensor::zeros([4, 8, 12], &d),
        Tensor::zeros([3, 6, 8], &d),
    )
    .unwrap_err();
    assert_eq!(field_of(err), "w2");

    let mut layer = MoeLayerConfig::swiglu(8, 6, 4, 2);
    layer.experts.num_experts = 5;
    assert_eq!(
        field_of(layer.validate().unwrap_err()),
        "experts.num_experts"
    );
    let layer = MoeLayerConfig::swiglu(8, 6, 4, 2).init(&d).unwrap();
    assert_eq!(
        field_of(layer.forward(Tensor::zeros([2, 2, 9], &d)).unwrap_err()),
        "x"
    );
}

#[test]
fn non_finite_logits_are_an_error() {
    let d = Device::flex();
    let router = RouterConfig::new(2, 4, 2).init(&d).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let logits = Tensor::<2>::from_floats([[0.1, 0.2, bad, 0.0], [0.0, 0.0, 0.0, 1.0]], &d);
        let err = router
            .route(logits, 2, 1, RouteOptions::default())
            .unwrap_err();
        assert_eq!(err, MoeError::NonFiniteLogits { count: 1 }, "{bad}");
    }
    // A NaN input reaches the logits through the gate.
    let x = Tensor::<3>::from_floats([[[f32::NAN, 1.0]]], &d);
    assert!(matches!(
        router.forward(x),
        Err(MoeError::NonFiniteLogits { .. })
    ));
}
