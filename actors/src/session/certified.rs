//! A session that presented a client certificate keeps it only while the certificate
//! holds: it closes when a reload revokes it (SIGHUP re-reads the revocation list and
//! the users revoked as a whole) and when it expires, with a log line naming the
//! certificate's subject and serial and a record in the audit trail; its tunnel ends
//! with it.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{Closing, Session};
use crate::audit::{Attempt, Refused};
use crate::refusal::Reason;
use crate::revocation::{Revocations, Revoked};

/// The longest single wait for an expiry; a later one is waited for in steps.
const LONGEST_WAIT: Duration = Duration::from_secs(86_400);

impl Session {
    /// Watches this session's certificate, if it has one, for revocation and expiry.
    pub(super) fn hold_certificate(&mut self, ctx: &mut Context<Self>) {
        let (Some(cert), Some(tls)) = (&self.certificate, &self.hub.config.tls) else {
            return;
        };
        let not_after = cert.not_after;
        let mut reloads = tls.subscribe();
        reloads.mark_unchanged();
        self.await_reload(reloads, ctx);
        self.await_expiry(not_after, ctx);
    }

    fn await_reload(
        &mut self,
        mut reloads: watch::Receiver<Arc<Revocations>>,
        ctx: &mut Context<Self>,
    ) {
        let changed = async move {
            let changed = reloads.changed().await.is_ok();
            (reloads, changed)
        };
        ctx.spawn(
            changed
                .into_actor(self)
                .map(|(reloads, changed), act, ctx| {
                    if !changed {
                        return;
                    }
                    let verdict = act
                        .certificate
                        .as_deref()
                        .and_then(|c| reloads.borrow().check(c, Utc::now()));
                    match verdict {
                        Some(why) => act.certificate_ended(why, ctx),
                        None => act.await_reload(reloads, ctx),
                    }
                }),
        );
    }

    fn await_expiry(&mut self, not_after: DateTime<Utc>, ctx: &mut Context<Self>) {
        let left = (not_after - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        ctx.run_later(left.min(LONGEST_WAIT), move |act, ctx| {
            if Utc::now() >= not_after {
                act.certificate_ended(Revoked::Expired(not_after), ctx);
            } else {
                act.await_expiry(not_after, ctx);
            }
        });
    }

    /// The certificate no longer holds: say so, record it, and close.
    fn certificate_ended(&mut self, why: Revoked, ctx: &mut Context<Self>) {
        let Some(cert) = self.certificate.clone() else {
            return;
        };
        if self.closed_by.is_some() {
            return;
        }
        let detail = format!(
            "the connection from {} with the certificate of {:?} (serial {}) is closed: the \
             certificate is {why}",
            self.remote, cert.user, cert.serial
        );
        log::info!("{detail}");
        self.hub
            .refusals
            .report(self.remote.ip(), Reason::Certificate, || detail.clone());
        self.hub.trail.refusal(Refused {
            request: Attempt::Connection,
            reason: Reason::Certificate,
            source: self.remote,
            uuid: None,
            device: None,
            certificate: Some(&cert),
            detail: detail.clone(),
        });
        self.hub.herald.do_send(crate::events::herald::PeerRefused {
            kind: crate::events::EventKind::CertificateRefused,
            uuid: None,
            mac: None,
            host: None,
            source: self.remote,
            certificate: Some(crate::certificate::ClientCert::clone(&cert)),
            reason: detail,
        });
        let limit = match why {
            Revoked::Expired(_) => Closing::CertificateExpired,
            Revoked::Serial | Revoked::User(_) => Closing::CertificateRevoked,
        };
        self.limit_reached(limit, ctx);
    }
}
