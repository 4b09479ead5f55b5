//! Tunnel data on the session's side: payload forwarded into the tunnel peer's
//! output (pausing while it is full, ending the tunnel when it stalls), and what the
//! bridge and the registry tell the session ([`PeerEvent`]).

use std::ops::ControlFlow;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Closing, Session};
use crate::bridge::{Cause, Unlink};
use crate::connection::UNTUNNELLED_READ;
use crate::link::{PeerEvent, Tunnel, TunnelId};
use crate::masked::masked;
use crate::metric;
use crate::outbox::Unsent;

impl Session {
    /// Writes a payload into the tunnel peer's queue, pausing while it is full. A peer
    /// that takes nothing for the stall time ends the tunnel.
    pub(super) fn forward(&mut self, bytes: Bytes, ctx: &mut Context<Self>) -> ControlFlow<()> {
        let len = bytes.len() as u64;
        if self.discard {
            metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len);
            return ControlFlow::Continue(());
        }
        let Some(Tunnel {
            id: tunnel,
            peer,
            sent,
        }) = self.tunnel.as_deref()
        else {
            log::debug!("{}: no tunnel, dropped {len} payload bytes", self.remote);
            metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len);
            return ControlFlow::Continue(());
        };
        // With more input at hand, queue: the peer's writer sends this read's frames
        // with one system call. The last (or only) one may be written directly.
        let handed = if self.inbox.is_empty() {
            peer.out.try_send(bytes)
        } else {
            peer.out.try_queue(bytes)
        };
        let bytes = match handed {
            Ok(()) => {
                sent.add(len);
                return ControlFlow::Continue(());
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The peer is closing; the bridge is about to tell us.
                metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len);
                return ControlFlow::Continue(());
            }
            Err(mpsc::error::TrySendError::Full(bytes)) => bytes,
        };
        let (tunnel, out, sent) = (*tunnel, peer.out.clone(), sent.clone());
        let stall = self.hub.config.server.tunnel_stall;
        let step = async move { out.send_within(bytes, stall).await };
        self.pause(ctx, step, move |act, result, _| match result {
            Ok(()) => sent.add(len),
            Err(Unsent::Closed) => {
                metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len)
            }
            Err(Unsent::Stalled) => {
                metrics::counter!(metric::PAYLOAD_DROPPED_BYTES_TOTAL).increment(len);
                act.unlinked(tunnel);
                act.hub.bridge.do_send(Unlink {
                    session: act.id,
                    cause: Cause::Stalled(stall),
                });
            }
        })
    }

    /// This session is now one end of `tunnel`, unless that tunnel is already gone or
    /// older than the one it is in.
    pub(super) fn linked(&mut self, tunnel: Tunnel) {
        let current = self.tunnel.as_deref().map_or(0, |t| t.id);
        if tunnel.id > self.cleared && tunnel.id > current {
            self.latest = self.latest.max(tunnel.id);
            self.tunnel = Some(Box::new(tunnel));
            // The largest read: the configured size while in a tunnel, small otherwise.
            self.probe
                .set_read_limit(self.hub.config.server.read_buffer_bytes.get());
        }
    }

    /// `tunnel` is gone; every older one too (tunnels are made in id order). Returns
    /// whether it was the newest this session has been in.
    pub(super) fn unlinked(&mut self, tunnel: TunnelId) -> bool {
        self.cleared = self.cleared.max(tunnel);
        if self.tunnel.as_deref().is_some_and(|t| t.id <= tunnel) {
            self.tunnel = None;
            let small = UNTUNNELLED_READ.min(self.hub.config.server.read_buffer_bytes.get());
            self.probe.set_read_limit(small);
        }
        tunnel >= self.latest
    }
}

impl Handler<PeerEvent> for Session {
    type Result = ();

    fn handle(&mut self, event: PeerEvent, ctx: &mut Context<Self>) {
        match event {
            PeerEvent::Linked(tunnel) => self.linked(tunnel),
            PeerEvent::Unlinked { tunnel, close } => {
                if self.unlinked(tunnel) && close {
                    log::debug!("{}: tunnel {tunnel} ended; closing", self.remote);
                    self.close(ctx);
                }
            }
            PeerEvent::Replaced(device) => {
                if self
                    .device
                    .as_ref()
                    .is_some_and(|d| d.identity.key == device)
                {
                    // The registry already points at the new connection.
                    self.device = None;
                    self.close(ctx);
                }
            }
            PeerEvent::Withdrawn(device, why) => {
                if self
                    .device
                    .as_ref()
                    .is_some_and(|d| d.identity.key == device)
                {
                    log::info!(
                        "device {} of user {} from {}: closed, {why}",
                        device.mac,
                        masked(&device.uuid),
                        self.remote
                    );
                    // The registry has already removed it.
                    self.device = None;
                    self.limit_reached(Closing::Removed, ctx);
                }
            }
        }
    }
}
