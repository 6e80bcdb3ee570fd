//! Signed tokens: the fan's queue ticket, the join receipt and the pass. All are JWTs carrying a
//! `kid` naming the key and a `typ` naming the kind of token, so a ticket can never be presented
//! as a pass. Receipts and passes, which others verify (fans, the purchase service), are signed
//! with Ed25519 (EdDSA) and checked against the public keys at `/.well-known/jwks.json`. Queue
//! tickets are only ever checked by fairgate's own buffer and queue, which hold the signing key
//! anyway, so they are HMAC-SHA256 (HS256) under a key derived from it: a join then costs one
//! public-key signature, not two. Verifiers pin the algorithm, pick the key by `kid`
//! from their own key set (never from the token), require every claim, check `iss`, `aud`,
//! `exp` and `nbf`, and allow only [`LEEWAY_SECS`] of clock skew — stricter than the
//! jsonwebtoken crate's defaults (60 s leeway, `iss`/`aud`/`sub` optional).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use ring::signature::KeyPair;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use uuid::Uuid;

use crate::error::ApiError;
use crate::ids::{EventId, TicketId};

pub const LEEWAY_SECS: u64 = 5;

/// The kinds of token fairgate signs; each has its own `typ` and audience.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Ticket,
    Receipt,
    Pass,
}

impl TokenKind {
    pub fn typ(self) -> &'static str {
        match self {
            TokenKind::Ticket => "fg-ticket+jwt",
            TokenKind::Receipt => "fg-receipt+jwt",
            TokenKind::Pass => "fg-pass+jwt",
        }
    }

    pub fn audience(self) -> &'static str {
        match self {
            TokenKind::Ticket => "fairgate:queue",
            TokenKind::Receipt => "fairgate:receipt",
            TokenKind::Pass => "fairgate:purchase",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn algorithm(self) -> Algorithm {
        match self {
            TokenKind::Ticket => Algorithm::HS256,
            TokenKind::Receipt | TokenKind::Pass => Algorithm::EdDSA,
        }
    }

    fn alg_name(self) -> &'static str {
        match self.algorithm() {
            Algorithm::HS256 => "HS256",
            _ => "EdDSA",
        }
    }
}

/// A queue ticket: proof that its holder joined the event's line under identity `sub`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TicketClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub evt: EventId,
    pub tkt: TicketId,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

/// A join receipt: what the fan can later check against the published draw.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceiptClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub evt: EventId,
    pub tkt: TicketId,
    /// Hex SHA-256 commitment to the draw's seed, as published when the fan joined.
    pub cmt: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

/// A pass: admission to the purchase step of one event for one identity.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PassClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub evt: EventId,
    pub tkt: TicketId,
    pub jti: Uuid,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Most seats this pass may hold and buy.
    pub lim: u32,
}

/// An Ed25519 private key with its key id.
pub struct SigningKey {
    kid: String,
    pair: ring::signature::Ed25519KeyPair,
    public: [u8; 32],
    /// HS256 key of queue tickets, derived from the seed.
    ticket_secret: [u8; 32],
    /// The same key prepared for signing (its HMAC pads computed once).
    ticket_hmac: ring::hmac::Key,
    /// The encoded JWT header of each kind of token (fixed per key).
    headers: [String; 3],
}

