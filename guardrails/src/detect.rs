//! Detectors of personal data and secrets: a candidate regex on the folded, case-preserving
//! view of the text, then a check that a regex cannot express (Luhn, ISO 13616 mod-97, SSA
//! number rules, address parsing, JWT header decoding).
//!
//! Each detector also has a *partial* pattern, anchored at the end of the text: what the start
//! of one of its matches looks like while a stream is still producing it. The streaming output
//! filter holds back text from where a partial match begins, and only that, so a secret split
//! across tokens is still caught while ordinary text flows at once.

use base64::Engine as _;
use regex::Regex;
use std::sync::OnceLock;

/// What a detector finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// E-mail addresses (RFC 5321 §4.5.3.1 lengths).
    Email,
    /// Telephone numbers: E.164 with `+`, and North American numbers.
    Phone,
    /// Payment card numbers, 13-19 digits, with the Luhn check (ISO/IEC 7812-1 Annex B).
    Card,
    /// International bank account numbers, with the mod-97 check (ISO 13616-1 §7).
    Iban,
    /// US social security numbers, with the SSA's never-issued ranges excluded.
    UsSsn,
    /// IPv4 addresses (dotted quad).
    Ipv4,
    /// IPv6 addresses (RFC 4291 §2.2 text forms).
    Ipv6,
    /// AWS access key ids (IAM unique-id prefixes, base32 body).
    AwsAccessKey,
    /// AWS secret access keys: 40 base64 characters next to a secret-key label.
    AwsSecretKey,
    /// PEM private keys (RFC 7468 §10, §11 and the OpenSSH and EC labels), to the END line or
    /// to the end of the text.
    PemPrivateKey,
    /// JSON Web Tokens (RFC 7519): three base64url parts whose header decodes to JSON with
    /// an `alg`.
    Jwt,
}

/// Every detector, in the order the policy lists them.
pub const ALL: [Kind; 11] = [
    Kind::Email,
    Kind::Phone,
    Kind::Card,
    Kind::Iban,
    Kind::UsSsn,
    Kind::Ipv4,
    Kind::Ipv6,
    Kind::AwsAccessKey,
    Kind::AwsSecretKey,
    Kind::PemPrivateKey,
    Kind::Jwt,
];

/// IAM unique-id prefixes of access keys and principals (AWS IAM User Guide, "Reference:
/// IAM identifiers", unique identifier prefixes).
const AWS_PREFIXES: [&str; 12] = [
    "AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AIPA", "ANPA", "ANVA", "AROA", "APKA", "ASCA",
];

