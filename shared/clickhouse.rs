//! The one ClickHouse HTTP client: the loader's inserts through the proxy and the operator tools'
//! queries (set-up, status, verify, replay, backfill) straight to ClickHouse go through it.
//!
//! One place sets the credentials, the timeouts, TLS and reads an answer: credentials travel in
//! `X-ClickHouse-User`/`X-ClickHouse-Key` headers, never in the URL, so they cannot end up in a
//! proxy's access log; every request has a connect timeout and a total timeout; ClickHouse's
//! exception code (`X-ClickHouse-Exception-Code`) is parsed once and carried by [`Answer`] and
//! [`ClickHouseError`].
//!
//! `https` URLs go through rustls with the `ring` provider: the system roots, or only the CAs of
//! `clickhouse.ca_file`, and an optional client certificate. A TLS failure is its own error
//! ([`ClickHouseError::Tls`]), never a transport error: an untrusted certificate or a wrong host
//! name does not heal by itself, so the loader stops on it instead of retrying forever.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ClickHouseSettings, Secret};

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
    /// The TLS handshake failed (certificate not trusted, wrong host name, refused client
    /// certificate, no TLS at that port): a configuration problem, not a passing one.
    #[error("TLS to ClickHouse at {url} failed: {detail}")]
    Tls { url: String, detail: String },
    /// The TLS settings cannot be used (file unreadable, no certificate in it, key not matching).
    #[error("ClickHouse TLS settings unusable: {0}")]
    TlsSetup(String),
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

/// PEM files for TLS (`clickhouse.ca_file`, `clickhouse.client_cert_file`,
/// `clickhouse.client_key_file`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CAs trusted instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (chain) presented to a server that asks for one; with `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl TlsFiles {
    pub fn from_settings(settings: &ClickHouseSettings) -> TlsFiles {
        TlsFiles {
            ca_file: settings.ca_file.clone(),
            client_cert_file: settings.client_cert_file.clone(),
            client_key_file: settings.client_key_file.clone(),
        }
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
    pub tls: TlsFiles,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            source_address: None,
            timeout: QUERY_TIMEOUT,
            reuse_connections: true,
            tls: TlsFiles::default(),
        }
    }
}

/// Makes ring the process's default rustls provider. reqwest is built with `rustls-no-provider`,
/// so a client built without a preconfigured TLS config (the stages' health probe, `edgelog
/// status` reading `/status`, tests) panics unless one is installed: every binary calls this at
/// start ([`crate::cli::init`]), and so does code that builds its own reqwest client. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// True when `password` would cross the network unencrypted: a plain `http` URL to a host that is
/// not this machine.
pub fn password_in_clear(url: &str, password: &Secret) -> bool {
    if password.is_empty() {
        return false;
    }
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    if u.scheme() != "http" {
        return false;
    }
    match u.host() {
        Some(url::Host::Ipv4(ip)) => !ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => {
            !(ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
        }
        // RFC 6761: `localhost` and names under it are this machine.
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d != "localhost" && !d.ends_with(".localhost")
        }
        None => false,
    }
}

/// The rustls configuration for `files`. `https` says whether the client's URL needs TLS at all:
/// without it and without a CA file, no system roots are loaded (a minimal image may have none,
/// and a plain-HTTP client must not fail for that).
fn tls_config(files: &TlsFiles, https: bool) -> Result<rustls::ClientConfig, ClickHouseError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClickHouseError::TlsSetup(format!("TLS versions: {e}")))?;
    let builder = match &files.ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certificates("clickhouse.ca_file", path)? {
                roots.add(cert).map_err(|e| {
                    ClickHouseError::TlsSetup(format!(
                        "clickhouse.ca_file {}: not a usable CA certificate: {e}",
                        path.display()
                    ))
                })?;
            }
            builder.with_root_certificates(roots)
        }
        None if https => {
            let verifier = rustls_platform_verifier::Verifier::new(provider).map_err(|e| {
                ClickHouseError::TlsSetup(format!(
                    "system CA certificates: {e} (install the ca-certificates package, or set \
                     clickhouse.ca_file)"
                ))
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
        None => builder.with_root_certificates(rustls::RootCertStore::empty()),
    };
    let mut config = match (&files.client_cert_file, &files.client_key_file) {
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certificates("clickhouse.client_cert_file", cert_path)?;
            let key = read_private_key(key_path)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                let why = match e {
                    rustls::Error::InconsistentKeys(_) => "does not match".to_string(),
                    e => format!("cannot be used with it: {e}"),
                };
                ClickHouseError::TlsSetup(format!(
                    "clickhouse.client_key_file {} {why} clickhouse.client_cert_file {}",
                    key_path.display(),
                    cert_path.display()
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(ClickHouseError::TlsSetup(
                "clickhouse.client_cert_file and clickhouse.client_key_file go together".into(),
            ))
        }
    };
    // reqwest is built without HTTP/2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_pem_file(key: &str, path: &Path) -> Result<Vec<u8>, ClickHouseError> {
    std::fs::read(path).map_err(|e| {
        ClickHouseError::TlsSetup(format!("{key} {}: cannot read: {e}", path.display()))
    })
}

fn read_certificates(
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ClickHouseError> {
    let pem = read_pem_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ClickHouseError::TlsSetup(format!("{key} {}: bad PEM: {e}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(ClickHouseError::TlsSetup(format!(
            "{key} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, ClickHouseError> {
    let key = "clickhouse.client_key_file";
    let pem = read_pem_file(key, path)?;
    // The error names the file, never what is in it: this is key material.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        ClickHouseError::TlsSetup(format!(
            "{key} {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
            path.display()
        ))
    })
}

/// The TLS error somewhere in `e`'s sources. `io::Error` hides the error it wraps from
/// `source()`, so it is opened with `get_ref`.
fn tls_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = tls_failure(inner) {
                return Some(tls);
            }
        }
        next = err.source();
    }
    None
}

