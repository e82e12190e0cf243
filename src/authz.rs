//! The allow-list: which authenticated client identities may reach the app.
//!
//! Pure. A [`Policy`] is built once from `--allow` patterns and asked once per handshake.
//! Patterns: a URI (`spiffe://cluster.local/ns/shop/sa/*`, where `*` is one path segment and `**`
//! any number of them), `dns:NAME` (`*` is one label, `**` one or more), or `cn:NAME` (exact).
//! Depends on `x509` for the identity's names.

use crate::x509::CertSummary;

/// Why an allow pattern was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The pattern is not of a known form.
    #[error("allow pattern '{pattern}': {reason}")]
    BadPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither a pattern nor `--allow-any-authenticated` was given.
    #[error("no allow policy: give --allow PATTERN (repeatable) or --allow-any-authenticated")]
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Many,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Uri { scheme: String, segments: Vec<Segment> },
    Dns(Vec<Segment>),
    Cn(String),
}

/// The result of asking the policy about one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it in; names the pattern that matched (or `any-authenticated`).
    Allow(String),
    /// Refuse it; says who was refused (for a 403 body and a log line).
    Deny(Denied),
}

/// An identity the allow-list does not admit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identity {who} is not allowed by this proxy's allow-list")]
pub struct Denied {
    /// The identity's best name: SPIFFE ID, URI, DNS name, or its subject.
    pub who: String,
}

/// The configured allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<(String, Rule)>,
    any_authenticated: bool,
}

fn bad(pattern: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::BadPattern {
        pattern: pattern.to_owned(),
        reason: reason.into(),
    }
}

fn segments(pattern: &str, parts: &[&str], what: &str) -> Result<Vec<Segment>, PolicyError> {
    parts
        .iter()
        .map(|p| match *p {
            "*" => Ok(Segment::One),
            "**" => Ok(Segment::Many),
            "" => Err(bad(pattern, format!("empty {what}"))),
            lit if lit.contains('*') => Err(bad(
                pattern,
                format!("'*' and '**' must stand for a whole {what}, not part of '{lit}'"),
            )),
            lit => Ok(Segment::Literal(lit.to_owned())),
        })
        .collect()
}

