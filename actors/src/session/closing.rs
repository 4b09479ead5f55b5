//! Why the gateway closed a session itself: each cause counted by its label in
//! `elfin_connections_closed_total{limit}`, and said in the audit trail's words.

/// What closed a session (none while its peer closes it, or the gateway stops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// No valid message within `limits.identify_secs` of connecting.
    Identify,
    /// A message left unfinished for `limits.identify_secs`.
    UnfinishedMessage,
    /// Not a tunnel end, and no valid message for `limits.idle_secs`.
    Idle,
    /// Its replies stayed unread for `server.tunnel_stall_secs`.
    UnreadReplies,
    /// It claimed a device seen lately from elsewhere (`auth.device_takeover =
    /// "when-silent"`).
    TakeoverRefused,
    /// Its device, or its device's user, was removed from the database.
    Removed,
    /// Its client certificate was revoked, or expired.
    CertificateRevoked,
    CertificateExpired,
}

impl Closing {
    /// The `limit` label of `elfin_connections_closed_total`.
    pub fn label(self) -> &'static str {
        match self {
            Closing::Identify => "identify",
            Closing::UnfinishedMessage => "unfinished_message",
            Closing::Idle => "idle",
            Closing::UnreadReplies => "unread_replies",
            Closing::TakeoverRefused => "takeover_refused",
            Closing::Removed => "removed",
            Closing::CertificateRevoked => "certificate_revoked",
            Closing::CertificateExpired => "certificate_expired",
        }
    }

    /// Why a device that this closed went offline, for the audit trail.
    pub fn device_cause(self) -> &'static str {
        match self {
            Closing::Idle => "silent",
            Closing::Identify => "did not identify in time",
            _ => "closed by a limit",
        }
    }
}
