//! What stage one keeps of a URL's query string and fragment (`anonymizer.url_query`), one pure
//! function. Query strings often carry personal data (e-mail addresses, session tokens, user ids),
//! which GDPR treats like the client address.
//!
//! The `url` field holds whatever the edge logged: a path (`/a?b=1`), an absolute URL
//! (`https://h/a?b=1`) or text that is no URL at all. It is split as RFC 3986 does, without
//! parsing anything else: the fragment starts at the first `#`, the query at the first `?` before
//! it, and everything before the query (scheme, host, path) is never touched. No `?` and no `#`:
//! the URL passes unchanged under every policy. A `?` inside the fragment is part of the fragment.
//!
//! Policies:
//! - [`UrlQuery::Keep`] (default): the URL is stored exactly as logged.
//! - [`UrlQuery::DropValues`]: every parameter keeps its name and loses its value; the `=` stays,
//!   so `?a=1&b=x@y&flag` becomes `?a=&b=&flag`. Keeping `=` keeps the shape a reader can still
//!   parse (which parameters carried a value, which were bare flags) and the result is already
//!   in its final form, so applying the policy again changes nothing. Names are kept as written:
//!   a name that is itself personal data (`?alice@example.com`) survives; use an allow-list then.
//! - [`UrlQuery::AllowList`]: a parameter whose *decoded* name is on the list is kept whole (name
//!   and value, as written); every other parameter is removed entirely, name included, since a
//!   name can carry data as well. No parameter kept: the `?` goes too.
//!
//! Under both redacting policies the fragment (`#…`, with its `#`) is removed: browsers do not
//! send it, so a logged one comes from another kind of client, and fragments carry tokens (OAuth's
//! implicit flow puts `#access_token=…` there).
//!
//! Parameters are separated by `&` and by `;` (the older W3C form some servers still honour):
//! treating `;` as a separator means `?page=1;email=a@b` cannot smuggle `email` out inside an
//! allowed `page`. The price is that a raw `;` inside a value cuts it under an allow-list, which
//! loses data but never leaks any. Separators are kept as written. Empty parameters (`a&&b`) and
//! empty names (`=x`) are parameters like any other: `drop_values` keeps `&&` and `=`; an
//! allow-list never lists an empty name, so it removes them. Repeated names are handled one by
//! one, with no de-duplication. A name is decoded once before matching, as a server decodes it:
//! `%XX` becomes its byte and `+` a space (so `%65mail` is `email`); a `%` not followed by two hex
//! digits stays literal. Matching is byte-exact and case-sensitive, as parameter names are.
//!
//! Properties (property-tested below): never panics; idempotent; the result is never longer; the
//! part before the query is kept; `keep` returns the input itself (no copy).
//!
//! Text that is not UTF-8 never reaches this function: the record decoder dead-letters it as
//! `undecodable` first.

use std::borrow::Cow;
use std::fmt;

/// Most names an allow-list may hold, and the longest one in bytes: far beyond any real site's
/// set of analytics-relevant parameters; more is a configuration mistake.
pub const MAX_ALLOWED_NAMES: usize = 1000;
pub const MAX_ALLOWED_NAME_BYTES: usize = 256;

/// The policy, from `anonymizer.url_query`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UrlQuery {
    #[default]
    Keep,
    DropValues,
    AllowList(AllowList),
}

/// Parameter names kept with their values, sorted and de-duplicated for binary search.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowList {
    names: Vec<String>,
}

impl AllowList {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> AllowList {
        let mut names: Vec<String> = names.into_iter().map(Into::into).collect();
        names.sort();
        names.dedup();
        AllowList { names }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn allows(&self, decoded_name: &[u8]) -> bool {
        self.names
            .binary_search_by(|n| n.as_bytes().cmp(decoded_name))
            .is_ok()
    }
}

impl UrlQuery {
    /// The metric label and the configuration word of the policy.
    pub fn label(&self) -> &'static str {
        match self {
            UrlQuery::Keep => "keep",
            UrlQuery::DropValues => "drop_values",
            UrlQuery::AllowList(_) => "allow_list",
        }
    }

