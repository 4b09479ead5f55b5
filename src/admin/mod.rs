//! The admin HTTP server on `admin.listen`: `/healthz` and `/readyz` for supervisors,
//! `/metrics` for Prometheus, the live status page (`/`, fed by `/api/status` and
//! `/api/devices`), a page per device (`/devices/<mac>`, fed by `/api/devices/<mac>`)
//! and the audit trail (`/api/audit`).
//!
//! Served by actix-web on the gateway's actix system with one worker thread of its
//! own; nothing here is on a tunnel's path. The page's assets are compiled into the
//! binary (an offline plant network has no CDN).
//!
//! Access ([`guard`]): without `admin.token` the server only listens on loopback (the
//! settings check refuses anything else) and answers only loopback `Host:` names; with
//! a token, every request but the login form and its style sheet needs it, as
//! `Authorization: Bearer <token>` or in the cookie of a session the form opened.

mod forwarded;
mod guard;
mod status;

use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;

use crate::audit;
use elfin_actors::Hub;
pub use guard::Rules;
use guard::{Guard, Verdict};
use status::StatusBoard;

/// How long `/readyz` waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// What loads without the token: the login form and its style sheet.
const PUBLIC: &[&str] = &["/login", "/style.css"];

const PAGE: &str = include_str!("page/index.html");
const LOGIN: &str = include_str!("page/login.html");
const SCRIPT: &str = include_str!("page/app.js");
const COMMON_SCRIPT: &str = include_str!("page/common.js");
const DEVICE_PAGE: &str = include_str!("page/device.html");
const DEVICE_SCRIPT: &str = include_str!("page/device.js");
const STYLE: &str = include_str!("page/style.css");

struct AdminState {
    hub: Hub,
    guard: Guard,
    prometheus: PrometheusHandle,
    process: metrics_process::Collector,
    board: StatusBoard,
}

/// Serves on `listener` once the returned server is spawned on the actix system; stop
/// it with its handle.
pub fn start(
    listener: std::net::TcpListener,
    rules: Rules,
    hub: Hub,
    prometheus: PrometheusHandle,
) -> std::io::Result<Server> {
    let process = metrics_process::Collector::default();
    process.describe();
    // Help texts of the gateway's own metrics (the series appear once they have values).
    elfin_actors::metric::describe();
    let admin = web::Data::new(AdminState {
        board: StatusBoard::new(hub.clone()),
        hub,
        guard: Guard::new(rules),
        prometheus,
        process,
    });
    actix_rt::spawn(sample_forever(admin.clone().into_inner()));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(admin.clone())
            .app_data(web::QueryConfig::default().error_handler(bad_query))
            .wrap(from_fn(authorize))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
            .route("/api/status", web::get().to(status))
            .route("/api/devices", web::get().to(devices))
            .route("/api/devices/{mac}", web::get().to(device))
            .route("/api/audit", web::get().to(audit_trail))
            .route("/", web::get().to(page))
            .route("/devices/{mac}", web::get().to(device_page))
            .route(
                "/device.js",
                web::get().to(|| asset("text/javascript", DEVICE_SCRIPT)),
            )
            .route(
                "/common.js",
                web::get().to(|| asset("text/javascript", COMMON_SCRIPT)),
            )
            .route(
                "/app.js",
                web::get().to(|| asset("text/javascript", SCRIPT)),
            )
            .route("/style.css", web::get().to(|| asset("text/css", STYLE)))
            .route("/login", web::get().to(login_form))
            .route("/login", web::post().to(login))
            .route("/logout", web::post().to(logout))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    Ok(server)
}

/// Records the page's history and keeps the Prometheus histograms current.
async fn sample_forever(admin: Arc<AdminState>) {
    let mut every = tokio::time::interval(status::SAMPLE_EVERY);
    loop {
        every.tick().await;
        admin.board.sample().await;
        admin.prometheus.run_upkeep();
    }
}

