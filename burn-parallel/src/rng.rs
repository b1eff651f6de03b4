//! The workspace's seeded generator: SplitMix64 used as a counter-based generator, so any
//! value is a pure function of its key (a sample can be drawn without drawing the ones before
//! it; a shard of a tensor can be drawn without the rest).

use burn::tensor::TensorData;

/// SplitMix64's output function of `z`.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable 64-bit key of a name (FNV-1a): the same on every machine, Rust version and run,
/// unlike `std`'s hasher; for seeding a stream by a name or identifying a host.
pub fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A uniform number in `[0, 1)` from `key`.
pub fn unit(key: u64) -> f64 {
    (mix(key) >> 11) as f64 / (1u64 << 53) as f64
}

/// Normal(0, `std`) values of `shape` from `(seed, stream)` (Box–Muller; element `i` is a pure
/// function of `(seed, stream, i)`).
pub fn normal(seed: u64, stream: u64, shape: Vec<usize>, std: f64) -> TensorData {
    let n: usize = shape.iter().product();
    TensorData::new(normal_values(seed, stream, 0..n, std), shape)
}

/// The sub-block `block` (one range per dimension) of [`normal`]`(seed, stream, shape, std)`,
/// drawn without the rest of the tensor: shape `[block[0].len(), block[1].len(), …]`. How a
/// rank draws its shard of a tensor split along any dimensions (the experts of its
/// expert-parallel rank and the columns of its expert-tensor-parallel rank).
pub fn normal_block(
    seed: u64,
    stream: u64,
    shape: &[usize],
    block: &[std::ops::Range<usize>],
    std: f64,
) -> TensorData {
    let values = block_runs(shape, block)
        .flat_map(|run| normal_values(seed, stream, run, std))
        .collect();
    TensorData::new(values, block.iter().map(|r| r.len()).collect::<Vec<_>>())
}

/// The flat (row-major) index ranges of tensor `shape` that sub-block `block` covers, in
/// order: one contiguous run per index of the leading dimensions (a run spans the last
/// dimension's range). Empty for an empty block or a block outside the shape.
pub fn block_runs(
    shape: &[usize],
    block: &[std::ops::Range<usize>],
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let d = shape.len();
    let valid = d > 0
        && block.len() == d
        && block
            .iter()
            .zip(shape)
            .all(|(r, &n)| r.start <= r.end && r.end <= n)
        && block.iter().all(|r| !r.is_empty());
    let mut strides = vec![1usize; d];
    for i in (0..d.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let outer: usize = if valid {
        block[..d - 1].iter().map(|r| r.len()).product()
    } else {
        0
    };
    let block = block.to_vec();
    (0..outer).map(move |mut o| {
        // The o-th index of the leading dimensions, last of them fastest.
        let mut start = 0;
        for i in (0..d - 1).rev() {
            let len = block[i].len();
            start += (block[i].start + o % len) * strides[i];
            o /= len;
        }
        let last = &block[d - 1];
        start + last.start..start + last.end
    })
}

/// Elements `range` of the flattened [`normal`] tensor of `(seed, stream)`.
fn normal_values(seed: u64, stream: u64, range: std::ops::Range<usize>, std: f64) -> Vec<f32> {
    let base = mix(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    range
        .map(|i| {
            let a = mix(base.wrapping_add(2 * i as u64));
            let b = mix(base.wrapping_add(2 * i as u64 + 1));
            let u1 = ((a >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

/// `n` values uniform in `[-scale, scale)` from `seed` (value `i` a pure function of
/// `(seed, i)`): the inputs of tests, examples and check programs.
pub fn uniform_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let base = mix(seed);
    (0..n)
        .map(|i| (unit(base.wrapping_add(i as u64)) * 2.0 - 1.0) as f32 * scale)
        .collect()
}

/// A seeded stream of draws (SplitMix64's sequence: draw `k` is [`unit`] of
/// `seed + k·0x9E3779B97F4A7C15`), for sequential choices such as timesteps, clips of a batch
/// or caption dropout.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        let v = unit(self.0);
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        v
    }

    /// Uniform in `0..n` (`n` at least 1).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_key_is_fnv_1a() {
        // The published FNV-1a 64-bit test vectors.
        assert_eq!(name_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_key("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(name_key("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn normal_values_are_standardised_and_reproducible() {
        let a = normal(7, 3, vec![4000], 2.0).try_to_vec::<f32>().unwrap();
        assert_eq!(
            a,
            normal(7, 3, vec![4000], 2.0).try_to_vec::<f32>().unwrap()
        );
        assert_ne!(
            a,
            normal(7, 4, vec![4000], 2.0).try_to_vec::<f32>().unwrap()
        );
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.1, "{mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.1, "{var}");
        let full = normal(7, 3, vec![10, 4, 3], 2.0)
            .try_to_vec::<f32>()
            .unwrap();
        // A block drawn alone is the full tensor's block.
        let block = normal_block(7, 3, &[10, 4, 3], &[2..5, 1..3, 1..3], 2.0);
        assert_eq!(block.shape().as_slice(), [3, 2, 2]);
        let mut want = Vec::new();
        for a in 2..5 {
            for b in 1..3 {
                for c in 1..3 {
                    want.push(full[a * 12 + b * 3 + c]);
                }
            }
        }
        assert_eq!(block.try_to_vec::<f32>().unwrap(), want);
        let u: Vec<f64> = (0..1000).map(unit).collect();
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
    }
}
