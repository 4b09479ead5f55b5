//! How a user's uuid is shown: it is the user's only secret (devices send it in
//! clear), so logs, the status page and the audit trail show its first characters
//! only, enough to tell users apart.

/// The first eight characters of a uuid, and an ellipsis.
pub fn masked(uuid: &str) -> String {
    let end = uuid.char_indices().nth(8).map_or(uuid.len(), |(i, _)| i);
    format!("{}…", &uuid[..end])
}
