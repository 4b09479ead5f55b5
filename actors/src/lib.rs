//! The Elfin Connect gateway's protocol codec, actors, storage and server.
//!
//! Read it bottom-up; each module uses only those above it in this list, and
//! `tests/modules.rs` fails on any circle between modules:
//!
//! 1. Leaves: [`clock`] (gateway time), [`frame`] (the codec: messages in, replies
//!    out), [`de`] (the rules every settings key follows), [`metric`] (every metric's
//!    name and help text), [`source`] (who a peer is for per-address limits: an IPv4
//!    address or an IPv6 prefix), [`bounded`] (per-source tables that fail closed when
//!    full), [`masked`] (how a uuid is shown), [`certificate`] (the user, serial and
//!    validity a client certificate names) and [`outbox`] (a connection's output: the
//!    bounded queue, direct writes and the writer task).
//! 2. [`revocation`] (which client certificates are revoked), [`tls`] (the `[tls]`
//!    section and the server side), [`limits`] (what one peer may cost), [`refusal`]
//!    (every refusal counted and logged), [`audit`] (the audit trail's records and
//!    budgets) and [`connection`] (a socket's two halves and its read stream).
//! 3. [`store`] (the database by role — sightings, directory, audit log — each
//!    backend, embedded SQLite or MongoDB, a folder with a file per role), [`device`] (a connected
//!    device's identity and last-seen), [`users`] (known uuids, accounts), [`link`]
//!    (the tunnel vocabulary: how actors reach a session and what they tell it) and
//!    [`tenants`] (what each user may have; `auth.devices`).
//! 4. The shared actors: [`persistence`] (batched sightings), [`audit_writer`]
//!    (batched audit records), [`registry`] (live devices;
//!    `auth.device_takeover`), [`bridge`] (tunnels) and [`debouncer`]
//!    (data-heartbeat timers); then [`query`] (the `query` reply's rows) and
//!    [`follow`] (re-reading users and registered devices so removals reach open
//!    connections).
//! 5. [`config`] (the gateway's settings, section by section, with the rules between
//!    them), then [`cluster`]: in cluster mode, this node's member of the cluster
//!    (presence, requests to other nodes) and tunnel ends that stand for connections
//!    elsewhere; then [`events`]: fleet events (a device offline, back online,
//!    contested, a peer refused) and the webhooks they are sent to.
//! 6. [`hub`]: handles to the shared actors and the settings, and the final flush.
//! 7. [`command`]: `connme`, `connthem` and `query`, each answered with a typed reply.
//! 8. [`session`]: one actor per connection; input, device identity and tunnel data.
//! 9. [`server`]: the accept loop and the gateway's lifetime ([`serve`]).

pub mod audit;
pub mod audit_writer;
pub mod bounded;
pub mod bridge;
pub mod certificate;
pub mod clock;
pub mod cluster;
pub mod command;
pub mod config;
pub mod connection;
pub mod de;
pub mod debouncer;
pub mod device;
pub mod events;
pub mod follow;
pub mod frame;
pub mod hub;
pub mod limits;
pub mod link;
pub mod masked;
pub mod metric;
pub mod outbox;
pub mod persistence;
pub mod query;
pub mod refusal;
pub mod registry;
pub mod revocation;
pub mod server;
pub mod session;
pub mod source;
pub mod store;
pub mod tenants;
pub mod tls;
pub mod users;

pub use config::{Config, Workers};
pub use hub::{Hub, ShutdownError};
pub use limits::Limits;
pub use server::{serve, serve_all, Listen};