impl Kind {
    /// The name in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::Card => "payment_card",
            Kind::Iban => "iban",
            Kind::UsSsn => "us_ssn",
            Kind::Ipv4 => "ipv4",
            Kind::Ipv6 => "ipv6",
            Kind::AwsAccessKey => "aws_access_key_id",
            Kind::AwsSecretKey => "aws_secret_access_key",
            Kind::PemPrivateKey => "pem_private_key",
            Kind::Jwt => "jwt",
        }
    }

    /// The detector a policy names.
    pub fn from_name(name: &str) -> Option<Kind> {
        ALL.into_iter().find(|k| k.name() == name)
    }

    /// What redaction puts in place of a match.
    pub fn placeholder(self) -> &'static str {
        match self {
            Kind::Email => "[EMAIL]",
            Kind::Phone => "[PHONE]",
            Kind::Card => "[CARD]",
            Kind::Iban => "[IBAN]",
            Kind::UsSsn => "[SSN]",
            Kind::Ipv4 => "[IPV4]",
            Kind::Ipv6 => "[IPV6]",
            Kind::AwsAccessKey => "[AWS_ACCESS_KEY_ID]",
            Kind::AwsSecretKey => "[AWS_SECRET_ACCESS_KEY]",
            Kind::PemPrivateKey => "[PRIVATE_KEY]",
            Kind::Jwt => "[JWT]",
        }
    }

    fn compiled(self) -> &'static Compiled {
        static TABLE: OnceLock<Vec<Compiled>> = OnceLock::new();
        let table = TABLE.get_or_init(|| ALL.iter().map(|k| Compiled::new(*k)).collect());
        // `ALL` lists every kind once, in declaration order.
        #[allow(clippy::indexing_slicing)]
        &table[self as usize]
    }

    /// Every match in `text` (the folded, case-preserving view), as byte spans of `text`.
    pub fn find(self, text: &str, out: &mut Vec<(usize, usize)>) {
        let c = self.compiled();
        for caps in c.candidate.captures_iter(text) {
            // Group 1 is the part to report when the pattern carries context (a label, a
            // boundary character); otherwise the whole match.
            let Some(m) = caps.get(1).or_else(|| caps.get(0)) else {
                continue;
            };
            if self.valid(text, m.start(), m.end()) {
                out.push((m.start(), m.end()));
            }
        }
    }

    /// Where, if anywhere, the end of `text` may be the start of a match still being written.
    pub fn partial_start(self, text: &str) -> Option<usize> {
        self.compiled().partial.find(text).map(|m| m.start())
    }

    fn valid(self, text: &str, s: usize, e: usize) -> bool {
        let Some(m) = text.get(s..e) else {
            return false;
        };
        match self {
            Kind::Email => {
                let local = m.split('@').next().unwrap_or_default();
                !local.starts_with('.') && !local.ends_with('.') && !local.contains("..")
            }
            Kind::Phone => {
                let digits = m.bytes().filter(u8::is_ascii_digit).count();
                if m.starts_with('+') {
                    (8..=15).contains(&digits)
                } else {
                    digits == 10
                }
            }
            Kind::Card => {
                let digits: Vec<u8> = m
                    .bytes()
                    .filter(u8::is_ascii_digit)
                    .map(|b| b - b'0')
                    .collect();
                (13..=19).contains(&digits.len())
                    && luhn(&digits)
                    && digits.iter().any(|d| Some(d) != digits.first())
            }
            Kind::Iban => iban_valid(m),
            Kind::UsSsn => ssn_valid(m),
            Kind::Ipv4 => m.parse::<std::net::Ipv4Addr>().is_ok() || ipv4_lenient(m),
            Kind::Ipv6 => ipv6_valid(text, s, e),
            Kind::AwsAccessKey | Kind::AwsSecretKey | Kind::PemPrivateKey => true,
            Kind::Jwt => jwt_header_valid(m),
        }
    }
}

struct Compiled {
    candidate: Regex,
    partial: Regex,
}

impl Compiled {
    fn new(kind: Kind) -> Self {
        let (candidate, partial) = patterns(kind);
        // The patterns are constants, checked by `every_pattern_compiles`.
        #[allow(clippy::expect_used)]
        Compiled {
            candidate: Regex::new(&candidate).expect("detector pattern"),
            partial: Regex::new(&partial).expect("partial pattern"),
        }
    }
}

/// Every prefix of `word`, longest first, as a regex alternation.
fn prefixes(word: &str) -> String {
    let mut alts: Vec<String> = (1..=word.len())
        .rev()
        .filter_map(|n| word.get(..n))
        .map(regex::escape)
        .collect();
    alts.dedup();
    alts.join("|")
}

