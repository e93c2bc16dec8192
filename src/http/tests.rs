//! The bridge without a bus: error mapping, routes against the OpenAPI document, limits.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use serde_json::Value;

use crate::core::Error;

use super::routes::*;
use super::*;

#[test]
fn errors_map_to_statuses_and_invalid_args_name_the_field() {
    for (e, status) in [
        (Error::NoSuchWorkspace("w".into()), 404),
        (Error::WorkspaceExists("w".into()), 409),
        (Error::Busy("w".into()), 409),
        (Error::invalid("limits.memory_max", "bad"), 400),
        (Error::AccessDenied("no".into()), 403),
        (Error::InteractiveAuthorizationRequired("ask".into()), 403),
        (
            Error::Bus {
                name: "org.freedesktop.DBus.Error.ServiceUnknown".into(),
                message: "gone".into(),
            },
            503,
        ),
        (Error::io_msg("disk"), 500),
        (Error::LimitsExceeded("many".into()), 429),
    ] {
        assert_eq!(ApiError::from(e.clone()).status.as_u16(), status, "{e:?}");
    }
    let a = ApiError::from(Error::invalid("limits.memory_max", "bad"));
    assert_eq!(a.field.as_deref(), Some("limits.memory_max"));
    assert_eq!(a.message, "Invalid 'limits.memory_max': bad");
    assert_eq!(
        ApiError::from(Error::NoSuchWorkspace("w".into())).field,
        None
    );
}

/// An MCP-only token of the test app (`[mcp.tokens.agent-1]`).
const MCP_TOKEN: &str = "mcp-only-token-0123456789";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The router over a peer-to-peer bus with nobody behind it: handlers run and their calls
/// fail, which is all these tests need. Keep the returned peer alive.
async fn test_app() -> (Router, String, zbus::Connection) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let guid = zbus::Guid::generate();
    let (server, conn) = tokio::join!(
        zbus::connection::Builder::unix_stream(a)
            .server(guid)
            .p2p()
            .build(),
        zbus::connection::Builder::unix_stream(b).p2p().build(),
    );
    let (server, conn) = (server.unwrap(), conn.unwrap());
    // Serving objects makes the peer answer every call (with UnknownObject).
    let _ = server.object_server();
    let token = "t".repeat(16);
    let mcp = crate::mcp::Shared {
        bus: crate::mcp::Bus::new(conn.clone(), None),
        policy: crate::mcp::Policy::new(
            crate::mcp::Section::default(),
            crate::mcp::Transport::Http,
            &crate::mcp::tools::names(),
        )
        .unwrap(),
        caller: crate::mcp::Caller::Token(TOKEN_NAME.into()),
        tokens: crate::mcp::policy::http_tokens(
            &toml::from_str::<crate::mcp::Section>(&format!(
                "[tokens.agent-1]\nsha256 = \"{}\"\nworkspaces = [\"box\"]\n",
                sha256_hex(MCP_TOKEN)
            ))
            .unwrap(),
            &crate::mcp::tools::names(),
        )
        .unwrap(),
    };
    let state = AppState {
        conn,
        bus_address: None,
        token: token.clone(),
        ports: PortProxy::new(PortLimits::default()),
        mcp: Some(Arc::new(mcp)),
    };
    (app(Arc::new(state)), token, server)
}

