//! One device's page (`GET /api/devices/<mac>`): its connection, its open tunnels,
//! its tunnels, comings and goings and refusals from the audit trail, and whether it
//! is contested.

use super::*;

/// A device claimed from other addresses within the online window.
#[derive(Serialize)]
pub struct Contested {
    /// Where the device was seen from, and the addresses that claimed it.
    pub seen_from: String,
    pub claimants: Vec<String>,
    pub since_secs: u64,
}

/// Everything the device page shows.
#[derive(Serialize)]
pub struct DeviceDetail {
    pub device: DeviceRow,
    /// Its open tunnels (on this node).
    pub tunnels_now: Vec<LiveTunnelRow>,
    /// Its tunnels from the audit trail, newest first.
    pub tunnels: Vec<audit::TunnelRow>,
    /// It coming and going, newest first.
    pub events: Vec<audit::EventRow>,
    /// Requests, handshakes and takeovers naming it that were refused, newest first.
    pub refusals: Vec<audit::RefusalRow>,
    /// Connections from other addresses that claimed it lately, while
    /// `auth.device_takeover = "when-silent"` kept it (refused).
    pub contested: Option<Contested>,
    pub audit_error: Option<String>,
    pub clock: Clock,
}

impl StatusBoard {
    /// One device with its tunnels and history; `None` if the gateway knows no such
    /// device.
    pub async fn device(&self, mac: &str) -> Option<DeviceDetail> {
        let (live, tunnels) = futures::join!(
            self.hub.registry.send(AllLive),
            self.hub.bridge.send(Tunnels)
        );
        let live = live.unwrap_or_default();
        let (device, uuid, names) = {
            let directory = self.directory().await;
            let (device, uuid) = Self::entries(&directory, &live)
                .iter()
                .find(|d| d.mac == mac)
                .map(|d| (self.row(d), d.uuid.map(str::to_owned)))?;
            let names: HashMap<String, String> = directory
                .users
                .iter()
                .map(|u| (u.uuid.clone(), u.username.clone()))
                .collect();
            (device, uuid, names)
        };
        let contest = match uuid {
            Some(uuid) => {
                let key = elfin_actors::device::DeviceKey::new(&uuid, mac);
                self.hub.registry.send(ContestOf(key)).await.ok().flatten()
            }
            None => None,
        };
        let contested = contest.map(|c| Contested {
            seen_from: c.holder.to_string(),
            claimants: c.claimants.iter().map(ToString::to_string).collect(),
            since_secs: c.since.elapsed().as_secs(),
        });
        let now = SystemTime::now();
        let open: Vec<TunnelInfo> = tunnels
            .map(|r| r.open)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| {
                [&t.a, &t.b]
                    .iter()
                    .any(|e| e.mac().is_some_and(|m| m == mac))
            })
            .collect();
        let tunnels_now = open.iter().map(|t| tunnel_row(t, now)).collect();
        let filter = elfin_actors::audit::Filter {
            mac: Some(mac.to_owned()),
            limit: DEVICE_HISTORY,
            ..Default::default()
        };
        let store = &self.hub.store;
        let read = tokio::time::timeout(STORE_TIMEOUT, async {
            futures::try_join!(
                store.audit_tunnels(&filter),
                store.audit_devices(&filter),
                store.audit_refusals(&filter)
            )
        })
        .await;
        let shown = audit::Shown {
            names: &names,
            format: &self.hub.config.query,
        };
        let (tunnels, events, refusals, audit_error) = match read {
            Ok(Ok((tunnels, events, refusals))) => (
                tunnels
                    .into_iter()
                    .map(|t| shown.tunnel(self.with_live_bytes(t, &open)))
                    .collect(),
                events.into_iter().map(|e| shown.event(e)).collect(),
                refusals.into_iter().map(|r| shown.refusal(r)).collect(),
                None,
            ),
            Ok(Err(e)) => (Vec::new(), Vec::new(), Vec::new(), Some(e.to_string())),
            Err(_) => (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Some(format!("the store did not answer within {STORE_TIMEOUT:?}")),
            ),
        };
        Some(DeviceDetail {
            device,
            tunnels_now,
            tunnels,
            events,
            refusals,
            contested,
            audit_error,
            clock: self.clock(),
        })
    }

    /// A tunnel record still open on this node, with the bytes it has carried so far
    /// (the record itself holds them only once it closes).
    fn with_live_bytes(&self, mut record: TunnelRecord, open: &[TunnelInfo]) -> TunnelRecord {
        if record.closed.is_some() {
            return record;
        }
        let live = open
            .iter()
            .find(|t| self.hub.trail.tunnel_id(t.id) == record.id);
        if let Some(t) = live {
            let device_is_a = t.a.mac().is_some_and(|m| **m == record.device);
            (record.to_device, record.from_device) = match device_is_a {
                true => (t.b_sent, t.a_sent),
                false => (t.a_sent, t.b_sent),
            };
        }
        record
    }
}
