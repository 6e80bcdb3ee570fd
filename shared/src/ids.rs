//! Domain newtypes used across service boundaries. Constructors check invariants so a value of
//! one of these types is always meaningful (a positive event id, a 1-based position, ...).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An event's id: a positive Postgres identity value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct EventId(i64);

impl EventId {
    pub fn new(raw: i64) -> Option<Self> {
        (raw > 0).then_some(EventId(raw))
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

impl EventId {
    /// The event named by a path parameter: one that cannot exist is a 404, like an unknown one.
    pub fn from_path(raw: i64) -> Result<Self, crate::ApiError> {
        EventId::new(raw)
            .ok_or_else(|| crate::ApiError::NotFound("event_not_found", format!("no event {raw}")))
    }
}

impl TryFrom<i64> for EventId {
    type Error = String;
    fn try_from(raw: i64) -> Result<Self, String> {
        EventId::new(raw).ok_or_else(|| format!("event id must be positive, got {raw}"))
    }
}

impl From<EventId> for i64 {
    fn from(id: EventId) -> i64 {
        id.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A queue ticket's id (public once the draw is published; the signed ticket is the secret).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TicketId(pub Uuid);

impl TicketId {
    /// A fresh ticket id: a UUIDv7 (48 bits of Unix milliseconds, then 74 random bits), so a
    /// sale's joins arrive in index order and Postgres appends them to the primary key instead
    /// of touching a random page per join (a third more joins per second, migration 0015's
    /// notes). The time it carries is no secret: the join's receipt states it too.
    pub fn mint() -> Self {
        TicketId(Uuid::now_v7())
    }
}

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A place in an event's queue: dense, starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Position(i64);

impl Position {
    pub fn new(raw: i64) -> Option<Self> {
        (raw > 0).then_some(Position(raw))
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Position {
    type Error = String;
    fn try_from(raw: i64) -> Result<Self, String> {
        Position::new(raw).ok_or_else(|| format!("position must be positive, got {raw}"))
    }
}

impl From<Position> for i64 {
    fn from(p: Position) -> i64 {
        p.0
    }
}

/// A seat's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeatId(pub i64);

/// A fan's identity as the pass's `sub` carries it: `anon:<ticket>` for anonymous fans.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Identity(String);

impl Identity {
    pub const MAX_LEN: usize = 200;

    pub fn new(raw: impl Into<String>) -> Option<Self> {
        let raw = raw.into();
        let ok =
            !raw.is_empty() && raw.len() <= Self::MAX_LEN && raw.chars().all(|c| !c.is_control());
        ok.then_some(Identity(raw))
    }

    pub fn anonymous(ticket: TicketId) -> Self {
        Identity(format!("anon:{ticket}"))
    }

    /// Whether this is the anonymous identity minted for `ticket` (which no other join has).
    pub fn is_anonymous_for(&self, ticket: TicketId) -> bool {
        self.0
            .strip_prefix("anon:")
            .and_then(|id| Uuid::parse_str(id).ok())
            .is_some_and(|id| id == ticket.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The secret seed of one event's draw. Its SHA-256 is published before the draw.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed(pub [u8; 32]);

impl Seed {
    /// A fresh seed from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Seed(crate::token::random_seed())
    }

    pub fn from_slice(raw: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(raw).ok().map(Seed)
    }

    pub fn commitment(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(self.0).into()
    }
}

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a seed that may still be secret.
        f.write_str("Seed(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newtypes_refuse_out_of_range_values() {
        assert!(EventId::new(0).is_none());
        assert!(Position::new(-3).is_none());
        assert!(Identity::new("").is_none());
        assert!(Identity::new("a\nb").is_none());
        assert!(Identity::new("x".repeat(201)).is_none());
        assert_eq!(EventId::new(7).map(EventId::get), Some(7));
    }

    #[test]
    fn seed_commitment_is_sha256_of_the_seed() {
        let seed = Seed([0u8; 32]);
        assert_eq!(
            hex::encode(seed.commitment()),
            "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
        );
        assert_eq!(format!("{seed:?}"), "Seed(..)");
    }
}
