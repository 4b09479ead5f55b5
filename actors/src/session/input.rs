//! A session's input: the inbox and the decoder, turns bounded by `turn_bytes`, the
//! one way a session waits for anything ([`Session::pause`]), the payload tail held
//! for the rest of a header, and the deadline for an unfinished message.

use std::future::Future;
use std::io;
use std::ops::ControlFlow;

use actix::prelude::*;
use bytes::BytesMut;
use tokio::time::Instant;

use super::{Closing, Session};
use crate::connection::{header_hold, precise_sleep};
use crate::metric;

/// A held-back payload tail: the timer that forwards it as payload, and since when.
pub(super) struct Held {
    timer: SpawnHandle,
    since: Instant,
}

impl Session {
    /// Decodes and handles buffered input until it runs out, a step pauses, or this
    /// turn's budget is spent (the step, or a yield, resumes it). At the end of input,
    /// closes once everything is handled.
    pub(super) fn drain(&mut self, ctx: &mut Context<Self>) {
        let mut budget = self.hub.config.limits.turn_bytes;
        let mut progress = false;
        loop {
            let before = self.inbox.len();
            let Some(frame) = self.decoder.decode(&mut self.inbox) else {
                break;
            };
            progress = true;
            // Each frame costs its bytes and a little more, so a flood of tiny frames
            // yields too.
            budget = budget.saturating_sub(before - self.inbox.len() + 64);
            if self.handle_frame(frame, ctx).is_break() {
                return;
            }
            if budget == 0 && !self.inbox.is_empty() {
                metrics::counter!(metric::SESSION_YIELDS_TOTAL).increment(1);
                let _ = self.pause(ctx, tokio::task::yield_now(), |_, (), _| {});
                return;
            }
        }
        if self.eof {
            // A held-back tail is payload after all: no header can follow it now.
            if let Some(frame) = self.decoder.flush_held(&mut self.inbox) {
                if self.handle_frame(frame, ctx).is_break() {
                    return;
                }
            }
            ctx.stop();
            return;
        }
        self.watch_unfinished(progress, ctx);
        if self.decoder.holding(&self.inbox) && self.hold.is_none() {
            self.hold_tail(ctx);
        }
        if self.inbox.is_empty() {
            // Let go of the read buffer this view still points into.
            self.inbox = BytesMut::new();
        }
    }

    /// Holds back the payload tail the decoder kept (it could start this connection's
    /// next header) for about two round trips of its link (see
    /// [`crate::connection::header_hold`]), then forwards it as payload. The held
    /// bytes are acknowledged at once, so a sender whose Nagle algorithm waits for
    /// that ACK sends the rest of the header within one round trip.
    ///
    /// Right after a backlog the tail waits the longest hold instead: a sender whose
    /// writes outran the tunnel is cut wherever its socket was full, and sends the
    /// rest when it is scheduled again, which the link's round trip says nothing
    /// about. A bulk stream that really ends in such a tail has its last bytes late;
    /// no header byte becomes payload.
    pub(super) fn hold_tail(&mut self, ctx: &mut Context<Self>) {
        self.probe.ack_now();
        let server = &self.hub.config.server;
        let (floor, ceiling) = (server.header_hold_min, server.header_hold);
        let wait = match self.probe.backlogged_within(ceiling) {
            true => ceiling,
            false => header_hold(self.probe.link_rtt(), floor, ceiling),
        };
        let timer = ctx.spawn(precise_sleep(wait).into_actor(self).map(|(), act, ctx| {
            act.end_hold(None, "timed_out");
            if let Some(frame) = act.decoder.flush_held(&mut act.inbox) {
                if act.handle_frame(frame, ctx).is_continue() {
                    act.drain(ctx);
                }
            }
        }));
        metrics::counter!(metric::HELD_TAILS_TOTAL).increment(1);
        self.hold = Some(Held {
            timer,
            since: Instant::now(),
        });
    }

    /// The held tail is decided: more input came, the hold ran out, or the connection
    /// closes. Cancels its timer (unless it is the timer that ran out) and records how
    /// long it was held.
    pub(super) fn end_hold(&mut self, ctx: Option<&mut Context<Self>>, outcome: &'static str) {
        let Some(held) = self.hold.take() else {
            return;
        };
        if let Some(ctx) = ctx {
            ctx.cancel_future(held.timer);
        }
        metrics::histogram!(metric::HEADER_HOLD_SECONDS, "outcome" => outcome)
            .record(held.since.elapsed().as_secs_f64());
    }

    /// A message left incomplete must be finished within the identify time; the timer
    /// restarts whenever a message completes.
    pub(super) fn watch_unfinished(&mut self, progress: bool, ctx: &mut Context<Self>) {
        let unfinished = !self.inbox.is_empty() && !self.decoder.holding(&self.inbox);
        if progress || !unfinished {
            if let Some(timer) = self.unfinished.take() {
                ctx.cancel_future(timer);
            }
        }
        if unfinished && self.unfinished.is_none() {
            let limit = self.hub.config.limits.identify;
            self.unfinished = Some(ctx.run_later(limit, move |act, ctx| {
                act.unfinished = None;
                act.limit_reached(Closing::UnfinishedMessage, ctx);
            }));
        }
    }

    /// Runs `step` with input paused, then `done`, then resumes decoding: the one way
    /// a session waits for anything. Returns `Break` for the caller to hand on.
    pub(super) fn pause<R: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        step: impl Future<Output = R> + 'static,
        done: impl FnOnce(&mut Self, R, &mut Context<Self>) + 'static,
    ) -> ControlFlow<()> {
        step.into_actor(self)
            .map(move |result, act, ctx| {
                done(act, result, ctx);
                act.drain(ctx);
            })
            .wait(ctx);
        ControlFlow::Break(())
    }
}

impl StreamHandler<io::Result<BytesMut>> for Session {
    fn handle(&mut self, chunk: io::Result<BytesMut>, ctx: &mut Context<Self>) {
        match chunk {
            Ok(chunk) => {
                self.end_hold(Some(ctx), "more_input");
                self.inbox.unsplit(chunk);
                self.drain(ctx);
            }
            Err(e) => {
                log::debug!("{}: read error: {e}", self.remote);
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.close(ctx);
    }
}
