//! Text for a terminal: what peers wrote (host names, user names, causes quoting
//! them) reaches the operator's terminal and log files only with its control
//! characters escaped, so a device named `\x1b[31m...` cannot recolour, rewrite or
//! forge lines there. JSON output escapes by itself and is left as it is.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every control character (C0, DEL, C1) and every bidirectional
/// override escaped as `\n`, `\t`, `\r`, `\x1b` or `\u{202e}`; unchanged (borrowed)
/// when there is none.
pub fn escaped(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escaped("pump-7 Kühlung"), "pump-7 Kühlung");
        assert!(matches!(escaped("plain"), Cow::Borrowed(_)));
        assert_eq!(escaped("\x1b[31mred\x1b[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(escaped("a\nb\r\tc\x00\x7f"), "a\\nb\\r\\tc\\x00\\x7f");
        assert_eq!(escaped("\u{9b}2J"), "\\u{9b}2J");
        assert_eq!(escaped("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
    }

    proptest::proptest! {
        #[test]
        fn nothing_escaped_holds_a_control_character(text in "\\PC*|[\\x00-\\x1f\\x7f-\\u{9f}a-z]{0,40}") {
            let out = escaped(&text);
            proptest::prop_assert!(!out.chars().any(needs_escape));
        }
    }
}
