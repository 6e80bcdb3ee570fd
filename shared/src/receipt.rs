//! Join receipts signed in batches (`fg-receipt-v2`).
//!
//! A receipt must be checkable by anyone with fairgate's public keys, so it needs a public-key
//! signature; one Ed25519 signature per join was a third of the buffer's CPU. Instead, every
//! receipt issued in the same instant is a leaf of one Merkle tree and the tree's root is signed
//! once, as certificate-transparency logs do. A receipt is three parts joined by `~`:
//!
//! 1. the **batch**: a compact JWS (`typ` `fg-receipt+jwt`, EdDSA, `kid`) whose claims name the
//!    tree's root (`root`, hex) and its size (`n`), besides `iss`, `aud`, `sub`, `iat`, `nbf`,
//!    `exp`;
//! 2. the **leaf**: base64url of the JSON [`ReceiptClaims`] of this join;
//! 3. the **proof**: base64url of the leaf's index (4 bytes, big-endian) followed by its audit
//!    path (32 bytes per hash), leaf to root.
//!
//! Hashing and audit paths follow RFC 9162 (certificate transparency v2): a leaf hashes as
//! `SHA-256(0x00 ‖ leaf)`, a node as `SHA-256(0x01 ‖ left ‖ right)`, a tree of `n` leaves splits
//! at the largest power of two below `n`, and the path is checked with RFC 9162 §2.1.3.2. So a
//! receipt verifies with the batch's signature, one hash per level, and nothing else; changing
//! any byte of the leaf, the path or the root breaks it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::token::{ReceiptClaims, Signer, TokenError, TokenKind, Verifier, LEEWAY_SECS};

/// What a receipt batch's JWS says: the root of the tree of receipts it signs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchClaims {
    pub iss: String,
    pub aud: String,
    /// Always `"receipt-batch"`.
    pub sub: String,
    /// Hex SHA-256 root of the receipts' Merkle tree.
    pub root: String,
    /// Receipts in the tree.
    pub n: u32,
    pub iat: i64,
    pub nbf: i64,
    /// The latest expiry of the receipts in the batch.
    pub exp: i64,
}

const BATCH_SUBJECT: &str = "receipt-batch";
/// Most receipts one batch signs (a path is then at most 16 hashes).
pub const MAX_BATCH: usize = 1 << 16;

type Hash = [u8; 32];

fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The root of `leaves` (hashed) and each leaf's audit path, RFC 9162 §2.1.
fn tree(leaves: &[Hash], paths: &mut [Vec<Hash>]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            let (left_paths, right_paths) = paths.split_at_mut(k);
            let left = tree(&leaves[..k], left_paths);
            let right = tree(&leaves[k..], right_paths);
            for path in left_paths {
                path.push(right);
            }
            for path in right_paths {
                path.push(left);
            }
            node_hash(&left, &right)
        }
    }
}

