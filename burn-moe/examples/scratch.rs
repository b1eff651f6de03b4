use burn::tensor::{Device, Int, Tensor};
fn main() {
    let d = Device::flex().autodiff();
    let a = Tensor::<2>::ones([2, 3], &d).require_grad();
    let e = a.clone().slice([0..0, 0..3]);
    println!("slice empty tracked {}", e.is_require_grad());
    let m = e.clone().mul_scalar(0.0);
    println!("mul tracked {}", m.is_require_grad());
    let idx = Tensor::<1, Int>::from_data([0i64; 0].as_slice(), &d);
    let s = e.clone().select(0, idx.clone());
    println!("select tracked {}", s.is_require_grad());
    let z = Tensor::<2>::zeros([4, 3], &d).select_assign(
        0,
        idx,
        m.clone(),
        burn::tensor::IndexingUpdateOp::Add,
    );
    println!("select_assign tracked {}", z.is_require_grad());
    let c = Tensor::cat(vec![e.clone(), e.clone()], 1);
    println!("cat tracked {}", c.is_require_grad());
    let r = e.clone().reshape([0, 3]);
    println!("reshape tracked {}", r.is_require_grad());
}
