//! Multi-rank check (run under `mpirun -np N`): every collective, on the world and on split
//! groups, host buffers (f32 and bf16) and differentiable tensor mappings (forward and
//! backward), against its definition computed locally from every rank's known inputs.
//! Rank 0 prints `collectives: N checks passed`; any mismatch exits non-zero.

use std::process::ExitCode;
use std::sync::Arc;

use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_parallel::comm::mpi::{MpiWorld, bytes_copied, bytes_sent};
use burn_parallel::comm::{Communicator, ReduceOp};
use burn_parallel::group::{self, Group};
use burn_parallel::launch::check_program;
use burn_parallel::ops::GatherGrad;
use burn_parallel::{mappings, transfers};
use half::bf16;

/// Exact in f32 and bf16: multiples of 0.25 in [-2, 3.5].
fn val(seed: usize, rank: usize, i: usize) -> f32 {
    ((seed * 7 + rank * 131 + i * 17) % 23) as f32 * 0.25 - 2.0
}

fn data(seed: usize, rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| val(seed, rank, i)).collect()
}

struct Checker {
    passed: usize,
    failures: Vec<String>,
}

impl Checker {
    fn eq(&mut self, what: &str, got: &[f32], want: &[f32]) {
        let same = got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
        if same {
            self.passed += 1;
        } else {
            let show = |v: &[f32]| format!("{:?}", &v[..v.len().min(12)]);
            self.failures.push(format!(
                "{what}: got {} (len {}), want {} (len {})",
                show(got),
                got.len(),
                show(want),
                want.len()
            ));
        }
    }

    fn ok<T>(&mut self, what: &str, r: burn_parallel::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.failures.push(format!("{what}: {e}"));
                None
            }
        }
    }
}

