//! Extractors whose rejections speak our error contract instead of axum's plain-text bodies:
//! `Json`, `Path` and `Query` wrap axum's own and map every rejection to a precise 4xx.
//!
//! Text that Postgres cannot store is refused here, for every endpoint at once: a NUL character
//! (`\u0000` in a JSON string, `%00` in a query string) would make any statement carrying it
//! fail. JSON bodies, even empty optional ones, need a JSON `Content-Type`: a form or
//! `text/plain` post is a CORS "simple" request any web page can make its visitors' browsers
//! send, without asking first.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ApiError;

/// JSON body in, JSON body out. Malformed → 400, wrong types or missing fields → 422,
/// wrong content type → 415, over the body limit → 413.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_body(req, state).await?;
        // Every body fairgate takes is an object: serde would also fill a struct from an
        // array by position, past the field names (and the checks that name them).
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return Err(ApiError::Unprocessable(
                "invalid_body",
                "the body must be a JSON object, not an array".into(),
            ));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// Whether the request says its body is JSON (`application/json` or `application/…+json`).
pub fn has_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// A websocket upgrade request; one without `Upgrade: websocket`, with a bad
/// `Sec-WebSocket-Version` or without a key is refused in the JSON contract (400, or 405 for a
/// method other than GET) instead of axum's plain text.
pub struct Upgrade(pub axum::extract::ws::WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::ws::rejection::WebSocketUpgradeRejection as Refused;
        axum::extract::ws::WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(Upgrade)
            .map_err(|r| match r {
                Refused::MethodNotGet(_) => ApiError::MethodNotAllowed(
                    "method_not_allowed",
                    "a websocket is opened with GET".into(),
                ),
                Refused::InvalidWebSocketVersionHeader(_) => ApiError::BadRequest(
                    "websocket_version_unsupported",
                    "Sec-WebSocket-Version must be 13".into(),
                ),
                other => ApiError::BadRequest("websocket_upgrade_required", other.body_text()),
            })
    }
}

/// A request body as bytes, whatever its type (a signed webhook is checked byte for byte);
/// over the body limit → 413, unreadable → 400, in the JSON contract.
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(
                        "body_too_large",
                        "the request body is larger than this endpoint accepts".into(),
                    )
                } else {
                    ApiError::BadRequest("bad_body", r.body_text())
                }
            })
    }
}

/// The body of a request that must say it is JSON, with no NUL character in its strings.
async fn json_body<S: Send + Sync>(req: Request, state: &S) -> Result<axum::body::Bytes, ApiError> {
    if !has_json_content_type(req.headers()) {
        return Err(ApiError::UnsupportedMediaType(
            "unsupported_media_type",
            "expected a request body with Content-Type: application/json".into(),
        ));
    }
    let RawBody(bytes) = RawBody::from_request(req, state).await?;
    if json_has_nul(&bytes) {
        return Err(ApiError::Unprocessable(
            "invalid_body",
            "text in the request body must not contain the NUL character (\\u0000)".into(),
        ));
    }
    Ok(bytes)
}

/// Whether a JSON text has a `\u0000` escape in a string. Backslashes occur only in strings,
/// so following escapes from the start is enough (`\\u0000` is a backslash and text).
pub fn json_has_nul(json: &[u8]) -> bool {
    let mut i = 0;
    while i < json.len() {
        if json[i] == b'\\' {
            if json.get(i + 1) == Some(&b'u') && json.get(i + 2..i + 6) == Some(b"0000".as_slice())
            {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let text = rejection.body_text();
    match rejection {
        JsonRejection::JsonDataError(_) => ApiError::Unprocessable("invalid_body", text),
        JsonRejection::JsonSyntaxError(_) => ApiError::BadRequest("malformed_json", text),
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
            "unsupported_media_type",
            "expected a request body with Content-Type: application/json".into(),
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(
            "body_too_large",
            "the request body is larger than this endpoint accepts".into(),
        ),
        other => ApiError::BadRequest("bad_body", other.body_text()),
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Path parameters; a value that does not parse is a 400 naming it (an id that parses but
/// does not exist is the handler's 404).
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|r: PathRejection| ApiError::BadRequest("bad_path", r.body_text()))
    }
}

/// Query string parameters; a bad one is a 400 naming it.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if parts.uri.query().is_some_and(|q| q.contains("%00")) {
            return Err(ApiError::BadRequest(
                "bad_query",
                "query parameters must not contain the NUL character (%00)".into(),
            ));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|r: QueryRejection| ApiError::BadRequest("bad_query", r.body_text()))
    }
}