    /// What configuration validation reports, if anything: names that can never match as the
    /// operator meant them.
    pub fn problem(&self) -> Option<String> {
        let UrlQuery::AllowList(list) = self else {
            return None;
        };
        if list.names.len() > MAX_ALLOWED_NAMES {
            return Some(format!(
                "allow holds {} names, more than {MAX_ALLOWED_NAMES}",
                list.names.len()
            ));
        }
        for name in &list.names {
            if name.is_empty() {
                return Some("allow holds an empty name (a stray comma?)".into());
            }
            if name.len() > MAX_ALLOWED_NAME_BYTES {
                return Some(format!(
                    "allow holds a name of {} bytes, more than {MAX_ALLOWED_NAME_BYTES}",
                    name.len()
                ));
            }
            // Names are matched after decoding: `%65mail` in the list would only match a URL
            // holding `%2565mail`, never `email`.
            if name.contains('%') {
                return Some(format!(
                    "allow holds {name:?}: write names decoded (`email`, not `%65mail`)"
                ));
            }
        }
        None
    }

    /// The URL as stored under this policy: borrowed when nothing changes (always under `keep`),
    /// owned when the query or the fragment was changed.
    pub fn apply<'a>(&self, url: &'a str) -> Cow<'a, str> {
        match self {
            UrlQuery::Keep => Cow::Borrowed(url),
            UrlQuery::DropValues => redact(url, drop_values),
            UrlQuery::AllowList(list) => redact(url, |query, out| allow_only(list, query, out)),
        }
    }
}

/// Keeps everything before the query, rewrites the query with `rewrite` (which writes the `?`
/// when it keeps one) and drops the fragment.
fn redact<'a>(url: &'a str, rewrite: impl FnOnce(&str, &mut String)) -> Cow<'a, str> {
    let Some(cut) = url.find(['?', '#']) else {
        return Cow::Borrowed(url);
    };
    let before_fragment = &url[..url.find('#').unwrap_or(url.len())];
    let mut out = String::with_capacity(before_fragment.len());
    out.push_str(&url[..cut]);
    if let Some(query) = before_fragment[cut..].strip_prefix('?') {
        rewrite(query, &mut out);
    }
    if out == url {
        Cow::Borrowed(url)
    } else {
        Cow::Owned(out)
    }
}

/// The query's parameters, each with the separator that ends it (none for the last one). Nothing
/// after a final separator: `a=1&` is one parameter. Bytes are scanned, not chars: both
/// separators are ASCII, so every cut is on a character boundary.
fn parameters(query: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = query;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let q = rest;
        match q.bytes().position(|b| b == b'&' || b == b';') {
            Some(i) => {
                rest = &q[i + 1..];
                Some((&q[..i], &q[i..i + 1]))
            }
            None => {
                rest = "";
                Some((q, ""))
            }
        }
    })
}

fn drop_values(query: &str, out: &mut String) {
    out.push('?');
    for (param, separator) in parameters(query) {
        match param.split_once('=') {
            Some((name, _)) => {
                out.push_str(name);
                out.push('=');
            }
            None => out.push_str(param),
        }
        out.push_str(separator);
    }
}

fn allow_only(list: &AllowList, query: &str, out: &mut String) {
    let mut kept = 0usize;
    // The separator in front of the current parameter, kept between two kept parameters.
    let mut before = "";
    for (param, separator) in parameters(query) {
        let name = param.split_once('=').map_or(param, |(name, _)| name);
        // An empty parameter is never kept: it carries nothing, and keeping one would leave a
        // bare `?` that the next pass removes (not idempotent).
        if !param.is_empty() && list.allows(&decode_name(name)) {
            out.push_str(if kept == 0 { "?" } else { before });
            out.push_str(param);
            kept += 1;
        }
        before = separator;
    }
}

/// One level of `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; a
/// `%` without two hex digits stays as it is. Bytes, not text: `%FF` is a valid name to match
/// (and to not match).
fn decode_name(name: &str) -> Cow<'_, [u8]> {
    let bytes = name.as_bytes();
    if !bytes.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(bytes);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// `"keep"`, `"drop_values"` or `{ allow = [names] }`, the forms [`UrlQuery`]'s deserializer
