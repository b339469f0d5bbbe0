//! min / median / max over repeated runs.

use serde_json::{json, Value};

use crate::results::JsonPath;

/// A figure measured `n` times.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// Summarises the finite samples; `None` if there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            min: v[0],
            median,
            max: v[n - 1],
            n,
        })
    }

    pub fn to_json(&self, unit: &str) -> Value {
        json!({
            "min": self.min,
            "median": self.median,
            "max": self.max,
            "runs": self.n,
            "unit": unit,
        })
    }

    pub fn from_json(v: &Value) -> Option<Summary> {
        Some(Summary {
            min: v.num("min")?,
            median: v.num("median")?,
            max: v.num("max")?,
            n: v.num("runs")? as usize,
        })
    }
}

/// `{min, median, max, runs, unit}` of the samples, or `null`.
pub fn summary_json(samples: &[f64], unit: &str) -> Value {
    Summary::of(samples).map_or(Value::Null, |s| s.to_json(unit))
}

/// The p-th percentile (0..=100) of the samples, nearest rank.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        let s = Summary::of(&[3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        assert_eq!(Summary::of(&[1.0, 2.0, 3.0, 4.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(&[]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
    }
}