fn patterns(kind: Kind) -> (String, String) {
    let (c, p): (String, String) = match kind {
        Kind::Email => (
            r"\b[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b".into(),
            r"[A-Za-z0-9._%+-]{1,64}(?:@[A-Za-z0-9.-]{0,253})?$".into(),
        ),
        Kind::Phone => (
            r"(?:^|[^\w+])(\+[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,4}\)?){2,5})\b|(?:\([0-9]{3}\) ?|\b[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}\b".into(),
            r"[+(0-9][0-9 ().-]{0,24}$".into(),
        ),
        Kind::Card => (
            r"\b(?:[0-9][ -]?){12,18}[0-9]\b".into(),
            r"[0-9][0-9 -]{0,24}$".into(),
        ),
        Kind::Iban => (
            r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b".into(),
            r"\b[A-Z]{2}(?:[0-9]{1,2}[A-Z0-9 ]{0,38})?$".into(),
        ),
        Kind::UsSsn => (
            r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b|\b[0-9]{3} [0-9]{2} [0-9]{4}\b".into(),
            r"[0-9][0-9 -]{0,10}$".into(),
        ),
        Kind::Ipv4 => (
            r"\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b".into(),
            r"[0-9][0-9.]{0,14}$".into(),
        ),
        Kind::Ipv6 => (
            r"(?i)(?:[0-9a-f]{1,4}|:)?:[0-9a-f:]*[0-9a-f](?:\.[0-9]{1,3}){0,3}|(?i)[0-9a-f]{1,4}::".into(),
            r"(?i)\b[0-9a-f]{1,4}(?::[0-9a-f.:]{0,40})?$|(?i)::?[0-9a-f.:]{0,40}$".into(),
        ),
        Kind::AwsAccessKey => {
            let all = AWS_PREFIXES.join("|");
            let partial = AWS_PREFIXES
                .iter()
                .map(|p| prefixes(p))
                .collect::<Vec<_>>()
                .join("|");
            let c = format!(r"\b(?:{all})[A-Z2-7]{{16}}\b");
            (c, format!(r"\b(?:(?:{all})[A-Z2-7]{{0,16}}|{partial})$"))
        }
        Kind::AwsSecretKey => (
            r#"(?i:aws)?[_ .-]?(?i:secret)[_ .-]?(?i:access)?[_ .-]?(?i:key)["']?\s*[:=]?\s*["']?([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)"#.into(),
            r"(?i:secret)[^\n]{0,80}$".into(),
        ),
        Kind::PemPrivateKey => (
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?s:.*?)(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\z)".into(),
            format!(r"(?:{})$|-----BEGIN [A-Z0-9 ]{{0,40}}-{{0,5}}$", prefixes("-----BEGIN ")),
        ),
        Kind::Jwt => (
            r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*".into(),
            r"\b(?:e|ey|eyJ[A-Za-z0-9_.-]{0,8192})$".into(),
        ),
    };
    (c, p)
}

/// The Luhn check (ISO/IEC 7812-1 Annex B).
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// IBAN lengths by country (the SWIFT IBAN Registry); other countries: 15 to 34.
fn iban_length(country: &str) -> Option<usize> {
    Some(match country {
        "AD" => 24,
        "AT" => 20,
        "BE" => 16,
        "BG" => 22,
        "CH" => 21,
        "CY" => 28,
        "CZ" => 24,
        "DE" => 22,
        "DK" => 18,
        "EE" => 20,
        "ES" => 24,
        "FI" => 18,
        "FR" => 27,
        "GB" => 22,
        "GR" => 27,
        "HR" => 21,
        "HU" => 28,
        "IE" => 22,
        "IS" => 26,
        "IT" => 27,
        "LI" => 21,
        "LT" => 20,
        "LU" => 20,
        "LV" => 21,
        "MC" => 27,
        "MT" => 31,
        "NL" => 18,
        "NO" => 15,
        "PL" => 28,
        "PT" => 25,
        "RO" => 24,
        "SE" => 24,
        "SI" => 19,
        "SK" => 24,
        "SM" => 27,
        "TR" => 26,
        _ => return None,
    })
}

/// ISO 13616-1 §7: move the first four characters to the end, letters to 10..35, mod 97 = 1.
pub fn iban_valid(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    let (Some(country), Some(rest)) = (compact.get(..2), compact.get(4..)) else {
        return false;
    };
    let country = std::str::from_utf8(country).unwrap_or_default();
    match iban_length(country) {
        Some(n) if compact.len() != n => return false,
        None if !(15..=34).contains(&compact.len()) => return false,
        _ => {}
    }
    let mut r: u32 = 0;
    for &b in rest.iter().chain(compact.iter().take(4)) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        r = if v >= 10 {
            (r * 100 + v) % 97
        } else {
            (r * 10 + v) % 97
        };
    }
    r == 1
}

/// SSA rules: area 000, 666 and 900-999, group 00 and serial 0000 are never issued.
fn ssn_valid(s: &str) -> bool {
    let d: Vec<u32> = s
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| u32::from(b - b'0'))
        .collect();
    let [a1, a2, a3, g1, g2, s1, s2, s3, s4] = d[..] else {
        return false;
    };
    let area = a1 * 100 + a2 * 10 + a3;
    area != 0 && area != 666 && area < 900 && (g1, g2) != (0, 0) && (s1, s2, s3, s4) != (0, 0, 0, 0)
}

/// Dotted quads with leading zeros (`010.001.002.003`), which `Ipv4Addr` refuses but people write.
fn ipv4_lenient(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.parse::<u16>().is_ok_and(|v| v <= 255))
}