/// reads back (so `edgelog config` prints a loadable file).
impl serde::Serialize for UrlQuery {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            UrlQuery::Keep | UrlQuery::DropValues => s.serialize_str(self.label()),
            UrlQuery::AllowList(list) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("allow", &list.names)?;
                map.end()
            }
        }
    }
}

/// Reads `"keep"`, `"drop_values"`, or a table with one key, `allow`: a list of names, or one
/// string of comma-separated names (what an environment variable can hold:
/// `EDGELOG_ANONYMIZER__URL_QUERY__ALLOW=page,lang`). Names that look like numbers are names.
impl<'de> serde::Deserialize<'de> for UrlQuery {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UrlQuery, D::Error> {
        struct Policy;
        impl<'de> serde::de::Visitor<'de> for Policy {
            type Value = UrlQuery;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"keep\", \"drop_values\" or { allow = [parameter names] }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UrlQuery, E> {
                match v {
                    "keep" => Ok(UrlQuery::Keep),
                    "drop_values" => Ok(UrlQuery::DropValues),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UrlQuery, A::Error> {
                let mut names = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "allow" {
                        return Err(serde::de::Error::unknown_field(&key, &["allow"]));
                    }
                    names = Some(map.next_value::<Names>()?.0);
                }
                let names = names.ok_or_else(|| serde::de::Error::missing_field("allow"))?;
                Ok(UrlQuery::AllowList(AllowList::new(names)))
            }
        }
        d.deserialize_any(Policy)
    }
}

/// The value of `allow`: a list, or a comma-separated string.
struct Names(Vec<String>);

