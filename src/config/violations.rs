//! [`Violation`] and [`Violations`]: the broken rules of a configuration,
//! every one reported at once.

use std::fmt;

use crate::error::BackendError;

/// One broken rule of a configuration: the field path and what is wrong with it.
///
/// `Display` reads `path: message`, e.g.
/// `latency_target: 50ms is out of range 100ms..=5s`. Messages never carry a
/// secret's value: the names and keys they quote are shown as
/// [`shown_in_error`](crate::shown_in_error) shows them (cut where they look
/// secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The path of the offending field, e.g. `latency_target`,
    /// `processors[2].name` or `provider_config.api_key`.
    pub path: String,
    /// What is wrong and, where possible, what is allowed.
    pub message: String,
}

impl Violation {
    /// A violation of the field at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Violation {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every [`Violation`] found in a configuration, in the order they were found.
///
/// `Display` writes one violation per line. [`Violations::into_error`] turns the
/// list into one [`BackendError`] of code
/// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Violations(Vec<Violation>);

impl Violations {
    /// An empty list.
    pub fn new() -> Self {
        Violations(Vec::new())
    }

    /// Records that the field at `path` breaks a rule.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Violation::new(path, message));
    }

    /// Appends every violation of `other`.
    pub fn append(&mut self, other: Violations) {
        self.0.extend(other.0);
    }

    /// Whether nothing was found, i.e. the configuration is valid.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many violations were found.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The violations, in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, Violation> {
        self.0.iter()
    }

    /// The violations as a vector.
    pub fn into_vec(self) -> Vec<Violation> {
        self.0
    }

    /// One [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) error for
    /// operation `op` listing every violation in its message
    /// (`2 config errors: timeout: ...; max_retries: ...`), with one `details`
    /// entry per field path.
    pub fn into_error(self, op: &'static str) -> BackendError {
        let message = match self.0.len() {
            0 => "invalid config".to_owned(),
            n => {
                let list = self
                    .0
                    .iter()
                    .map(Violation::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                let noun = if n == 1 { "error" } else { "errors" };
                format!("{n} config {noun}: {list}")
            }
        };
        let mut error = BackendError::invalid_config(op, message);
        for v in self.0 {
            error.push_detail(v.path, v.message);
        }
        error
    }

    /// `Ok(())` when empty, otherwise [`Violations::into_error`].
    pub fn into_result(self, op: &'static str) -> Result<(), BackendError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.into_error(op))
        }
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            fmt::Display::fmt(v, f)?;
        }
        Ok(())
    }
}

impl From<Vec<Violation>> for Violations {
    fn from(list: Vec<Violation>) -> Self {
        Violations(list)
    }
}

impl FromIterator<Violation> for Violations {
    fn from_iter<I: IntoIterator<Item = Violation>>(iter: I) -> Self {
        Violations(iter.into_iter().collect())
    }
}

impl Extend<Violation> for Violations {
    fn extend<I: IntoIterator<Item = Violation>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl IntoIterator for Violations {
    type Item = Violation;
    type IntoIter = std::vec::IntoIter<Violation>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Violations {
    type Item = &'a Violation;
    type IntoIter = std::slice::Iter<'a, Violation>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
