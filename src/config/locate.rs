//! Finding keys in the text: the line of every key and array element, and the
//! wording of serde's own errors (wrong type, unknown key with a "did you mean"
//! guess) in the file's terms.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::Issue;

/// Every key and array element of the parsed document with its dotted path
/// and spans. Built from toml's own spanned parse tree, so dotted keys,
/// inline tables and `[[arrays]]` are located exactly, with no text search.
pub(super) struct Locator<'t> {
    text: &'t str,
    entries: Vec<Entry>,
}

struct Entry {
    /// Path of the enclosing table, "" at top level.
    parent: String,
    /// The key itself, or `[i]` for an array element.
    name: String,
    key: Range<usize>,
    value: Range<usize>,
}

impl Entry {
    fn path(&self) -> String {
        if self.parent.is_empty() {
            self.name.clone()
        } else if self.name.starts_with('[') {
            format!("{}{}", self.parent, self.name)
        } else {
            format!("{}.{}", self.parent, self.name)
        }
    }
}

impl<'t> Locator<'t> {
    pub(super) fn new(text: &'t str, table: &DeTable<'_>) -> Self {
        let mut locator = Locator {
            text,
            entries: Vec::new(),
        };
        locator.walk_table("", table);
        locator
    }

    fn walk_table(&mut self, parent: &str, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            self.push(parent, key.get_ref().to_string(), key.span(), value);
        }
    }

    fn push(
        &mut self,
        parent: &str,
        name: String,
        key: Range<usize>,
        value: &toml::Spanned<DeValue<'_>>,
    ) {
        let entry = Entry {
            parent: parent.to_owned(),
            name,
            key,
            value: value.span(),
        };
        let path = entry.path();
        self.entries.push(entry);
        match value.get_ref() {
            DeValue::Table(table) => self.walk_table(&path, table),
            DeValue::Array(array) => {
                for (index, item) in array.iter().enumerate() {
                    self.push(&path, format!("[{index}]"), item.span(), item);
                }
            }
            _ => {}
        }
    }

    /// The innermost entry whose key or value covers `pos`.
    fn at(&self, pos: usize) -> Option<&Entry> {
        let covers = |r: &Range<usize>| r.contains(&pos) || (r.is_empty() && r.start == pos);
        self.entries
            .iter()
            .flat_map(|e| [(e, &e.key), (e, &e.value)])
            .filter(|(_, r)| covers(r))
            .min_by_key(|(_, r)| r.len())
            .map(|(e, _)| e)
    }

    /// The line of `path`'s key; `None` when the file does not set it.
    pub(super) fn line(&self, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| e.path() == path)
            .map(|e| line_of(self.text, e.key.start))
    }

    pub(super) fn has(&self, path: &str) -> bool {
        self.entries.iter().any(|e| e.path() == path)
    }

    /// Turn a serde error (wrong type, unknown key) into an issue naming the key.
    pub(super) fn serde_issue(&self, error: &toml::de::Error, origin: &str) -> Issue {
        let pos = error.span().map(|s| s.start);
        let line = pos.map(|p| line_of(self.text, p));
        let raw = error.message();
        let Some(entry) = pos.and_then(|p| self.at(p)) else {
            return Issue {
                origin: origin.to_owned(),
                line,
                key: String::new(),
                message: raw.to_owned(),
            };
        };
        let path = entry.path();
        let unknown_prefix = format!("unknown field `{}`", entry.name);
        let message = if let Some(rest) = raw.strip_prefix(&unknown_prefix) {
            unknown_key(entry, rest)
        } else if path.starts_with("auth.users") && !path.ends_with(".name") {
            // serde quotes the offending value, and anything under a user entry
            // but its name may be a password or key. The "expected ..." tail
            // comes from our types, so it is safe to keep.
            let expected = raw.rfind(", expected ").map_or("", |i| &raw[i..]);
            format!(
                "{path}: invalid value (not shown, it may be a secret){}",
                friendly(expected)
            )
        } else {
            format!("{path}: {}", friendly(raw))
        };
        Issue {
            origin: origin.to_owned(),
            line,
            key: path,
            message,
        }
    }
}

/// A TOML syntax error, before there is a document to locate keys in.
pub(super) fn syntax_issue(error: &toml::de::Error, text: &str, origin: &str) -> Issue {
    Issue {
        origin: origin.to_owned(),
        line: error.span().map(|s| line_of(text, s.start)),
        key: String::new(),
        message: format!("invalid TOML: {}", error.message()),
    }
}

/// `rest` is what serde wrote after "unknown field `x`": ", expected one of
/// `a`, `b`" (or "expected `a` or `b`", or "there are no fields").
fn unknown_key(entry: &Entry, rest: &str) -> String {
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let table = if entry.parent.is_empty() {
        "the top-level table".to_owned()
    } else if entry.parent.ends_with(']') {
        entry.parent.clone()
    } else {
        format!("[{}]", entry.parent)
    };
    let mut message = format!("unknown key {:?} in {table}", entry.name);
    if let Some(guess) = closest(&entry.name, &expected) {
        message.push_str(&format!("; did you mean {guess:?}?"));
    }
    if !expected.is_empty() {
        message.push_str(&format!(" (expected one of: {})", expected.join(", ")));
    }
    message
}

