//! Latency histograms' quantiles: the one estimate the proxy's metrics (`graven top`) and
//! the chaos checker read from bucket counts, so the two never disagree. Pure; names no other
//! module, so every layer may use it.

/// Estimates quantile `q` of a latency histogram, `counts[i]` requests having taken at most
/// `bounds_us[i]` (the last count, past every bound, is the unbounded bucket), by
/// interpolating linearly inside the bucket it falls in; the unbounded bucket reports its
/// lower bound. None when nothing was counted.
pub fn quantile(bounds_us: &[u64], counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0);
    let mut seen = 0u64;
    for (index, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if (seen + count) as f64 >= rank {
            let lower = if index == 0 { 0 } else { bounds_us[index - 1] };
            let Some(&upper) = bounds_us.get(index) else {
                return Some(lower);
            };
            let fraction = (rank - seen as f64) / count as f64;
            return Some(lower + ((upper - lower) as f64 * fraction).round() as u64);
        }
        seen += count;
    }
    None
}
