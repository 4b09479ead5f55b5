//! The device a connection speaks for (`docs/PROTOCOL.md` §7): where a trust
//! decision about a device is taken. Its first valid `beat` or device `data` is
//! admitted — a known user, within the user's limits and enrolment
//! ([`crate::tenants`]), not a takeover `auth.device_takeover` refuses
//! ([`crate::registry`], and other nodes in cluster mode) — and registered as the
//! device's live connection; a refused one is recorded and asked about again at most
//! once a second (a refused takeover closes the connection). Later messages refresh
//! its last-seen: a `beat` through the persistence actor, device data through the
//! heartbeat debouncer.

use std::ops::ControlFlow;
use std::sync::Arc;

use actix::prelude::*;
use tokio::time::{Duration, Instant};

use super::{Closing, Session};
use crate::audit::{Attempt, Refused};
use crate::cluster::{Elsewhere, SeenElsewhere};
use crate::debouncer;
use crate::device::{DeviceKey, Identity};
use crate::events::{herald, EventKind};
use crate::frame::{Header, Role};
use crate::hub::Hub;
use crate::link::PeerLink;
use crate::masked::masked;
use crate::metric;
use crate::persistence;
use crate::refusal::Reason;
use crate::registry::{LastSeen, Register, StillLive, Takeover, Unregister};
use crate::users::Access;

/// A device admitted: whether its sightings are stored (a known user's) or not (a
/// guest's, see [`Access`]).
struct Admitted {
    stored: bool,
}

/// A device turned away: the refusal's reason, and the refusal in words.
struct Turned {
    reason: Reason,
    detail: String,
}

impl Turned {
    fn new(reason: Reason, detail: String) -> Self {
        Self { reason, detail }
    }
}

/// The device a connection speaks for.
pub(super) struct Speaking {
    pub(super) identity: Arc<Identity>,
    /// Whether its sightings are stored (not for guests, see [`Access`]).
    pub(super) stored: bool,
    /// Whether this connection is its registered, live connection (not while it is
    /// refused: over its user's limits, not enrolled).
    pub(super) live: bool,
    /// When a refused device may be asked about again.
    pub(super) retry: Instant,
}

/// How long a refused device's messages are dropped before it is asked about again.
const RETRY_REFUSED: Duration = Duration::from_secs(1);

/// Admits `device` for the connection `link` from `ip`: its user must be known (an
/// unknown uuid costs the address a paced look-up), within its limits and enrolled
/// ([`crate::tenants`]), and the registry must take it (`auth.device_takeover`).
/// Says whether its sightings are stored, or why it is refused.
async fn admit(
    hub: &Hub,
    ip: std::net::IpAddr,
    device: Arc<Identity>,
    link: PeerLink,
) -> Result<Admitted, Turned> {
    let key = device.key.clone();
    let link_remote = link.remote;
    let name = || format!("device {} of user {}", key.mac, masked(&key.uuid));
    let access = hub.users.access(&key.uuid).await;
    if access.refused() {
        let delay = hub.lookups.failed(ip);
        tokio::time::sleep(delay).await;
        return Err(Turned::new(
            Reason::UnknownUser,
            format!("{}: no such user", name()),
        ));
    }
    if let Err(reason) = hub.tenants.admit(&key, access == Access::Member).await {
        let why = match reason {
            Reason::Enrollment => "not registered (auth.devices = \"registered\")".to_owned(),
            Reason::DeviceQuota => format!(
                "its user has limits.max_devices_per_user = {} devices",
                hub.config.limits.max_devices_per_user
            ),
            _ => "its user added new devices faster than limits.new_devices_per_minute".to_owned(),
        };
        return Err(Turned::new(reason, format!("{}: {why}", name())));
    }
    if hub.config.auth.device_takeover == Takeover::WhenSilent {
        // Not seen here lately: ask the nodes that hold it or held it lately. One that
        // does not answer in time keeps it (fail closed).
        let here = hub.registry.send(LastSeen(key.clone())).await;
        if let (Ok(None), Some(cluster)) = (here, &hub.cluster) {
            let asked = SeenElsewhere {
                device: key.clone(),
                from: ip,
            };
            let why = match cluster.send(asked).await {
                Ok(Elsewhere::Free) => None,
                Ok(Elsewhere::Seen) => Some("another node saw it lately from another address"),
                _ => Some(
                    "the node that holds it did not answer in time, so it keeps it (fail \
                     closed)",
                ),
            };
            if let Some(why) = why {
                return Err(Turned::new(
                    Reason::Takeover,
                    format!("{}: {why} (auth.device_takeover = \"when-silent\")", name()),
                ));
            }
        }
    }
    match hub.registry.send(Register { device, link }).await {
        Ok(Err(StillLive { holder, ago })) => Err(Turned::new(
            Reason::Takeover,
            format!(
                "{}: a connection from {} claims it, but it was seen from {holder} {ago:?} \
                 ago (auth.device_takeover = \"when-silent\")",
                name(),
                link_remote
            ),
        )),
        // Registered (or the gateway is stopping).
        _ => Ok(Admitted {
            stored: access == Access::Member,
        }),
    }
}