impl SigningKey {
    /// From the 32-byte Ed25519 seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> anyhow::Result<Self> {
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| anyhow::anyhow!("invalid Ed25519 seed"))?;
        let public: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| anyhow::anyhow!("unexpected Ed25519 public key length"))?;
        let kid = hex::encode(&sha2::Sha256::digest(public)[..8]);
        let mut derive = sha2::Sha256::new();
        derive.update(b"fairgate ticket hmac v1");
        derive.update(seed);
        let ticket_secret: [u8; 32] = derive.finalize().into();
        let header = |kind: TokenKind| {
            let json = serde_json::json!({ "typ": kind.typ(), "alg": kind.alg_name(), "kid": kid });
            URL_SAFE_NO_PAD.encode(json.to_string())
        };
        let headers = [
            header(TokenKind::Ticket),
            header(TokenKind::Receipt),
            header(TokenKind::Pass),
        ];
        Ok(SigningKey {
            pair,
            public,
            ticket_hmac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &ticket_secret),
            ticket_secret,
            headers,
            kid,
        })
    }

    /// From the seed written as 64 hex digits (how `FAIRGATE_SIGNING_KEY` holds it).
    pub fn from_hex(raw: &str) -> anyhow::Result<Self> {
        let bytes = hex::decode(raw.trim())
            .map_err(|_| anyhow::anyhow!("signing key must be 64 hex digits"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("signing key must be 64 hex digits (32 bytes)"))?;
        Self::from_seed(&seed)
    }

    /// The key from `FAIRGATE_SIGNING_KEY` (hex) or else from a file holding the hex seed.
    pub fn load(hex_seed: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        match (hex_seed, file) {
            (Some(raw), _) => Self::from_hex(raw),
            (None, Some(path)) => {
                let raw = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read signing key file {}: {e}", path.display())
                })?;
                Self::from_hex(&raw)
            }
            (None, None) => anyhow::bail!(
                "no signing key: set FAIRGATE_SIGNING_KEY (64 hex digits) or \
                 FAIRGATE_SIGNING_KEY_FILE"
            ),
        }
    }

    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> anyhow::Result<Self> {
        Self::from_seed(&random_seed())
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            alg: "EdDSA".into(),
            key_use: "sig".into(),
            kid: self.kid.clone(),
            x: URL_SAFE_NO_PAD.encode(self.public),
        }
    }
}

/// 32 bytes from the operating system's CSPRNG.
pub fn random_seed() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .expect("the OS random number generator failed");
    seed
}

/// One public key in JWKS form (RFC 8037 OKP).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub key_use: String,
    pub kid: String,
    pub x: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// Signs tokens with the active key.
#[derive(Clone)]
pub struct Signer {
    key: Arc<SigningKey>,
    retired: Arc<Vec<SigningKey>>,
    issuer: String,
}

impl Signer {
    pub fn new(key: SigningKey, issuer: impl Into<String>) -> Self {
        Signer {
            key: Arc::new(key),
            retired: Arc::default(),
            issuer: issuer.into(),
        }
    }

    /// Keys rotated out: they sign nothing more, but stay published and trusted so tokens they
    /// signed remain valid until they expire.
    pub fn retiring(mut self, retired: Vec<SigningKey>) -> Self {
        self.retired = Arc::new(retired);
        self
    }

    fn all_keys(&self) -> impl Iterator<Item = &SigningKey> {
        std::iter::once(self.key.as_ref()).chain(self.retired.iter())
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn kid(&self) -> &str {
        self.key.kid()
    }

    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: self.all_keys().map(SigningKey::jwk).collect(),
        }
    }

    /// A verifier trusting this signer's key, tickets included (for the services that hold the
    /// key anyway).
    pub fn verifier(&self) -> Verifier {
        let verifier = Verifier::new(self.issuer.clone());
        verifier
            .add_jwks(&self.jwks())
            .expect("our own JWK is well formed");
        if let Ok(mut keys) = verifier.ticket_keys.write() {
            for key in self.all_keys() {
                keys.insert(
                    key.kid.clone(),
                    DecodingKey::from_secret(&key.ticket_secret),
                );
            }
        }
        verifier
    }

    /// A compact JWS (RFC 7515) of `claims`, signed directly with the prepared key: the
    /// jsonwebtoken crate would re-derive the Ed25519 key pair on every signature.
    pub fn sign<T: Serialize>(&self, kind: TokenKind, claims: &T) -> Result<String, ApiError> {
        let payload = serde_json::to_vec(claims).map_err(ApiError::internal)?;
        let mut token = String::with_capacity(64 + payload.len() * 4 / 3 + 90);
        token.push_str(&self.key.headers[kind.index()]);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let signature = match kind.algorithm() {
            Algorithm::HS256 => ring::hmac::sign(&self.key.ticket_hmac, token.as_bytes())
                .as_ref()
                .to_vec(),
            _ => self.key.pair.sign(token.as_bytes()).as_ref().to_vec(),
        };
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
        Ok(token)
    }
}

/// Why a token was refused. Each reason has a stable error code per kind of token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token was presented")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued for another audience")]
    WrongAudience,
    #[error("the token was issued by someone else")]
    WrongIssuer,
    #[error("the token is signed with a key this service does not know")]
    UnknownKey,
    #[error("the token is of another kind or algorithm")]
    WrongType,
    #[error("the token is for another event")]
    WrongEvent,
}

