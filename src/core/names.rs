//! Names and ids: what a workspace may be called, and how ids map to object paths.

/// The id (and name) of the default host workspace.
pub const DEFAULT_HOST: &str = "host";

/// Longest workspace name: a DNS label, so names are valid host, machine and unit names.
pub const NAME_MAX: usize = 63;

/// Checks a workspace name: 1-63 of `a-z`, `0-9`, `-`, starting and ending with a letter or digit,
/// and not shaped like a UUID (ids are UUIDs, so a key is never both an id and a name).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(format!(
            "workspace name must be 1 to {NAME_MAX} characters, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "workspace name '{}' contains {c:?}: only a-z, 0-9 and '-' are allowed",
            name.escape_default()
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "workspace name '{name}' must start and end with a letter or digit"
        ));
    }
    if uuid::Uuid::try_parse(name).is_ok() {
        return Err(format!(
            "workspace name '{name}' looks like a workspace id (a UUID)"
        ));
    }
    Ok(())
}

/// Escapes one object path element the way systemd's `bus_label_escape` does: every byte outside
/// `[A-Za-z0-9]` becomes `_xx` (lower-case hex); the empty string becomes `_`.
pub fn bus_label_escape(s: &str) -> String {
    if s.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push('_');
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// Inverse of [`bus_label_escape`]; `None` for anything it cannot have produced.
pub fn bus_label_unescape(s: &str) -> Option<String> {
    if s == "_" {
        return Some(String::new());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// A fresh workspace id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Checks a snapshot's name: 1 to 64 of `a-z`, `0-9`, `-`, `_`, `.`, starting with a letter or
/// a digit (a path element and a URL segment as it is).
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    if !ok {
        return Err(format!(
            "'{}' is not a snapshot name: 1 to 64 of a-z, 0-9, '-', '_' and '.', starting with a letter or digit",
            name.escape_default()
        ));
    }
    Ok(())
}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 bytes.
pub fn validate_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !ok_first || name.len() > 255 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "'{}' is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most 255 bytes)",
            name.escape_default()
        ));
    }
    Ok(())
}

/// Checks the name of a skill, tool or template: one path element of at most 255 bytes, not
/// `.`/`..`, not hidden, no `/`, `\\` or control characters, so it can never leave the Library
/// or the workspace.
pub fn validate_library_name(kind: &str, name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with('.')
        || name.contains(['/', '\\'])
        || name.chars().any(|c| c.is_control());
    if bad {
        return Err(format!(
            "'{}' is not a valid {kind} name (one path element, not hidden, no '/')",
            name.escape_default()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for n in ["a", "web-1", "0abc", "python-project", &"a".repeat(63)] {
            assert!(validate_name(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        for n in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            "ä",
            &"a".repeat(64),
            "../x",
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        ] {
            assert!(validate_name(n).is_err(), "{n:?} was accepted");
        }
    }

    #[test]
    fn escapes_like_systemd() {
        assert_eq!(bus_label_escape("host"), "host");
        assert_eq!(
            bus_label_escape("1b4e28ba-2fa1"),
            "1b4e28ba_2d2fa1",
            "'-' is 0x2d"
        );
        assert_eq!(bus_label_escape(""), "_");
        assert_eq!(bus_label_escape("a/b_c"), "a_2fb_5fc");
    }

    #[test]
    fn unescape_inverts_escape() {
        for s in [
            "",
            "host",
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "a_b/c d",
            "ü",
        ] {
            assert_eq!(bus_label_unescape(&bus_label_escape(s)).as_deref(), Some(s));
        }
        assert_eq!(bus_label_unescape("a_zz"), None);
        assert_eq!(bus_label_unescape("a-b"), None);
    }

    #[test]
    fn library_names_cannot_leave_the_library() {
        for ok in ["python-dev", "a.b", "x_1", "ünï"] {
            assert!(validate_library_name("skill", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc",
            ".hidden",
            "a\\b",
            "a\nb",
            &"x".repeat(256),
        ] {
            assert!(validate_library_name("skill", bad).is_err(), "{bad:?}");
        }
    }

    /// Every generated name is either refused or a single, non-escaping path element.
    #[test]
    fn generated_library_names_never_escape() {
        use std::path::{Component, Path};
        let alphabet = ['a', '.', '/', '\\', '-', '\0', 'é', ' ', '\n'];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 7) as usize;
            let name: String = (0..len)
                .map(|i| alphabet[((seed >> (i * 5)) % alphabet.len() as u64) as usize])
                .collect();
            if validate_library_name("skill", &name).is_ok() {
                let joined = Path::new("/lib/skill").join(&name);
                let comps: Vec<_> = joined.components().collect();
                assert_eq!(comps.len(), 4, "{name:?} is one element");
                assert!(matches!(comps[3], Component::Normal(_)), "{name:?}");
                assert!(joined.starts_with("/lib/skill"));
            }
        }
    }

    #[test]
    fn env_names() {
        for n in ["A", "_x", "PATH", "a1_B"] {
            assert!(validate_env_name(n).is_ok(), "{n}");
        }
        for n in ["", "1A", "A-B", "A=B", "A B", &"A".repeat(256)] {
            assert!(validate_env_name(n).is_err(), "{n:?}");
        }
    }
}
