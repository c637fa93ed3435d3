//! Client IP anonymization (GDPR), one pure function.
//!
//! Text forms produced:
//! - IPv4 `a.b.c.d` becomes `a.b.c.X` (the last octet is gone; `a.b.c` is written canonically).
//! - IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is an IPv4 client and becomes `a.b.c.X` too.
//! - Other IPv6 keeps its first `prefix_bits` bits (default 48, at most 64): the hextets that hold
//!   the prefix are written in lowercase hex without leading zeros, bits past the prefix inside the
//!   last of them zeroed, followed by `:X`. `2001:db8:85a3:8d3:1319:8a2e:370:7348` with /48 becomes
//!   `2001:db8:85a3:X`; with /56, `2001:db8:85a3:800:X`; with /0, `X`.
//! - Anything else (empty, a host name, a port suffix, leading zeros, out-of-range octets) never
//!   passes through: it becomes [`INVALID_MARKER`], and the caller counts it.
//!
//! Surrounding ASCII whitespace is ignored; nothing else is repaired. Leading zeros are rejected
//! because `010.1.1.1` means 8.1.1.1 to some parsers and 10.1.1.1 to others.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What an address that is neither IPv4 nor IPv6 becomes.
pub const INVALID_MARKER: &str = "invalid";

/// Largest IPv6 prefix kept: more than a /64 would identify a subscriber's host.
pub const MAX_IPV6_PREFIX_BITS: u8 = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anonymized {
    V4(String),
    V6(String),
    /// Not an IP address; the text is [`INVALID_MARKER`].
    Invalid,
}

impl Anonymized {
    pub fn as_str(&self) -> &str {
        match self {
            Anonymized::V4(s) | Anonymized::V6(s) => s,
            Anonymized::Invalid => INVALID_MARKER,
        }
    }
}

/// Anonymizes one client address. `ipv6_prefix_bits` is clamped to [`MAX_IPV6_PREFIX_BITS`].
pub fn anonymize_ip(addr: &str, ipv6_prefix_bits: u8) -> Anonymized {
    match addr
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .parse::<IpAddr>()
    {
        Ok(IpAddr::V4(v4)) => Anonymized::V4(v4_text(v4)),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => Anonymized::V4(v4_text(v4)),
            None => Anonymized::V6(v6_text(v6, ipv6_prefix_bits.min(MAX_IPV6_PREFIX_BITS))),
        },
        Err(_) => Anonymized::Invalid,
    }
}

fn v4_text(v4: Ipv4Addr) -> String {
    let [a, b, c, _] = v4.octets();
    format!("{a}.{b}.{c}.X")
}

