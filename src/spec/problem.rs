//! Problems found in `graven.toml`, each with its file, line, column and dotted field path,
//! and the small text helpers that make their messages useful ("did you mean").

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// Every problem found in one `graven.toml`, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors {
    pub problems: Vec<Problem>,
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// One problem. `line` and `column` count from 1 (columns in characters); both are 0 when
/// the problem has no place in the file (it cannot be read). `field` is the dotted path of
/// the key, e.g. `services.web.health.interval`, or empty for the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// A problem before it is placed: a byte span in the source instead of a line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    pub span: Range<usize>,
    pub field: String,
    pub message: String,
}

/// Collects issues; the first one reported for a place and field wins, so a problem in a
/// base service is said once even though every environment resolves it.
#[derive(Debug, Default)]
pub(crate) struct Issues {
    list: Vec<Issue>,
}

impl Issues {
    pub fn push(
        &mut self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        let issue = Issue {
            span,
            field: field.into(),
            message: message.into(),
        };
        if !self
            .list
            .iter()
            .any(|seen| seen.span == issue.span && seen.field == issue.field)
        {
            self.list.push(issue);
        }
    }

    /// Whether `field` itself, or an unknown field directly inside `table`, was reported: a
    /// "missing field" after either would only repeat the same mistake.
    pub fn mentions(&self, table: &str, field: &str) -> bool {
        let full = format!("{table}.{field}");
        self.list.iter().any(|issue| {
            issue.field == full
                || (issue.message.starts_with("unknown field")
                    && issue.field.rsplit_once('.').map(|(parent, _)| parent) == Some(table))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Places every issue in `source` and orders them as they appear in the file.
    pub fn into_errors(self, source: &str, file: &std::path::Path) -> SpecErrors {
        let mut problems: Vec<Problem> = self
            .list
            .into_iter()
            .map(|issue| {
                let (line, column) = position(source, issue.span.start);
                Problem {
                    file: file.to_owned(),
                    line,
                    column,
                    field: issue.field,
                    message: issue.message,
                }
            })
            .collect();
        problems.sort_by_key(|p| (p.line, p.column));
        SpecErrors { problems }
    }
}

/// The 1-based line and character column of a byte offset (clamped into the source).
pub(crate) fn position(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The closest candidate within an edit distance of 2, if any: the "did you mean".
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (edit_distance(word, candidate), candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// `; did you mean "x"?` when `suggest` finds a candidate near `word`, else nothing.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> String {
    suggest(word, candidates)
        .map(|near| format!("; did you mean {near:?}?"))
        .unwrap_or_default()
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// `"a", "b" or "c"`-style lists for messages.
pub(crate) fn quoted_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items
        .into_iter()
        .map(|item| format!("{item:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        let source = "a = 1\nbé = \"x\"\n";
        assert_eq!(position(source, 0), (1, 1));
        assert_eq!(position(source, 6), (2, 1));
        // "é" is two bytes but one column.
        assert_eq!(position(source, 9), (2, 3));
        assert_eq!(position(source, 1000), (3, 1));
    }

    #[test]
    fn suggestions_need_an_edit_distance_of_two_or_less() {
        let known = ["health", "instances", "port"];
        assert_eq!(suggest("helth", known), Some("health"));
        assert_eq!(suggest("instance", known), Some("instances"));
        assert_eq!(suggest("prot", known), Some("port"));
        assert_eq!(suggest("volumes", known), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
