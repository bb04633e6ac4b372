//! Validation of user-supplied names, which become folder and file names.

/// Longest allowed name, in characters (a DNS label's limit).
pub const MAX_NAME_LEN: usize = 63;

/// A user-supplied name that ferry cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} name {name:?}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
)]
pub struct NameError {
    /// What the name is for, e.g. `"VM"`, `"host"`, `"site"`, `"switch"` or `"plan"`.
    pub kind: String,
    /// The name as given.
    pub name: String,
}

/// Checks a user-supplied name (VM, host, site, switch, plan): 1–63 chars of [A-Za-z0-9._-], starting with a letter or digit, not "." or "..": it becomes a folder name, so nothing may escape ferry's folders.
pub fn validate_name(kind: &str, name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let valid = (1..=MAX_NAME_LEN).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(NameError {
            kind: kind.to_string(),
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_names() {
        let longest = "a".repeat(63);
        for name in [
            "web1",
            "W",
            "0",
            "db-primary",
            "app_server.prod",
            "a..b",
            "x.",
            "9-lives",
            longest.as_str(),
        ] {
            assert_eq!(validate_name("VM", name), Ok(()), "{name}");
        }
    }

    #[test]
    fn bad_names() {
        let too_long = "a".repeat(64);
        for name in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "/abs",
            ".hidden",
            "-flag",
            "_x",
            "web 1",
            "wéb",
            "a\0b",
            "a\nb",
            "C:x",
            "a*",
            too_long.as_str(),
        ] {
            assert!(validate_name("VM", name).is_err(), "{name:?} accepted");
        }
    }

    #[test]
    fn message() {
        assert_eq!(
            validate_name("VM", "../x").unwrap_err().to_string(),
            "invalid VM name \"../x\": use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        );
        let e = validate_name("switch", "a\nb").unwrap_err();
        assert_eq!(e.kind, "switch");
        assert_eq!(e.name, "a\nb");
        // Control characters are shown escaped, so the message stays on one line.
        assert!(!e.to_string().contains('\n'));
    }

    proptest! {
        #[test]
        fn valid_names_stay_inside_their_folder(name in "\\PC{0,70}") {
            if validate_name("VM", &name).is_ok() {
                let path = std::path::Path::new("base").join(&name);
                let parts: Vec<_> = path.components().collect();
                prop_assert_eq!(parts.len(), 2);
                prop_assert_eq!(
                    parts[1],
                    std::path::Component::Normal(std::ffi::OsStr::new(&name))
                );
            }
        }

        #[test]
        fn names_from_the_allowed_alphabet_pass(name in "[A-Za-z0-9][A-Za-z0-9._-]{0,62}") {
            prop_assert_eq!(validate_name("host", &name), Ok(()));
        }
    }
}
