//! The Elfin Connect gateway's protocol codec, actors, storage and server.
//!
//! Read it bottom-up; each module uses only those above it in this list:
//!
//! 1. [`clock`] (gateway time), [`frame`] (the codec: messages in, replies out),
//!    [`config`] (the settings' sections and the rules their keys follow),
//!    [`metric`] (every metric's name and help text), [`source`] (who a peer is for
//!    per-address limits: an IPv4 address or an IPv6 prefix), [`bounded`] (per-source
//!    tables that fail closed when full), [`masked`] (how a uuid is shown) and
//!    [`certificate`] (the user and serial a client certificate names).
//! 2. [`audit`] (the audit trail's records), [`store`] (the database: embedded SQLite
//!    or MongoDB), [`device`] (a connected
//!    device's identity and last-seen), [`outbox`] (a connection's output: the bounded
//!    queue, direct writes and the writer task), [`link`] (the tunnel vocabulary: how
//!    actors reach a session and what they tell it), [`limits`] (what one peer may
//!    cost) and [`connection`] (a socket's two halves and its read stream).
//! 3. The shared actors: [`registry`] (live devices), [`bridge`] (tunnels),
//!    [`persistence`] (batched writes) and [`debouncer`] (data-heartbeat timers); with
//!    [`users`] (known uuids, accounts), [`tenants`] (what each user may have),
//!    [`refusal`] (every refusal counted and logged), [`query`] (the `query`
//!    reply's rows), [`revocation`] (which client certificates are revoked, by
//!    serial and by user) and [`follow`] (re-reading users and registered devices so
//!    removals reach open connections).
//! 4. [`cluster`]: in cluster mode, this node's member of the cluster (presence,
//!    requests to other nodes) and tunnel ends that stand for connections elsewhere.
//! 5. [`hub`]: handles to the shared actors and the settings, and the final flush.
//! 6. [`command`]: `connme`, `connthem` and `query`, each answered with a typed reply.
//! 7. [`session`]: one actor per connection; input, device identity and tunnel data.
//! 8. [`server`]: the accept loop and the gateway's lifetime ([`serve`]).

pub mod audit;
pub mod bounded;
pub mod bridge;
pub mod certificate;
pub mod clock;
pub mod cluster;
pub mod command;
pub mod config;
pub mod connection;
pub mod debouncer;
pub mod device;
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
