//! Checks on identifiers and names from requests, so bad input is a 400 naming its field
//! before any SQL runs (the database's `fleet_id` domain and CHECKs stay the last word).

use crate::error::ApiError;

/// Longest identifier (`fleet_id` domain: `^[A-Za-z0-9_.:-]{1,64}$`).
pub const MAX_ID_LEN: usize = 64;

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

/// A tenant, site, device or metric identifier.
pub fn id(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_ID_LEN || !value.chars().all(id_char) {
        return Err(ApiError::bad(
            field,
            format!("must be 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 _ . : -"),
        ));
    }
    Ok(())
}

/// A person-facing name (1 to 200 characters, no control characters).
pub fn name(field: &str, value: &str) -> Result<(), ApiError> {
    let len = value.chars().count();
    if len == 0 || len > 200 || value.chars().any(char::is_control) {
        return Err(ApiError::bad(
            field,
            "must be 1 to 200 characters without control characters",
        ));
    }
    Ok(())
}

/// A comma-separated list of identifiers (`metrics=a,b`), at most `max`, without duplicates.
pub fn id_list(field: &str, value: &str, max: usize) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        id(field, item)?;
        if !out.iter().any(|seen| seen == item) {
            out.push(item.to_owned());
        }
    }
    if out.is_empty() {
        return Err(ApiError::bad(field, "must name at least one metric"));
    }
    if out.len() > max {
        return Err(ApiError::bad(
            field,
            format!("at most {max} metrics per request"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_follow_the_fleet_id_domain() {
        assert!(id("device_id", "dev-01.a:b_c").is_ok());
        for bad in [
            "",
            "a b",
            "x'; DROP TABLE devices; --",
            "ü",
            &"a".repeat(65),
        ] {
            let err = id("device_id", bad).unwrap_err();
            assert!(
                matches!(err, ApiError::BadRequest { field: Some(ref f), .. } if f == "device_id")
            );
        }
    }

    #[test]
    fn metric_lists_are_split_deduplicated_and_bounded() {
        assert_eq!(id_list("metrics", "a, b,a", 5).unwrap(), vec!["a", "b"]);
        assert!(id_list("metrics", ",", 5).is_err());
        assert!(id_list("metrics", "a,b,c", 2).is_err());
    }
}