/// RFC 9162 §2.1.3.2: the root a leaf hash and its audit path lead to, if the path fits a tree
/// of `size` leaves.
fn root_from_path(index: u64, size: u64, leaf: Hash, path: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    let (mut fn_, mut sn, mut r) = (index, size - 1, leaf);
    for p in path {
        if sn == 0 {
            return None;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    (sn == 0).then_some(r)
}

/// Signs `receipts` with one signature; the answer holds one receipt string per claim, in order.
pub fn sign_batch(signer: &Signer, receipts: &[ReceiptClaims]) -> Result<Vec<String>, ApiError> {
    if receipts.is_empty() {
        return Ok(Vec::new());
    }
    if receipts.len() > MAX_BATCH {
        return Err(ApiError::internal("too many receipts for one batch"));
    }
    let leaves: Vec<Vec<u8>> = receipts
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<_, _>>()
        .map_err(ApiError::internal)?;
    let hashes: Vec<Hash> = leaves.iter().map(|l| leaf_hash(l)).collect();
    let mut paths = vec![Vec::new(); hashes.len()];
    let root = tree(&hashes, &mut paths);
    let iat = receipts.iter().map(|r| r.iat).max().unwrap_or_default();
    let batch = BatchClaims {
        iss: signer.issuer().to_owned(),
        aud: TokenKind::Receipt.audience().to_owned(),
        sub: BATCH_SUBJECT.to_owned(),
        root: hex::encode(root),
        n: receipts.len() as u32,
        iat,
        nbf: receipts.iter().map(|r| r.nbf).min().unwrap_or(iat),
        exp: receipts.iter().map(|r| r.exp).max().unwrap_or(iat),
    };
    let jws = signer.sign(TokenKind::Receipt, &batch)?;
    Ok(leaves
        .iter()
        .zip(paths)
        .enumerate()
        .map(|(index, (leaf, path))| {
            let mut proof = Vec::with_capacity(4 + 32 * path.len());
            proof.extend_from_slice(&(index as u32).to_be_bytes());
            for hash in &path {
                proof.extend_from_slice(hash);
            }
            let mut receipt =
                String::with_capacity(jws.len() + 2 + (leaf.len() + proof.len()) * 4 / 3 + 4);
            receipt.push_str(&jws);
            receipt.push('~');
            URL_SAFE_NO_PAD.encode_string(leaf, &mut receipt);
            receipt.push('~');
            URL_SAFE_NO_PAD.encode_string(&proof, &mut receipt);
            receipt
        })
        .collect())
}

/// Checks a receipt: the batch's signature and claims, the leaf's claims, and that the leaf is
/// in the signed tree. Returns the join's claims.
pub fn verify(verifier: &Verifier, receipt: &str) -> Result<ReceiptClaims, TokenError> {
    if receipt.is_empty() {
        return Err(TokenError::Missing);
    }
    if receipt.len() > 8192 {
        return Err(TokenError::Malformed);
    }
    let mut parts = receipt.split('~');
    let (Some(jws), Some(leaf), Some(proof), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let batch: BatchClaims = verifier.verify(TokenKind::Receipt, jws)?;
    if batch.sub != BATCH_SUBJECT {
        return Err(TokenError::WrongType);
    }
    let leaf = URL_SAFE_NO_PAD
        .decode(leaf)
        .map_err(|_| TokenError::Malformed)?;
    let proof = URL_SAFE_NO_PAD
        .decode(proof)
        .map_err(|_| TokenError::Malformed)?;
    if proof.len() < 4 || (proof.len() - 4) % 32 != 0 {
        return Err(TokenError::Malformed);
    }
    let index = u32::from_be_bytes([proof[0], proof[1], proof[2], proof[3]]);
    let path: Vec<Hash> = proof[4..]
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap_or([0; 32]))
        .collect();
    let root = root_from_path(index.into(), batch.n.into(), leaf_hash(&leaf), &path)
        .ok_or(TokenError::BadSignature)?;
    if hex::encode(root) != batch.root {
        return Err(TokenError::BadSignature);
    }
    let claims: ReceiptClaims = serde_json::from_slice(&leaf).map_err(|_| TokenError::Malformed)?;
    if claims.iss != verifier.issuer() {
        return Err(TokenError::WrongIssuer);
    }
    if claims.aud != TokenKind::Receipt.audience() {
        return Err(TokenError::WrongAudience);
    }
    let now = chrono::Utc::now().timestamp();
    let leeway = LEEWAY_SECS as i64;
    if claims.exp < now - leeway {
        return Err(TokenError::Expired);
    }
    if claims.nbf > now + leeway {
        return Err(TokenError::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{EventId, TicketId};
    use crate::token::SigningKey;

    fn signer() -> Signer {
        Signer::new(SigningKey::generate().expect("key"), "fairgate-test")
    }

    fn claims(signer: &Signer, n: usize) -> Vec<ReceiptClaims> {
        let now = chrono::Utc::now().timestamp();
        (0..n)
            .map(|i| ReceiptClaims {
                iss: signer.issuer().to_owned(),
                aud: TokenKind::Receipt.audience().to_owned(),
                sub: format!("anon:{i}"),
                evt: EventId::new(7).expect("id"),
                tkt: TicketId::mint(),
                cmt: "ab".repeat(32),
                iat: now,
                nbf: now,
                exp: now + 3600,
            })
            .collect()
    }

    #[test]
    fn every_receipt_of_every_batch_size_verifies_to_its_own_claims() {
        let signer = signer();
        let verifier = signer.verifier();
        for n in [1, 2, 3, 4, 5, 7, 8, 9, 31, 64, 100, 257] {
            let claims = claims(&signer, n);
            let receipts = sign_batch(&signer, &claims).expect("sign");
            assert_eq!(receipts.len(), n);
            for (receipt, claim) in receipts.iter().zip(&claims) {
                assert_eq!(
                    &verify(&verifier, receipt).expect("verifies"),
                    claim,
                    "n={n}"
                );
            }
        }
    }

    /// Reassembles a receipt with one part replaced.
    fn with_part(receipt: &str, index: usize, part: &str) -> String {
        let mut parts: Vec<&str> = receipt.split('~').collect();
        parts[index] = part;
        parts.join("~")
    }

    #[test]
    fn an_edited_leaf_path_index_or_root_is_refused() {
        let signer = signer();
        let verifier = signer.verifier();
        let receipts = sign_batch(&signer, &claims(&signer, 10)).expect("sign");
        let parts: Vec<&str> = receipts[3].split('~').collect();

        // Another fan's leaf under this proof.
        let other_leaf = receipts[4].split('~').nth(1).expect("leaf");
        assert_eq!(
            verify(&verifier, &with_part(&receipts[3], 1, other_leaf)),
            Err(TokenError::BadSignature)
        );
        // The leaf edited to claim another ticket.
        let mut leaf: ReceiptClaims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        leaf.tkt = TicketId::mint();
        let edited = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&leaf).expect("json"));
        assert_eq!(
            verify(&verifier, &with_part(&receipts[3], 1, &edited)),
            Err(TokenError::BadSignature)
        );
        // The index or one bit of the path changed.
        let mut proof = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        proof[3] ^= 1;
        let moved = URL_SAFE_NO_PAD.encode(&proof);
        assert_eq!(
            verify(&verifier, &with_part(&receipts[3], 2, &moved)),
            Err(TokenError::BadSignature)
        );
        proof[3] ^= 1;
        proof[10] ^= 1;
        let flipped = URL_SAFE_NO_PAD.encode(&proof);
        assert_eq!(
            verify(&verifier, &with_part(&receipts[3], 2, &flipped)),
            Err(TokenError::BadSignature)
        );
        // A batch from another signer (its root fits no leaf here), or a bare JWS.
        let stranger = super::tests::signer();
        let foreign = sign_batch(&stranger, &claims(&stranger, 10)).expect("sign");
        let foreign_jws = foreign[3].split('~').next().expect("jws");
        assert_eq!(
            verify(&verifier, &with_part(&receipts[3], 0, foreign_jws)),
            Err(TokenError::UnknownKey)
        );
        assert_eq!(verify(&verifier, parts[0]), Err(TokenError::Malformed));
        assert_eq!(verify(&verifier, ""), Err(TokenError::Missing));
        // Another batch of the same signer: a valid signature over another root.
        let second = sign_batch(&signer, &claims(&signer, 10)).expect("sign");
        let second_jws = second[3].split('~').next().expect("jws");
        assert_eq!(
            verify(&verifier, &with_part(&receipts[3], 0, second_jws)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_proof_longer_or_shorter_than_the_tree_is_refused() {
        let leaves: Vec<Hash> = (0..13u8).map(|i| leaf_hash(&[i])).collect();
        let mut paths = vec![Vec::new(); leaves.len()];
        let root = tree(&leaves, &mut paths);
        for (i, path) in paths.iter().enumerate() {
            assert_eq!(root_from_path(i as u64, 13, leaves[i], path), Some(root));
            assert_ne!(
                root_from_path(i as u64, 13, leaves[i], &path[1..]),
                Some(root)
            );
            let mut longer = path.clone();
            longer.push(root);
            assert_ne!(root_from_path(i as u64, 13, leaves[i], &longer), Some(root));
        }
        assert_eq!(root_from_path(13, 13, leaves[0], &paths[0]), None);
    }

    #[test]
    fn the_tree_hash_matches_rfc_9162_on_a_frozen_vector() {
        // Three leaves "a", "b", "c": MTH = H(1 ‖ H(1 ‖ H(0‖a) ‖ H(0‖b)) ‖ H(0‖c)).
        let leaves: Vec<Hash> = [b"a", b"b", b"c"].iter().map(|l| leaf_hash(*l)).collect();
        let mut paths = vec![Vec::new(); 3];
        let root = tree(&leaves, &mut paths);
        let expected = node_hash(&node_hash(&leaves[0], &leaves[1]), &leaves[2]);
        assert_eq!(root, expected);
        assert_eq!(
            hex::encode(root),
            "36642e73c2540ab121e3a6bf9545b0a24982cd830eb13d3cd19de3ce6c021ec1",
            "frozen: changing the hashing changes every published receipt"
        );
    }
}