/// The bearer token of the `Authorization` header, if one is present and well formed.
pub fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A JSON body that may be empty: an empty body is `T::default()`. Otherwise as [`Json`]. Like
/// [`Json`], it needs a JSON `Content-Type` even when empty (415 otherwise): an endpoint taking
/// it (the join) must not be reachable by a cross-site "simple" request.
pub struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(OptionalJson)
            .map_err(|e| {
                if e.is_data() {
                    ApiError::Unprocessable("invalid_body", format!("invalid request body: {e}"))
                } else {
                    ApiError::BadRequest("malformed_json", format!("malformed JSON: {e}"))
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_are_found_in_strings_only() {
        assert!(json_has_nul(br#"{"name": "a\u0000b"}"#));
        assert!(json_has_nul(br#"["\u0000"]"#));
        assert!(
            !json_has_nul(br#"{"name": "a\\u0000b"}"#),
            "a backslash, then text"
        );
        assert!(json_has_nul(br#"{"name": "a\\\u0000b"}"#));
        assert!(!json_has_nul(br#"{"name": "\u0001 \n"}"#));
        assert!(!json_has_nul(br#"{"name": "ends with \"#));
    }

    #[test]
    fn json_content_types_are_told_apart() {
        let with = |value: &str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(
                axum::http::header::CONTENT_TYPE,
                value.parse().expect("header"),
            );
            has_json_content_type(&headers)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!with("multipart/form-data; boundary=x"));
        assert!(!with("application/jsonp"));
        assert!(!has_json_content_type(&axum::http::HeaderMap::new()));
    }
}

#[cfg(test)]
mod contract_tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    async fn ask(app: axum::Router, request: HttpRequest<Body>) -> (u16, serde_json::Value) {
        let response = app.oneshot(request).await.expect("answer");
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!("not JSON: {}", String::from_utf8_lossy(&bytes));
        });
        (status, body)
    }

    fn post_with(content_type: Option<&str>, body: &'static str) -> HttpRequest<Body> {
        let mut request = HttpRequest::post("/join");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.body(Body::from(body)).expect("request")
    }

    #[tokio::test]
    async fn optional_json_needs_a_json_content_type_even_when_empty() {
        let app = axum::Router::new().route(
            "/join",
            post(|OptionalJson(v): OptionalJson<serde_json::Value>| async move { axum::Json(v) }),
        );
        for (content_type, body) in [
            (None, ""),
            (None, "{}"),
            (Some("text/plain"), "{}"),
            (Some("application/x-www-form-urlencoded"), "a=b"),
            (Some("multipart/form-data; boundary=x"), "--x--"),
        ] {
            let (status, answer) = ask(app.clone(), post_with(content_type, body)).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (415, Some("unsupported_media_type")),
                "{content_type:?}"
            );
        }
        let (status, _) = ask(app.clone(), post_with(Some("application/json"), "")).await;
        assert_eq!(status, 200, "an empty JSON body is the default");
        let (status, answer) = ask(
            app.clone(),
            post_with(Some("application/json"), r#"{"name": "a\u0000b"}"#),
        )
        .await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (422, Some("invalid_body"))
        );
    }

    #[tokio::test]
    async fn nul_in_a_query_or_a_json_string_is_refused_in_the_contract() {
        #[derive(serde::Deserialize)]
        struct Q {
            #[allow(dead_code)]
            q: Option<String>,
        }
        let app = axum::Router::new()
            .route("/search", get(|Query(_): Query<Q>| async { "ok" }))
            .route(
                "/join",
                post(|Json(v): Json<serde_json::Value>| async move { axum::Json(v) }),
            );
        let request = HttpRequest::get("/search?q=a%00b")
            .body(Body::empty())
            .expect("request");
        let (status, answer) = ask(app.clone(), request).await;
        assert_eq!((status, answer["error"].as_str()), (400, Some("bad_query")));
        let (status, answer) = ask(
            app.clone(),
            post_with(Some("application/json"), r#"["\u0000"]"#),
        )
        .await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (422, Some("invalid_body"))
        );
        let (status, answer) = ask(app, post_with(Some("text/plain"), "[]")).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (415, Some("unsupported_media_type"))
        );
    }

    #[tokio::test]
    async fn a_bad_websocket_upgrade_and_an_oversized_raw_body_answer_json() {
        let app =
            axum::Router::new()
                .route(
                    "/ws",
                    get(|Upgrade(upgrade): Upgrade| async move {
                        upgrade.on_upgrade(|_socket| async {})
                    }),
                )
                .route(
                    "/hook",
                    post(|RawBody(body): RawBody| async move { axum::Json(body.len()) }),
                )
                .layer(axum::extract::DefaultBodyLimit::max(16));
        let plain = HttpRequest::get("/ws")
            .body(Body::empty())
            .expect("request");
        let (status, answer) = ask(app.clone(), plain).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("websocket_upgrade_required"))
        );
        let bad_version = HttpRequest::get("/ws")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "12")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Body::empty())
            .expect("request");
        let (status, answer) = ask(app.clone(), bad_version).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("websocket_version_unsupported"))
        );
        let big = HttpRequest::post("/hook")
            .body(Body::from("x".repeat(64)))
            .expect("request");
        let (status, answer) = ask(app, big).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (413, Some("body_too_large"))
        );
    }
}
