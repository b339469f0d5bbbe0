//! What serde_json leaves to us: looking figures up by dotted path in
//! `bench/results.json` and `tandem log inspect --json` (both read as
//! [`Value`]s), and the number form results.json is written in.

use serde_json::Value;

/// Lookups by dotted path: `"guest_time.seconds"`, `"workloads.0.name"`.
pub trait JsonPath {
    /// The value at `path`, if any (`null` included).
    fn at(&self, path: &str) -> Option<&Value>;

    /// The number at `path`, if it is one.
    fn num(&self, path: &str) -> Option<f64> {
        self.at(path)?.as_f64()
    }

    /// The string at `path`, if it is one.
    fn str(&self, path: &str) -> Option<&str> {
        self.at(path)?.as_str()
    }

    /// The array at `path` (empty if absent).
    fn arr(&self, path: &str) -> &[Value] {
        self.at(path)
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }
}

impl JsonPath for Value {
    fn at(&self, path: &str) -> Option<&Value> {
        path.split('.').try_fold(self, |v, key| match v {
            Value::Object(fields) => fields.get(key),
            Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
    }
}

/// `v` pretty-printed (two-space indent, ending in a newline), every number
/// an integer below 1e15 or else rounded to six significant digits.
pub fn pretty(mut v: Value) -> String {
    compact(&mut v);
    let mut text = serde_json::to_string_pretty(&v).expect("a Value always serializes");
    text.push('\n');
    text
}

fn compact(v: &mut Value) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                *v = compact_num(x);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(compact),
        Value::Object(fields) => fields.values_mut().for_each(compact),
        _ => {}
    }
}

fn compact_num(n: f64) -> Value {
    let n = if n.fract() == 0.0 {
        n
    } else {
        fmt_sig(n).parse().unwrap_or(n)
    };
    if n.fract() == 0.0 && n.abs() < 1e15 {
        Value::from(n as i64)
    } else {
        Value::from(n)
    }
}

/// Six significant digits, no exponent for ordinary magnitudes.
fn fmt_sig(n: f64) -> String {
    if n == 0.0 {
        return "0".into();
    }
    let mag = n.abs().log10().floor() as i32;
    if !(-6..15).contains(&mag) {
        return format!("{n:e}");
    }
    let decimals = (5 - mag).max(0) as usize;
    let s = format!("{n:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let text = r#"{"a": [1, 2.5, -3e2], "b": {"c": "x\"y\\n\u0041", "d": null, "e": true}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v.num("a.1"), Some(2.5));
        assert_eq!(v.num("a.2"), Some(-300.0));
        assert_eq!(v.str("b.c"), Some("x\"y\\nA"));
        assert_eq!(v.at("b.d"), Some(&Value::Null));
        assert_eq!(v.at("b.x"), None);
        assert_eq!(v.arr("a").len(), 3);
        assert!(v.arr("b").is_empty());
        let again: Value = serde_json::from_str(&pretty(v.clone())).unwrap();
        assert_eq!(
            (again.num("a.2"), again.str("b.c")),
            (Some(-300.0), v.str("b.c"))
        );
    }

    /// The committed bench/results.json (written by the hand-written JSON
    /// writer this module replaced) reads back, and writes and reads back
    /// unchanged: same keys, same nesting, every number the same.
    #[test]
    fn committed_results_round_trip() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/results.json");
        let text = std::fs::read_to_string(path).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v.num("schema").is_some() && !v.arr("tandem.workloads").is_empty());
        let again: Value = serde_json::from_str(&pretty(v.clone())).unwrap();
        assert_eq!(again, v);
    }

    #[test]
    fn numbers_print_compactly() {
        assert_eq!(fmt_sig(0.953_123_456), "0.953123");
        assert_eq!(fmt_sig(17.844_666), "17.8447");
        assert_eq!(fmt_sig(2_230_583.36), "2230583");
        let v = serde_json::json!({
            "a": 42.0, "b": 0.953_123_456, "c": 2_230_583.36, "d": f64::NAN, "e": [1u64, -0.0]
        });
        assert_eq!(
            pretty(v),
            "{\n  \"a\": 42,\n  \"b\": 0.953123,\n  \"c\": 2230583,\n  \"d\": null,\n  \"e\": [\n    1,\n    0\n  ]\n}\n"
        );
    }
}