impl<'de> serde::Deserialize<'de> for Names {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Names, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Names;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of parameter names or a comma-separated string of them")
            }
            fn visit_str<E>(self, v: &str) -> Result<Names, E> {
                if v.trim().is_empty() {
                    return Ok(Names(Vec::new()));
                }
                Ok(Names(v.split(',').map(|n| n.trim().to_string()).collect()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Names, E> {
                Ok(Names(vec![v.to_string()]))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Names, E> {
                Ok(Names(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Names, A::Error> {
                let mut names = Vec::new();
                while let Some(Name(n)) = seq.next_element::<Name>()? {
                    names.push(n);
                }
                Ok(Names(names))
            }
        }
        d.deserialize_any(V)
    }
}

/// One name of a list, numbers included (`[page, 10]` from an environment variable).
struct Name(String);

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a parameter name")
            }
            fn visit_str<E>(self, v: &str) -> Result<Name, E> {
                Ok(Name(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Name, E> {
                Ok(Name(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Name, E> {
                Ok(Name(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(names: &[&str]) -> UrlQuery {
        UrlQuery::AllowList(AllowList::new(names.iter().copied()))
    }

    /// Each hard case under the three policies.
    #[test]
    fn hard_cases() {
        let page_lang = allow(&["page", "lang", "q w"]);
        let table: &[(&str, &str, &str)] = &[
            // input, drop_values, allow [page, lang, "q w"]
            ("/a?a=1&b=x@y", "/a?a=&b=", "/a"),
            ("/a?email=a@b.c&page=2", "/a?email=&page=", "/a?page=2"),
            (
                "/a?page=2&email=a@b.c&lang=en",
                "/a?page=&email=&lang=",
                "/a?page=2&lang=en",
            ),
            // No query at all, not a URL at all, empty.
            ("/plain/path", "/plain/path", "/plain/path"),
            ("not a url", "not a url", "not a url"),
            ("", "", ""),
            // Absolute URLs: scheme and host untouched.
            (
                "https://h.example/p?page=1&t=s3cr3t",
                "https://h.example/p?page=&t=",
                "https://h.example/p?page=1",
            ),
            // The fragment goes under both, `?` inside it included.
            ("/a?page=1#frag", "/a?page=", "/a?page=1"),
            ("/a#access_token=x?page=1", "/a", "/a"),
            ("/a#", "/a", "/a"),
            // An empty query.
            ("/a?", "/a?", "/a"),
            // Percent-encoded names are decoded before matching, kept as written.
            (
                "/a?%70age=3&%65mail=x",
                "/a?%70age=&%65mail=",
                "/a?%70age=3",
            ),
            ("/a?%2570age=3", "/a?%2570age=", "/a"),
            (
                "/a?q+w=1&q%20w=2&q%2Bw=3",
                "/a?q+w=&q%20w=&q%2Bw=",
                "/a?q+w=1&q%20w=2",
            ),
            ("/a?%=1&%6=2&%zzpage=3", "/a?%=&%6=&%zzpage=", "/a"),
            // `;` separates too, and separators are kept as written.
            ("/a?page=1;email=a@b", "/a?page=;email=", "/a?page=1"),
            (
                "/a?x=1;page=1&lang=en",
                "/a?x=;page=&lang=",
                "/a?page=1&lang=en",
            ),
            (
                "/a?page=1;x=1&lang=en",
                "/a?page=;x=&lang=",
                "/a?page=1&lang=en",
            ),
            // Repeated names, one by one.
            ("/a?page=1&page=2", "/a?page=&page=", "/a?page=1&page=2"),
            // Empty parameters and empty names.
            ("/a?&&page=1&", "/a?&&page=&", "/a?page=1"),
            ("/a?=secret&page=1", "/a?=&page=", "/a?page=1"),
            // Parameters without `=`; a name that is itself personal data.
            (
                "/a?page&alice@example.com",
                "/a?page&alice@example.com",
                "/a?page",
            ),
            // `=` and `?` inside values.
            (
                "/a?page=a=b?c&lang=x",
                "/a?page=&lang=",
                "/a?page=a=b?c&lang=x",
            ),
            // Non-ASCII text.
            ("/ü?pägé=ü&page=ü", "/ü?pägé=&page=", "/ü?page=ü"),
            ("/a?%C3%BC=1", "/a?%C3%BC=", "/a"),
        ];
        for (input, dropped, allowed) in table {
            assert_eq!(UrlQuery::Keep.apply(input), *input);
            assert_eq!(
                UrlQuery::DropValues.apply(input),
                *dropped,
                "drop_values {input:?}"
            );
            assert_eq!(page_lang.apply(input), *allowed, "allow {input:?}");
        }
    }

    #[test]
    fn decoded_bytes_match() {
        assert_eq!(allow(&["ü"]).apply("/a?%C3%BC=1"), "/a?%C3%BC=1");
        // A byte that is no UTF-8 on its own matches no configured name.
        assert_eq!(allow(&["\u{ff}"]).apply("/a?%FF=1"), "/a");
        assert_eq!(&*decode_name("%41%4a+%4"), b"AJ %4");
        assert_eq!(&*decode_name("%FF"), &[0xff]);
    }

    #[test]
    fn unchanged_urls_are_borrowed() {
        for (policy, url) in [
            (UrlQuery::Keep, "/a?email=x#f"),
            (UrlQuery::DropValues, "/a?email=&page"),
            (allow(&["page"]), "/a?page=1"),
            (UrlQuery::DropValues, "/no/query"),
        ] {
            assert!(
                matches!(policy.apply(url), Cow::Borrowed(u) if u == url),
                "{url}"
            );
        }
        assert!(matches!(
            UrlQuery::DropValues.apply("/a?x=1"),
            Cow::Owned(_)
        ));
    }

    #[test]
    fn problems_name_the_mistake() {
        assert_eq!(UrlQuery::Keep.problem(), None);
        assert_eq!(
            allow(&[]).problem(),
            None,
            "an empty list drops every parameter"
        );
        assert_eq!(allow(&["page", "lang"]).problem(), None);
        assert!(allow(&["page", ""]).problem().unwrap().contains("empty"));
        assert!(allow(&["%65mail"]).problem().unwrap().contains("decoded"));
        let long = "n".repeat(MAX_ALLOWED_NAME_BYTES + 1);
        assert!(allow(&[long.as_str()]).problem().is_some());
        let many: Vec<String> = (0..=MAX_ALLOWED_NAMES).map(|i| i.to_string()).collect();
        assert!(UrlQuery::AllowList(AllowList::new(many))
            .problem()
            .is_some());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Text built from the characters that matter (separators, `%` and hex digits, `+`, `=`, `?`,
    /// `#`, non-ASCII), so the structure is hit far more often than arbitrary text hits it.
    fn urlish() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-c/?#&;=%+2F5é ]{0,40}",
            "(https://h)?/[a-z]{0,3}(\\?([a-c%2F5+]{0,4}(=[a-c=?@]{0,4})?[&;]?){0,5})?(#[a-c?=&]{0,5})?",
        ]
    }

    fn policy() -> impl Strategy<Value = UrlQuery> {
        prop_oneof![
            Just(UrlQuery::Keep),
            Just(UrlQuery::DropValues),
            prop::collection::vec("[a-c%2F5+ é]{0,3}", 0..4)
                .prop_map(|names| UrlQuery::AllowList(AllowList::new(names))),
        ]
    }

    /// Where the query or the fragment starts: the part every policy keeps.
    fn head(url: &str) -> &str {
        &url[..url.find(['?', '#']).unwrap_or(url.len())]
    }

    proptest! {
        // Cheap (microseconds per case), so more cases than proptest's default 256.
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn idempotent_never_longer_head_kept(url in urlish(), policy in policy()) {
            let once = policy.apply(&url);
            prop_assert!(once.len() <= url.len());
            prop_assert!(once.starts_with(head(&url)), "{:?} -> {:?}", url, once);
            prop_assert_eq!(head(&once), head(&url));
            let twice = policy.apply(&once);
            prop_assert_eq!(&*twice, &*once);
            prop_assert!(matches!(twice, Cow::Borrowed(_)), "a second pass changes nothing");
            prop_assert_eq!(matches!(once, Cow::Owned(_)), *once != *url);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), policy in policy()) {
            let url = String::from_utf8_lossy(&bytes);
            let _ = policy.apply(&url);
        }

        #[test]
        fn keep_is_the_identity(url in urlish()) {
            prop_assert!(matches!(UrlQuery::Keep.apply(&url), Cow::Borrowed(u) if u == url));
        }

        /// Under the redacting policies no fragment survives, and no value survives `drop_values`.
        #[test]
        fn fragments_and_values_go(url in urlish()) {
            let dropped = UrlQuery::DropValues.apply(&url);
            prop_assert!(!dropped.contains('#'));
            if let Some((_, query)) = dropped.split_once('?') {
                for param in query.split(['&', ';']) {
                    prop_assert!(param.split_once('=').is_none_or(|(_, v)| v.is_empty()), "{:?}", dropped);
                }
            }
            prop_assert!(!allow_none().apply(&url).contains(['#', '?']));
        }

        /// An allow-list keeps exactly the listed parameters, whole and in order.
        #[test]
        fn allow_list_keeps_listed_parameters(url in urlish(), names in prop::collection::vec("[a-c%2F5+]{1,3}", 0..4)) {
            let list = AllowList::new(names);
            let out = UrlQuery::AllowList(list.clone()).apply(&url);
            // Non-empty parameters of the query; an empty one never has a listed name.
            let query_of = |u: &str| -> Vec<String> {
                let before = &u[..u.find('#').unwrap_or(u.len())];
                before.split_once('?').map_or(Vec::new(), |(_, q)| {
                    q.split(['&', ';']).filter(|p| !p.is_empty()).map(str::to_string).collect()
                })
            };
            let name_of = |p: &str| decode_name(p.split_once('=').map_or(p, |(n, _)| n)).into_owned();
            let expected: Vec<String> = query_of(&url).into_iter().filter(|p| list.allows(&name_of(p))).collect();
            prop_assert_eq!(query_of(&out), expected);
        }
    }

    fn allow_none() -> UrlQuery {
        UrlQuery::AllowList(AllowList::new(Vec::<String>::new()))
    }
}
