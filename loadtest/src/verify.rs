//! Checking a published draw from the outside, as any fan or journalist can: fetch it, check the
//! seed against the commitment published before the draw, recompute the order, and find one's
//! own join receipt in it.

use anyhow::{anyhow, Context};
use serde::Deserialize;
use shared::draw::Verdict;
use shared::ids::Seed;
use shared::token::{ReceiptClaims, Verifier};
use uuid::Uuid;

use crate::client::Client;

/// A draw as `GET /api/v1/events/{id}/draw` publishes it.
#[derive(Debug, Deserialize)]
pub struct Published {
    pub event_id: i64,
    pub algorithm: String,
    pub status: String,
    pub commitment: Option<String>,
    pub seed: Option<String>,
    pub entrants: Option<i64>,
    pub order: Option<Vec<Uuid>>,
}

/// A published draw that has run: its seed, commitment and order.
pub struct Drawn {
    pub seed: Seed,
    pub commitment: [u8; 32],
    pub order: Vec<Uuid>,
}

impl Drawn {
    pub fn verdict(&self) -> Verdict {
        shared::draw::verify(&self.seed, &self.commitment, &self.order)
    }

    /// The 1-based position of a ticket in the draw.
    pub fn position_of(&self, ticket: Uuid) -> Option<usize> {
        self.order.iter().position(|t| *t == ticket).map(|i| i + 1)
    }
}

impl TryFrom<Published> for Drawn {
    type Error = anyhow::Error;

    fn try_from(p: Published) -> anyhow::Result<Drawn> {
        anyhow::ensure!(
            p.algorithm == shared::draw::ALGORITHM,
            "unknown draw algorithm {}",
            p.algorithm
        );
        anyhow::ensure!(
            p.status == "drawn",
            "the draw has not run yet ({})",
            p.status
        );
        let seed = hex::decode(p.seed.ok_or_else(|| anyhow!("no seed published"))?)?;
        let seed = Seed::from_slice(&seed).ok_or_else(|| anyhow!("the seed is not 32 bytes"))?;
        let commitment = hex::decode(p.commitment.ok_or_else(|| anyhow!("no commitment"))?)?;
        let commitment: [u8; 32] = commitment
            .try_into()
            .map_err(|_| anyhow!("the commitment is not 32 bytes"))?;
        let order = p.order.ok_or_else(|| anyhow!("no order published"))?;
        if let Some(n) = p.entrants {
            anyhow::ensure!(
                n as usize == order.len(),
                "{n} entrants announced but {} listed",
                order.len()
            );
        }
        Ok(Drawn {
            seed,
            commitment,
            order,
        })
    }
}

pub async fn fetch(client: &Client, event: i64) -> anyhow::Result<Drawn> {
    let value = client.draw(event).await?;
    let published: Published = serde_json::from_value(value).context("reading the draw")?;
    published.try_into()
}

/// Verifies a join receipt's signature with the given public keys and returns its claims.
pub fn read_receipt(
    receipt: &str,
    keys: &shared::token::Jwks,
    issuer: &str,
) -> anyhow::Result<ReceiptClaims> {
    let verifier = Verifier::new(issuer);
    verifier.add_jwks(keys)?;
    shared::receipt::verify(&verifier, receipt)
        .map_err(|e| anyhow!("the receipt does not verify: {e}"))
}