fn v6_text(v6: Ipv6Addr, prefix_bits: u8) -> String {
    let bits = u128::from(v6);
    let masked = if prefix_bits == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(prefix_bits)))
    };
    let hextets = Ipv6Addr::from(masked).segments();
    let kept = usize::from(prefix_bits).div_ceil(16);
    let mut out = String::with_capacity(kept * 5 + 2);
    for h in &hextets[..kept] {
        let _ = write!(out, "{h:x}:");
    }
    out.push('X');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_of_cases() {
        let cases: &[(&str, u8, &str)] = &[
            ("1.2.3.4", 48, "1.2.3.X"),
            ("0.0.0.0", 48, "0.0.0.X"),
            ("255.255.255.255", 48, "255.255.255.X"),
            ("10.0.0.1", 48, "10.0.0.X"),
            (" 10.0.0.1", 48, "10.0.0.X"),
            ("10.0.0.1 \t", 48, "10.0.0.X"),
            ("::ffff:1.2.3.4", 48, "1.2.3.X"),
            ("::FFFF:1.2.3.4", 48, "1.2.3.X"),
            (
                "2001:db8:85a3:8d3:1319:8a2e:370:7348",
                48,
                "2001:db8:85a3:X",
            ),
            ("2001:DB8:85A3::1", 48, "2001:db8:85a3:X"),
            (
                "2001:db8:85a3:8d3:1319:8a2e:370:7348",
                56,
                "2001:db8:85a3:800:X",
            ),
            (
                "2001:db8:85a3:8d3:1319:8a2e:370:7348",
                64,
                "2001:db8:85a3:8d3:X",
            ),
            (
                "2001:db8:85a3:8d3:1319:8a2e:370:7348",
                128,
                "2001:db8:85a3:8d3:X",
            ),
            ("2001:db8:85a3:8d3::1", 32, "2001:db8:X"),
            ("2001:db8:85a3:8d3::1", 0, "X"),
            ("2001:db8:85a3:8d3::1", 1, "0:X"),
            ("::1", 48, "0:0:0:X"),
            ("::", 48, "0:0:0:X"),
            ("", 48, INVALID_MARKER),
            ("   ", 48, INVALID_MARKER),
            ("unknown", 48, INVALID_MARKER),
            ("1.2.3", 48, INVALID_MARKER),
            ("1.2.3.4.5", 48, INVALID_MARKER),
            ("256.1.1.1", 48, INVALID_MARKER),
            ("01.2.3.4", 48, INVALID_MARKER),
            ("1.2.3.004", 48, INVALID_MARKER),
            ("1.2.3.4:8080", 48, INVALID_MARKER),
            ("[2001:db8::1]", 48, INVALID_MARKER),
            ("fe80::1%eth0", 48, INVALID_MARKER),
            ("1.2.3.-4", 48, INVALID_MARKER),
            ("1 .2.3.4", 48, INVALID_MARKER),
        ];
        for (input, bits, expected) in cases {
            assert_eq!(
                anonymize_ip(input, *bits).as_str(),
                *expected,
                "{input:?} /{bits}"
            );
        }
    }

    #[test]
    fn kinds() {
        assert!(matches!(anonymize_ip("1.2.3.4", 48), Anonymized::V4(_)));
        assert!(matches!(
            anonymize_ip("::ffff:1.2.3.4", 48),
            Anonymized::V4(_)
        ));
        assert!(matches!(anonymize_ip("2001:db8::1", 48), Anonymized::V6(_)));
        assert_eq!(anonymize_ip("nope", 48), Anonymized::Invalid);
    }

    /// Property: for many pseudo-random addresses, the last IPv4 octet and IPv6 bits past the
    /// prefix never survive, and the output is a pure function of the kept part.
    #[test]
    fn never_leaks_past_the_prefix() {
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let v4 = Ipv4Addr::from(next() as u32);
            let out = anonymize_ip(&v4.to_string(), 48);
            let [a, b, c, _] = v4.octets();
            assert_eq!(out.as_str(), format!("{a}.{b}.{c}.X"));
            // Any last octet gives the same output.
            let other = Ipv4Addr::new(a, b, c, (next() & 0xff) as u8);
            assert_eq!(anonymize_ip(&other.to_string(), 48), out);

            let bits = (u128::from(next()) << 64) | u128::from(next());
            let v6 = Ipv6Addr::from(bits);
            if v6.to_ipv4_mapped().is_some() {
                continue;
            }
            for prefix in [0u8, 1, 17, 32, 48, 56, 63, 64] {
                let out = anonymize_ip(&v6.to_string(), prefix);
                let keep = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix))
                };
                let noise = u128::from(next()) & !keep;
                let sibling = Ipv6Addr::from((bits & keep) | noise);
                if sibling.to_ipv4_mapped().is_none() {
                    assert_eq!(
                        anonymize_ip(&sibling.to_string(), prefix),
                        out,
                        "{v6} /{prefix}"
                    );
                }
                let hextets = out.as_str().split(':').count() - 1;
                assert_eq!(hextets, usize::from(prefix).div_ceil(16), "{out:?}");
            }
        }
    }
}

