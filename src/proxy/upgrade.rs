//! The HTTP/1.1 WebSocket upgrade on both legs, and header hygiene.
//!
//! Pure functions over `http` types: check the client's request, build the app's request or an
//! outbound remote's (strip
//! hop-by-hop headers, extensions wsgate does not relay, and any header the client tried to forge
//! that wsgate sets or that names the client: in any case and with `_` for `-`, since WSGI, Rack
//! and CGI read both spellings as one variable; add the verified identity), check the app's 101
//! and build the client's, or relay the app's refusal. Depends on `tls::identity`.

use std::borrow::Cow;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Empty, Full};

use crate::tls::PeerIdentity;

/// The identity header, in Envoy's format.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// The client certificate's not-after, RFC 3339.
pub const CLIENT_NOT_AFTER: HeaderName = HeaderName::from_static("x-wsgate-client-not-after");
const OUR_PREFIX: &str = "x-wsgate-";
/// Headers the client may not send under any spelling: wsgate sets them (the identity, the hop
/// it saw) or they claim facts about the client or the hop that only a proxy knows
/// (`Forwarded`, `X-Real-IP`, the host, port, prefix and scheme it was reached at: apps and
/// frameworks trust these for redirects, links and access rules). Compared after [`canonical`].
const RESERVED: [&str; 12] = [
    "x-forwarded-client-cert",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
];
const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");
const SEC_WEBSOCKET_PROTOCOL: HeaderName = HeaderName::from_static("sec-websocket-protocol");
const SEC_WEBSOCKET_EXTENSIONS: HeaderName = HeaderName::from_static("sec-websocket-extensions");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never cross the proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Why a request is not a WebSocket upgrade this proxy can serve (answered 426).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotUpgrade {
    /// Only GET opens a WebSocket.
    #[error("method {0} is not GET")]
    Method(Method),
    /// HTTP/2 and HTTP/1.0 cannot upgrade.
    #[error("{0:?} cannot upgrade to WebSocket, use HTTP/1.1")]
    Version(Version),
    /// No `Upgrade: websocket`.
    #[error("no 'Upgrade: websocket' header")]
    NoUpgradeHeader,
    /// No `Connection: upgrade`.
    #[error("no 'Connection: upgrade' header")]
    NoConnectionUpgrade,
    /// The key is missing or not 16 bytes in base64.
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    /// Only version 13 exists.
    #[error("Sec-WebSocket-Version must be 13")]
    BadVersion,
}

/// Why the app's 101 cannot be passed on to the client (answered 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAnswer {
    /// The 101 lacks the upgrade headers.
    #[error("the app answered 101 without 'Upgrade: websocket' and 'Connection: upgrade'")]
    NotWebsocket,
    /// The accept key does not prove the app read the client's key.
    #[error("the app's Sec-WebSocket-Accept does not match the key")]
    AcceptMismatch,
    /// Extensions are never offered to the app.
    #[error("the app negotiated a WebSocket extension that was not offered")]
    Extension,
    /// The chosen subprotocol is not ASCII.
    #[error("the app chose a non-ASCII subprotocol")]
    SubprotocolNotAscii,
    /// The chosen subprotocol was not offered.
    #[error("the app chose subprotocol '{0}', which the client did not offer")]
    SubprotocolNotOffered(String),
}

/// Why the identity headers for the app could not be built. The request is then refused, never
/// forwarded without them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityHeaderError {
    /// The `X-Forwarded-Client-Cert` value is not a valid header value.
    #[error("cannot write the client certificate into X-Forwarded-Client-Cert: {0}")]
    Xfcc(String),
    /// The `x-wsgate-client-not-after` value is not a valid header value.
    #[error("cannot write the client certificate's not-after into x-wsgate-client-not-after: {0}")]
    NotAfter(String),
}

