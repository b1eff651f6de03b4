//! Tile tables of the grouped GEMM (host side): one row `[i0, i1, r0, r1, a_off, b_off,
//! c_off]` per output tile, so one launch covers every group without padding.

/// Tiles of at most `tile` rows over each group's rows (`counts[g]` consecutive rows): the
/// forward layouts, where output rows are input rows. `per_group(g)` gives the reduction
/// range and the operand offsets of group `g`. Empty groups get no tile.
pub(crate) fn row_tiles(
    counts: &[usize],
    tile: usize,
    per_group: impl Fn(usize) -> (usize, usize, usize, usize, usize),
) -> Vec<usize> {
    let mut table = Vec::new();
    let mut start = 0;
    for (g, &count) in counts.iter().enumerate() {
        let (r0, r1, a_off, b_off, c_off) = per_group(g);
        let end = start + count;
        let mut i0 = start;
        while i0 < end {
            let i1 = (i0 + tile).min(end);
            table.extend([i0, i1, r0, r1, a_off, b_off, c_off]);
            i0 = i1;
        }
        start = end;
    }
    table
}

/// Tiles of at most `tile` rows over `0..rows` for every group, reducing over that group's
/// rows: the weight-gradient layout (`[G, K, M]` output). Empty groups still get their tiles
/// (with an empty reduction, which writes zeros).
pub(crate) fn weight_tiles(
    counts: &[usize],
    rows: usize,
    tile: usize,
    per_group: impl Fn(usize) -> (usize, usize, usize),
) -> Vec<usize> {
    let mut table = Vec::new();
    let mut start = 0;
    for (g, &count) in counts.iter().enumerate() {
        let (a_off, b_off, c_off) = per_group(g);
        let mut i0 = 0;
        while i0 < rows {
            let i1 = (i0 + tile).min(rows);
            table.extend([i0, i1, start, start + count, a_off, b_off, c_off]);
            i0 = i1;
        }
        start += count;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_tiles_cover_every_row_once_and_skip_empty_groups() {
        let counts = [3, 0, 130, 1];
        let table = row_tiles(&counts, 64, |g| (0, 8, 0, g * 100, 0));
        let rows: Vec<[usize; 7]> = table
            .chunks(7)
            .map(|c| c.try_into().expect("7 entries"))
            .collect();
        assert_eq!(
            rows,
            vec![
                [0, 3, 0, 8, 0, 0, 0],
                [3, 67, 0, 8, 0, 200, 0],
                [67, 131, 0, 8, 0, 200, 0],
                [131, 133, 0, 8, 0, 200, 0],
                [133, 134, 0, 8, 0, 300, 0],
            ]
        );
    }

    #[test]
    fn weight_tiles_reduce_over_each_group_even_when_empty() {
        let table = weight_tiles(&[2, 0, 5], 70, 64, |g| (0, 0, g * 1000));
        let rows: Vec<&[usize]> = table.chunks(7).collect();
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0], &[0, 64, 0, 2, 0, 0, 0]);
        assert_eq!(rows[1], &[64, 70, 0, 2, 0, 0, 0]);
        assert_eq!(rows[2], &[0, 64, 2, 2, 0, 0, 1000]);
        assert_eq!(rows[5], &[64, 70, 2, 7, 0, 0, 2000]);
    }
}