/// Lets a request through when [`Guard::check`] does; otherwise sends a page to the
/// login form and answers the rest with why (401, 403 or 429 with `Retry-After`).
async fn authorize(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let admin = req
        .app_data::<web::Data<AdminState>>()
        .expect("the admin state is registered");
    let public = PUBLIC.contains(&req.path());
    let verdict = admin.guard.check(req.request(), public);
    if verdict == Verdict::Allowed {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    admin
        .guard
        .report(&admin.hub.refusals, req.request(), &verdict);
    let refused = match verdict {
        Verdict::ForeignHost => HttpResponse::Forbidden().json(serde_json::json!({
            "error": "this admin server does not answer that Host (see admin.allowed_hosts)"
        })),
        Verdict::Paced(wait) => too_many(wait).json(serde_json::json!({
            "error": "too many wrong admin tokens from this address; try again later"
        })),
        _ if req.path() == "/" || req.path().starts_with("/devices/") => HttpResponse::SeeOther()
            .insert_header((header::LOCATION, "/login"))
            .finish(),
        _ => HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
            .json(serde_json::json!({ "error": "a valid admin token is required" })),
    };
    Ok(req.into_response(refused).map_into_right_body())
}

/// A query string that does not parse (a page that is no number, one too large for
/// one): a 400 saying why, as JSON like every other refusal of the API.
fn bad_query(err: actix_web::error::QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let body = serde_json::json!({ "error": format!("bad query string: {err}") });
    actix_web::error::InternalError::from_response(err, HttpResponse::BadRequest().json(body))
        .into()
}

/// A 429 telling the source when to come back (whole seconds, rounded up).
fn too_many(wait: Duration) -> actix_web::HttpResponseBuilder {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = HttpResponse::TooManyRequests();
    response.insert_header((header::RETRY_AFTER, secs.max(1).to_string()));
    response
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// 200 when the gateway accepts connections and the store answers; 503 with the
/// reason otherwise.
async fn readyz(admin: web::Data<AdminState>) -> HttpResponse {
    let reason = if !admin.hub.is_accepting() {
        Some("the gateway is not accepting connections (starting or shutting down)".to_owned())
    } else {
        match tokio::time::timeout(READY_TIMEOUT, admin.hub.store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("the store does not answer: {e}")),
            Err(_) => Some(format!("the store did not answer within {READY_TIMEOUT:?}")),
        }
    };
    match reason {
        None => HttpResponse::Ok().json(serde_json::json!({ "ready": true })),
        Some(reason) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "ready": false, "reason": reason })),
    }
}

async fn metrics(admin: web::Data<AdminState>) -> HttpResponse {
    admin.process.collect();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(admin.prometheus.render())
}

async fn status(admin: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(admin.board.status().await)
}

/// `GET /api/devices?q=&status=&user=&page=&per_page=`: one page of the devices.
async fn devices(
    admin: web::Data<AdminState>,
    query: web::Query<status::DeviceQuery>,
) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(admin.board.devices(&query).await)
}

/// `GET /api/devices/<mac>`: the device, its tunnels and its history.
async fn device(admin: web::Data<AdminState>, mac: web::Path<String>) -> HttpResponse {
    match admin.board.device(&mac).await {
        Some(detail) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(detail),
        None => HttpResponse::NotFound()
            .json(serde_json::json!({ "error": "the gateway knows no device with this MAC" })),
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    /// "tunnels" (the default), "devices" or "refusals".
    kind: Option<String>,
    user: Option<String>,
    device: Option<String>,
    since: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

/// Pages beyond this are refused rather than read (no store skips further).
const MAX_AUDIT_OFFSET: usize = 1_000_000_000;

/// What an `/api/audit` request asks for, checked.
struct AuditRequest {
    wanted: audit::Wanted,
    kind: AuditKind,
    page: usize,
    per_page: usize,
}

/// Which records of the trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuditKind {
    Tunnels,
    Devices,
    Refusals,
}

impl AuditKind {
    fn label(self) -> &'static str {
        match self {
            AuditKind::Tunnels => "tunnels",
            AuditKind::Devices => "devices",
            AuditKind::Refusals => "refusals",
        }
    }
}