/// A parsable IPv6 address with at least two non-empty groups, not inside a longer word
/// (so `std::io` and clock times are not addresses).
fn ipv6_valid(text: &str, s: usize, e: usize) -> bool {
    let Some(m) = text.get(s..e) else {
        return false;
    };
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == ':' || c == '_');
    if word(text.get(..s).and_then(|t| t.chars().next_back()))
        || word(text.get(e..).and_then(|t| t.chars().next()))
    {
        return false;
    }
    let groups = m.split(':').filter(|g| !g.is_empty()).count();
    groups >= 2 && m.parse::<std::net::Ipv6Addr>().is_ok()
}

/// A JWT's first part is base64url JSON with an `alg` (RFC 7515 §4.1.1).
fn jwt_header_valid(m: &str) -> bool {
    let header = m.split('.').next().unwrap_or_default();
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    let text = String::from_utf8_lossy(&bytes);
    text.trim_start().starts_with('{') && text.contains("\"alg\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(kind: Kind, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        kind.find(text, &mut out);
        out.iter().map(|&(s, e)| text[s..e].to_string()).collect()
    }

    #[test]
    fn every_pattern_compiles() {
        for k in ALL {
            let _ = k.compiled();
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
    }

    #[test]
    fn luhn_and_mod97_checks() {
        let digits = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<_>>();
        assert!(luhn(&digits("4111111111111111")));
        assert!(!luhn(&digits("4111111111111112")));
        assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
        assert!(iban_valid("DE89370400440532013000"));
        assert!(!iban_valid("DE89370400440532013001"));
        assert!(!iban_valid("DE8937040044053201300")); // one short for Germany
    }

    #[test]
    fn each_detector_finds_its_kind() {
        assert_eq!(
            found(Kind::Email, "mail jane.doe+x@example.co.uk now"),
            ["jane.doe+x@example.co.uk"]
        );
        assert_eq!(
            found(Kind::Phone, "call +44 20 7946 0958 or (415) 555-2671."),
            ["+44 20 7946 0958", "(415) 555-2671"]
        );
        assert_eq!(
            found(
                Kind::Card,
                "card 4111 1111 1111 1111, not 4111 1111 1111 1112"
            ),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            found(Kind::Iban, "IBAN GB82 WEST 1234 5698 7654 32."),
            ["GB82 WEST 1234 5698 7654 32"]
        );
        assert_eq!(
            found(Kind::UsSsn, "ssn 078-05-1120, bad 666-12-3456"),
            ["078-05-1120"]
        );
        assert_eq!(
            found(Kind::Ipv4, "host 192.168.0.1 not 999.1.1.1"),
            ["192.168.0.1"]
        );
        assert_eq!(
            found(
                Kind::Ipv6,
                "at 2001:db8::8a2e:370:7334 and fe80::1, std::io 10:30"
            ),
            ["2001:db8::8a2e:370:7334", "fe80::1"]
        );
        assert_eq!(
            found(Kind::AwsAccessKey, "id AKIAIOSFODNN7EXAMPLE."),
            ["AKIAIOSFODNN7EXAMPLE"]
        );
        assert_eq!(
            found(
                Kind::AwsSecretKey,
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
            ),
            ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]
        );
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----";
        assert_eq!(found(Kind::PemPrivateKey, &format!("k: {pem} ok")), [pem]);
        // Truncated: to the end of the text.
        assert_eq!(
            found(Kind::PemPrivateKey, "-----BEGIN PRIVATE KEY-----\nMIIE"),
            ["-----BEGIN PRIVATE KEY-----\nMIIE"]
        );
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_eq!(found(Kind::Jwt, &format!("token {jwt} end")), [jwt]);
        assert!(found(Kind::Jwt, "eyJub3RhIjoiand0In0.abc.def").is_empty());
    }

    #[test]
    fn partials_hold_only_what_could_grow_into_a_match() {
        assert!(Kind::Card.partial_start("pay 4111 1111").is_some());
        assert!(Kind::Card.partial_start("Hello").is_none());
        assert_eq!(Kind::AwsAccessKey.partial_start("key AKI"), Some(4));
        assert!(Kind::AwsAccessKey.partial_start("Hello").is_none());
        assert_eq!(Kind::Jwt.partial_start("tok eyJhbGc"), Some(4));
        assert!(Kind::Jwt.partial_start("every").is_none());
        assert!(Kind::PemPrivateKey.partial_start("x\n-----BEG").is_some());
        assert!(Kind::Email.partial_start("jane.doe").is_some());
    }
}