const CODES: [[&str; 10]; 3] = [
    [
        "ticket_missing",
        "ticket_malformed",
        "ticket_bad_signature",
        "ticket_expired",
        "ticket_not_yet_valid",
        "ticket_wrong_audience",
        "ticket_wrong_issuer",
        "ticket_unknown_key",
        "ticket_wrong_type",
        "ticket_wrong_event",
    ],
    [
        "receipt_missing",
        "receipt_malformed",
        "receipt_bad_signature",
        "receipt_expired",
        "receipt_not_yet_valid",
        "receipt_wrong_audience",
        "receipt_wrong_issuer",
        "receipt_unknown_key",
        "receipt_wrong_type",
        "receipt_wrong_event",
    ],
    [
        "pass_missing",
        "pass_malformed",
        "pass_bad_signature",
        "pass_expired",
        "pass_not_yet_valid",
        "pass_wrong_audience",
        "pass_wrong_issuer",
        "pass_unknown_key",
        "pass_wrong_type",
        "pass_wrong_event",
    ],
];

impl TokenError {
    pub fn code(self, kind: TokenKind) -> &'static str {
        CODES[kind.index()][self as usize]
    }

    /// 401 for a token that proves nothing; 403 for a valid token used where it does not apply.
    pub fn into_api(self, kind: TokenKind) -> ApiError {
        let message = format!("{}: {}", kind_name(kind), self);
        match self {
            TokenError::WrongEvent => ApiError::Forbidden(self.code(kind), message),
            _ => ApiError::Unauthorized(self.code(kind), message),
        }
    }
}

fn kind_name(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Ticket => "queue ticket refused",
        TokenKind::Receipt => "join receipt refused",
        TokenKind::Pass => "pass refused",
    }
}

/// Verifies tokens against a set of public keys chosen by `kid`.
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<RwLock<HashMap<String, DecodingKey>>>,
    ticket_keys: Arc<RwLock<HashMap<String, DecodingKey>>>,
    issuer: String,
}

impl Verifier {
    pub fn new(issuer: impl Into<String>) -> Self {
        Verifier {
            keys: Arc::default(),
            ticket_keys: Arc::default(),
            issuer: issuer.into(),
        }
    }

    /// Adds (or replaces) the Ed25519 keys of a JWKS; other key types are ignored.
    pub fn add_jwks(&self, jwks: &Jwks) -> anyhow::Result<usize> {
        let added = Self::ed25519_keys(jwks)?;
        let count = added.len();
        let mut keys = self
            .keys
            .write()
            .map_err(|_| anyhow::anyhow!("key set lock poisoned"))?;
        keys.extend(added);
        Ok(count)
    }

    /// Makes the Ed25519 keys of a JWKS the whole key set: a key the publisher no longer lists
    /// is no longer trusted (revocation). A JWKS with a malformed key changes nothing. Returns
    /// the key ids now trusted.
    pub fn replace_jwks(&self, jwks: &Jwks) -> anyhow::Result<Vec<String>> {
        let fresh: HashMap<String, DecodingKey> = Self::ed25519_keys(jwks)?.into_iter().collect();
        let kids = fresh.keys().cloned().collect();
        let mut keys = self
            .keys
            .write()
            .map_err(|_| anyhow::anyhow!("key set lock poisoned"))?;
        *keys = fresh;
        Ok(kids)
    }

