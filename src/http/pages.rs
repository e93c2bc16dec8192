//! The dashboard's static pages and the OpenAPI document, built into the binary.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The OpenAPI document of this API, served at `/api/openapi.json`.
pub const OPENAPI: &str = include_str!("../../http/openapi.json");

/// The dashboard: static pages built into the binary, served without a token (they hold no
/// data; everything they show comes from the API, with the token the user signs in with).
pub(super) const PAGES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "/app.css",
        "text/css; charset=utf-8",
        include_str!("../../web/app.css"),
    ),
    // The terminal (xterm.js, MIT; see web/vendor/README).
    (
        "/vendor/xterm.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/vendor/xterm.js"),
    ),
    (
        "/vendor/xterm.css",
        "text/css; charset=utf-8",
        include_str!("../../web/vendor/xterm.css"),
    ),
];

/// The pages load nothing from elsewhere, and the browser is told to refuse anything else.
/// Styles may be inline: the terminal (xterm.js) sets its colours in a `<style>` it makes.
pub(super) const PAGE_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
    style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

pub(super) fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