impl Session {
    /// A `beat` or device `data` header. The first one of a known user fixes the
    /// device this connection speaks for (`docs/PROTOCOL.md` §7): it is admitted
    /// (within its user's limits, enrolled, not taking over a device that still beats
    /// elsewhere) and registered; later ones refresh it. One naming another device is
    /// refused, and so is its payload.
    pub(super) fn sighted(
        &mut self,
        h: Header,
        beat: bool,
        ctx: &mut Context<Self>,
    ) -> ControlFlow<()> {
        let retry = match &self.device {
            Some(d) if !d.identity.key.is(&h.uuid, &h.mac) => {
                self.discard = true;
                let (spoken, named) = (&d.identity.key, DeviceKey::new(&h.uuid, &h.mac));
                self.hub
                    .refusals
                    .report(self.remote.ip(), Reason::Identity, || {
                        format!(
                            "a connection of device {} (user {}) named device {} (user {})",
                            spoken.mac,
                            masked(&spoken.uuid),
                            named.mac,
                            masked(&named.uuid)
                        )
                    });
                return ControlFlow::Continue(());
            }
            Some(d) if d.live && d.identity.host == h.host => {
                self.last_message = Instant::now();
                self.refresh(beat);
                return ControlFlow::Continue(());
            }
            Some(d) if !d.live => d.retry,
            _ => Instant::now(),
        };
        if Instant::now() < retry {
            // Refused a moment ago: not asked again before then.
            self.discard = true;
            return ControlFlow::Continue(());
        }
        let device = Identity::new(&h.uuid, &h.mac, &h.host);
        let (hub, ip, link) = (self.hub.clone(), self.remote.ip(), self.link(ctx));
        let candidate = device.clone();
        let step = async move { admit(&hub, ip, candidate, link).await };
        self.pause(ctx, step, move |act, admitted, ctx| match admitted {
            Ok(Admitted { stored }) => {
                act.registered(device, stored);
                act.refresh(beat);
            }
            Err(Turned { reason, detail }) => act.refused_device(device, reason, detail, ctx),
        })
    }

    /// `device` is now registered with this connection as its live one. Its first
    /// sign of life on a new connection is written with the next batch, beat or data
    /// alike (a device that only streams data would otherwise show in the store, and
    /// in the Web UI, only when the debouncer's first timer fires).
    fn registered(&mut self, device: Arc<Identity>, stored: bool) {
        let was_live = self.device.as_ref().is_some_and(|d| d.live);
        if !was_live {
            log::info!(
                "device {} ({}) of user {} online from {}",
                device.key.mac,
                device.host,
                masked(&device.key.uuid),
                self.remote
            );
            if stored {
                persistence::beat(&self.hub.persistence, &device);
            }
        }
        self.identified = true;
        self.last_message = Instant::now();
        self.set_role(Role::Device);
        self.device = Some(Speaking {
            identity: device,
            stored,
            live: true,
            retry: Instant::now(),
        });
    }

    /// `device` was refused. A device of an unknown user identifies nothing; any
    /// other refused device is still the one this connection speaks for (it may not
    /// name another), asked again at most once a second. A refused takeover closes
    /// the connection: it is not kept to ask again until the real device's
    /// connection drops.
    fn refused_device(
        &mut self,
        device: Arc<Identity>,
        reason: Reason,
        detail: String,
        ctx: &mut Context<Self>,
    ) {
        self.discard = true;
        let (peer, refusals) = (self.remote.ip(), &self.hub.refusals);
        if reason == Reason::Takeover {
            self.hub.trail.refusal(Refused {
                request: Attempt::Takeover,
                reason,
                source: self.remote,
                uuid: Some(&device.key.uuid),
                device: Some(&device.key.mac),
                certificate: None,
                detail: detail.clone(),
            });
        }
        let event = match reason {
            Reason::Takeover => Some(EventKind::TakeoverRefused),
            Reason::Enrollment => Some(EventKind::EnrollmentRefused),
            _ => None,
        };
        if let Some(kind) = event {
            self.hub.herald.do_send(herald::PeerRefused {
                kind,
                uuid: Some(device.key.uuid.clone()),
                mac: Some(device.key.mac.clone()),
                host: Some(device.host.clone()),
                source: self.remote,
                certificate: None,
                reason: detail.clone(),
            });
        }
        match reason {
            Reason::DeviceQuota | Reason::NewDeviceRate => {
                refusals.report_for_user(peer, &device.key.uuid, reason, || detail)
            }
            _ => refusals.report(peer, reason, || detail),
        }
        if reason == Reason::UnknownUser {
            metrics::counter!(metric::UNKNOWN_USER_MESSAGES_TOTAL).increment(1);
            return;
        }
        if reason == Reason::Takeover {
            self.limit_reached(Closing::TakeoverRefused, ctx);
            return;
        }
        if self.device.is_none() {
            self.device = Some(Speaking {
                identity: device,
                stored: false,
                live: false,
                retry: Instant::now() + RETRY_REFUSED,
            });
        } else if let Some(d) = &mut self.device {
            d.retry = Instant::now() + RETRY_REFUSED;
        }
    }

    pub(super) fn unregister(&self, device: Arc<Identity>, cause: &'static str) {
        self.hub.registry.do_send(Unregister {
            device: device.key.clone(),
            session: self.id,
            cause,
        });
    }

    /// Why this session ends, in the audit trail's words.
    pub(super) fn end_cause(&self) -> &'static str {
        match self.closed_by {
            Some(closing) => closing.device_cause(),
            None if self.lease.stop.is_cancelled() => "gateway shut down",
            None => "closed",
        }
    }

    /// Refreshes last-seen: a `beat` is persisted at once (batched), device data goes
    /// through the heartbeat debouncer.
    fn refresh(&self, beat: bool) {
        let Some(Speaking {
            identity,
            stored,
            live: true,
            ..
        }) = &self.device
        else {
            return;
        };
        match (stored, beat) {
            (true, true) => persistence::beat(&self.hub.persistence, identity),
            (true, false) => debouncer::data_frame(&self.hub.debouncer, identity),
            (false, _) => identity.activity.touch(),
        }
    }
}