fn parse_rule(pattern: &str) -> Result<Rule, PolicyError> {
    if let Some(name) = pattern.strip_prefix("dns:") {
        let labels: Vec<&str> = name.split('.').collect();
        let segs = segments(pattern, &labels, "DNS label")?;
        return Ok(Rule::Dns(
            segs.into_iter()
                .map(|s| match s {
                    Segment::Literal(l) => Segment::Literal(l.to_ascii_lowercase()),
                    other => other,
                })
                .collect(),
        ));
    }
    if let Some(name) = pattern.strip_prefix("cn:") {
        if name.is_empty() {
            return Err(bad(pattern, "empty common name"));
        }
        return Ok(Rule::Cn(name.to_owned()));
    }
    if let Some((scheme, rest)) = pattern.split_once("://") {
        if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
            return Err(bad(pattern, "invalid URI scheme"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let segs = segments(pattern, &parts, "path segment")?;
        return Ok(Rule::Uri {
            scheme: scheme.to_ascii_lowercase(),
            segments: segs,
        });
    }
    Err(bad(
        pattern,
        "expected a URI (spiffe://trust-domain/ns/NAMESPACE/sa/ACCOUNT), dns:NAME or cn:NAME",
    ))
}

/// Matches name parts against pattern segments; `many_min` is the least number of parts `**`
/// stands for (0 in URI paths, 1 in DNS names).
fn match_segments(pattern: &[Segment], value: &[&str], fold_case: bool, many_min: usize) -> bool {
    let Some((seg, rest)) = pattern.split_first() else {
        return value.is_empty();
    };
    let next = |v: &[&str]| match_segments(rest, v, fold_case, many_min);
    match seg {
        Segment::Many => (many_min..=value.len()).any(|skip| next(&value[skip..])),
        Segment::One => value.split_first().is_some_and(|(v, tail)| !v.is_empty() && next(tail)),
        Segment::Literal(l) => value
            .split_first()
            .is_some_and(|(v, tail)| (if fold_case { l.eq_ignore_ascii_case(v) } else { l == v }) && next(tail)),
    }
}

impl Rule {
    fn matches(&self, id: &CertSummary) -> bool {
        match self {
            Rule::Uri { scheme, segments } => id.uri_sans.iter().any(|uri| {
                uri.split_once("://").is_some_and(|(s, rest)| {
                    s.eq_ignore_ascii_case(scheme) && {
                        let parts: Vec<&str> = rest.split('/').collect();
                        match_segments(segments, &parts, false, 0)
                    }
                })
            }),
            Rule::Dns(segments) => id.dns_sans.iter().any(|dns| {
                let parts: Vec<&str> = dns.trim_end_matches('.').split('.').collect();
                // `**` in a DNS pattern stands for one or more labels, never zero.
                match_segments(segments, &parts, true, 1)
            }),
            Rule::Cn(cn) => id.common_name.as_deref() == Some(cn.as_str()),
        }
    }
}

impl Policy {
    /// Builds the policy; refuses an empty one so that there is never a silent open door.
    pub fn new(patterns: &[String], any_authenticated: bool) -> Result<Self, PolicyError> {
        if patterns.is_empty() && !any_authenticated {
            return Err(PolicyError::Empty);
        }
        let rules = patterns
            .iter()
            .map(|p| parse_rule(p).map(|r| (p.clone(), r)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            rules,
            any_authenticated,
        })
    }

    /// A policy that admits nobody: the inbound side of an outbound-only proxy, which has no
    /// inbound listener.
    pub fn nobody() -> Self {
        Self {
            rules: Vec::new(),
            any_authenticated: false,
        }
    }

    /// Checks that a pattern parses, without building a policy (for admission-time validation).
    pub fn check_pattern(pattern: &str) -> Result<(), PolicyError> {
        parse_rule(pattern).map(|_| ())
    }

    /// Decides whether the identity may pass.
    pub fn decide(&self, id: &CertSummary) -> Decision {
        if let Some((pattern, _)) = self.rules.iter().find(|(_, r)| r.matches(id)) {
            return Decision::Allow(pattern.clone());
        }
        if self.any_authenticated {
            return Decision::Allow("any-authenticated".to_owned());
        }
        let who = id
            .spiffe_id()
            .or(id.uri_sans.first().map(String::as_str))
            .or(id.dns_sans.first().map(String::as_str))
            .map(str::to_owned)
            .unwrap_or_else(|| format!("subject \"{}\"", id.subject));
        Decision::Deny(Denied { who })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uris: &[&str], dns: &[&str], cn: Option<&str>) -> CertSummary {
        CertSummary::fake(&cn.map(|c| format!("CN={c}")).unwrap_or_default(), cn, uris, dns)
    }

    fn policy(p: &[&str]) -> Policy {
        Policy::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false).unwrap()
    }

    fn allowed(p: &Policy, who: &CertSummary) -> bool {
        matches!(p.decide(who), Decision::Allow(_))
    }

    #[test]
    fn exact_spiffe_id_matches_only_itself() {
        let p = policy(&["spiffe://cluster.local/ns/shop/sa/frontend"]);
        assert!(allowed(
            &p,
            &id(&["spiffe://cluster.local/ns/shop/sa/frontend"], &[], None)
        ));
        assert!(!allowed(
            &p,
            &id(&["spiffe://cluster.local/ns/shop/sa/backend"], &[], None)
        ));
        assert!(!allowed(
            &p,
            &id(&["spiffe://cluster.local/ns/shop/sa/frontend/x"], &[], None)
        ));
        assert!(!allowed(
            &p,
            &id(&["spiffe://other.local/ns/shop/sa/frontend"], &[], None)
        ));
    }

    #[test]
    fn single_star_is_exactly_one_segment() {
        let p = policy(&["spiffe://cluster.local/ns/*/sa/frontend"]);
        assert!(allowed(
            &p,
            &id(&["spiffe://cluster.local/ns/shop/sa/frontend"], &[], None)
        ));
        assert!(!allowed(
            &p,
            &id(&["spiffe://cluster.local/ns/a/b/sa/frontend"], &[], None)
        ));
        assert!(!allowed(
            &p,
            &id(&["spiffe://cluster.local/ns//sa/frontend"], &[], None)
        ));
    }

    #[test]
    fn double_star_is_any_number_of_segments() {
        let p = policy(&["spiffe://cluster.local/ns/shop/**"]);
        assert!(allowed(
            &p,
            &id(&["spiffe://cluster.local/ns/shop/sa/frontend"], &[], None)
        ));
        assert!(allowed(&p, &id(&["spiffe://cluster.local/ns/shop"], &[], None)));
        assert!(!allowed(&p, &id(&["spiffe://cluster.local/ns/other/sa/x"], &[], None)));
        let p = policy(&["spiffe://cluster.local/**/sa/admin"]);
        assert!(allowed(&p, &id(&["spiffe://cluster.local/ns/a/sa/admin"], &[], None)));
        assert!(!allowed(&p, &id(&["spiffe://cluster.local/ns/a/sa/user"], &[], None)));
    }

    #[test]
    fn dns_patterns_match_labels_case_insensitively() {
        let p = policy(&["dns:*.shop.svc"]);
        assert!(allowed(&p, &id(&[], &["frontend.shop.svc"], None)));
        assert!(allowed(&p, &id(&[], &["FrontEnd.Shop.SVC"], None)));
        assert!(!allowed(&p, &id(&[], &["a.b.shop.svc"], None)));
        assert!(!allowed(&p, &id(&[], &["shop.svc"], None)));
        let p = policy(&["dns:**.shop.svc"]);
        assert!(allowed(&p, &id(&[], &["a.b.shop.svc"], None)));
        assert!(!allowed(&p, &id(&[], &["shop.svc"], None)));
    }

    #[test]
    fn cn_patterns_match_the_common_name_exactly() {
        let p = policy(&["cn:billing"]);
        assert!(allowed(&p, &id(&[], &[], Some("billing"))));
        assert!(!allowed(&p, &id(&[], &[], Some("billing2"))));
        assert!(!allowed(&p, &id(&[], &[], None)));
    }

    #[test]
    fn any_of_several_patterns_is_enough_and_names_the_match() {
        let p = policy(&["cn:x", "spiffe://td/ns/a/sa/b"]);
        assert_eq!(
            p.decide(&id(&["spiffe://td/ns/a/sa/b"], &[], None)),
            Decision::Allow("spiffe://td/ns/a/sa/b".into())
        );
    }

    #[test]
    fn deny_reason_names_the_identity() {
        let p = policy(&["spiffe://td/ns/a/sa/b"]);
        match p.decide(&id(&["spiffe://td/ns/a/sa/evil"], &[], None)) {
            Decision::Deny(denied) => {
                assert_eq!(denied.who, "spiffe://td/ns/a/sa/evil");
                let reason = denied.to_string();
                assert!(!reason.contains('\n'));
            }
            other => panic!("expected deny, got {other:?}"),
        }
    }

    #[test]
    fn any_authenticated_admits_everyone() {
        let p = Policy::new(&[], true).unwrap();
        assert!(allowed(&p, &id(&[], &[], None)));
    }

    #[test]
    fn an_empty_policy_is_refused() {
        assert_eq!(Policy::new(&[], false), Err(PolicyError::Empty));
    }

    #[test]
    fn malformed_patterns_are_refused_with_a_reason() {
        for bad in [
            "frontend",
            "spiffe://td/ns/fr*nt",
            "dns:",
            "dns:a..b",
            "cn:",
            "://x",
            "spiffe://td//x",
        ] {
            let err = Policy::check_pattern(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
    }
}
