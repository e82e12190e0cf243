//! Who may hold a slot: connections still in their handshake (not authenticated yet), per
//! source address and in all, and open connections per client identity.
//!
//! An unauthenticated peer can therefore never take the place of authenticated ones: it holds
//! at most `max_pending_per_ip` slots, all of them together at most `max_pending` (below
//! `--max-connections`), each for at most the handshake timeout. Slots are RAII guards: a
//! dropped guard frees its slot. A leaf of `proxy`: depends on std only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was refused a slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Too many handshakes in progress in all.
    #[error("{0} handshakes already in progress (--max-pending)")]
    Pending(usize),
    /// Too many handshakes in progress from this address.
    #[error("{limit} handshakes already in progress from {ip} (--max-pending-per-ip)")]
    PendingPerIp {
        /// The source address.
        ip: IpAddr,
        /// The limit.
        limit: usize,
    },
    /// Too many open connections of this identity.
    #[error("{limit} connections of {identity} already open (--max-connections-per-identity)")]
    PerIdentity {
        /// The identity's name.
        identity: String,
        /// The limit.
        limit: usize,
    },
    /// Too many open outbound connections to this remote.
    #[error("{limit} connections to {destination} already open (--outbound-max-connections-per-destination)")]
    PerDestination {
        /// The remote's `host:port`.
        destination: String,
        /// The limit.
        limit: usize,
    },
}

impl Refusal {
    /// The `reason` label of `wsgate_connections_refused_total` (no identity in it).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Pending(_) => "max_pending",
            Self::PendingPerIp { .. } => "max_pending_per_ip",
            Self::PerIdentity { .. } => "max_connections_per_identity",
            Self::PerDestination { .. } => "max_connections_per_destination",
        }
    }
}

/// The limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Handshakes in progress, in all.
    pub max_pending: usize,
    /// Handshakes in progress from one source address.
    pub max_pending_per_ip: usize,
    /// Open connections of one client identity.
    pub max_per_identity: usize,
}

#[derive(Debug, Default)]
struct Counts {
    pending: usize,
    pending_by_ip: HashMap<IpAddr, usize>,
    open_by_identity: HashMap<String, usize>,
}

/// The slot keeper, shared by every connection.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    counts: Mutex<Counts>,
}

/// A handshake slot; freed on drop.
#[derive(Debug)]
pub struct PendingSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

/// An identity's connection slot; freed on drop.
#[derive(Debug)]
pub struct IdentitySlot {
    admission: Arc<Admission>,
    identity: String,
}

impl Admission {
    /// A keeper enforcing `limits`.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // A panic while holding this lock cannot leave the counts half-updated: recover them.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a handshake from `ip`, or why not.
    pub fn pending(self: &Arc<Self>, ip: IpAddr) -> Result<PendingSlot, Refusal> {
        let ip = ip.to_canonical();
        let mut c = self.counts();
        if c.pending >= self.limits.max_pending {
            return Err(Refusal::Pending(self.limits.max_pending));
        }
        let from_ip = c.pending_by_ip.entry(ip).or_insert(0);
        if *from_ip >= self.limits.max_pending_per_ip {
            return Err(Refusal::PendingPerIp {
                ip,
                limit: self.limits.max_pending_per_ip,
            });
        }
        *from_ip += 1;
        c.pending += 1;
        Ok(PendingSlot {
            admission: self.clone(),
            ip,
        })
    }

    /// A slot for one more open connection of `identity`, or why not.
    pub fn identity(self: &Arc<Self>, identity: &str) -> Result<IdentitySlot, Refusal> {
        let mut c = self.counts();
        let open = c.open_by_identity.entry(identity.to_owned()).or_insert(0);
        if *open >= self.limits.max_per_identity {
            return Err(Refusal::PerIdentity {
                identity: identity.to_owned(),
                limit: self.limits.max_per_identity,
            });
        }
        *open += 1;
        Ok(IdentitySlot {
            admission: self.clone(),
            identity: identity.to_owned(),
        })
    }

    /// A slot for one more open outbound connection to `destination` (an outbound keeper counts
    /// destinations where an inbound one counts identities; its `max_per_identity` is the
    /// per-destination limit), or why not.
    pub fn destination(self: &Arc<Self>, destination: &str) -> Result<IdentitySlot, Refusal> {
        self.identity(destination).map_err(|refusal| match refusal {
            Refusal::PerIdentity { identity, limit } => Refusal::PerDestination {
                destination: identity,
                limit,
            },
            other => other,
        })
    }

    /// Handshakes in progress now.
    pub fn pending_now(&self) -> usize {
        self.counts().pending
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.pending = c.pending.saturating_sub(1);
        if let Some(n) = c.pending_by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.pending_by_ip.remove(&self.ip);
            }
        }
    }
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        if let Some(n) = c.open_by_identity.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                c.open_by_identity.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keeper() -> Arc<Admission> {
        Admission::new(AdmissionLimits {
            max_pending: 3,
            max_pending_per_ip: 2,
            max_per_identity: 1,
        })
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share_of_pending_slots() {
        let a = keeper();
        let one: IpAddr = "127.0.0.1".parse().unwrap();
        let two: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = a.pending(one).unwrap();
        let _s2 = a.pending(one).unwrap();
        assert_eq!(a.pending(one).unwrap_err().label(), "max_pending_per_ip");
        let _s3 = a.pending(two).unwrap();
        assert_eq!(a.pending(two).unwrap_err(), Refusal::Pending(3));
        drop(s1);
        let _s4 = a.pending(two).expect("a freed slot is free again");
        assert_eq!(a.pending_now(), 3);
    }

    #[test]
    fn a_mapped_ipv4_address_counts_as_its_ipv4_address() {
        let a = keeper();
        let _s1 = a.pending("127.0.0.1".parse().unwrap()).unwrap();
        let _s2 = a.pending("::ffff:127.0.0.1".parse().unwrap()).unwrap();
        assert!(a.pending("127.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn an_identity_over_its_limit_is_refused_until_one_closes() {
        let a = keeper();
        let slot = a.identity("spiffe://td/ns/a/sa/b").unwrap();
        let err = a.identity("spiffe://td/ns/a/sa/b").unwrap_err();
        assert_eq!(err.label(), "max_connections_per_identity");
        assert!(err.to_string().contains("spiffe://td/ns/a/sa/b"));
        assert!(a.identity("spiffe://td/ns/a/sa/c").is_ok(), "others are not affected");
        drop(slot);
        assert!(a.identity("spiffe://td/ns/a/sa/b").is_ok());
    }
}
