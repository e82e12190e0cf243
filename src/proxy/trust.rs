//! The trust registry: the client chains of the open connections, verified again whenever the
//! trust roots change, so that a connection whose client the new roots no longer admit ends.
//!
//! A helper of the composition root, not a stage: `inbound` registers each relayed connection
//! (the chain its client presented and a closure that ends it) and holds the [`TrustGuard`] for
//! the connection's life; `proxy` hands every installed set of roots to
//! [`TrustRegistry::set_roots`] and runs the returned [`Recheck`] off the async workers. Ending
//! a connection is a closure, so this file knows nothing of the pump. Connections that present
//! the same chain (a client reconnecting, or holding several connections) share one copy of it.
//! Depends on `tls` (the client verifier the served config uses, the roots digest) and rustls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::tls::TlsError;

/// Ends one connection because its client is no longer trusted; returns whether it ended it
/// (false when the connection was already gone or already ending).
pub type Stop = Box<dyn Fn() -> bool + Send + Sync>;

/// Why new trust roots could not be applied to the open connections.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The verifier could not be built from the new roots.
    #[error("building the client-certificate verifier for the new trust roots: {0}")]
    Verifier(#[from] TlsError),
}

/// An open connection, as it registers.
pub struct Connection {
    /// The chain the client presented, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The client's identity, for the log line.
    pub name: String,
    /// The client's address, for the log line.
    pub peer: SocketAddr,
    /// The leaf's not-after: past it, the expiry (not the trust change) ends the connection.
    pub not_after: SystemTime,
    /// [`crate::tls::roots_digest`] of the roots the handshake verified the chain against.
    pub verified_with: [u8; 32],
    /// Ends the connection.
    pub stop: Stop,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("name", &self.name)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// A connection ended because its chain no longer verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrusted {
    /// The client's identity.
    pub name: String,
    /// The client's address.
    pub peer: SocketAddr,
    /// Why the chain was refused (the verifier's error).
    pub reason: String,
}

/// A chain as the registry keeps it: one copy for all the connections that presented it.
type Chain = Arc<[CertificateDer<'static>]>;

/// An open connection, as the registry knows it: a [`Connection`] with its chain shared.
struct Entry {
    chain: Chain,
    name: String,
    peer: SocketAddr,
    not_after: SystemTime,
    verified_with: [u8; 32],
    stop: Stop,
}

struct Roots {
    digest: [u8; 32],
    verifier: Arc<dyn ClientCertVerifier>,
}

#[derive(Default)]
struct Inner {
    roots: Option<Arc<Roots>>,
    entries: HashMap<u64, Arc<Entry>>,
    /// Every chain an entry holds, with how many entries hold it.
    chains: HashMap<Chain, usize>,
    next: u64,
}

impl Inner {
    /// The shared copy of `chain`, counted once more.
    fn intern(&mut self, chain: Vec<CertificateDer<'static>>) -> Chain {
        let shared: Chain = match self.chains.get_key_value(chain.as_slice()) {
            Some((shared, _)) => shared.clone(),
            None => chain.into(),
        };
        *self.chains.entry(shared.clone()).or_insert(0) += 1;
        shared
    }

    /// Removes entry `id`, and its chain when no other entry holds it.
    fn remove(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        if let Some(count) = self.chains.get_mut(&entry.chain) {
            *count -= 1;
            if *count == 0 {
                self.chains.remove(&entry.chain);
            }
        }
    }
}

/// The open connections and the trust roots they are held to.
#[derive(Default)]
pub struct TrustRegistry {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for TrustRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustRegistry")
            .field("open", &self.len())
            .finish_non_exhaustive()
    }
}

/// Removes its connection from the registry when dropped (when the connection ends).
#[derive(Debug)]
pub struct TrustGuard {
    registry: Weak<TrustRegistry>,
    id: u64,
}

impl Drop for TrustGuard {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.lock().remove(self.id);
        }
    }
}

/// The open connections to verify against new roots: built under the registry's lock, run
/// without it (on a blocking thread: it verifies signatures).
pub struct Recheck {
    verifier: Arc<dyn ClientCertVerifier>,
    entries: Vec<Arc<Entry>>,
}

