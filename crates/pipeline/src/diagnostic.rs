//! Problems found in a project folder, each located as `file:line:col`.

use std::fmt;

/// One problem, with where it is and, when there is an obvious fix, what was probably meant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// Path relative to the project folder, with `/` separators.
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
    /// What was probably meant, e.g. "did you mean `quantity`?".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if let Some(suggestion) = &self.suggestion {
            write!(f, "; {suggestion}")?;
        }
        Ok(())
    }
}

impl Diagnostic {
    /// A problem at byte `offset` of `text`, the contents of `file`.
    pub fn at_byte(
        file: &str,
        text: &str,
        offset: usize,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, column) = line_column(text, offset);
        Diagnostic {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
            suggestion: None,
        }
    }

    /// A problem about a whole file.
    pub fn in_file(file: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.to_owned(),
            line: 1,
            column: 1,
            message: message.into(),
            suggestion: None,
        }
    }

    pub fn with_suggestion(mut self, suggestion: Option<String>) -> Diagnostic {
        self.suggestion = suggestion;
        self
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// "did you mean `x`?" for the candidate closest to `name`, if one is close enough: a few edits
/// away (typos), or an abbreviation of it (`qty` for `quantity`).
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let lower = name.to_lowercase();
    candidates
        .into_iter()
        .filter_map(|candidate| {
            let other = candidate.to_lowercase();
            let distance = strsim::damerau_levenshtein(&lower, &other);
            let close = (other.chars().count().max(lower.chars().count()) / 3).max(1);
            if distance <= close {
                Some((distance, candidate))
            } else if abbreviates(&lower, &other) || (other.len() >= 3 && lower.starts_with(&other))
            {
                Some((close + 1, candidate))
            } else {
                None
            }
        })
        .min_by_key(|(score, _)| *score)
        .map(|(_, candidate)| format!("did you mean `{candidate}`?"))
}

/// Whether `short` is `long` with letters left out, keeping its first letter.
fn abbreviates(short: &str, long: &str) -> bool {
    if short.len() < 2 || short.len() >= long.len() || short.chars().next() != long.chars().next() {
        return false;
    }
    let mut rest = long.chars();
    short.chars().all(|c| rest.any(|d| d == c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_suggestions() {
        let text = "a = 1\nbé = 2\nc = 3";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 10), (2, 4));
        assert_eq!(
            did_you_mean("qty", ["quantity", "price"]).as_deref(),
            Some("did you mean `quantity`?")
        );
        assert_eq!(did_you_mean("xyz", ["quantity", "price"]), None);
        assert_eq!(
            did_you_mean("integer", ["int", "bigint"]).as_deref(),
            Some("did you mean `int`?")
        );
        assert_eq!(
            did_you_mean("quantty", ["quantity", "price"]).as_deref(),
            Some("did you mean `quantity`?")
        );
        assert_eq!(
            did_you_mean("prices", ["quantity", "price"]).as_deref(),
            Some("did you mean `price`?")
        );
        let d = Diagnostic::at_byte("models/x.sql", text, 10, "no column `bé`")
            .with_suggestion(Some("did you mean `b`?".into()));
        assert_eq!(
            d.to_string(),
            "models/x.sql:2:4: no column `bé`; did you mean `b`?"
        );
    }
}
