//! The one ClickHouse HTTP client: the loader's inserts through the proxy and the operator tools'
//! queries (set-up, status, verify, replay, backfill) straight to ClickHouse go through it.
//!
//! One place sets the credentials, the timeouts and reads an answer: credentials travel in
//! `X-ClickHouse-User`/`X-ClickHouse-Key` headers, never in the URL, so they cannot end up in a
//! proxy's access log; every request has a connect timeout and a total timeout; ClickHouse's
//! exception code (`X-ClickHouse-Exception-Code`) is parsed once and carried by [`Answer`] and
//! [`ClickHouseError`].

use std::net::IpAddr;
use std::time::Duration;

use crate::config::Secret;

/// Longest wait for a TCP connection: an address that does not answer fails fast, whatever the
/// request's own timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Total timeout of an operator query (an audit's GROUP BY over a large table takes minutes).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error("ClickHouse at {url} unreachable: {detail}")]
    Transport { url: String, detail: String },
    #[error("ClickHouse answered HTTP {status} (exception code {code:?}): {body}")]
    Server {
        status: u16,
        /// ClickHouse's exception code; `None` when the answer came from something else (a proxy).
        code: Option<u32>,
        body: String,
    },
}

/// An HTTP answer as ClickHouse (or a proxy in front of it) gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `X-ClickHouse-Exception-Code`: its presence tells a ClickHouse error from a proxy's.
    pub exception_code: Option<u32>,
    pub body: String,
}

impl Answer {
    /// A success: 200 and no exception (a 200 can carry an exception that happened mid-stream).
    pub fn is_ok(&self) -> bool {
        self.status == 200 && self.exception_code.is_none()
    }
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Local address to send from (the proxy budgets requests per client address).
    pub source_address: Option<IpAddr>,
    /// Total time for one request, answer included.
    pub timeout: Duration,
    /// Keep idle connections for reuse. The loader sends one request a minute through a proxy
    /// that closes idle connections anyway, so it keeps none.
    pub reuse_connections: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            source_address: None,
            timeout: QUERY_TIMEOUT,
            reuse_connections: true,
        }
    }
}

#[derive(Clone)]
pub struct ClickHouseClient {
    http: reqwest::Client,
    url: String,
    user: String,
    password: Secret,
}

impl ClickHouseClient {
    /// A client for queries to `url` (operator tools).
    pub fn new(url: &str, user: &str, password: &Secret) -> ClickHouseClient {
        ClickHouseClient::with_options(url, user, password, &ClientOptions::default())
    }

    pub fn with_options(
        url: &str,
        user: &str,
        password: &Secret,
        options: &ClientOptions,
    ) -> ClickHouseClient {
        let mut builder = reqwest::Client::builder()
            .local_address(options.source_address)
            .timeout(options.timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(options.timeout));
        if !options.reuse_connections {
            builder = builder.pool_max_idle_per_host(0);
        }
        ClickHouseClient {
            http: builder
                .build()
                .expect("building an HTTP client without TLS cannot fail"),
            url: url.trim_end_matches('/').to_string() + "/",
            user: user.to_string(),
            password: password.clone(),
        }
    }

    /// The admin client (direct to ClickHouse, bypassing the proxy) from settings.
    pub fn admin(settings: &crate::config::ClickHouseSettings) -> ClickHouseClient {
        ClickHouseClient::new(
            &settings.admin_url,
            &settings.admin_user,
            &settings.admin_password,
        )
    }

    /// Runs one statement (sent as the request body) and returns the response body.
    /// `params` become `param_<name>` query parameters for `{name:Type}` placeholders, so values
    /// never get spliced into SQL text.
    pub async fn query(
        &self,
        sql: &str,
        params: &[(&str, &str)],
    ) -> Result<String, ClickHouseError> {
        let mut url = url::Url::parse(&self.url).map_err(|e| ClickHouseError::Transport {
            url: self.url.clone(),
            detail: format!("not a URL: {e}"),
        })?;
        for (k, v) in params {
            url.query_pairs_mut().append_pair(&format!("param_{k}"), v);
        }
        let answer = self
            .post(url.as_str(), None, sql.as_bytes().to_vec())
            .await?;
        if answer.is_ok() {
            Ok(answer.body)
        } else {
            Err(ClickHouseError::Server {
                status: answer.status,
                code: answer.exception_code,
                body: answer.body.trim().to_string(),
            })
        }
    }

    /// POSTs `body` to `url` (a full URL, query string included: the loader's insert URL) with
    /// the credentials, and returns the answer whatever its status. `Err` only when no answer
    /// came (connection refused or dropped, timeout).
    pub async fn post(
        &self,
        url: &str,
        content_encoding: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Answer, ClickHouseError> {
        let mut request = self
            .http
            .post(url)
            .header("X-ClickHouse-User", &self.user)
            .body(body);
        if let Some(encoding) = content_encoding {
            request = request.header("Content-Encoding", encoding);
        }
        if !self.password.is_empty() {
            request = request.header("X-ClickHouse-Key", self.password.expose());
        }
        // The endpoint without the query string: the insert URL's query holds the statement.
        let endpoint = url.split('?').next().unwrap_or(url).to_string();
        let transport = |e: reqwest::Error| ClickHouseError::Transport {
            url: endpoint.clone(),
            detail: error_chain(&e),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let exception_code = response
            .headers()
            .get("X-ClickHouse-Exception-Code")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = response.text().await.map_err(transport)?;
        Ok(Answer {
            status,
            exception_code,
            body,
        })
    }
}

/// An error and its sources, one line (reqwest's own message leaves out the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_200_with_an_exception_is_not_a_success() {
        let ok = Answer {
            status: 200,
            exception_code: None,
            body: String::new(),
        };
        assert!(ok.is_ok());
        assert!(!Answer {
            exception_code: Some(241),
            ..ok.clone()
        }
        .is_ok());
        assert!(!Answer { status: 503, ..ok }.is_ok());
    }
}