fn host_checks(c: &mut Checker, comm: &dyn Communicator, label: &str) {
    let (r, g) = (comm.rank(), comm.size());
    let n = 6;
    let all: Vec<Vec<f32>> = (0..g).map(|p| data(1, p, n * g)).collect();
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        let mut buf = all[r].clone();
        if c.ok("all_reduce", comm.all_reduce(&mut buf, op)).is_some() {
            let want: Vec<f32> = (0..n * g)
                .map(|i| {
                    let v = all.iter().map(|a| a[i]);
                    match op {
                        ReduceOp::Sum => v.sum(),
                        ReduceOp::Avg => v.sum::<f32>() / g as f32,
                        ReduceOp::Max => v.fold(f32::NEG_INFINITY, f32::max),
                    }
                })
                .collect();
            c.eq(&format!("{label} all_reduce {op:?}"), &buf, &want);
        }
        if let Some(out) = c.ok("reduce_scatter", comm.reduce_scatter(&all[r], op)) {
            let want: Vec<f32> = (r * n..(r + 1) * n)
                .map(|i| {
                    let v = all.iter().map(|a| a[i]);
                    match op {
                        ReduceOp::Sum => v.sum(),
                        ReduceOp::Avg => v.sum::<f32>() / g as f32,
                        ReduceOp::Max => v.fold(f32::NEG_INFINITY, f32::max),
                    }
                })
                .collect();
            c.eq(&format!("{label} reduce_scatter {op:?}"), &out, &want);
        }
    }
    // bf16 paths.
    let mut b: Vec<bf16> = all[r].iter().map(|&v| bf16::from_f32(v)).collect();
    if c.ok(
        "all_reduce_bf16",
        comm.all_reduce_bf16(&mut b, ReduceOp::Sum),
    )
    .is_some()
    {
        let want: Vec<f32> = (0..n * g).map(|i| all.iter().map(|a| a[i]).sum()).collect();
        let got: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
        c.eq(&format!("{label} all_reduce_bf16"), &got, &want);
    }
    let mine: Vec<bf16> = data(2, r, n).iter().map(|&v| bf16::from_f32(v)).collect();
    let before = bytes_sent();
    if let Some(out) = c.ok("all_gather_bf16", comm.all_gather_bf16(&mine)) {
        // bf16 travels as its 16 bits: 2 bytes a value handed to MPI, not 4.
        c.eq(
            &format!("{label} all_gather_bf16 bytes sent"),
            &[(bytes_sent() - before) as f32],
            &[(2 * n) as f32],
        );
        let want: Vec<f32> = (0..g).flat_map(|p| data(2, p, n)).collect();
        let got: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
        c.eq(&format!("{label} all_gather_bf16"), &got, &want);
    }
    // bf16 all-to-all-v and all-gather-v: rank p sends (q + p) % 3 values to rank q.
    let to = |p: usize, q: usize| (q + p) % 3;
    let send: Vec<bf16> = (0..g)
        .flat_map(|q| data(40 + q, r, to(r, q)))
        .map(bf16::from_f32)
        .collect();
    let sc: Vec<usize> = (0..g).map(|q| to(r, q)).collect();
    let rc: Vec<usize> = (0..g).map(|p| to(p, r)).collect();
    let before = bytes_sent();
    if let Some(out) = c.ok("all_to_all_v_bf16", comm.all_to_all_v_bf16(&send, &sc, &rc)) {
        c.eq(
            &format!("{label} all_to_all_v_bf16 bytes sent"),
            &[(bytes_sent() - before) as f32],
            &[(2 * send.len()) as f32],
        );
        let want: Vec<f32> = (0..g).flat_map(|p| data(40 + r, p, to(p, r))).collect();
        let got: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
        c.eq(&format!("{label} all_to_all_v_bf16"), &got, &want);
    }
    let counts: Vec<usize> = (0..g).map(|p| (p * 3) % 4).collect();
    let mine: Vec<bf16> = data(50, r, counts[r])
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    if let Some(out) = c.ok("all_gather_v_bf16", comm.all_gather_v_bf16(&mine, &counts)) {
        let want: Vec<f32> = (0..g).flat_map(|p| data(50, p, counts[p])).collect();
        let got: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
        c.eq(&format!("{label} all_gather_v_bf16"), &got, &want);
    }
    // all-gather, equal and uneven (with a zero count).
    if let Some(out) = c.ok("all_gather", comm.all_gather(&data(3, r, n))) {
        let want: Vec<f32> = (0..g).flat_map(|p| data(3, p, n)).collect();
        c.eq(&format!("{label} all_gather"), &out, &want);
    }
    let counts: Vec<usize> = (0..g).map(|p| (p * 3) % 4).collect();
    if let Some(out) = c.ok(
        "all_gather_v",
        comm.all_gather_v(&data(4, r, counts[r]), &counts),
    ) {
        let want: Vec<f32> = (0..g).flat_map(|p| data(4, p, counts[p])).collect();
        c.eq(&format!("{label} all_gather_v"), &out, &want);
    }
    // all-to-all-v with uneven and zero counts: rank p sends (p + q) % 3 values to q.
    let count = |p: usize, q: usize| (p + 2 * q) % 3;
    let send_counts: Vec<usize> = (0..g).map(|q| count(r, q)).collect();
    let recv_counts: Vec<usize> = (0..g).map(|p| count(p, r)).collect();
    let payload = |p: usize| -> Vec<f32> {
        (0..g)
            .flat_map(|q| (0..count(p, q)).map(move |i| (p * 100 + q * 10 + i) as f32))
            .collect()
    };
    if let Some(out) = c.ok(
        "all_to_all_v",
        comm.all_to_all_v(&payload(r), &send_counts, &recv_counts),
    ) {
        let want: Vec<f32> = (0..g)
            .flat_map(|p| (0..count(p, r)).map(move |i| (p * 100 + r * 10 + i) as f32))
            .collect();
        c.eq(&format!("{label} all_to_all_v"), &out, &want);
    }
    // Broadcast from the last rank, bytes from rank 0.
    let mut buf = data(5, r, n);
    if c.ok("broadcast", comm.broadcast(&mut buf, g - 1)).is_some() {
        c.eq(&format!("{label} broadcast"), &buf, &data(5, g - 1, n));
    }
    let mut bytes = if r == 0 {
        b"burn-parallel".to_vec()
    } else {
        Vec::new()
    };
    if c.ok("broadcast_bytes", comm.broadcast_bytes(&mut bytes, 0))
        .is_some()
    {
        let got: Vec<f32> = bytes.iter().map(|&b| b as f32).collect();
        let want: Vec<f32> = b"burn-parallel".iter().map(|&b| b as f32).collect();
        c.eq(&format!("{label} broadcast_bytes"), &got, &want);
    }
    // Ring send/recv: even ranks send first, odd ranks receive first.
    if g > 1 {
        let (next, prev) = ((r + 1) % g, (r + g - 1) % g);
        let msg = data(6, r, n);
        let got = if r % 2 == 0 {
            c.ok("send", comm.send(&msg, next, 7));
            c.ok("recv", comm.recv(n, prev, 7))
        } else {
            let got = c.ok("recv", comm.recv(n, prev, 7));
            c.ok("send", comm.send(&msg, next, 7));
            got
        };
        if let Some(got) = got {
            c.eq(&format!("{label} send/recv"), &got, &data(6, prev, n));
        }
        // Posted sends both ways before any receive, three in a row, each far above MPI's
        // eager limit (blocking sends would deadlock here): they arrive in order.
        let big = 1 << 18;
        for i in 0..3 {
            c.ok("post_send", comm.post_send(data(20 + i, r, big), next, 8));
            c.ok("post_send", comm.post_send(data(30 + i, r, big), prev, 9));
        }
        for i in 0..3 {
            if let Some(got) = c.ok("recv", comm.recv(big, prev, 8)) {
                c.eq(
                    &format!("{label} posted send {i} from prev"),
                    &got,
                    &data(20 + i, prev, big),
                );
            }
            if let Some(got) = c.ok("recv", comm.recv(big, next, 9)) {
                c.eq(
                    &format!("{label} posted send {i} from next"),
                    &got,
                    &data(30 + i, next, big),
                );
            }
        }
        c.ok("flush_sends", comm.flush_sends());
        // A posted bf16 send (pipeline activations of a bf16 model) hands MPI 2 bytes a value.
        let half: Vec<bf16> = data(40, r, big)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let before = bytes_sent();
        c.ok("post_send_bf16", comm.post_send_bf16(half, next, 10));
        c.eq(
            &format!("{label} post_send_bf16 bytes sent"),
            &[(bytes_sent() - before) as f32],
            &[(2 * big) as f32],
        );
        if let Some(got) = c.ok("recv_bf16", comm.recv_bf16(big, prev, 10)) {
            let want: Vec<f32> = data(40, prev, big)
                .iter()
                .map(|&v| bf16::from_f32(v).to_f32())
                .collect();
            let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
            c.eq(&format!("{label} posted bf16 send"), &got, &want);
        }
        c.ok("flush_sends", comm.flush_sends());
    }
    c.ok("barrier", comm.barrier());
}