/// What an operator reads for a failed handshake: the cause in words, and the setting to look at.
fn describe_tls_failure(e: &rustls::Error, url: &str) -> String {
    use rustls::{AlertDescription, CertificateError, Error};
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let cause = match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a trusted CA (set clickhouse.ca_file to \
             the CA that signed it; without it the system roots are used)"
                .to_string()
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!("the server's certificate is not valid for the host name {host:?}"),
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the server's certificate has expired".to_string(),
        Error::InvalidCertificate(_) => "the server's certificate is not acceptable".to_string(),
        Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::HandshakeFailure,
        ) => "the server refused the handshake: it may require a client certificate it trusts \
              (clickhouse.client_cert_file, clickhouse.client_key_file)"
            .to_string(),
        Error::InvalidMessage(_) => {
            "the server did not answer in TLS (an http port behind an https URL?)".to_string()
        }
        _ => "the handshake failed".to_string(),
    };
    format!("{cause}: {e}")
}

#[derive(Clone)]
pub struct ClickHouseClient {
    http: reqwest::Client,
    url: String,
    user: String,
    password: Secret,
}

impl ClickHouseClient {
    /// A client for queries to `url` (operator tools), without TLS files (system roots).
    pub fn new(
        url: &str,
        user: &str,
        password: &Secret,
    ) -> Result<ClickHouseClient, ClickHouseError> {
        ClickHouseClient::with_options(url, user, password, &ClientOptions::default())
    }

    /// A client for `url`, whose scheme decides whether TLS is needed (a client given full URLs
    /// by the caller, as the loader's, passes its base URL here). Warns when `password` would
    /// travel unencrypted to another machine. Fails on unusable TLS files.
    pub fn with_options(
        url: &str,
        user: &str,
        password: &Secret,
        options: &ClientOptions,
    ) -> Result<ClickHouseClient, ClickHouseError> {
        let https = url::Url::parse(url).is_ok_and(|u| u.scheme() == "https");
        let mut builder = reqwest::Client::builder()
            .local_address(options.source_address)
            .timeout(options.timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(options.timeout))
            .tls_backend_preconfigured(tls_config(&options.tls, https)?);
        if !options.reuse_connections {
            builder = builder.pool_max_idle_per_host(0);
        }
        if password_in_clear(url, password) {
            tracing::warn!(
                %url,
                "the ClickHouse password is sent unencrypted over plain HTTP to another machine; \
                 use an https URL (docs/OPERATIONS.md, TLS and secrets)"
            );
        }
        let http = builder.build().map_err(|e| {
            ClickHouseError::TlsSetup(format!("building the HTTP client: {}", error_chain(&e)))
        })?;
        Ok(ClickHouseClient {
            http,
            url: url.trim_end_matches('/').to_string() + "/",
            user: user.to_string(),
            password: password.clone(),
        })
    }

    /// The admin client (direct to ClickHouse, bypassing the proxy) from settings.
    pub fn admin(settings: &ClickHouseSettings) -> Result<ClickHouseClient, ClickHouseError> {
        let options = ClientOptions {
            tls: TlsFiles::from_settings(settings),
            ..ClientOptions::default()
        };
        ClickHouseClient::with_options(
            &settings.admin_url,
            &settings.admin_user,
            &settings.admin_password,
            &options,
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
        let transport = |e: reqwest::Error| match tls_failure(&e) {
            Some(tls) => ClickHouseError::Tls {
                detail: describe_tls_failure(tls, &endpoint),
                url: endpoint.clone(),
            },
            None => ClickHouseError::Transport {
                url: endpoint.clone(),
                detail: error_chain(&e),
            },
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

    #[test]
    fn a_password_in_clear_is_one_sent_over_http_to_another_machine() {
        let pw = Secret::new("pw");
        for url in [
            "http://ch-proxy:8124",
            "http://10.0.0.5:8123/",
            "http://[2001:db8::1]:8123",
        ] {
            assert!(password_in_clear(url, &pw), "{url}");
        }
        for url in [
            "https://ch-proxy:8124",
            "http://127.0.0.1:8124",
            "http://127.0.0.7:8124",
            "http://localhost:8123",
            "http://[::1]:8123",
            "http://[::ffff:127.0.0.1]:8123",
            "http://LOCALHOST.:8123",
            "http://ch.localhost:8123",
        ] {
            assert!(!password_in_clear(url, &pw), "{url}");
        }
        assert!(!password_in_clear(
            "http://ch-proxy:8124",
            &Secret::default()
        ));
    }

    #[test]
    fn unusable_tls_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let files = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| TlsFiles {
            ca_file: ca.map(Path::to_path_buf),
            client_cert_file: cert.map(Path::to_path_buf),
            client_key_file: key.map(Path::to_path_buf),
        };
        for (tls, named) in [
            (files(Some(&missing), None, None), "clickhouse.ca_file"),
            (files(Some(&not_pem), None, None), "clickhouse.ca_file"),
            (
                files(None, Some(&missing), Some(&not_pem)),
                "clickhouse.client_cert_file",
            ),
            (files(None, Some(&not_pem), None), "go together"),
        ] {
            let err = tls_config(&tls, true).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
        let err = tls_config(&files(Some(&missing), None, None), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}
