//! Unicode folding for matching, with a map back to the original text.
//!
//! Rules match on a folded copy of the text so that look-alike and invisible characters do not
//! bypass them (Unicode TR36 §2 "Visual Security Issues", TR39 §4 "Confusable Detection"):
//!
//! 1. default-ignorable code points are removed (zero-width spaces and joiners, soft hyphens,
//!    bidi controls, variation selectors, tag characters: UAX 44 `Default_Ignorable_Code_Point`);
//! 2. each character is replaced by its compatibility decomposition (the "K" of NFKC, UAX 15),
//!    so fullwidth, mathematical, circled and ligature forms become plain letters and digits,
//!    and combining marks are dropped, so "pässwörd" and "pa\u{308}ssword" both fold to
//!    "password" (NFKC followed by mark removal: nothing is left to compose);
//! 3. the Cyrillic and Greek letters that look like Latin ones (TR39's confusables for the
//!    letters of the Latin alphabet) become those Latin letters;
//! 4. optionally, lowercase.
//!
//! Redaction replaces spans of the *original* text: every byte of the folded text records the
//! span of the original character it came from.

use unicode_normalization::char::{decompose_compatible, is_combining_mark};

/// A folded copy of a text, and where each of its bytes came from. Its `Debug` shows sizes
/// only: the text is a prompt or an answer.
#[derive(Clone, Default)]
pub struct Folded {
    /// The folded text.
    pub text: String,
    start: Vec<u32>,
    end: Vec<u32>,
}

impl std::fmt::Debug for Folded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Folded({} bytes)", self.text.len())
    }
}

impl Folded {
    /// Folds `original`; `lowercase` adds step 4.
    pub fn new(original: &str, lowercase: bool) -> Self {
        let mut f = Folded {
            text: String::with_capacity(original.len()),
            start: Vec::with_capacity(original.len()),
            end: Vec::with_capacity(original.len()),
        };
        for (at, c) in original.char_indices() {
            if is_ignorable(c) {
                continue;
            }
            // Texts are bounded well below 4 GiB (the enclave's request limit), so u32 holds
            // every offset.
            let (s, e) = (at as u32, (at + c.len_utf8()) as u32);
            let push = |d: char, f: &mut Folded| {
                let before = f.text.len();
                f.text.push(d);
                for _ in before..f.text.len() {
                    f.start.push(s);
                    f.end.push(e);
                }
            };
            decompose_compatible(c, |d| {
                if is_combining_mark(d) || is_ignorable(d) {
                    return;
                }
                let d = confusable(d);
                if lowercase {
                    for l in d.to_lowercase() {
                        push(l, &mut f);
                    }
                } else {
                    push(d, &mut f);
                }
            });
        }
        f
    }

    /// The span of the original text that the folded bytes `start..end` came from.
    pub fn original(&self, start: usize, end: usize) -> (usize, usize) {
        let s = self.start.get(start).copied().unwrap_or(u32::MAX);
        let e = end
            .checked_sub(1)
            .and_then(|i| self.end.get(i))
            .copied()
            .unwrap_or(s);
        (s as usize, (e as usize).max(s as usize))
    }
}

/// UAX 44 `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt), plus the invisible
/// separators that are not in it but render as nothing (U+180E).
pub fn is_ignorable(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5
        | 0x180B..=0x180F | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F
        | 0x3164 | 0xFE00..=0xFE0F | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFF8
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF)
}

/// The Latin letter a Cyrillic or Greek look-alike stands for (TR39 confusables.txt, the
/// single-character entries whose target is a basic Latin letter).
pub fn confusable(c: char) -> char {
    match c {
        // Cyrillic lowercase.
        'а' => 'a',
        'е' => 'e',
        'о' => 'o',
        'р' => 'p',
        'с' => 'c',
        'у' => 'y',
        'х' => 'x',
        'ѕ' => 's',
        'і' => 'i',
        'ј' => 'j',
        'ԁ' => 'd',
        'ԛ' => 'q',
        'ԝ' => 'w',
        'һ' => 'h',
        'ӏ' => 'l',
        'ɡ' => 'g',
        // Cyrillic uppercase.
        'А' => 'A',
        'В' => 'B',
        'Е' => 'E',
        'К' => 'K',
        'М' => 'M',
        'Н' => 'H',
        'О' => 'O',
        'Р' => 'P',
        'С' => 'C',
        'Т' => 'T',
        'Х' => 'X',
        'У' => 'Y',
        'І' => 'I',
        'Ј' => 'J',
        'Ѕ' => 'S',
        'Ԁ' => 'D',
        'Ԛ' => 'Q',
        'Ԝ' => 'W',
        'Ӏ' => 'I',
        // Greek.
        'α' => 'a',
        'ο' => 'o',
        'ν' => 'v',
        'ρ' => 'p',
        'ι' => 'i',
        'κ' => 'k',
        'υ' => 'u',
        'Α' => 'A',
        'Β' => 'B',
        'Ε' => 'E',
        'Ζ' => 'Z',
        'Η' => 'H',
        'Ι' => 'I',
        'Κ' => 'K',
        'Μ' => 'M',
        'Ν' => 'N',
        'Ο' => 'O',
        'Ρ' => 'P',
        'Τ' => 'T',
        'Υ' => 'Y',
        'Χ' => 'X',
        other => other,
    }
}

/// The folded form of a pattern or term, as rules store it.
pub fn fold(s: &str, lowercase: bool) -> String {
    Folded::new(s, lowercase).text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_fullwidth_accented_and_lookalike_text_folds_to_ascii() {
        assert_eq!(fold("pa\u{200B}ss\u{00AD}word", true), "password");
        assert_eq!(fold("ＰＡＳＳＷＯＲＤ", true), "password");
        assert_eq!(fold("pässwörd", true), "password");
        assert_eq!(fold("pa\u{0308}sswo\u{0308}rd", true), "password");
        // Cyrillic а, о and Greek ο.
        assert_eq!(fold("pаsswоrd", true), "password");
        assert_eq!(fold("𝐩𝐚𝐬𝐬𝐰𝐨𝐫𝐝", true), "password");
        assert_eq!(fold("ﬁle", true), "file");
        assert_eq!(fold("AKIA", false), "AKIA");
        assert_eq!(fold("ＡＫＩＡ", false), "AKIA");
    }

    #[test]
    fn folded_spans_map_back_to_the_original() {
        let original = "x ｐａ\u{200B}ss y";
        let f = Folded::new(original, true);
        assert_eq!(f.text, "x pass y");
        let at = f.text.find("pass").unwrap();
        let (s, e) = f.original(at, at + 4);
        assert_eq!(&original[s..e], "ｐａ\u{200B}ss");
        // A ligature is one original character for two folded ones.
        let f = Folded::new("ﬁ!", true);
        assert_eq!(f.original(0, 1), (0, 3));
        assert_eq!(f.original(1, 2), (0, 3));
        assert_eq!(f.original(2, 3), (3, 4));
    }
}