impl AuditQuery {
    /// The request, or why it cannot be answered (a 400).
    fn request(&self) -> Result<AuditRequest, String> {
        let per_page = self.per_page.unwrap_or(50).clamp(1, 200);
        let page = self.page.unwrap_or(1).max(1);
        let offset = (page - 1)
            .checked_mul(per_page)
            .filter(|offset| *offset <= MAX_AUDIT_OFFSET)
            .ok_or_else(|| format!("page {page}: past the last page there can be"))?;
        let kind = match self.kind.as_deref() {
            None | Some("tunnels") => AuditKind::Tunnels,
            Some("devices") => AuditKind::Devices,
            Some("refusals") => AuditKind::Refusals,
            Some(other) => {
                return Err(format!(
                    "kind {other:?}: expected tunnels, devices or refusals"
                ))
            }
        };
        if let Some(since) = &self.since {
            audit::parse_since(since, chrono::Utc::now())?;
        }
        let wanted = audit::Wanted {
            user: self.user.clone(),
            device: self.device.clone(),
            since: self.since.clone(),
            offset,
            // One more than a page: whether another page follows.
            limit: per_page + 1,
        };
        Ok(AuditRequest {
            wanted,
            kind,
            page,
            per_page,
        })
    }
}

/// `GET /api/audit?kind=tunnels|devices|refusals&user=&device=&since=&page=&per_page=`:
/// one page of the audit trail, newest first.
async fn audit_trail(admin: web::Data<AdminState>, query: web::Query<AuditQuery>) -> HttpResponse {
    let AuditRequest {
        wanted,
        kind,
        page,
        per_page,
    } = match query.request() {
        Ok(request) => request,
        Err(why) => return HttpResponse::BadRequest().json(serde_json::json!({ "error": why })),
    };
    let store = &*admin.hub.store;
    let read = async {
        let Some(filter) = audit::filter(store, &wanted).await? else {
            return Ok(Vec::new());
        };
        let names = admin.board.user_names().await;
        let shown = audit::Shown {
            names: &names,
            format: &admin.hub.config.query,
        };
        let rows: Vec<serde_json::Value> = match kind {
            AuditKind::Devices => store
                .audit_devices(&filter)
                .await?
                .into_iter()
                .map(|e| serde_json::json!(shown.event(e)))
                .collect(),
            AuditKind::Tunnels => store
                .audit_tunnels(&filter)
                .await?
                .into_iter()
                .map(|t| serde_json::json!(shown.tunnel(t)))
                .collect(),
            AuditKind::Refusals => store
                .audit_refusals(&filter)
                .await?
                .into_iter()
                .map(|r| serde_json::json!(shown.refusal(r)))
                .collect(),
        };
        Ok::<_, audit::AuditError>(rows)
    };
    match read.await {
        Ok(mut rows) => {
            let more = rows.len() > per_page;
            rows.truncate(per_page);
            HttpResponse::Ok()
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .json(serde_json::json!({
                    "kind": kind.label(),
                    "page": page,
                    "per_page": per_page,
                    "more": more,
                    "rows": rows,
                }))
        }
        Err(audit::AuditError::BadArgument(why)) => {
            HttpResponse::BadRequest().json(serde_json::json!({ "error": why }))
        }
        Err(audit::AuditError::Store(e)) => {
            HttpResponse::ServiceUnavailable().json(serde_json::json!({ "error": e.to_string() }))
        }
    }
}

/// The page, its script and style: same-origin only, never framed.
fn html(status: actix_web::http::StatusCode, body: impl MessageBody + 'static) -> HttpResponse {
    with_page_headers(&mut HttpResponse::build(status)).body(body)
}

fn with_page_headers(
    response: &mut actix_web::HttpResponseBuilder,
) -> &mut actix_web::HttpResponseBuilder {
    response
        .content_type("text/html; charset=utf-8")
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'",
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
}

/// The status page.
async fn page(admin: web::Data<AdminState>) -> HttpResponse {
    signed_page(&admin, PAGE)
}

/// The device page; its script reads the MAC from the address.
async fn device_page(admin: web::Data<AdminState>) -> HttpResponse {
    signed_page(&admin, DEVICE_PAGE)
}

