//! What the services' web pages share: the addresses a browser reaches each service at (pages
//! link to one another and call one another's APIs), the CORS policy that allows exactly those
//! cross-origin calls, and serving a page with those addresses filled in.

use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::response::Html;
use clap::Args;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};

#[derive(Clone, Debug, Args)]
pub struct WebConfig {
    /// Address browsers reach the buffer service at (event pages send joins there).
    #[arg(
        long,
        env = "FAIRGATE_BUFFER_PUBLIC_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub buffer_public_url: String,

    /// Address browsers reach the queue service at (waiting page, operator dashboard).
    #[arg(
        long,
        env = "FAIRGATE_QUEUE_PUBLIC_URL",
        default_value = "http://127.0.0.1:8082"
    )]
    pub queue_public_url: String,

    /// Address browsers reach the purchase service at (event, seat and organizer pages).
    #[arg(
        long,
        env = "FAIRGATE_PURCHASE_PUBLIC_URL",
        default_value = "http://127.0.0.1:8083"
    )]
    pub purchase_public_url: String,

    /// Origins whose pages may call this service's API from a browser (comma-separated).
    /// Unset: the three public URLs above.
    #[arg(long, env = "FAIRGATE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            buffer_public_url: "http://127.0.0.1:8081".into(),
            queue_public_url: "http://127.0.0.1:8082".into(),
            purchase_public_url: "http://127.0.0.1:8083".into(),
            cors_origins: Vec::new(),
        }
    }
}

/// The placeholder a page template carries where the links object goes (a JS expression).
const LINKS_PLACEHOLDER: &str = "\"__FAIRGATE_LINKS__\"";

fn trimmed(url: &str) -> &str {
    url.trim().trim_end_matches('/')
}

impl WebConfig {
    /// `{"buffer": …, "queue": …, "purchase": …}` plus `extra`, as a JS literal safe inside a
    /// `<script>` element.
    pub fn links(&self, extra: serde_json::Value) -> String {
        let mut links = json!({
            "buffer": trimmed(&self.buffer_public_url),
            "queue": trimmed(&self.queue_public_url),
            "purchase": trimmed(&self.purchase_public_url),
        });
        if let (Some(map), serde_json::Value::Object(more)) = (links.as_object_mut(), extra) {
            map.extend(more);
        }
        links.to_string().replace('<', "\\u003c")
    }

    /// A page template with its `"__FAIRGATE_LINKS__"` placeholder filled in.
    pub fn page(&self, template: &str, extra: serde_json::Value) -> Html<String> {
        Html(template.replacen(LINKS_PLACEHOLDER, &self.links(extra), 1))
    }

    fn origins(&self) -> Vec<HeaderValue> {
        let configured: Vec<&str> = if self.cors_origins.iter().any(|o| !o.trim().is_empty()) {
            self.cors_origins.iter().map(|o| trimmed(o)).collect()
        } else {
            vec![
                trimmed(&self.buffer_public_url),
                trimmed(&self.queue_public_url),
                trimmed(&self.purchase_public_url),
            ]
        };
        configured
            .into_iter()
            .filter(|o| !o.is_empty())
            .filter_map(|o| match HeaderValue::from_str(o) {
                Ok(v) => Some(v),
                Err(_) => {
                    tracing::warn!(
                        origin = o,
                        "ignoring a CORS origin that is not a header value"
                    );
                    None
                }
            })
            .collect()
    }

    /// Lets the configured origins (and only them) call this service from a browser, with the
    /// headers fairgate's APIs take; `Retry-After` stays readable by the page.
    pub fn cors(&self) -> CorsLayer {
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(self.origins()))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_script_safe_and_trimmed() {
        let web = WebConfig {
            buffer_public_url: "https://join.example/".into(),
            queue_public_url: "https://line.example".into(),
            purchase_public_url: "https://shop.example</script>".into(),
            cors_origins: vec![],
        };
        let links = web.links(json!({"event": 7}));
        assert!(!links.contains('<'), "{links}");
        let back: serde_json::Value = serde_json::from_str(&links).expect("JSON");
        assert_eq!(back["buffer"], "https://join.example");
        assert_eq!(back["purchase"], "https://shop.example</script>");
        assert_eq!(back["event"], 7);
        let page = web.page(
            "<script>const L = \"__FAIRGATE_LINKS__\";</script>",
            json!({}),
        );
        assert!(page.0.contains("const L = {\"buffer\""), "{}", page.0);
    }

    #[test]
    fn origins_default_to_the_public_urls() {
        let mut web = WebConfig::default();
        assert_eq!(web.origins().len(), 3);
        web.cors_origins = vec!["https://a.example/".into(), " ".into()];
        assert_eq!(
            web.origins(),
            vec![HeaderValue::from_static("https://a.example")]
        );
    }
}