#[tokio::test]
async fn pages_need_no_token_and_load_nothing_from_elsewhere() {
    use axum::body::Body;
    use tower::ServiceExt;
    let (app, _, _peer) = test_app().await;
    let get = |uri: &str| axum::http::Request::get(uri).body(Body::empty()).unwrap();
    for (path, content_type, _) in PAGES {
        let r = app.clone().oneshot(get(path)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()[header::CONTENT_TYPE], *content_type);
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
    }
    let r = app.clone().oneshot(get("/api/openapi.json")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The pages name no other origin: no fonts, scripts or styles from elsewhere. (A style
    // sheet's comments may credit a site: xterm.css's licence header does.)
    for (path, content_type, body) in PAGES {
        let mut text = body.to_string();
        if content_type.starts_with("text/css") {
            while let Some(start) = text.find("/*") {
                let end = text[start..]
                    .find("*/")
                    .map_or(text.len(), |e| start + e + 2);
                text.replace_range(start..end, "");
            }
        }
        for foreign in ["http://", "https://", "//fonts", "@import"] {
            assert!(!text.contains(foreign), "{path} contains {foreign}");
        }
    }
    // The API itself still needs the token.
    let r = app.oneshot(get("/api/templates")).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn mcp_is_served_behind_the_token() {
    use axum::body::Body;
    use tower::ServiceExt;
    let (app, token, _peer) = test_app().await;
    let initialize = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let post = |auth: Option<&str>| {
        let mut r = axum::http::Request::post("/mcp")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream")
            .header(header::HOST, "workspaces.example");
        if let Some(a) = auth {
            r = r.header(header::AUTHORIZATION, a);
        }
        r.body(Body::from(initialize)).unwrap()
    };
    let r = app.clone().oneshot(post(None)).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app
        .clone()
        .oneshot(post(Some("Bearer wrong-token-wrong")))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // An MCP-only token opens /mcp, and nothing else of the bridge.
    let r = app
        .clone()
        .oneshot(post(Some(&format!("Bearer {MCP_TOKEN}"))))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let get = axum::http::Request::get("/api/templates")
        .header(header::AUTHORIZATION, format!("Bearer {MCP_TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let r = app.clone().oneshot(get).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app
        .oneshot(post(Some(&format!("Bearer {token}"))))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains(r#""name":"agent-workspaces""#) && body.contains("2025-11-25"),
        "{body}"
    );
}

/// The request bodies of the OpenAPI document are the schema's dictionaries: the same
/// members (limits inside `limits`), each of the schema's JSON type.
#[test]
fn the_openapi_request_bodies_are_the_schema() {
    use crate::dbus::schema::{self, Json, Keys};
    use std::collections::BTreeMap;

    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let schemas = &doc["components"]["schemas"];
    let documented = |name: &str, but: &[&str]| -> BTreeMap<String, String> {
        let props = schemas[name]["properties"].as_object().unwrap();
        assert_eq!(schemas[name]["additionalProperties"], false, "{name}");
        props
            .iter()
            .filter(|(k, _)| !but.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v["type"].as_str().unwrap_or("$ref").to_owned()))
            .collect()
    };
    let wanted = |keys: Keys, place: Json| -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = keys
            .keys
            .iter()
            .filter(|k| k.json == place)
            .map(|k| {
                (
                    place.json_name(k.name).to_owned(),
                    k.ty.json_type().to_owned(),
                )
            })
            .collect();
        if place == Json::Member {
            for nested in keys.nested() {
                out.insert(nested.object().unwrap().to_owned(), "$ref".to_owned());
            }
        }
        out
    };
    assert_eq!(
        documented("CreateWorkspace", &[]),
        wanted(schema::CREATE, Json::Member)
    );
    assert_eq!(
        documented("UpdateWorkspace", &[]),
        wanted(schema::CHANGES, Json::Member)
    );
    assert_eq!(
        documented("Limits", &[]),
        wanted(schema::CREATE, Json::Limit)
    );
    assert_eq!(
        documented("Limits", &[]),
        wanted(schema::CHANGES, Json::Limit)
    );
    assert_eq!(
        documented("Egress", &[]),
        wanted(schema::CREATE, Json::Egress)
    );
    assert_eq!(
        documented("Egress", &[]),
        wanted(schema::CHANGES, Json::Egress)
    );
    assert_eq!(
        documented("ExecRequest", &["command"]),
        wanted(schema::EXEC, Json::Member)
    );
    assert_eq!(
        documented("RerunInitRequest", &[]),
        wanted(schema::RERUN_INIT, Json::Member)
    );
    assert_eq!(
        documented("StartProcessRequest", &["command"]),
        wanted(schema::START_PROCESS, Json::Member)
    );
    // The distros the document offers (and the dashboard lists) are the core's.
    let distros: Vec<&str> = schemas["CreateWorkspace"]["properties"]["distro"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["const"].as_str().unwrap())
        .collect();
    assert_eq!(distros, crate::core::workspace::Distro::NAMES);
}

/// The OpenAPI document and the router agree: the same paths, and on each path exactly
/// the documented methods are routed (the others get 405).
#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes() {
    use axum::body::Body;
    use axum::http::Method;
    use std::collections::BTreeSet;
    use tower::ServiceExt;

    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    // The router's catch-all `{*path}` is OpenAPI's `{path}`.
    let mut routed: BTreeSet<String> = api_routes()
        .into_iter()
        .map(|(p, _)| p.replace("{*path}", "{path}"))
        .collect();
    routed.insert("/api/openapi.json".into());
    assert_eq!(paths.keys().cloned().collect::<BTreeSet<_>>(), routed);

    let (app, token, _peer) = test_app().await;
    for (path, item) in paths {
        let documented: BTreeSet<String> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        let uri = path
            .replace("{id}", "some-workspace")
            .replace("{pid}", "1")
            .replace("{port}", "8000")
            .replace("{path}", "some/page");
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ] {
            let request = axum::http::Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::from("{}"))
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            let status = response.status();
            if status == StatusCode::METHOD_NOT_ALLOWED {
                assert!(response.headers().contains_key(header::ALLOW));
                let body = axum::body::to_bytes(response.into_body(), 4096)
                    .await
                    .unwrap();
                let error: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(
                    error["error"]["code"], "method_not_allowed",
                    "{method} {path}"
                );
            }
            let want_routed = documented.contains(method.as_str());
            assert_eq!(
                status != StatusCode::METHOD_NOT_ALLOWED && status != StatusCode::NOT_FOUND,
                want_routed,
                "{method} {path}: {status}"
            );
        }
    }
}