impl std::fmt::Debug for Recheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recheck")
            .field("connections", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Recheck {
    /// How many connections it verifies.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it verifies no connection.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Verifies every connection's chain (each distinct chain once) and ends those that fail;
    /// returns the connections it ended.
    pub fn run(self) -> Vec<Untrusted> {
        let now = SystemTime::now();
        let mut verdicts: HashMap<&[CertificateDer<'static>], Result<(), String>> = HashMap::new();
        let mut ended = Vec::new();
        for conn in &self.entries {
            let verdict = verdicts
                .entry(&conn.chain[..])
                .or_insert_with(|| verify(self.verifier.as_ref(), conn, now));
            if let Err(reason) = verdict
                && (conn.stop)()
            {
                ended.push(untrusted(conn, reason.clone()));
            }
        }
        ended
    }
}

fn untrusted(conn: &Entry, reason: String) -> Untrusted {
    Untrusted {
        name: conn.name.clone(),
        peer: conn.peer,
        reason,
    }
}

/// Whether `conn`'s chain verifies with `verifier` now. A leaf already expired passes: its
/// expiry ends the connection with its own reason.
fn verify(verifier: &dyn ClientCertVerifier, conn: &Entry, now: SystemTime) -> Result<(), String> {
    if now >= conn.not_after {
        return Ok(());
    }
    let Some((leaf, intermediates)) = conn.chain.split_first() else {
        return Err("no client certificate".to_owned());
    };
    let at = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    verifier
        .verify_client_cert(leaf, intermediates, at)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl TrustRegistry {
    /// An empty registry with no roots yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (every update is one call).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes `roots` the roots connections are held to. Call it before the served config with
    /// these roots is installed: a connection registered later that was verified against other
    /// roots is then verified again at registration. Returns the open connections to verify
    /// again when the roots differ from the previous ones (`None` for the first roots, or the
    /// same roots again).
    pub fn set_roots(&self, roots: &[CertificateDer<'static>]) -> Result<Option<Recheck>, TrustError> {
        let digest = crate::tls::roots_digest(roots);
        if self.lock().roots.as_ref().is_some_and(|r| r.digest == digest) {
            return Ok(None);
        }
        let verifier = crate::tls::server::client_verifier(roots)?;
        let mut inner = self.lock();
        let previous = inner.roots.replace(Arc::new(Roots {
            digest,
            verifier: verifier.clone(),
        }));
        match previous {
            Some(previous) if previous.digest != digest => Ok(Some(Recheck {
                verifier,
                entries: inner.entries.values().cloned().collect(),
            })),
            _ => Ok(None),
        }
    }

    /// Registers an open connection until the returned guard drops. When the roots changed
    /// since its handshake verified it (and before the re-check could see it), its chain is
    /// verified now, and the connection ended if it fails: the second value says so.
    pub fn register(self: &Arc<Self>, conn: Connection) -> (TrustGuard, Option<Untrusted>) {
        let (id, roots, conn) = {
            let mut inner = self.lock();
            let id = inner.next;
            inner.next += 1;
            let conn = Arc::new(Entry {
                chain: inner.intern(conn.chain),
                name: conn.name,
                peer: conn.peer,
                not_after: conn.not_after,
                verified_with: conn.verified_with,
                stop: conn.stop,
            });
            inner.entries.insert(id, conn.clone());
            (id, inner.roots.clone(), conn)
        };
        let guard = TrustGuard {
            registry: Arc::downgrade(self),
            id,
        };
        let ended = roots
            .filter(|r| r.digest != conn.verified_with)
            .and_then(|r| verify(r.verifier.as_ref(), &conn, SystemTime::now()).err())
            .filter(|_| (conn.stop)())
            .map(|reason| untrusted(&conn, reason));
        (guard, ended)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::demo::pki::{Ca, LeafSpec};

    struct Client {
        chain: Vec<CertificateDer<'static>>,
        stops: Arc<AtomicUsize>,
    }

    fn client(ca: &Ca) -> Client {
        let leaf = ca.leaf(&LeafSpec::new("frontend")).unwrap();
        Client {
            chain: vec![leaf.cert_der],
            stops: Arc::default(),
        }
    }

    fn conn(c: &Client, verified_with: &Ca) -> Connection {
        let stops = c.stops.clone();
        Connection {
            chain: c.chain.clone(),
            name: "frontend".into(),
            peer: SocketAddr::from(([127, 0, 0, 1], 4000)),
            not_after: SystemTime::now() + Duration::from_secs(3600),
            verified_with: crate::tls::roots_digest(std::slice::from_ref(&verified_with.cert_der)),
            stop: Box::new(move || {
                stops.fetch_add(1, Ordering::SeqCst);
                true
            }),
        }
    }

    #[test]
    fn connections_presenting_the_same_chain_share_one_copy_until_the_last_ends() {
        let a = Ca::new("A").unwrap();
        let registry = TrustRegistry::new();
        let (c, other) = (client(&a), client(&a));
        let first = registry.register(conn(&c, &a)).0;
        let second = registry.register(conn(&c, &a)).0;
        let third = registry.register(conn(&other, &a)).0;
        {
            let inner = registry.lock();
            assert_eq!(inner.chains.len(), 2);
            let (x, y) = (&inner.entries[&first.id].chain, &inner.entries[&second.id].chain);
            assert!(Arc::ptr_eq(x, y), "one copy of the shared chain");
            assert_eq!(inner.chains[x], 2);
        }
        drop((first, third));
        assert_eq!(registry.lock().chains.len(), 1, "a chain still held stays");
        drop(second);
        assert!(registry.lock().chains.is_empty(), "the last holder takes it along");
    }

    #[test]
    fn entries_vanish_when_their_guard_drops() {
        let a = Ca::new("A").unwrap();
        let registry = TrustRegistry::new();
        let c = client(&a);
        let (first, _) = registry.register(conn(&c, &a));
        let (second, _) = registry.register(conn(&c, &a));
        assert_eq!(registry.len(), 2);
        drop(first);
        assert_eq!(registry.len(), 1);
        drop(second);
        assert!(registry.is_empty());
        // A guard outliving its registry does nothing.
        let registry = TrustRegistry::new();
        let (guard, _) = registry.register(conn(&c, &a));
        drop(registry);
        drop(guard);
    }

    #[test]
    fn new_roots_end_the_connections_they_no_longer_admit_and_only_those() {
        let (a, b) = (Ca::new("A").unwrap(), Ca::new("B").unwrap());
        let registry = TrustRegistry::new();
        let both = [a.cert_der.clone(), b.cert_der.clone()];
        assert!(
            registry.set_roots(&both).unwrap().is_none(),
            "first roots: nothing to check"
        );
        let (of_a, of_b) = (client(&a), client(&b));
        let _guards = [
            registry.register(conn(&of_a, &a)).0,
            registry.register(conn(&of_a, &a)).0,
            registry.register(conn(&of_b, &b)).0,
        ];
        // The same roots in another order are not a change.
        let reversed = [b.cert_der.clone(), a.cert_der.clone()];
        assert!(registry.set_roots(&reversed).unwrap().is_none());
        let recheck = registry.set_roots(std::slice::from_ref(&b.cert_der)).unwrap().unwrap();
        assert_eq!(recheck.len(), 3);
        let ended = recheck.run();
        assert_eq!(ended.len(), 2, "{ended:?}");
        assert_eq!(of_a.stops.load(Ordering::SeqCst), 2);
        assert_eq!(of_b.stops.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_connection_verified_against_replaced_roots_is_checked_when_it_registers() {
        let (a, b) = (Ca::new("A").unwrap(), Ca::new("B").unwrap());
        let registry = TrustRegistry::new();
        registry.set_roots(std::slice::from_ref(&a.cert_der)).unwrap();
        registry.set_roots(std::slice::from_ref(&b.cert_der)).unwrap();
        // Its handshake used A's config, but it registers after the re-check took its snapshot.
        let late = client(&a);
        let (_guard, ended) = registry.register(conn(&late, &a));
        assert!(ended.is_some_and(|u| u.name == "frontend" && !u.reason.is_empty()));
        assert_eq!(late.stops.load(Ordering::SeqCst), 1);
        // A client of B verified against B is not checked again.
        let fine = client(&b);
        let (_guard, ended) = registry.register(conn(&fine, &b));
        assert_eq!(ended, None);
        assert_eq!(fine.stops.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_expired_leaf_is_left_to_the_expiry() {
        let (a, b) = (Ca::new("A").unwrap(), Ca::new("B").unwrap());
        let registry = TrustRegistry::new();
        registry.set_roots(std::slice::from_ref(&a.cert_der)).unwrap();
        let c = client(&a);
        let mut expired = conn(&c, &a);
        expired.not_after = SystemTime::now() - Duration::from_secs(1);
        let _guard = registry.register(expired).0;
        let ended = registry
            .set_roots(std::slice::from_ref(&b.cert_der))
            .unwrap()
            .unwrap()
            .run();
        assert!(ended.is_empty());
    }
}