    fn ed25519_keys(jwks: &Jwks) -> anyhow::Result<Vec<(String, DecodingKey)>> {
        let mut found = Vec::new();
        for jwk in &jwks.keys {
            if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
                continue;
            }
            let raw = URL_SAFE_NO_PAD.decode(&jwk.x)?;
            anyhow::ensure!(raw.len() == 32, "Ed25519 public key must be 32 bytes");
            found.push((jwk.kid.clone(), DecodingKey::from_ed_der(&raw)));
        }
        Ok(found)
    }

    /// The issuer (`iss`) tokens must name.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn knows(&self, kid: &str) -> bool {
        self.keys
            .read()
            .map(|k| k.contains_key(kid))
            .unwrap_or(false)
    }

    /// The `kid` of a token's header, without verifying anything (to decide on a key refresh).
    pub fn kid_of(token: &str) -> Option<String> {
        jsonwebtoken::decode_header(token).ok()?.kid
    }

    pub fn verify<T: DeserializeOwned>(
        &self,
        kind: TokenKind,
        token: &str,
    ) -> Result<T, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > 4096 {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != kind.algorithm() || header.typ.as_deref() != Some(kind.typ()) {
            return Err(TokenError::WrongType);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = {
            let keys = match kind {
                TokenKind::Ticket => &self.ticket_keys,
                TokenKind::Receipt | TokenKind::Pass => &self.keys,
            };
            let keys = keys.read().map_err(|_| TokenError::UnknownKey)?;
            keys.get(&kid).cloned().ok_or(TokenError::UnknownKey)?
        };
        let mut validation = Validation::new(kind.algorithm());
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[kind.audience()]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<T>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAlgorithm => TokenError::WrongType,
                _ => TokenError::Malformed,
            })
    }

    /// Verifies a pass and checks it is for `event`.
    pub fn verify_pass(&self, token: &str, event: EventId) -> Result<PassClaims, TokenError> {
        let claims: PassClaims = self.verify(TokenKind::Pass, token)?;
        if claims.evt != event {
            return Err(TokenError::WrongEvent);
        }
        Ok(claims)
    }

    /// Verifies a queue ticket and checks it is for `event`.
    pub fn verify_ticket(&self, token: &str, event: EventId) -> Result<TicketClaims, TokenError> {
        let claims: TicketClaims = self.verify(TokenKind::Ticket, token)?;
        if claims.evt != event {
            return Err(TokenError::WrongEvent);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(signer: &Signer, evt: i64, exp_offset: i64) -> PassClaims {
        let now = chrono::Utc::now().timestamp();
        PassClaims {
            iss: signer.issuer().to_owned(),
            aud: TokenKind::Pass.audience().to_owned(),
            sub: "fan-1".into(),
            evt: EventId::new(evt).expect("positive"),
            tkt: TicketId::mint(),
            jti: Uuid::new_v4(),
            iat: now,
            nbf: now,
            exp: now + exp_offset,
            lim: 4,
        }
    }

    fn signer() -> Signer {
        Signer::new(SigningKey::generate().expect("key"), "fairgate")
    }

    #[test]
    fn a_signed_pass_verifies_and_is_deterministic() {
        let signer = signer();
        let claims = pass(&signer, 1, 600);
        let token = signer.sign(TokenKind::Pass, &claims).expect("sign");
        let again = signer.sign(TokenKind::Pass, &claims).expect("sign");
        assert_eq!(token, again, "Ed25519 signatures are deterministic");
        let got = signer
            .verifier()
            .verify_pass(&token, claims.evt)
            .expect("valid");
        assert_eq!(got, claims);
    }

    #[test]
    fn forged_expired_misdirected_and_mistyped_passes_are_refused() {
        let signer = signer();
        let verifier = signer.verifier();
        let evt = EventId::new(1).expect("positive");

        let expired = signer
            .sign(
                TokenKind::Pass,
                &pass(&signer, 1, -(LEEWAY_SECS as i64) - 5),
            )
            .expect("sign");
        assert_eq!(
            verifier.verify_pass(&expired, evt),
            Err(TokenError::Expired)
        );

        let other_event = signer
            .sign(TokenKind::Pass, &pass(&signer, 2, 600))
            .expect("sign");
        assert_eq!(
            verifier.verify_pass(&other_event, evt),
            Err(TokenError::WrongEvent)
        );

        let as_ticket = signer
            .sign(TokenKind::Ticket, &pass(&signer, 1, 600))
            .expect("sign");
        assert_eq!(
            verifier.verify_pass(&as_ticket, evt),
            Err(TokenError::WrongType)
        );

        let good = signer
            .sign(TokenKind::Pass, &pass(&signer, 1, 600))
            .expect("sign");
        let mut tampered = good.clone();
        // Flip one character of the payload: the signature no longer matches.
        let dot = tampered.find('.').expect("jwt") + 5;
        let flipped = if &tampered[dot..=dot] == "A" {
            "B"
        } else {
            "A"
        };
        tampered.replace_range(dot..=dot, flipped);
        assert!(matches!(
            verifier.verify_pass(&tampered, evt),
            Err(TokenError::BadSignature | TokenError::Malformed)
        ));

        let stranger = self::signer();
        let foreign = stranger
            .sign(TokenKind::Pass, &pass(&stranger, 1, 600))
            .expect("sign");
        assert_eq!(
            verifier.verify_pass(&foreign, evt),
            Err(TokenError::UnknownKey)
        );

        let mut wrong_iss = pass(&signer, 1, 600);
        wrong_iss.iss = "someone-else".into();
        let wrong_iss = signer.sign(TokenKind::Pass, &wrong_iss).expect("sign");
        assert_eq!(
            verifier.verify_pass(&wrong_iss, evt),
            Err(TokenError::WrongIssuer)
        );

        let mut wrong_aud = pass(&signer, 1, 600);
        wrong_aud.aud = TokenKind::Ticket.audience().into();
        let wrong_aud = signer.sign(TokenKind::Pass, &wrong_aud).expect("sign");
        assert_eq!(
            verifier.verify_pass(&wrong_aud, evt),
            Err(TokenError::WrongAudience)
        );
    }

    #[test]
    fn tickets_verify_only_where_the_signing_key_is_held() {
        let signer = signer();
        let now = chrono::Utc::now().timestamp();
        let evt = EventId::new(3).expect("positive");
        let claims = TicketClaims {
            iss: "fairgate".into(),
            aud: TokenKind::Ticket.audience().into(),
            sub: "anon:x".into(),
            evt,
            tkt: TicketId::mint(),
            iat: now,
            nbf: now,
            exp: now + 600,
        };
        let ticket = signer.sign(TokenKind::Ticket, &claims).expect("sign");
        assert_eq!(signer.verifier().verify_ticket(&ticket, evt), Ok(claims));
        // A service that only has the public keys (the purchase service) cannot accept tickets.
        let public_only = Verifier::new("fairgate");
        public_only.add_jwks(&signer.jwks()).expect("jwks");
        assert_eq!(
            public_only.verify_ticket(&ticket, evt),
            Err(TokenError::UnknownKey)
        );
        // Another deployment's ticket key is unknown here.
        assert_eq!(
            self::signer().verifier().verify_ticket(&ticket, evt),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn a_pass_forged_with_hs256_and_the_public_key_is_refused() {
        // The classic algorithm-confusion attack: HMAC keyed with the (public) Ed25519 key.
        let signer = signer();
        let claims = pass(&signer, 1, 600);
        let jwk = signer.jwks().keys[0].clone();
        let public = URL_SAFE_NO_PAD.decode(&jwk.x).expect("b64");
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some(jwk.kid);
        header.typ = Some(TokenKind::Pass.typ().into());
        let forged = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&public),
        )
        .expect("sign");
        assert_eq!(
            signer.verifier().verify_pass(&forged, claims.evt),
            Err(TokenError::WrongType)
        );
    }

    #[test]
    fn tokens_signed_before_a_key_rotation_stay_valid() {
        let old_seed = random_seed();
        let before = Signer::new(SigningKey::from_seed(&old_seed).expect("key"), "fairgate");
        let claims = pass(&before, 1, 600);
        let old_pass = before.sign(TokenKind::Pass, &claims).expect("sign");

        let after = Signer::new(SigningKey::generate().expect("key"), "fairgate")
            .retiring(vec![SigningKey::from_seed(&old_seed).expect("key")]);
        assert_eq!(after.jwks().keys.len(), 2, "old and new keys are published");
        assert_ne!(after.kid(), before.kid(), "new tokens name the new key");
        // A verifier that only knows the published keys (the purchase service) accepts both.
        let purchase = Verifier::new("fairgate");
        purchase.add_jwks(&after.jwks()).expect("jwks");
        assert_eq!(
            purchase.verify_pass(&old_pass, claims.evt),
            Ok(claims.clone())
        );
        let new_pass = after.sign(TokenKind::Pass, &claims).expect("sign");
        assert_eq!(purchase.verify_pass(&new_pass, claims.evt), Ok(claims));
    }

    #[test]
    fn a_token_missing_a_required_claim_is_refused() {
        let signer = signer();
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({
            "iss": "fairgate", "aud": "fairgate:purchase", "evt": 1,
            "tkt": Uuid::new_v4(), "jti": Uuid::new_v4(), "iat": now, "nbf": now,
            "exp": now + 600, "lim": 2
        });
        let token = signer.sign(TokenKind::Pass, &claims).expect("sign");
        assert_eq!(
            signer
                .verifier()
                .verify_pass(&token, EventId::new(1).expect("positive")),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn error_codes_name_the_kind_and_reason() {
        assert_eq!(TokenError::Expired.code(TokenKind::Pass), "pass_expired");
        assert_eq!(
            TokenError::WrongEvent.code(TokenKind::Ticket),
            "ticket_wrong_event"
        );
        assert_eq!(
            TokenError::Missing.code(TokenKind::Receipt),
            "receipt_missing"
        );
    }

    /// A JWS with any header and payload, signed (Ed25519) by `signer`'s key, or unsigned.
    fn forge(
        header: serde_json::Value,
        payload: &serde_json::Value,
        by: Option<&Signer>,
    ) -> String {
        let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(payload.to_string()));
        let signature = by
            .map(|s| s.key.pair.sign(token.as_bytes()).as_ref().to_vec())
            .unwrap_or_default();
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));
        token
    }

    fn pass_header(signer: &Signer) -> serde_json::Value {
        serde_json::json!({ "alg": "EdDSA", "typ": TokenKind::Pass.typ(), "kid": signer.kid() })
    }

    #[test]
    fn pass_attacks_are_all_refused() {
        let signer = signer();
        let verifier = signer.verifier();
        let evt = EventId::new(1).expect("positive");
        let claims = serde_json::to_value(pass(&signer, 1, 600)).expect("json");
        let honest = forge(pass_header(&signer), &claims, Some(&signer));
        assert!(
            verifier.verify_pass(&honest, evt).is_ok(),
            "the forge helper is faithful"
        );

        // alg: none, with and without a signature.
        let mut none = pass_header(&signer);
        none["alg"] = "none".into();
        for by in [None, Some(&signer)] {
            assert!(verifier
                .verify_pass(&forge(none.clone(), &claims, by), evt)
                .is_err());
        }
        // The wrong typ, or none at all.
        for typ in [
            serde_json::json!("JWT"),
            serde_json::json!(TokenKind::Ticket.typ()),
            serde_json::Value::Null,
        ] {
            let mut header = pass_header(&signer);
            header["typ"] = typ.clone();
            assert_eq!(
                verifier.verify_pass(&forge(header, &claims, Some(&signer)), evt),
                Err(TokenError::WrongType),
                "typ {typ}"
            );
        }
        // Injected or unknown kids: the key is chosen from our own set only.
        for kid in [
            serde_json::json!("../../../../dev/null"),
            serde_json::json!("' OR '1'='1"),
            serde_json::json!(""),
            serde_json::json!(42),
            serde_json::Value::Null,
        ] {
            let mut header = pass_header(&signer);
            header["kid"] = kid.clone();
            assert!(
                verifier
                    .verify_pass(&forge(header, &claims, Some(&signer)), evt)
                    .is_err(),
                "kid {kid}"
            );
        }
        // Our kid, a stranger's signature.
        let stranger = self::signer();
        assert_eq!(
            verifier.verify_pass(&forge(pass_header(&signer), &claims, Some(&stranger)), evt),
            Err(TokenError::BadSignature)
        );
        // Each claim missing, then each of the wrong type.
        let names = [
            "iss", "aud", "sub", "evt", "tkt", "jti", "iat", "nbf", "exp", "lim",
        ];
        for name in names {
            let mut missing = claims.clone();
            missing.as_object_mut().expect("object").remove(name);
            assert!(
                verifier
                    .verify_pass(&forge(pass_header(&signer), &missing, Some(&signer)), evt)
                    .is_err(),
                "without {name}"
            );
            let mut mistyped = claims.clone();
            mistyped[name] = match &claims[name] {
                serde_json::Value::String(_) => serde_json::json!(7),
                _ => serde_json::json!("7"),
            };
            assert!(
                verifier
                    .verify_pass(&forge(pass_header(&signer), &mistyped, Some(&signer)), evt)
                    .is_err(),
                "{name} of the wrong type"
            );
        }
        // Not valid yet (beyond the leeway), and a negative seat limit.
        let mut early = claims.clone();
        early["nbf"] = (chrono::Utc::now().timestamp() + 60).into();
        assert_eq!(
            verifier.verify_pass(&forge(pass_header(&signer), &early, Some(&signer)), evt),
            Err(TokenError::NotYetValid)
        );
        let mut negative = claims.clone();
        negative["lim"] = (-1).into();
        assert!(verifier
            .verify_pass(&forge(pass_header(&signer), &negative, Some(&signer)), evt)
            .is_err());
    }
}