/// Property tests: what the anonymizer may reveal, checked on generated addresses and text.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Parses a V6 output back into its network part, checking the documented form on the way:
    /// `h:h:...:X`, lowercase hex hextets without leading zeros.
    fn parse_v6_output(out: &str) -> Result<Vec<u16>, String> {
        let network = out.strip_suffix('X').ok_or("does not end in X")?;
        if network.is_empty() {
            return Ok(Vec::new());
        }
        let network = network.strip_suffix(':').ok_or("no ':' before X")?;
        network
            .split(':')
            .map(|h| {
                let ok = !h.is_empty()
                    && h.len() <= 4
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    && (h == "0" || !h.starts_with('0'));
                if ok {
                    Ok(u16::from_str_radix(h, 16).expect("checked hex"))
                } else {
                    Err(format!("bad hextet {h:?}"))
                }
            })
            .collect()
    }

    fn mask(prefix: u8) -> u128 {
        if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(prefix))
        }
    }

    /// IPv6 addresses that are not IPv4-mapped (those are IPv4 clients, tested separately).
    fn plain_v6() -> impl Strategy<Value = Ipv6Addr> {
        prop_oneof![
            any::<u128>(),
            // Few set bits: exercise `::` compression in the input text.
            (any::<u64>(), 0u32..128).prop_map(|(x, shift)| u128::from(x) << shift),
        ]
        .prop_map(Ipv6Addr::from)
        .prop_filter("IPv4-mapped", |a| a.to_ipv4_mapped().is_none())
    }

    /// Text forms one address can arrive in: canonical, fully expanded, uppercase, padded.
    fn v6_text_forms(a: Ipv6Addr) -> Vec<String> {
        let s = a.segments();
        let expanded = s.map(|h| format!("{h:04X}")).join(":");
        vec![
            a.to_string(),
            expanded,
            format!(" {}\t", a.to_string().to_uppercase()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn ipv4_output_is_exactly_the_first_three_octets(
            octets in any::<[u8; 4]>(),
            prefix in any::<u8>(),
            pad in "[ \t\n\r]{0,2}",
        ) {
            let [a, b, c, _] = octets;
            let text = format!("{pad}{}{pad}", Ipv4Addr::from(octets));
            prop_assert_eq!(
                anonymize_ip(&text, prefix),
                Anonymized::V4(format!("{a}.{b}.{c}.X"))
            );
        }

        #[test]
        fn ipv4_mapped_ipv6_is_anonymized_as_ipv4(octets in any::<[u8; 4]>(), prefix in any::<u8>()) {
            let [a, b, c, _] = octets;
            let mapped = Ipv4Addr::from(octets).to_ipv6_mapped();
            let s = mapped.segments();
            // Dotted tail, hex tail and fully expanded all name the same IPv4 client.
            for text in [
                mapped.to_string(),
                format!("::ffff:{:x}:{:x}", s[6], s[7]),
                format!("0:0:0:0:0:FFFF:{}", Ipv4Addr::from(octets)),
            ] {
                prop_assert_eq!(
                    anonymize_ip(&text, prefix),
                    Anonymized::V4(format!("{a}.{b}.{c}.X")),
                    "{}", text
                );
            }
        }

        /// Every prefix length the function accepts (any `u8`; above 64 it is clamped): the
        /// output's network part is exactly the input's first `min(prefix, 64)` bits, so nothing
        /// past the prefix can be present.
        #[test]
        fn ipv6_output_holds_only_the_prefix(addr in plain_v6(), prefix in any::<u8>()) {
            let kept = prefix.min(MAX_IPV6_PREFIX_BITS);
            for text in v6_text_forms(addr) {
                let out = anonymize_ip(&text, prefix);
                let Anonymized::V6(out) = out else {
                    return Err(TestCaseError::fail(format!("{text:?} gave {out:?}")));
                };
                let hextets = parse_v6_output(&out).map_err(|e| TestCaseError::fail(format!("{out:?}: {e}")))?;
                prop_assert_eq!(hextets.len(), usize::from(kept).div_ceil(16), "{}", out);
                let mut network = [0u16; 8];
                network[..hextets.len()].copy_from_slice(&hextets);
                let network = u128::from(Ipv6Addr::from(network));
                prop_assert_eq!(network & !mask(kept), 0, "bits past /{} in {}", kept, out);
                prop_assert_eq!(network, u128::from(addr) & mask(kept), "{}", out);
            }
        }

        /// Arbitrary text: the output is the marker or an anonymized form ending in `X`, and text
        /// comes out unchanged only if it is the marker itself.
        #[test]
        fn arbitrary_text_never_passes_through(
            text in prop_oneof![
                any::<String>(),
                "[0-9a-fA-F:.%\\[\\] \t]{0,48}",
                Just(INVALID_MARKER.to_string()),
            ],
            prefix in any::<u8>(),
        ) {
            let out = anonymize_ip(&text, prefix);
            let s = out.as_str();
            match &out {
                Anonymized::Invalid => prop_assert_eq!(s, INVALID_MARKER),
                Anonymized::V4(_) | Anonymized::V6(_) => {
                    prop_assert!(s.ends_with('X'), "{:?} -> {:?}", text, s);
                    prop_assert!(text.trim().parse::<IpAddr>().is_ok(), "{:?} -> {:?}", text, s);
                }
            }
            prop_assert!(s != text || text == INVALID_MARKER, "{:?} passed through", text);
        }
    }
}