/// A header name as WSGI, Rack and CGI see it: lowercase (already, in `http`), `_` read as `-`.
fn canonical(name: &HeaderName) -> Cow<'_, str> {
    let s = name.as_str();
    if s.contains('_') {
        Cow::Owned(s.replace('_', "-"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Whether a client-sent header is one wsgate sets or owns (under any spelling).
fn is_reserved(name: &HeaderName) -> bool {
    let c = canonical(name);
    c.starts_with(OUR_PREFIX) || RESERVED.contains(&c.as_ref())
}

/// Whether a name listed in `Connection` must survive anyway: `Host` (the app routes on it), the
/// WebSocket handshake (`Sec-WebSocket-*`), and what wsgate adds itself (added after the strip,
/// but protected here too so the rule does not depend on order).
fn is_protected(name: &HeaderName) -> bool {
    let c = canonical(name);
    *name == header::HOST
        || c.starts_with("sec-websocket-")
        || c.starts_with(OUR_PREFIX)
        || RESERVED.contains(&c.as_ref())
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the client's request is a WebSocket opening handshake (RFC 6455 §4.2.1).
pub fn check_client_request<B>(req: &Request<B>) -> Result<(), NotUpgrade> {
    let h = req.headers();
    if req.method() != Method::GET {
        return Err(NotUpgrade::Method(req.method().clone()));
    }
    if req.version() != Version::HTTP_11 {
        return Err(NotUpgrade::Version(req.version()));
    }
    if !has_token(h, &header::UPGRADE, "websocket") {
        return Err(NotUpgrade::NoUpgradeHeader);
    }
    if !has_token(h, &header::CONNECTION, "upgrade") {
        return Err(NotUpgrade::NoConnectionUpgrade);
    }
    match h.get(SEC_WEBSOCKET_KEY) {
        Some(k) if k.len() == 24 => {}
        _ => return Err(NotUpgrade::BadKey),
    }
    if h.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(NotUpgrade::BadVersion);
    }
    Ok(())
}

/// The 426 sent for a request that is not a WebSocket upgrade.
pub fn upgrade_required(reason: &NotUpgrade) -> Response<Full<Bytes>> {
    let mut resp = text_response(StatusCode::UPGRADE_REQUIRED, &format!("426 upgrade required: {reason}"));
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    resp
}

/// A plain-text response with a one-line body that closes the connection.
pub fn text_response(status: StatusCode, line: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{line}\n"))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Removes hop-by-hop headers, and every header the `Connection` header names except the
/// protected ones (`Connection: host` must not strip `Host`, nor the handshake's headers).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|name| !is_protected(name))
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The client's headers as they may be forwarded: no hop-by-hop headers, no extensions
/// (frames are relayed one by one, so none can be negotiated end to end), no body headers,
/// and none of the headers wsgate sets or that name the client or the hop ([`RESERVED`]:
/// `X-Forwarded-Client-Cert`, `x-wsgate-*`, `X-Forwarded-*`, `Forwarded`, `X-Real-IP`, …)
/// whatever their case or `_` spelling; `Connection: Upgrade` and `Upgrade: websocket` set.
fn forwarded_headers<B>(req: &Request<B>) -> HeaderMap {
    let mut headers = req.headers().clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(SEC_WEBSOCKET_EXTENSIONS);
    // An upgrade GET has no body; a client-sent length or Expect would make the peer wait for
    // (or read WebSocket frames as) a body that never comes.
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::EXPECT);
    let forged: Vec<HeaderName> = headers.keys().filter(|k| is_reserved(k)).cloned().collect();
    for k in forged {
        headers.remove(k);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers
}

/// A GET for the client's path and query with `headers`.
fn get_request<B>(req: &Request<B>, headers: HeaderMap) -> Request<Empty<Bytes>> {
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = Request::new(Empty::new());
    *out.method_mut() = Method::GET;
    *out.uri_mut() = path.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    *out.headers_mut() = headers;
    out
}

/// Builds the upgrade request for the app: the client's path, query, subprotocols, key and
/// ordinary headers, cleaned as [`forwarded_headers`] says; then the verified identity and the
/// hop wsgate saw added. `X-Forwarded-For` is replaced, not appended to: wsgate is the pod's
/// first hop and the client's list cannot be verified. Fails, rather than forward a request
/// without the identity, when the identity cannot be written as a header value.
pub fn upstream_request<B>(
    req: &Request<B>,
    identity: &PeerIdentity,
    peer: IpAddr,
    extra: &[(HeaderName, HeaderValue)],
) -> Result<Request<Empty<Bytes>>, IdentityHeaderError> {
    let xfcc = HeaderValue::from_str(&identity.xfcc()).map_err(|e| IdentityHeaderError::Xfcc(e.to_string()))?;
    let not_after = HeaderValue::from_str(&identity.not_after_rfc3339())
        .map_err(|e| IdentityHeaderError::NotAfter(e.to_string()))?;
    let mut headers = forwarded_headers(req);
    headers.insert(X_FORWARDED_FOR, peer_value(peer));
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    headers.insert(XFCC, xfcc);
    headers.insert(CLIENT_NOT_AFTER, not_after);
    for (k, v) in extra {
        headers.insert(k.clone(), v.clone());
    }
    Ok(get_request(req, headers))
}

/// Builds the upgrade request for an outbound route's remote from the local app's: the app's
/// path, query, subprotocols, key and ordinary headers, cleaned as [`forwarded_headers`] says
/// (so the app can forge no identity header: the remote's wsgate derives the identity from the
/// TLS client certificate), `Host` set to the remote's `authority`, and `extra` (the trace
/// context) added.
pub fn remote_request<B>(
    req: &Request<B>,
    authority: &str,
    extra: &[(HeaderName, HeaderValue)],
) -> Request<Empty<Bytes>> {
    let mut headers = forwarded_headers(req);
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, host);
    }
    for (k, v) in extra {
        headers.insert(k.clone(), v.clone());
    }
    get_request(req, headers)
}

/// The peer's address as a header value (digits, dots, colons and hex: always valid).
fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::try_from(peer.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Checks the app's 101 against the client's request and builds the 101 for the client.
/// Returns the response and the subprotocol the app chose.
pub fn switching_response(
    client_headers: &HeaderMap,
    uh: &HeaderMap,
) -> Result<(Response<Full<Bytes>>, Option<String>), BadAnswer> {
    if !has_token(uh, &header::UPGRADE, "websocket") || !has_token(uh, &header::CONNECTION, "upgrade") {
        return Err(BadAnswer::NotWebsocket);
    }
    let key = client_headers
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes())
        .unwrap_or_default();
    let want = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    if uh.get(SEC_WEBSOCKET_ACCEPT).map(|v| v.as_bytes()) != Some(want.as_bytes()) {
        return Err(BadAnswer::AcceptMismatch);
    }
    if uh.contains_key(SEC_WEBSOCKET_EXTENSIONS) {
        return Err(BadAnswer::Extension);
    }
    let subprotocol = match uh.get(SEC_WEBSOCKET_PROTOCOL) {
        None => None,
        Some(chosen) => {
            let chosen = chosen.to_str().map_err(|_| BadAnswer::SubprotocolNotAscii)?.trim();
            let offered = client_headers
                .get_all(SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|p| p.trim() == chosen);
            if !offered {
                return Err(BadAnswer::SubprotocolNotOffered(chosen.to_owned()));
            }
            Some(chosen.to_owned())
        }
    };
    let mut headers = uh.clone();
    strip_hop_by_hop(&mut headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.remove(header::CONTENT_LENGTH);
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = headers;
    Ok((resp, subprotocol))
}

/// Relays the app's refusal (any status but 101) with its body, closing the connection.
pub fn relay_refusal(parts: http::response::Parts, body: Bytes) -> Response<Full<Bytes>> {
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::CertSummary;

    fn identity() -> PeerIdentity {
        PeerIdentity {
            cert: CertSummary::fake(
                "CN=frontend",
                Some("frontend"),
                &["spiffe://td/ns/shop/sa/frontend"],
                &[],
            ),
            sha256: [1; 32],
            subject_rfc2253: "CN=frontend".into(),
        }
    }

    fn upgrade_req() -> http::request::Builder {
        Request::builder()
            .method("GET")
            .uri("/chat?room=1")
            .header("host", "app.shop.svc")
            .header("upgrade", "websocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
    }

    #[test]
    fn a_proper_upgrade_request_is_accepted() {
        assert_eq!(check_client_request(&upgrade_req().body(()).unwrap()), Ok(()));
    }

    #[test]
    fn requests_that_are_not_upgrades_are_named() {
        let plain = Request::get("/").body(()).unwrap();
        assert!(
            check_client_request(&plain)
                .unwrap_err()
                .to_string()
                .contains("Upgrade")
        );
        let post = upgrade_req().method("POST").body(()).unwrap();
        assert!(check_client_request(&post).unwrap_err() == NotUpgrade::Method(Method::POST));
        let v12 = upgrade_req().header("sec-websocket-version", "12");
        let mut r = v12.body(()).unwrap();
        r.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("12"));
        assert!(check_client_request(&r).unwrap_err() == NotUpgrade::BadVersion);
    }

    #[test]
    fn forged_identity_headers_never_reach_the_app() {
        let req = upgrade_req()
            .header("x-forwarded-client-cert", "URI=spiffe://td/ns/kube-system/sa/admin")
            .header("X-WSGATE-Client-Not-After", "2999-01-01T00:00:00Z")
            .header("x-wsgate-anything", "x")
            .body(())
            .unwrap();
        let out = upstream_request(&req, &identity(), "10.1.2.3".parse().unwrap(), &[]).unwrap();
        let xfcc: Vec<_> = out.headers().get_all(XFCC).iter().collect();
        assert_eq!(xfcc.len(), 1);
        assert!(
            xfcc[0]
                .to_str()
                .unwrap()
                .contains("URI=spiffe://td/ns/shop/sa/frontend")
        );
        assert!(!xfcc[0].to_str().unwrap().contains("admin"));
        assert_eq!(out.headers().get_all(CLIENT_NOT_AFTER).iter().count(), 1);
        assert_eq!(out.headers().get(CLIENT_NOT_AFTER).unwrap(), "1970-01-01T00:00:00Z");
        assert!(!out.headers().contains_key("x-wsgate-anything"));
    }

    #[test]
    fn a_client_sent_body_length_or_expect_never_reaches_the_app() {
        let req = upgrade_req()
            .header("content-length", "5")
            .header("expect", "100-continue")
            .body(())
            .unwrap();
        let out = upstream_request(&req, &identity(), "10.1.2.3".parse().unwrap(), &[]).unwrap();
        assert!(!out.headers().contains_key("content-length"));
        assert!(!out.headers().contains_key("expect"));
    }

    #[test]
    fn the_app_request_keeps_path_key_and_subprotocols_and_drops_hop_by_hop() {
        let req = upgrade_req()
            .header("sec-websocket-protocol", "chat, superchat")
            .header("sec-websocket-extensions", "permessage-deflate")
            .header("keep-alive", "timeout=5")
            .header("x-request-id", "abc")
            .body(())
            .unwrap();
        let out = upstream_request(&req, &identity(), "10.1.2.3".parse().unwrap(), &[]).unwrap();
        let h = out.headers();
        assert_eq!(out.uri(), "/chat?room=1");
        assert_eq!(h.get("sec-websocket-key").unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(h.get("sec-websocket-protocol").unwrap(), "chat, superchat");
        assert_eq!(h.get("x-request-id").unwrap(), "abc");
        assert_eq!(h.get("host").unwrap(), "app.shop.svc");
        assert_eq!(h.get("connection").unwrap(), "Upgrade");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.1.2.3");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("sec-websocket-extensions"));
    }

    fn app_request(req: &Request<()>) -> Request<Empty<Bytes>> {
        upstream_request(req, &identity(), "10.1.2.3".parse().unwrap(), &[]).unwrap()
    }

    /// The names of `out`'s headers as a WSGI/CGI server would see them.
    fn cgi_names(out: &Request<Empty<Bytes>>) -> Vec<String> {
        out.headers().keys().map(|k| canonical(k).into_owned()).collect()
    }

    #[test]
    fn underscore_and_mixed_case_forgeries_never_reach_the_app() {
        let req = upgrade_req()
            .header("X_Forwarded_Client_Cert", "URI=spiffe://td/ns/kube-system/sa/admin")
            .header("x_wsgate_client_not_after", "2999-01-01T00:00:00Z")
            .header("X_WSGATE_anything", "x")
            .header("X-Forwarded_Client-Cert", "URI=spiffe://evil")
            .header("x_forwarded_for", "1.1.1.1")
            .header("X_Forwarded_Proto", "http")
            .body(())
            .unwrap();
        let out = app_request(&req);
        let names = cgi_names(&out);
        for name in [
            "x-forwarded-client-cert",
            "x-wsgate-client-not-after",
            "x-forwarded-for",
            "x-forwarded-proto",
        ] {
            assert_eq!(names.iter().filter(|n| *n == name).count(), 1, "{name}: {names:?}");
        }
        assert!(!names.contains(&"x-wsgate-anything".to_owned()), "{names:?}");
        let xfcc = out.headers().get(XFCC).unwrap().to_str().unwrap();
        assert!(!xfcc.contains("admin") && !xfcc.contains("evil"), "{xfcc}");
        assert_eq!(out.headers().get(CLIENT_NOT_AFTER).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(out.headers().get("x-forwarded-proto").unwrap(), "https");
    }

    #[test]
    fn forwarding_headers_claiming_the_host_port_prefix_or_client_ip_never_reach_the_app() {
        let req = upgrade_req()
            .header("X-Forwarded-Host", "admin.internal")
            .header("x_forwarded_port", "443")
            .header("X-Forwarded-Prefix", "/admin")
            .header("X-Forwarded-Server", "trusted")
            .header("X-Forwarded-Scheme", "https")
            .header("X-Client-IP", "10.0.0.1")
            .header("True-Client-IP", "10.0.0.1")
            .header("X-Request-Id", "kept")
            .body(())
            .unwrap();
        let names = cgi_names(&app_request(&req));
        for forged in [
            "x-forwarded-host",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded-server",
            "x-forwarded-scheme",
            "x-client-ip",
            "true-client-ip",
        ] {
            assert!(!names.contains(&forged.to_owned()), "{forged}: {names:?}");
        }
        assert!(
            names.contains(&"x-request-id".to_owned()),
            "ordinary headers pass: {names:?}"
        );
    }

    #[test]
    fn a_client_x_forwarded_for_is_replaced_not_appended_to() {
        let req = upgrade_req()
            .header("x-forwarded-for", "6.6.6.6")
            .header("X-Forwarded-For", "7.7.7.7")
            .body(())
            .unwrap();
        let out = app_request(&req);
        let xff: Vec<_> = out.headers().get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, vec!["10.1.2.3"]);
    }

    #[test]
    fn forwarded_and_x_real_ip_are_stripped_in_every_spelling() {
        let req = upgrade_req()
            .header("Forwarded", "for=6.6.6.6;proto=https")
            .header("X-Real-IP", "6.6.6.6")
            .header("x_real_ip", "6.6.6.6")
            .body(())
            .unwrap();
        let names = cgi_names(&app_request(&req));
        assert!(!names.iter().any(|n| n == "forwarded" || n == "x-real-ip"), "{names:?}");
    }

    #[test]
    fn connection_cannot_strip_host_the_handshake_or_the_identity() {
        let req = upgrade_req()
            .header(
                "connection",
                "host, Sec-WebSocket-Key, sec-websocket-protocol, x-forwarded-client-cert, \
                 x-wsgate-client-not-after, x-forwarded-for, x-forwarded-proto",
            )
            .header("sec-websocket-protocol", "chat")
            .body(())
            .unwrap();
        let out = app_request(&req);
        let h = out.headers();
        assert_eq!(h.get("host").unwrap(), "app.shop.svc");
        assert_eq!(h.get("sec-websocket-key").unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(h.get("sec-websocket-protocol").unwrap(), "chat");
        for name in [XFCC, CLIENT_NOT_AFTER, X_FORWARDED_FOR, X_FORWARDED_PROTO] {
            assert_eq!(h.get_all(&name).iter().count(), 1, "{name}");
        }
        assert_eq!(h.get("connection").unwrap(), "Upgrade");
    }

    #[test]
    fn connection_still_strips_the_end_to_end_headers_it_names() {
        let req = upgrade_req()
            .header("connection", "x-hop-secret")
            .header("x-hop-secret", "s")
            .header("x-kept", "k")
            .body(())
            .unwrap();
        let out = app_request(&req);
        assert!(!out.headers().contains_key("x-hop-secret"));
        assert_eq!(out.headers().get("x-kept").unwrap(), "k");
    }

    #[test]
    fn the_identity_header_always_builds_whatever_the_certificate_holds() {
        // Every byte value in the subject and in the SANs (what a hostile CA could sign).
        let all: String = (0u8..=0x7f).map(char::from).chain(['\u{e9}', '\u{20ac}']).collect();
        let id = PeerIdentity {
            cert: CertSummary::fake(&all, Some(&all), &[&all], &[&all]),
            sha256: [2; 32],
            subject_rfc2253: all.clone(),
        };
        let req = upgrade_req().body(()).unwrap();
        let out = upstream_request(&req, &id, "10.1.2.3".parse().unwrap(), &[]).unwrap();
        let xfcc = out.headers().get(XFCC).unwrap();
        assert!(xfcc.as_bytes().iter().all(|b| (0x20..0x7f).contains(b)), "{xfcc:?}");
    }

    #[test]
    fn the_identity_header_error_names_the_header() {
        let e = IdentityHeaderError::Xfcc("invalid".into());
        assert!(e.to_string().contains("X-Forwarded-Client-Cert"), "{e}");
    }

    #[test]
    fn the_remote_request_keeps_path_and_subprotocols_and_drops_forged_identity() {
        let req = upgrade_req()
            .header("sec-websocket-protocol", "chat, superchat")
            .header("x-forwarded-client-cert", "Hash=forged")
            .header("x_wsgate_client_not_after", "never")
            .header("x-forwarded-for", "6.6.6.6")
            .header("keep-alive", "5")
            .header("x-app", "kept")
            .body(())
            .unwrap();
        let out = remote_request(&req, "chat.shop.svc:8443", &[]);
        let h = out.headers();
        assert_eq!(out.uri(), "/chat?room=1");
        assert_eq!(h.get("host").unwrap(), "chat.shop.svc:8443");
        assert_eq!(h.get("sec-websocket-protocol").unwrap(), "chat, superchat");
        assert_eq!(h.get("x-app").unwrap(), "kept");
        for gone in [
            "x-forwarded-client-cert",
            "x_wsgate_client_not_after",
            "x-forwarded-for",
            "keep-alive",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
    }
}
