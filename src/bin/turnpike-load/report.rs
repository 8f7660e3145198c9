//! A run's result: one JSON object for scripts, or aligned human lines with units.

use serde_json::Value;

pub struct Report {
    pub json: Value,
    /// (label, value with unit) in print order.
    pub lines: Vec<(String, String)>,
    /// Set when the generator, not the server, may have been the limit.
    pub warning: Option<String>,
}

impl Report {
    pub fn new(json: Value) -> Report {
        Report {
            json,
            lines: Vec::new(),
            warning: None,
        }
    }

    pub fn line(&mut self, label: &str, value: impl Into<String>) {
        self.lines.push((label.to_owned(), value.into()));
    }

    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.json);
            return;
        }
        let width = self.lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        for (label, value) in &self.lines {
            println!("{label:<width$}  {value}");
        }
        if let Some(w) = &self.warning {
            println!("WARNING: {w}");
        }
    }
}

/// The self-check: `Ok` unless the generator's CPU over the measured phase exceeded the
/// server's (then the figures are the generator's limit, not the server's).
pub fn self_check(load_cpu_s: f64, server_cpu_s: Option<f64>) -> (String, Option<String>) {
    match server_cpu_s {
        Some(s) if load_cpu_s > s => {
            let w = format!(
                "the load generator used {load_cpu_s:.3} s of CPU, more than the server's \
                 {s:.3} s: the figures may be limited by the generator"
            );
            (w.clone(), Some(w))
        }
        Some(_) => ("ok".into(), None),
        None => (
            "unchecked: no --server-pid to compare the generator's CPU with".into(),
            None,
        ),
    }
}

/// Microseconds with one decimal.
pub fn us(v: f64) -> String {
    format!("{v:.1} us")
}

pub fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_check_warns_only_when_the_generator_used_more() {
        assert_eq!(self_check(1.0, Some(2.0)).0, "ok");
        let (text, warning) = self_check(2.0, Some(1.0));
        assert!(text.contains("limited by the generator"));
        assert!(warning.is_some());
        assert!(self_check(1.0, None).0.starts_with("unchecked"));
    }
}
