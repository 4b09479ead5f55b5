//! The admin HTTP server on `admin.listen`: `/healthz` and `/readyz` for supervisors,
//! `/metrics` for Prometheus, and the live status page (`/`, fed by `/api/status`).
//!
//! Served by actix-web on the gateway's actix system with one worker thread of its
//! own; nothing here is on a tunnel's path. The page's assets are compiled into the
//! binary (an offline plant network has no CDN).
//!
//! Access: without `admin.token` the server only listens on loopback (the settings
//! check refuses anything else); with a token, every request but the login form needs
//! it, as `Authorization: Bearer <token>` or in the HttpOnly cookie the form sets.

mod status;

use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use elfin_actors::Hub;
use status::StatusBoard;

/// The cookie the login form sets.
const COOKIE: &str = "elfin_admin";
/// How long `/readyz` waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// A wrong token at the login form is answered after this (slows guessing).
const WRONG_TOKEN_DELAY: Duration = Duration::from_secs(1);

const PAGE: &str = include_str!("page/index.html");
const LOGIN: &str = include_str!("page/login.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

struct Admin {
    hub: Hub,
    token: Option<String>,
    prometheus: PrometheusHandle,
    process: metrics_process::Collector,
    board: StatusBoard,
}

/// Serves on `listener` once the returned server is spawned on the actix system; stop
/// it with its handle.
pub fn start(
    listener: std::net::TcpListener,
    token: Option<String>,
    hub: Hub,
    prometheus: PrometheusHandle,
) -> std::io::Result<Server> {
    let process = metrics_process::Collector::default();
    process.describe();
    // Help texts of the gateway's own metrics (the series appear once they have values).
    elfin_actors::metric::describe();
    let admin = web::Data::new(Admin {
        board: StatusBoard::new(hub.clone()),
        hub,
        token,
        prometheus,
        process,
    });
    actix_rt::spawn(sample_forever(admin.clone().into_inner()));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(admin.clone())
            .wrap(from_fn(authorize))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
            .route("/api/status", web::get().to(status))
            .route("/", web::get().to(page))
            .route(
                "/app.js",
                web::get().to(|| asset("text/javascript", SCRIPT)),
            )
            .route("/style.css", web::get().to(|| asset("text/css", STYLE)))
            .route("/login", web::get().to(login_form))
            .route("/login", web::post().to(login))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    Ok(server)
}

/// Records the page's history and keeps the Prometheus histograms current.
async fn sample_forever(admin: Arc<Admin>) {
    let mut every = tokio::time::interval(status::SAMPLE_EVERY);
    loop {
        every.tick().await;
        admin.board.sample().await;
        admin.prometheus.run_upkeep();
    }
}

/// Lets a request through if no token is set, it presents the token, or it is for
/// the login form; otherwise sends a page to the login form and refuses the rest.
async fn authorize(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let admin = req
        .app_data::<web::Data<Admin>>()
        .expect("the admin state is registered");
    let allowed = match &admin.token {
        None => true,
        Some(token) => req.path() == "/login" || presents(req.request(), token),
    };
    if allowed {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let refused = if req.path() == "/" {
        HttpResponse::SeeOther()
            .insert_header((header::LOCATION, "/login"))
            .finish()
    } else {
        HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
            .json(serde_json::json!({ "error": "a valid admin token is required" }))
    };
    Ok(req.into_response(refused).map_into_right_body())
}

/// Whether the request carries `token`, as a bearer token or in the cookie.
fn presents(req: &HttpRequest, token: &str) -> bool {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = req.cookie(COOKIE);
    let presented = bearer.or_else(|| cookie.as_ref().map(|c| c.value()));
    presented.is_some_and(|p| same(p, token))
}

/// Compares in time independent of where the two differ.
fn same(presented: &str, token: &str) -> bool {
    presented.as_bytes().ct_eq(token.as_bytes()).into()
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// 200 when the gateway accepts connections and the store answers; 503 with the
/// reason otherwise.
async fn readyz(admin: web::Data<Admin>) -> HttpResponse {
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

async fn metrics(admin: web::Data<Admin>) -> HttpResponse {
    admin.process.collect();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(admin.prometheus.render())
}

async fn status(admin: web::Data<Admin>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(admin.board.status().await)
}

/// The page, its script and style: same-origin only, never framed.
fn html(status: actix_web::http::StatusCode, body: impl MessageBody + 'static) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'",
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body)
}

async fn page() -> HttpResponse {
    html(actix_web::http::StatusCode::OK, PAGE)
}

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

/// The login form's post: the right token gets the cookie and goes to the page.
async fn login(admin: web::Data<Admin>, form: web::Form<Login>) -> HttpResponse {
    match &admin.token {
        Some(token) if same(&form.token, token) => {
            let cookie = actix_web::cookie::Cookie::build(COOKIE, token.clone())
                .path("/")
                .http_only(true)
                .same_site(actix_web::cookie::SameSite::Strict)
                .finish();
            HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/"))
                .cookie(cookie)
                .finish()
        }
        Some(_) => {
            tokio::time::sleep(WRONG_TOKEN_DELAY).await;
            let page = LOGIN.replace(
                "<!--message-->",
                "<p class=\"problem\">That is not the admin token.</p>",
            );
            html(actix_web::http::StatusCode::UNAUTHORIZED, page)
        }
        None => HttpResponse::SeeOther()
            .insert_header((header::LOCATION, "/"))
            .finish(),
    }
}
