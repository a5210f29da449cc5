//! What the two mirror configuration parsers share: errors that name the file and line, a
//! TOML table read in file order (the order of mirrors is the order they are tried), and
//! values that may be one string or a list of them.

use crate::error::Error;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use std::ops::Range;
use std::path::Path;
use toml::Spanned;

/// A configuration file being read: its path and text, for errors that point into it.
pub(super) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// An error about the file, at the line where `span` starts (if known).
    pub fn error(&self, span: Option<Range<usize>>, reason: impl Into<String>) -> Error {
        Error::Config {
            at: self.at(span),
            reason: reason.into(),
        }
    }

    /// `file:line` of where `span` starts (the file alone if unknown).
    pub fn at(&self, span: Option<Range<usize>>) -> String {
        match span {
            Some(s) => format!("{}:{}", self.path.display(), self.line(s.start)),
            None => self.path.display().to_string(),
        }
    }

    /// The 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// Parses the text as TOML into `T`; a syntax or type error names its line.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, Error> {
        toml::from_str(self.text).map_err(|e| self.error(e.span(), e.message().trim()))
    }
}

/// A TOML table whose entries keep the file's order.
#[derive(Debug)]
pub(super) struct Ordered<V>(pub Vec<(Spanned<String>, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered<V>, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry()? {
                    entries.push((k, v));
                }
                Ok(Ordered(entries))
            }
        }
        d.deserialize_map(Entries(std::marker::PhantomData))
    }
}

/// A value that is one string or a list of strings (`ca = "a.pem"`, `ca = ["a", "b"]`).
pub(super) fn strings(
    src: &Source,
    field: &str,
    v: &Spanned<toml::Value>,
) -> Result<Vec<String>, Error> {
    let bad = || {
        src.error(
            Some(v.span()),
            format!("{field} must be a string or a list of strings"),
        )
    };
    match v.get_ref() {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct T {
        t: Ordered<String>,
    }

    #[test]
    fn tables_keep_their_order_and_errors_their_line() {
        let path = Path::new("/etc/x.toml");
        let text = "# c\n[t]\nz = \"1\"\na = \"2\"\nm = \"3\"\n";
        let src = Source { path, text };
        let t: T = src.parse().unwrap();
        let keys: Vec<&str> = t.t.0.iter().map(|(k, _)| k.get_ref().as_str()).collect();
        assert_eq!(keys, ["z", "a", "m"]);
        assert_eq!(src.line(t.t.0[1].0.span().start), 4);
        let text = "[t]\nz = \"1\"\na = 2\n";
        let e = Source { path, text }
            .parse::<T>()
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("/etc/x.toml:3: "), "{e}");
    }
}
