//! Problems in pipeline and rules files, each with where it is and what to do.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::{Location, Spanned};

/// Where in a file something is; line and column are 1-based, 0 when unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The file.
    pub file: PathBuf,
    /// The line.
    pub line: u64,
    /// The column.
    pub column: u64,
}

impl Place {
    /// A place from a YAML location.
    pub fn at(file: &Path, location: Location) -> Self {
        Self {
            file: file.to_path_buf(),
            line: location.line(),
            column: location.column(),
        }
    }

    /// The place of a spanned value.
    pub fn of<T>(file: &Path, spanned: &Spanned<T>) -> Self {
        Self::at(file, spanned.referenced)
    }

    /// A whole file.
    pub fn file(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        Ok(())
    }
}

/// How much a problem matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth saying; nothing stops.
    Warning,
    /// The files cannot be used as they are.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// What kind of problem a diagnostic is, where a caller treats some kinds
/// apart (a streaming source that lost a ruled column warns instead of
/// stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// A column rule names a column the source does not have.
    RuledColumnMissing,
    /// Any other problem.
    Other,
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where.
    pub place: Place,
    /// Whether it stops the files from being used.
    pub severity: Severity,
    /// What kind of problem it is.
    pub problem: Problem,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// A problem at `place`.
    pub fn new(place: Place, message: impl Into<String>) -> Self {
        Self {
            place,
            severity: Severity::Error,
            problem: Problem::Other,
            message: message.into(),
            hint: None,
        }
    }

    /// Says what kind of problem it is.
    #[must_use]
    pub fn problem(mut self, problem: Problem) -> Self {
        self.problem = problem;
        self
    }

    /// Lowers it to a warning.
    #[must_use]
    pub fn warning(mut self) -> Self {
        self.severity = Severity::Warning;
        self
    }

    /// Adds what to do.
    #[must_use]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.place, self.severity, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every problem found in a set of files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Adds a problem.
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.0.push(diagnostic);
    }

    /// True when nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes out the warnings, leaving the errors.
    pub fn take_warnings(&mut self) -> Vec<Diagnostic> {
        let (warnings, errors) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|d| d.severity == Severity::Warning);
        self.0 = errors;
        warnings
    }

    /// `Ok(value)` when nothing is wrong.
    pub fn into_result<T>(self, value: T) -> Result<T, Diagnostics> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Turns a YAML error into a diagnostic with its location, a message that never
/// holds a substituted secret (the parser redacts those), and a hint.
pub fn from_yaml_error(file: &Path, error: &serde_saphyr::Error) -> Diagnostic {
    let place = error
        .location()
        .map_or_else(|| Place::file(file), |l| Place::at(file, l));
    let message = yaml_message(error);
    let hint = if message.contains("unknown field") {
        Some("check the spelling; docs/pipelines.md and docs/rules.md list every field")
    } else if message.contains("unknown variant") {
        Some("use one of the values the message lists")
    } else if message.contains("missing field") {
        Some("add the field; docs/pipelines.md shows a complete example")
    } else if message.contains("property") || message.contains("${") {
        Some("set the environment variable before starting oppen")
    } else {
        None
    };
    let diagnostic = Diagnostic::new(place, message);
    match hint {
        Some(h) => diagnostic.hint(h),
        None => diagnostic,
    }
}

/// The error's message without the parser's location suffix or source snippet.
fn yaml_message(error: &serde_saphyr::Error) -> String {
    let rendered = error.render_with_formatter(&serde_saphyr::UserMessageFormatter);
    let mut first = rendered.lines().next().unwrap_or_default().trim();
    // The renderer adds "error: line X column Y: " or " at line X, column Y"; the
    // place says that already.
    first = first.strip_prefix("error: ").unwrap_or(first);
    if let Some(rest) = first.strip_prefix("line ")
        && let Some((_, message)) = rest.split_once(": ")
    {
        first = message;
    }
    match first.rfind(" at line ") {
        Some(i) => first[..i].to_string(),
        None => first.to_string(),
    }
}