fn tensor(v: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn read(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap_or_default()
}

/// Forward `f(x)`, loss `sum(f(x) · w)`; returns (output, dloss/dx).
fn fwd_bwd(
    x: Vec<f32>,
    xs: [usize; 2],
    w: impl Fn([usize; 2]) -> Vec<f32>,
    f: impl Fn(Tensor<2>) -> burn_parallel::Result<Tensor<2>>,
    device: &Device,
) -> burn_parallel::Result<(Vec<f32>, Vec<f32>)> {
    let x = tensor(x, xs, device).require_grad();
    let y = f(x.clone())?;
    let ys = y.dims();
    let loss = (y.clone() * tensor(w(ys), ys, device)).sum();
    let grads = loss.backward();
    group::check()?;
    let gx = x.grad(&grads).map(read).unwrap_or_default();
    Ok((read(y), gx))
}

fn tensor_checks(c: &mut Checker, g_: &Group, label: &str) {
    let device = Device::flex().autodiff();
    let (r, g) = (g_.rank(), g_.size());
    let (rows, cols) = (2 * g, 3 * g);
    let x = |p: usize| data(10, p, rows * cols);
    let w = |p: usize, len: usize| data(11, p, len);
    // Column chunk `q` (of g) of a row-major [rows, cols] buffer.
    let col_chunk = |v: &[f32], q: usize, cols: usize| -> Vec<f32> {
        let k = cols / g;
        (0..v.len() / cols)
            .flat_map(|i| v[i * cols + q * k..i * cols + (q + 1) * k].to_vec())
            .collect()
    };
    let row_chunk = |v: &[f32], q: usize, cols: usize| -> Vec<f32> {
        let k = v.len() / cols / g;
        v[q * k * cols..(q + 1) * k * cols].to_vec()
    };
    let concat_cols = |parts: Vec<Vec<f32>>, k: usize| -> Vec<f32> {
        let nrows = parts[0].len() / k;
        (0..nrows)
            .flat_map(|i| {
                parts
                    .iter()
                    .flat_map(move |p| p[i * k..(i + 1) * k].to_vec())
            })
            .collect()
    };
    let sum_all = |f: &dyn Fn(usize) -> Vec<f32>| -> Vec<f32> {
        let mut acc = f(0);
        for p in 1..g {
            for (a, b) in acc.iter_mut().zip(f(p)) {
                *a += b;
            }
        }
        acc
    };
    let shape = [rows, cols];
    let n = rows * cols;

    if let Some((y, gx)) = c.ok(
        "copy_to_region",
        fwd_bwd(
            x(r),
            shape,
            |_| w(r, n),
            |t| mappings::copy_to_region(t, g_),
            &device,
        ),
    ) {
        c.eq(&format!("{label} copy_to_region fwd"), &y, &x(r));
        c.eq(
            &format!("{label} copy_to_region bwd"),
            &gx,
            &sum_all(&|p| w(p, n)),
        );
    }
    if let Some((y, gx)) = c.ok(
        "reduce_from_region",
        fwd_bwd(
            x(r),
            shape,
            |_| w(r, n),
            |t| mappings::reduce_from_region(t, g_),
            &device,
        ),
    ) {
        c.eq(&format!("{label} reduce_from_region fwd"), &y, &sum_all(&x));
        c.eq(&format!("{label} reduce_from_region bwd"), &gx, &w(r, n));
    }
    let k = cols / g;
    if let Some((y, gx)) = c.ok(
        "scatter_to_region",
        fwd_bwd(
            x(r),
            shape,
            |_| w(r, rows * k),
            |t| mappings::scatter_to_region(t, g_),
            &device,
        ),
    ) {
        c.eq(
            &format!("{label} scatter_to_region fwd"),
            &y,
            &col_chunk(&x(r), r, cols),
        );
        let want = concat_cols((0..g).map(|p| w(p, rows * k)).collect(), k);
        c.eq(&format!("{label} scatter_to_region bwd"), &gx, &want);
    }
    // The split exchanges nothing: it is cut on the device, with no host transfer.
    let t = tensor(x(r), shape, &device);
    let (split, log) = transfers::measure(|| mappings::scatter_to_region(t, g_));
    if c.ok("split on the device", split).is_some() {
        c.eq(
            &format!("{label} split host transfers"),
            &[log.len() as f32],
            &[0.0],
        );
    }
    if let Some((y, gx)) = c.ok(
        "gather_from_region",
        fwd_bwd(
            x(r),
            shape,
            |_| w(r, n * g),
            |t| mappings::gather_from_region(t, g_),
            &device,
        ),
    ) {
        c.eq(
            &format!("{label} gather_from_region fwd"),
            &y,
            &concat_cols((0..g).map(x).collect(), cols),
        );
        c.eq(
            &format!("{label} gather_from_region bwd"),
            &gx,
            &col_chunk(&w(r, n * g), r, cols * g),
        );
    }
    if let Some((y, gx)) = c.ok(
        "gather_from_sequence_region",
        fwd_bwd(
            x(r),
            shape,
            |_| w(r, n * g),
            |t| mappings::gather_from_sequence_region(t, g_, GatherGrad::ReduceScatter),
            &device,
        ),
    ) {
        let want: Vec<f32> = (0..g).flat_map(x).collect();
        c.eq(
            &format!("{label} gather_from_sequence_region fwd"),
            &y,
            &want,
        );
        let want = sum_all(&|p| row_chunk(&w(p, n * g), r, cols));
        c.eq(
            &format!("{label} gather_from_sequence_region bwd"),
            &gx,
            &want,
        );
    }
    if let Some((y, gx)) = c.ok(
        "reduce_scatter_to_sequence_region",
        fwd_bwd(
            x(r),
            shape,
            |_| w(r, n / g),
            |t| mappings::reduce_scatter_to_sequence_region(t, g_),
            &device,
        ),
    ) {
        c.eq(
            &format!("{label} reduce_scatter_to_sequence_region fwd"),
            &y,
            &row_chunk(&sum_all(&x), r, cols),
        );
        let want: Vec<f32> = (0..g).flat_map(|p| w(p, n / g)).collect();
        c.eq(
            &format!("{label} reduce_scatter_to_sequence_region bwd"),
            &gx,
            &want,
        );
    }
    // all-to-all-v over rows with uneven and zero counts.
    let count = |p: usize, q: usize| (p + 2 * q) % 3;
    let width = 2;
    let rows_of = |p: usize| -> Vec<f32> {
        (0..g)
            .flat_map(|q| (0..count(p, q) * width).map(move |i| (p * 1000 + q * 100 + i) as f32))
            .collect()
    };
    let send: Vec<usize> = (0..g).map(|q| count(r, q)).collect();
    let recv: Vec<usize> = (0..g).map(|p| count(p, r)).collect();
    let sent_rows: usize = send.iter().sum();
    let recv_rows: usize = recv.iter().sum();
    // Gradient seed: row j of the output gets value 7 * j + column.
    let wv = |len: usize| {
        (0..len)
            .map(|i| (7 * (i / width) + i % width) as f32)
            .collect()
    };
    if let Some((y, gx)) = c.ok(
        "all_to_all_v",
        fwd_bwd(
            rows_of(r),
            [sent_rows, width],
            |_| wv(recv_rows * width),
            |t| mappings::all_to_all_v(t, g_, &send, &recv),
            &device,
        ),
    ) {
        let want: Vec<f32> = (0..g)
            .flat_map(|p| (0..count(p, r) * width).map(move |i| (p * 1000 + r * 100 + i) as f32))
            .collect();
        c.eq(&format!("{label} all_to_all_v fwd"), &y, &want);
        // Backward: rank q's output rows from p carry q's seed; they come back to p in order.
        let mut want = Vec::new();
        for q in 0..g {
            let offset: usize = (0..r).map(|p| count(p, q)).sum();
            for j in 0..count(r, q) {
                for col in 0..width {
                    want.push((7 * (offset + j) + col) as f32);
                }
            }
        }
        c.eq(&format!("{label} all_to_all_v bwd"), &gx, &want);
    }
    // Uneven row counts (one rank may have none): gather-v and reduce-scatter-v.
    let vc: Vec<usize> = (0..g).map(|p| (2 * p + 1) % 3).collect();
    let total: usize = vc.iter().sum();
    let off: usize = vc[..r].iter().sum();
    let seg =
        |v: Vec<f32>, start: usize, len: usize| v[start * width..(start + len) * width].to_vec();
    if let Some((y, gx)) = c.ok(
        "gather_rows_v",
        fwd_bwd(
            data(20, r, vc[r] * width),
            [vc[r], width],
            |_| data(21, r, total * width),
            |t| mappings::gather_rows_v(t, g_, &vc),
            &device,
        ),
    ) {
        let want: Vec<f32> = (0..g).flat_map(|p| data(20, p, vc[p] * width)).collect();
        c.eq(&format!("{label} gather_rows_v fwd"), &y, &want);
        let mut want = vec![0f32; vc[r] * width];
        for p in 0..g {
            for (a, b) in want
                .iter_mut()
                .zip(seg(data(21, p, total * width), off, vc[r]))
            {
                *a += b;
            }
        }
        c.eq(&format!("{label} gather_rows_v bwd"), &gx, &want);
    }
    if let Some((y, gx)) = c.ok(
        "reduce_scatter_rows_v",
        fwd_bwd(
            data(22, r, total * width),
            [total, width],
            |_| data(23, r, vc[r] * width),
            |t| mappings::reduce_scatter_rows_v(t, g_, &vc),
            &device,
        ),
    ) {
        let mut want = vec![0f32; vc[r] * width];
        for p in 0..g {
            for (a, b) in want
                .iter_mut()
                .zip(seg(data(22, p, total * width), off, vc[r]))
            {
                *a += b;
            }
        }
        c.eq(&format!("{label} reduce_scatter_rows_v fwd"), &y, &want);
        let want: Vec<f32> = (0..g).flat_map(|p| data(23, p, vc[p] * width)).collect();
        c.eq(&format!("{label} reduce_scatter_rows_v bwd"), &gx, &want);
    }
    // bf16 tensors: gather along the last dim and a reduction, forward and backward; the
    // gather hands MPI 2 bytes a value (the tensor's own type on the wire).
    let xb = tensor(x(r), shape, &device)
        .cast(DType::BF16)
        .require_grad();
    let before = bytes_sent();
    let gathered = mappings::gather_from_region(xb.clone(), g_);
    if g > 1 {
        c.eq(
            &format!("{label} bf16 tensor gather bytes sent"),
            &[(bytes_sent() - before) as f32],
            &[(2 * n) as f32],
        );
    }
    // The tensor collectives hand MPI the values they read from the tensor as they are (no
    // copy into an engine buffer, bf16 reinterpreted in place); a slice method copies them.
    let before = bytes_copied();
    let t = tensor(x(r), shape, &device);
    let copied_nothing = [
        mappings::gather_from_region(t.clone(), g_).map(|_| ()),
        mappings::all_reduce(t.clone(), g_, ReduceOp::Sum).map(|_| ()),
        mappings::reduce_scatter_to_sequence_region(t.clone(), g_).map(|_| ()),
        mappings::gather_from_region(t.cast(DType::BF16), g_).map(|_| ()),
    ];
    if g > 1 && copied_nothing.iter().all(|r| r.is_ok()) {
        c.eq(
            &format!("{label} tensor collectives: bytes copied for MPI"),
            &[(bytes_copied() - before) as f32],
            &[0.0],
        );
        let before = bytes_copied();
        let sliced = g_
            .communicator()
            .and_then(|comm| comm.all_gather(&x(r)).map(|_| ()));
        if c.ok("slice all_gather", sliced).is_some() {
            c.eq(
                &format!("{label} a slice all_gather: bytes copied for MPI"),
                &[(bytes_copied() - before) as f32],
                &[(4 * n) as f32],
            );
        }
    }
    let yb = gathered.and_then(|y| mappings::reduce_from_region(y, g_));
    if let Some(yb) = c.ok("bf16 gather+reduce", yb) {
        let dtype_ok = yb.dtype() == DType::BF16;
        c.eq(
            &format!("{label} bf16 dtype kept"),
            &[f32::from(u8::from(dtype_ok))],
            &[1.0],
        );
        let got = read(yb.clone().cast(DType::F32));
        // Every rank gathered the same concatenation, so the reduction is g times it.
        let gathered = concat_cols((0..g).map(x).collect(), cols);
        let want_sum: Vec<f32> = gathered.iter().map(|v| v * g as f32).collect();
        c.eq(&format!("{label} bf16 gather+reduce fwd"), &got, &want_sum);
        let grads = yb.sum().backward();
        if c.ok("bf16 backward", group::check()).is_some() {
            let gx = xb
                .grad(&grads)
                .map(|t| read(t.cast(DType::F32)))
                .unwrap_or_default();
            c.eq(
                &format!("{label} bf16 gather+reduce bwd"),
                &gx,
                &vec![1.0; n],
            );
        }
    }
    // Non-differentiable all-reduce (max).
    let t = tensor(x(r), shape, &device);
    if let Some(y) = c.ok("all_reduce", mappings::all_reduce(t, g_, ReduceOp::Max)) {
        let want: Vec<f32> = (0..n)
            .map(|i| (0..g).map(|p| x(p)[i]).fold(f32::NEG_INFINITY, f32::max))
            .collect();
        c.eq(&format!("{label} all_reduce max"), &read(y), &want);
    }
}

fn run(world: &MpiWorld) -> Result<(usize, Vec<String>), String> {
    let comm = world.communicator();
    let mut c = Checker {
        passed: 0,
        failures: Vec::new(),
    };
    host_checks(&mut c, comm.as_ref(), "world");
    tensor_checks(
        &mut c,
        &Group::new(comm.clone()).map_err(|e| e.to_string())?,
        "world",
    );
    // Split by parity, keyed in reverse: exercises sub-groups and rank reordering.
    let sub: Arc<dyn Communicator> = comm
        .split(
            Some((comm.rank() % 2) as u32),
            (comm.size() - comm.rank()) as u32,
        )
        .map_err(|e| e.to_string())?
        .ok_or("split returned no group")?;
    let want: Vec<usize> = (0..comm.size())
        .rev()
        .filter(|p| p % 2 == comm.rank() % 2)
        .collect();
    c.eq(
        "split world ranks",
        &sub.world_ranks()
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>(),
        &want.iter().map(|&v| v as f32).collect::<Vec<_>>(),
    );
    host_checks(&mut c, sub.as_ref(), "parity");
    tensor_checks(
        &mut c,
        &Group::new(sub).map_err(|e| e.to_string())?,
        "parity",
    );
    Ok((c.passed, c.failures))
}

fn main() -> ExitCode {
    check_program(|world| {
        let (passed, failures) = run(world)?;
        let line = format!(
            "collectives ({} ranks): {passed} checks passed",
            world.size()
        );
        Ok((line, failures))
    })
}
