//! Escaping of untrusted text for human-facing output (text logs, the
//! console sink, the CLI's reports).
//!
//! Labels, summaries, hostnames and rule log text come from messages anyone
//! who can publish to a stream controls. Written raw, a newline forges a
//! whole log line or alert, CR overwrites the start of a line, and ESC drives
//! the terminal (clears, colours, title changes). [`escape`] turns every
//! such character into a visible escape, so one event stays one line and a
//! reader sees the bytes that were sent.
//!
//! Backslash is left alone: escaping it would make every Windows path and
//! regex harder to read, and without a control character a literal `\n` in
//! the text cannot start a new line. It also makes [`escape`] idempotent, so
//! a line built from already escaped parts can be escaped again safely.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with C0 and C1 controls (ESC, CR, LF, tab included), DEL, the
/// Unicode line and paragraph separators and the bidirectional overrides
/// escaped: `\n`, `\r`, `\t`, `\x1b`, `\x7f`, `\u{85}`, `\u{2028}`,
/// `\u{202e}`. Everything else, non-ASCII included, is kept. Borrows when
/// there is nothing to escape, which is nearly always.
pub fn escape(text: &str) -> Cow<'_, str> {
    let Some(first) = text.find(needs_escape) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                write!(out, "\\x{:02x}", c as u32).expect("writing to a String");
            }
            c if needs_escape(c) => {
                write!(out, "\\u{{{:x}}}", c as u32).expect("writing to a String");
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The characters a terminal or a line-oriented reader acts on, and the
/// bidirectional embeddings, overrides and isolates (U+202A–U+202E,
/// U+2066–U+2069): displayed, they reorder the text after them, so a label
/// could make a line read differently from the bytes it holds ("Trojan
/// Source", CVE-2021-42574). Right-to-left text itself (Arabic, Hebrew) and
/// the plain direction marks are kept.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\u{2028}'
        || c == '\u{2029}'
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in ["", "r1", "et-0/0/1", "Zürich ünïcödé 東京 🚨", r"C:\path\n"] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s}");
        }
    }

    #[test]
    fn line_breaks_and_carriage_returns_are_escaped() {
        assert_eq!(
            escape("r1\n2026-01-01T00:00:00.000000Z ERROR tripline::app: FORGED"),
            r"r1\n2026-01-01T00:00:00.000000Z ERROR tripline::app: FORGED"
        );
        assert_eq!(escape("a\r\nb\tc"), r"a\r\nb\tc");
    }

    #[test]
    fn bidi_overrides_are_escaped_and_right_to_left_text_is_kept() {
        // Displayed raw, U+202E makes "router-1 txt.exe" read "router-1 exe.txt".
        assert_eq!(
            escape("router-1 \u{202e}txt.exe\u{202c}"),
            r"router-1 \u{202e}txt.exe\u{202c}"
        );
        assert_eq!(escape("\u{2066}a\u{2069}"), r"\u{2066}a\u{2069}");
        for kept in ["נתב-1", "موجه-1", "a\u{200f}b"] {
            assert!(matches!(escape(kept), Cow::Borrowed(_)), "{kept}");
        }
    }

    #[test]
    fn terminal_escapes_and_other_controls_are_escaped() {
        assert_eq!(
            escape("\x1b[2J\x1b]0;title\x07"),
            r"\x1b[2J\x1b]0;title\x07"
        );
        assert_eq!(escape("nul\0del\x7f"), r"nul\x00del\x7f");
    }

    #[test]
    fn c1_controls_and_unicode_separators_are_escaped() {
        assert_eq!(escape("a\u{85}b\u{9b}c"), r"a\u{85}b\u{9b}c");
        assert_eq!(escape("a\u{2028}b\u{2029}c"), r"a\u{2028}b\u{2029}c");
    }

    #[test]
    fn escaping_is_idempotent() {
        let once = escape("x\n\x1b[31my\u{2028}").into_owned();
        assert_eq!(escape(&once), once);
    }

    #[test]
    fn a_huge_hostile_string_stays_one_line() {
        let hostile = "\n\r\x1b[2K".repeat(100_000);
        let out = escape(&hostile);
        assert!(!out.chars().any(needs_escape));
        assert_eq!(out.len(), 100_000 * r"\n\r\x1b[2K".len());
    }
}
