//! API keys and roles.
//!
//! A key is `fsk_` followed by 40 random hex digits. Only its SHA-256 (hex) is stored, with the
//! first 12 characters as a non-secret prefix so people can tell keys apart in listings. Keys
//! are verified by the `api_key_authenticate` definer function in the same statement that
//! scopes the request's transaction (see [`crate::session`]).

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// Length of the stored, displayable key prefix (`fsk_` and 8 hex digits).
pub const KEY_PREFIX_LEN: usize = 12;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads its tenant's data.
    Viewer,
    /// Reads and changes its tenant's data, provisions its devices and keys.
    Admin,
    /// Reads every tenant's data and the pipeline's system metrics.
    Operator,
    /// Everything, for every tenant, including tenants themselves.
    OperatorAdmin,
}

impl Role {
    /// Name in `api_keys.role` and `app.role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::OperatorAdmin => "operator_admin",
        }
    }

    /// Operator roles see every tenant and belong to none.
    pub fn is_operator(self) -> bool {
        matches!(self, Role::Operator | Role::OperatorAdmin)
    }

    /// Whether the role may change data (within its reach).
    pub fn can_write(self) -> bool {
        matches!(self, Role::Admin | Role::OperatorAdmin)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "operator_admin" => Ok(Role::OperatorAdmin),
            other => Err(format!(
                "unknown role `{other}` (viewer, admin, operator, operator_admin)"
            )),
        }
    }
}

/// The caller, as established by its key.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: i64,
    /// `None` for operator roles.
    pub tenant_id: Option<String>,
    pub role: Role,
}

/// A new secret with its stored forms.
#[derive(Debug, Clone)]
pub struct NewSecret {
    /// Shown once, never stored.
    pub secret: String,
    /// Hex SHA-256 of `secret`.
    pub hash: String,
    /// Displayable beginning of `secret`.
    pub prefix: String,
}

/// A fresh random secret with `kind` as its visible prefix (`fsk_` for API keys).
pub fn new_secret(kind: &str) -> NewSecret {
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{kind}{}", hex::encode(bytes));
    let prefix = secret.chars().take(kind.len() + 8).collect();
    NewSecret {
        hash: hash_secret(&secret),
        prefix,
        secret,
    }
}

/// Hex SHA-256, the form in which keys and device/gateway tokens are stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty() && token.len() <= 200).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_stored_as_sha256() {
        let a = new_secret("fsk_");
        let b = new_secret("fsk_");
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with("fsk_") && a.secret.len() == 44);
        assert_eq!(a.prefix.len(), KEY_PREFIX_LEN);
        assert_eq!(a.hash, hash_secret(&a.secret));
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bearer_tokens_are_taken_from_the_header() {
        assert_eq!(bearer("Bearer fsk_1"), Some("fsk_1"));
        assert_eq!(bearer("bearer  fsk_1 "), Some("fsk_1"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn roles_round_trip_their_names() {
        for role in [
            Role::Viewer,
            Role::Admin,
            Role::Operator,
            Role::OperatorAdmin,
        ] {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
