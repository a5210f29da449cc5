//! sha256 digests in the `sha256:<hex>` form OCI uses.

use sha2::{Digest, Sha256};

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An incremental sha256 that finishes as `sha256:<hex>`.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The digest of everything added.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }
}

/// Checks `sha256:<64 lowercase hex>` (the only algorithm ocifs verifies).
pub fn validate_digest(d: &str) -> std::result::Result<(), String> {
    let (alg, hex) = d.split_once(':').ok_or("must look like sha256:<hex>")?;
    if alg != "sha256" {
        return Err(format!("algorithm {alg:?} is not supported (only sha256)"));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("sha256 needs 64 lowercase hex digits".into());
    }
    Ok(())
}
