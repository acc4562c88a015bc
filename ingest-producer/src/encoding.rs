//! `Content-Encoding` of request bodies: `identity` (or none) and `gzip` (`x-gzip`), the one
//! most HTTP agents use. Anything else is refused with `415` before the body is read.
//!
//! The body limit holds twice: the body as sent is read up to the limit (`413` past it), and a
//! gzip body is decompressed only up to the limit (`413` past it), so a gzip bomb costs at
//! most the limit in memory and the work of inflating that many bytes.
//!
//! Why not `tower_http::decompression::RequestDecompressionLayer` (checked in tower-http
//! 0.6.11): it has no limit on the decompressed size of its own (it would need a
//! `RequestBodyLimitLayer` behind it, whose `413` is a fixed `text/plain` body), and it answers
//! an unknown encoding itself with an empty `415` before the token is checked, so neither
//! reply would have the documented `{"error","field","index"}` body. Here the order stays:
//! authenticate, check the content type and encoding, read, decompress.

use std::io::Read;

use axum::http::header::CONTENT_ENCODING;
use axum::http::HeaderMap;
use flate2::read::MultiGzDecoder;

use crate::error::Rejection;

/// How the request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentEncoding {
    /// As is (no header, an empty one, or `identity`).
    Identity,
    /// gzip (RFC 1952), one member or several concatenated.
    Gzip,
}

impl ContentEncoding {
    /// The encoding named by the request's `Content-Encoding` header(s). `identity` entries are
    /// ignored; more than one real encoding (`gzip, gzip`) is refused like an unknown one.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, Rejection> {
        let mut encoding = ContentEncoding::Identity;
        for value in headers.get_all(CONTENT_ENCODING) {
            let value = value
                .to_str()
                .map_err(|_| Rejection::unsupported_encoding("(not ascii)"))?;
            for coding in value.split(',').map(str::trim) {
                if coding.is_empty() || coding.eq_ignore_ascii_case("identity") {
                    continue;
                }
                let gzip =
                    coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip");
                if !gzip || encoding != ContentEncoding::Identity {
                    return Err(Rejection::unsupported_encoding(value.trim()));
                }
                encoding = ContentEncoding::Gzip;
            }
        }
        Ok(encoding)
    }

    /// The body as the client wrote it, at most `limit` bytes.
    pub fn decode(self, body: Vec<u8>, limit: usize) -> Result<Vec<u8>, Rejection> {
        match self {
            ContentEncoding::Identity => Ok(body),
            ContentEncoding::Gzip => gunzip(&body, limit),
        }
    }
}

/// Inflates at most `limit + 1` bytes: one more than allowed tells a body over the limit,
/// without inflating the rest.
fn gunzip(compressed: &[u8], limit: usize) -> Result<Vec<u8>, Rejection> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    // Bodies compress 3 to 10 times; start near that and let the vector grow up to the cap.
    let mut body = Vec::with_capacity(compressed.len().saturating_mul(4).min(limit));
    MultiGzDecoder::new(compressed)
        .take(cap)
        .read_to_end(&mut body)
        .map_err(|err| Rejection::malformed_encoding("gzip", err))?;
    if body.len() > limit {
        return Err(Rejection::too_large_decompressed(limit));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use axum::http::HeaderValue;
    use flate2::write::GzEncoder;
    use flate2::Compression;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn encoding(values: &[&str]) -> Result<ContentEncoding, Rejection> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(CONTENT_ENCODING, HeaderValue::from_str(value).unwrap());
        }
        ContentEncoding::from_headers(&headers)
    }

    #[test]
    fn gzip_and_identity_are_the_encodings() {
        assert_eq!(encoding(&[]).unwrap(), ContentEncoding::Identity);
        assert_eq!(encoding(&["identity"]).unwrap(), ContentEncoding::Identity);
        assert_eq!(encoding(&[""]).unwrap(), ContentEncoding::Identity);
        assert_eq!(encoding(&["gzip"]).unwrap(), ContentEncoding::Gzip);
        assert_eq!(encoding(&["X-Gzip"]).unwrap(), ContentEncoding::Gzip);
        assert_eq!(
            encoding(&["identity", " GZIP "]).unwrap(),
            ContentEncoding::Gzip
        );
        for unknown in [
            &["br"][..],
            &["compress"],
            &["deflate"],
            &["gzip, gzip"],
            &["gzip", "br"],
        ] {
            let rejection = encoding(unknown).unwrap_err();
            assert_eq!(rejection.status.as_u16(), 415, "{unknown:?}");
            assert_eq!(rejection.field.as_deref(), Some("content-encoding"));
        }
        assert_eq!(
            encoding(&["br"]).unwrap_err().error,
            "content-encoding br is not supported; send gzip or identity"
        );
    }

    #[test]
    fn gzip_bodies_are_inflated_up_to_the_limit() {
        let body = br#"{"seq":1,"metrics":{"t":1}}"#;
        assert_eq!(
            ContentEncoding::Gzip
                .decode(gzip(body), body.len())
                .unwrap(),
            body
        );
        // Concatenated members are one body.
        let mut two = gzip(b"[1,");
        two.extend(gzip(b"2]"));
        assert_eq!(ContentEncoding::Gzip.decode(two, 100).unwrap(), b"[1,2]");
        let over = ContentEncoding::Gzip
            .decode(gzip(body), body.len() - 1)
            .unwrap_err();
        assert_eq!(over.status.as_u16(), 413);
        assert_eq!(
            over.error,
            format!("decompressed body exceeds {} bytes", body.len() - 1)
        );
    }

    #[test]
    fn a_bomb_is_cut_off_at_the_limit() {
        // 64 MiB of zeros in 64 KiB of gzip; only `limit + 1` bytes are ever inflated.
        let bomb = gzip(&vec![0; 64 << 20]);
        assert!(bomb.len() < 128 << 10, "{}", bomb.len());
        let rejection = ContentEncoding::Gzip.decode(bomb, 1 << 20).unwrap_err();
        assert_eq!(rejection.error, "decompressed body exceeds 1048576 bytes");
    }

    #[test]
    fn broken_gzip_is_malformed() {
        let mut truncated = gzip(b"{\"seq\":1}");
        truncated.truncate(truncated.len() - 4);
        for body in [b"not gzip".to_vec(), Vec::new(), truncated] {
            let rejection = ContentEncoding::Gzip.decode(body, 1 << 20).unwrap_err();
            assert_eq!(rejection.status.as_u16(), 400);
            assert!(
                rejection.error.starts_with("malformed gzip body: "),
                "{}",
                rejection.error
            );
        }
    }
}