#[tokio::test]
async fn an_oversized_head_is_431_with_the_documented_body() {
    use axum::body::Body;
    use tower::ServiceExt;
    let (app, token, _peer) = test_app().await;
    let request = axum::http::Request::builder()
        .uri("/api/templates")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header("x-big", "a".repeat(MAX_HEADER_BYTES))
        .body(Body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap();
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "header_too_large");
}

#[test]
fn bodies_are_json_whatever_the_content_type() {
    let m = body_json(Bytes::from_static(br#"{"command": "true"}"#)).unwrap();
    assert_eq!(m["command"], "true");
    assert!(body_json(Bytes::from_static(b"[1]")).is_err());
    assert!(body_json(Bytes::from_static(b"  ")).unwrap().is_empty());
}

/// A browser's WebSocket cannot send `Authorization`: the token comes as the subprotocol
/// `bearer.<hex>`. The terminal without an upgrade is 426; with the token in either form it
/// gets past the token check (the call then fails: nobody serves the bus here); a wrong or
/// malformed one is 401.
#[tokio::test]
async fn the_terminal_takes_the_token_as_a_subprotocol() {
    use axum::body::Body;
    use tower::ServiceExt;
    let (app, token, _peer) = test_app().await;
    let hex: String = token.bytes().map(|b| format!("{b:02x}")).collect();
    let request = |auth: Option<(&str, String)>| {
        let mut r = axum::http::Request::get("/api/workspaces/host/terminal");
        if let Some((name, value)) = auth {
            r = r.header(name, value);
        }
        r.body(Body::empty()).unwrap()
    };
    let status = |r: axum::http::Request<Body>| {
        let app = app.clone();
        async move { app.oneshot(r).await.unwrap().status().as_u16() }
    };
    assert_eq!(status(request(None)).await, 401);
    let bearer = ("authorization", format!("Bearer {token}"));
    assert_eq!(status(request(Some(bearer))).await, 426);
    let offered = format!("agent-workspaces.terminal, bearer.{hex}");
    assert_eq!(
        status(request(Some(("sec-websocket-protocol", offered)))).await,
        426
    );
    for wrong in [
        format!("bearer.{}", &hex[2..]),
        format!("bearer.{hex}0"),
        "bearer.zz".to_owned(),
        format!("agent-workspaces.terminal, bearer.{}", "00".repeat(16)),
    ] {
        let r = request(Some(("sec-websocket-protocol", wrong.clone())));
        assert_eq!(status(r).await, 401, "{wrong}");
    }
}
