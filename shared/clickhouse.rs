//! A small ClickHouse HTTP client for set-up, status and audits (the loader has its own insert path).
//!
//! Credentials travel in `X-ClickHouse-User`/`X-ClickHouse-Key` headers, never in the URL, so they
//! cannot end up in a proxy's access log.

use std::time::Duration;

use crate::config::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error("ClickHouse at {url} unreachable: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("ClickHouse answered HTTP {status} (exception code {code:?}): {body}")]
    Server {
        status: u16,
        code: Option<String>,
        body: String,
    },
}

#[derive(Clone)]
pub struct ClickHouseClient {
    http: reqwest::Client,
    url: String,
    user: String,
    password: Secret,
}

impl ClickHouseClient {
    pub fn new(url: &str, user: &str, password: &Secret) -> ClickHouseClient {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .expect("building an HTTP client without TLS cannot fail");
        ClickHouseClient {
            http,
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
        let query: Vec<(String, &str)> = params
            .iter()
            .map(|(k, v)| (format!("param_{k}"), *v))
            .collect();
        let mut request = self
            .http
            .post(&self.url)
            .query(&query)
            .header("X-ClickHouse-User", &self.user)
            .body(sql.to_string());
        if !self.password.is_empty() {
            request = request.header("X-ClickHouse-Key", self.password.expose());
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClickHouseError::Transport {
                url: self.url.clone(),
                source,
            })?;
        let status = response.status().as_u16();
        let code = response
            .headers()
            .get("X-ClickHouse-Exception-Code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response
            .text()
            .await
            .map_err(|source| ClickHouseError::Transport {
                url: self.url.clone(),
                source,
            })?;
        if status == 200 && code.is_none() {
            Ok(body)
        } else {
            Err(ClickHouseError::Server {
                status,
                code,
                body: body.trim().to_string(),
            })
        }
    }
}
