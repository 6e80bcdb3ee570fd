//! `verify`: checks an event's published draw and, optionally, your join receipt against it.
//! Prints MATCH, or the first mismatch, and exits non-zero on anything but a match.

use clap::Parser;
use fairgate_loadtest::client::{Client, Endpoints};
use fairgate_loadtest::verify;
use shared::draw::Verdict;
use shared::token::Jwks;

/// Recompute a fairgate draw from its published seed and entrants.
#[derive(Parser)]
#[command(name = "verify", version)]
struct Args {
    /// The event whose draw to check.
    #[arg(long)]
    event: i64,
    /// Buffer service URL (where draws are published).
    #[arg(
        long,
        env = "FAIRGATE_BUFFER_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    buffer_url: String,
    /// Your join receipt (the `receipt` the join answered): checks it is signed by fairgate,
    /// names the published commitment, and is in the draw.
    #[arg(long)]
    receipt: Option<String>,
    /// Where fairgate publishes its public keys (to check the receipt's signature).
    #[arg(
        long,
        env = "FAIRGATE_JWKS_URL",
        default_value = "http://127.0.0.1:8082/.well-known/jwks.json"
    )]
    jwks_url: String,
    /// Issuer name fairgate signs with.
    #[arg(long, env = "FAIRGATE_ISSUER", default_value = "fairgate")]
    issuer: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::new(Endpoints {
        buffer: args.buffer_url.trim_end_matches('/').to_owned(),
        queue: String::new(),
        purchase: String::new(),
    })?;
    let drawn = verify::fetch(&client, args.event).await?;
    println!(
        "event {}: {} entrants, commitment {}",
        args.event,
        drawn.order.len(),
        hex::encode(drawn.commitment)
    );
    let verdict = drawn.verdict();
    match &verdict {
        Verdict::Match => {
            println!("MATCH: the published order is what the seed makes of its entrants")
        }
        Verdict::CommitmentMismatch => {
            println!("MISMATCH: the published seed does not hash to the published commitment")
        }
        Verdict::Mismatch {
            position,
            published,
            recomputed,
        } => println!(
            "MISMATCH at position {position}: published {published}, recomputed {recomputed}"
        ),
    }
    if let Some(receipt) = &args.receipt {
        let keys: Jwks = client
            .http
            .get(&args.jwks_url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let claims = verify::read_receipt(receipt, &keys, &args.issuer)?;
        anyhow::ensure!(
            claims.evt.get() == args.event,
            "the receipt is for event {}, not {}",
            claims.evt,
            args.event
        );
        anyhow::ensure!(
            claims.cmt == hex::encode(drawn.commitment),
            "the receipt names commitment {}, but the draw published {}",
            claims.cmt,
            hex::encode(drawn.commitment)
        );
        match drawn.position_of(claims.tkt.0) {
            Some(p) => println!(
                "your receipt (ticket {}) is in the draw at position {p}",
                claims.tkt
            ),
            None => anyhow::bail!(
                "your ticket {} is not in the draw (did you join after the sale started?)",
                claims.tkt
            ),
        }
    }
    if verdict != Verdict::Match {
        std::process::exit(1);
    }
    Ok(())
}
