//! Small statistics used to show a sale was fair: Spearman rank correlation (arrival order vs
//! queue position should be ≈ 0) and Pearson's chi-square statistic (positions should be
//! uniform).

/// Spearman rank correlation of two equally long samples without ties; `None` below 3 values.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 3 || n != y.len() {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let d2: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - b) * (a - b)).sum();
    let n = n as f64;
    Some(1.0 - 6.0 * d2 / (n * (n * n - 1.0)))
}

fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    for (rank, &i) in order.iter().enumerate() {
        ranks[i] = rank as f64;
    }
    ranks
}

/// Pearson's chi-square statistic of observed counts against a uniform expectation.
pub fn chi_square_uniform(observed: &[u64]) -> f64 {
    let total: u64 = observed.iter().sum();
    if observed.is_empty() || total == 0 {
        return 0.0;
    }
    let expected = total as f64 / observed.len() as f64;
    observed
        .iter()
        .map(|&o| {
            let d = o as f64 - expected;
            d * d / expected
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_identical_and_reversed_ranks() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let rev = [5.0, 4.0, 3.0, 2.0, 1.0];
        assert_eq!(spearman(&x, &x), Some(1.0));
        assert_eq!(spearman(&x, &rev), Some(-1.0));
        assert_eq!(spearman(&x[..2], &x[..2]), None);
    }

    #[test]
    fn chi_square_is_zero_for_a_perfectly_even_count() {
        assert_eq!(chi_square_uniform(&[5, 5, 5, 5]), 0.0);
        assert!((chi_square_uniform(&[10, 0]) - 10.0).abs() < 1e-9);
    }
}