/// A page, with a sign-out button when there is a token to sign in with.
fn signed_page(admin: &AdminState, page: &str) -> HttpResponse {
    let page = if admin.guard.has_token() {
        page.replace("<!--signout-->", SIGN_OUT)
    } else {
        page.to_owned()
    };
    html(actix_web::http::StatusCode::OK, page)
}

const SIGN_OUT: &str = r#"<form class="signout" method="post" action="/logout"><button type="submit">Sign out</button></form>"#;

async fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body)
}

async fn login_form() -> HttpResponse {
    html(actix_web::http::StatusCode::OK, LOGIN)
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// The login form's post: the right token opens a session (its random id in an
/// HttpOnly cookie) and goes to the page; a wrong one makes the source wait.
async fn login(
    admin: web::Data<AdminState>,
    req: HttpRequest,
    form: web::Form<Login>,
) -> HttpResponse {
    if !admin.guard.has_token() {
        return HttpResponse::SeeOther()
            .insert_header((header::LOCATION, "/"))
            .finish();
    }
    match admin.guard.login(&req, &form.token) {
        Ok(session) => {
            let lifetime = admin.guard.session_lifetime();
            let cookie = Cookie::build(guard::COOKIE, session)
                .path("/")
                .http_only(true)
                .secure(admin.guard.behind_proxy(&req))
                .same_site(SameSite::Strict)
                .max_age(actix_web::cookie::time::Duration::seconds(
                    i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
                ))
                .finish();
            HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/"))
                .cookie(cookie)
                .finish()
        }
        Err(verdict) => {
            admin.guard.report(&admin.hub.refusals, &req, &verdict);
            let (mut response, message) = match verdict {
                Verdict::Paced(wait) => (
                    too_many(wait),
                    format!(
                        "Too many wrong tokens from your address: try again in {} s.",
                        wait.as_secs().max(1)
                    ),
                ),
                _ => (
                    HttpResponse::Unauthorized(),
                    "That is not the admin token.".to_owned(),
                ),
            };
            let page = LOGIN.replace(
                "<!--message-->",
                &format!("<p class=\"problem\">{message}</p>"),
            );
            with_page_headers(&mut response).body(page)
        }
    }
}

/// Ends the session of the request, if any, and goes to the login form.
async fn logout(admin: web::Data<AdminState>, req: HttpRequest) -> HttpResponse {
    admin.guard.logout(&req);
    let mut gone = Cookie::build(guard::COOKIE, "").path("/").finish();
    gone.make_removal();
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/login"))
        .cookie(gone)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query: &str) -> Result<AuditRequest, String> {
        web::Query::<AuditQuery>::from_query(query)
            .map_err(|e| e.to_string())?
            .request()
    }

    #[test]
    fn audit_queries_are_checked_into_requests_or_reasons() {
        let r = request("kind=devices&page=3&per_page=10&since=24h").unwrap();
        assert_eq!(r.kind, AuditKind::Devices);
        assert_eq!(
            (r.page, r.per_page, r.wanted.offset, r.wanted.limit),
            (3, 10, 20, 11)
        );
        for bad in [
            "since=300000000d",
            "since=-1h",
            "kind=everything",
            "page=18446744073709551615",
            "page=99999999999999999999999",
            "per_page=-1",
        ] {
            assert!(request(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// No query string reaches a panic: each is a request or a reason.
        #[test]
        fn no_audit_query_panics(
            kind in proptest::option::of("\\PC{0,12}"),
            since in proptest::option::of("[0-9]{0,22}[smhdw]?|\\PC{0,30}"),
            page in proptest::option::of("[0-9]{1,22}|-?[0-9]{1,4}"),
            per_page in proptest::option::of("[0-9]{1,22}"),
            raw in "\\PC{0,60}",
        ) {
            let mut pairs = Vec::new();
            for (name, value) in [("kind", kind), ("since", since), ("page", page), ("per_page", per_page)] {
                if let Some(value) = value {
                    pairs.push(format!("{name}={}", urlencode(&value)));
                }
            }
            let _ = request(&pairs.join("&"));
            let _ = request(&raw);
        }
    }

    fn urlencode(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
}