fn line_of(text: &str, pos: usize) -> usize {
    let pos = pos.min(text.len());
    text.as_bytes()[..pos]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// serde names Rust types; operators think in TOML types.
fn friendly(message: &str) -> String {
    let mut out = message
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array")
        .replace("expected a boolean", "expected true or false");
    if let Some(at) = out.find("expected struct ") {
        let name_end = out[at + "expected struct ".len()..]
            .find(|c: char| !c.is_alphanumeric())
            .map_or(out.len(), |n| at + "expected struct ".len() + n);
        out.replace_range(at..name_end, "expected a table");
    }
    out
}

/// The expected key closest to a misspelt one, if it is close enough to be a
/// plausible typo.
fn closest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{err, fails, parse};
    use super::*;

    #[test]
    fn typo_guesses_are_close_or_absent() {
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            closest("pasword", &["name", "password", "key"]),
            Some("password")
        );
        assert_eq!(closest("bogus", &["name", "password", "key"]), None);
    }

    #[test]
    fn syntax_error_has_line() {
        let m = err("realm = \"x\"\n\nlisten = [\"0.0.0.0:3478\"\n");
        assert!(m.starts_with("t.toml:"), "{m}");
        assert!(m.contains("invalid TOML"), "{m}");
    }

    #[test]
    fn dotted_keys_and_inline_tables() {
        let c = parse(
            "relay.port_min = 50000\nauth = { users = [{ name = \"a\", password = \"p\" }] }\n",
        )
        .unwrap();
        assert_eq!(c.relay.port_min, 50000);
        assert_eq!(c.auth.users.len(), 1);
        fails(
            "relay.port_min = 70000\n",
            1,
            "relay.port_min = 70000 is invalid",
        );
        fails(
            "\nauth = { users = [{ name = \"a\" }, { name = \"b\", password = \"\" }] }\n",
            2,
            "auth.users[1].password is invalid",
        );
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let m = fails(
            "[limits]\n\ntotal_allocations = \"10\"\n",
            3,
            "limits.total_allocations",
        );
        assert!(m.contains("expected an integer"), "{m}");
        fails("threads = 1.5\n", 1, "threads");
        fails(
            "[peers]\nallow_loopback_peers = 1\n",
            2,
            "peers.allow_loopback_peers",
        );
        fails("listen = \"0.0.0.0:3478\"\n", 1, "listen");
        let m = fails("relay = 5\n", 1, "relay");
        assert!(
            m.ends_with("relay: invalid type: integer `5`, expected a table"),
            "{m}"
        );
    }

    #[test]
    fn wrong_types_under_a_user_never_show_the_value() {
        let m = fails(
            "[[auth.users]]\nname = \"a\"\npassword = 12345678\n",
            3,
            "auth.users[0].password",
        );
        assert!(!m.contains("12345678"), "{m}");
        let m = fails(
            "[[auth.users]]\nname = \"a\"\nkey = 987654321\n",
            3,
            "auth.users[0].key",
        );
        assert!(!m.contains("987654321"), "{m}");
        assert!(m.contains("expected a string"), "{m}");
        let m = fails("[auth]\nusers = [\"bob:hunter2\"]\n", 2, "auth.users[0]");
        assert!(
            !m.contains("hunter2") && m.contains("expected a table"),
            "{m}"
        );
        let m = fails("[auth]\nusers = \"bob:hunter2\"\n", 2, "auth.users");
        assert!(
            !m.contains("hunter2") && m.contains("expected an array"),
            "{m}"
        );
    }

    #[test]
    fn unknown_top_level_key() {
        let m = fails("realm = \"x\"\nlistn = []\n", 2, "unknown key \"listn\"");
        assert!(m.contains("in the top-level table"), "{m}");
        assert!(m.contains("did you mean \"listen\"?"), "{m}");
        assert!(
            m.contains("expected one of: realm, software, threads, listen"),
            "{m}"
        );
    }

    #[test]
    fn unknown_key_in_every_table() {
        for (table, line) in [
            ("relay", 3),
            ("auth", 3),
            ("limits", 3),
            ("peers", 3),
            ("api", 3),
        ] {
            let m = fails(
                &format!("\n[{table}]\nbogus = 1\n"),
                line,
                "unknown key \"bogus\"",
            );
            assert!(m.contains(&format!("in [{table}]")), "{m}");
        }
        let m = fails(
            "[[auth.users]]\nname = \"a\"\npasword = \"p\"\n",
            3,
            "unknown key \"pasword\" in auth.users[0]",
        );
        assert!(m.contains("did you mean \"password\"?"), "{m}");
        assert!(!m.contains("\"p\""), "{m}");
        // [metrics] was folded into [api]; the old table is an error, not ignored.
        fails(
            "[metrics]\nlisten = \"127.0.0.1:9100\"\n",
            1,
            "unknown key \"metrics\"",
        );
    }
}
