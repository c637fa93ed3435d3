//! HTTPS to ClickHouse against a real TLS server on 127.0.0.1 (tokio-rustls, certificates made
//! here by rcgen from a throw-away CA): trusted through `clickhouse.ca_file`, every failure a TLS
//! error naming its cause (never a transport error the loader would retry forever), a client
//! certificate presented when the server asks for one. Only the last test, which runs the real
//! loader, needs the local stack (Kafka).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgelog::body::BodyCompression;
use edgelog::clickhouse::{ClickHouseClient, ClickHouseError, ClientOptions, TlsFiles};
use edgelog::config::{ClickHouseSettings, Secret};
use edgelog::loader::insert::{InsertClient, Outcome};
use http_body_util::Full;
use hyper::body::Bytes;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// A CA that signs certificates, its certificate written to a PEM file.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem_file: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("edgelog test CA {name}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem_file = dir.join(format!("{name}.pem"));
        std::fs::write(&pem_file, cert.pem()).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            der: cert.der().clone(),
            pem_file,
        }
    }

    /// A leaf certificate for `names` (host names or IP addresses), and its key.
    fn leaf(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert, key)
    }

    /// A client certificate and its key, written to PEM files in `dir`.
    fn client_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(&["edgelog-loader"]);
        let cert_file = dir.join("client.pem");
        let key_file = dir.join("client.key");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

/// An HTTPS server on 127.0.0.1 answering every request `200` with whether the client presented
/// a certificate (`client certificate: yes|no`). With `client_ca`, it requires a client
/// certificate that CA signed. Returns its base URL.
async fn https_server(server_names: &[&str], ca: &Ca, client_ca: Option<&Ca>) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = ca.leaf(server_names);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.der.clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(vec![cert.der().clone(), ca.der.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A refused handshake is what some tests are about: the client reports it.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let presented = tls.get_ref().1.peer_certificates().is_some();
                let answer = format!(
                    "client certificate: {}\n",
                    if presented { "yes" } else { "no" }
                );
                let service = hyper::service::service_fn(move |_request| {
                    let answer = answer.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(answer),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    format!("https://127.0.0.1:{port}")
}

/// A server on 127.0.0.1 that speaks plain HTTP to whatever connects. Returns its port.
async fn plain_http_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    port
}

fn client(url: &str, tls: TlsFiles) -> Result<ClickHouseClient, ClickHouseError> {
    let options = ClientOptions {
        timeout: Duration::from_secs(20),
        tls,
        ..ClientOptions::default()
    };
    ClickHouseClient::with_options(url, "default", &Secret::default(), &options)
}

fn trusting(ca: &Ca) -> TlsFiles {
    TlsFiles {
        ca_file: Some(ca.pem_file.clone()),
        ..TlsFiles::default()
    }
}

/// The TLS error of a query that must fail on TLS; anything else fails the test.
async fn tls_error(client: &ClickHouseClient) -> String {
    match client.query("SELECT 1", &[]).await {
        Err(ClickHouseError::Tls { detail, .. }) => detail,
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn the_ca_file_makes_a_private_ca_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let url = https_server(&["127.0.0.1"], &ca, None).await;
    let answer = client(&url, trusting(&ca))
        .unwrap()
        .query("SELECT 1", &[])
        .await
        .expect("the server's certificate is trusted through ca_file");
    assert_eq!(answer, "client certificate: no\n");
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_tls_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let other = Ca::new(dir.path(), "other");
    let url = https_server(&["127.0.0.1"], &ca, None).await;
    // The system roots (no ca_file) do not hold a CA made a moment ago.
    let detail = tls_error(&client(&url, TlsFiles::default()).unwrap()).await;
    assert!(detail.contains("not signed by a trusted CA"), "{detail}");
    assert!(detail.contains("clickhouse.ca_file"), "{detail}");
    // Nor does a ca_file with another CA: only the file's CAs are trusted then.
    let detail = tls_error(&client(&url, trusting(&other)).unwrap()).await;
    assert!(detail.contains("not signed by a trusted CA"), "{detail}");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_a_tls_error_naming_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let url = https_server(&["clickhouse.example"], &ca, None).await;
    let detail = tls_error(&client(&url, trusting(&ca)).unwrap()).await;
    assert!(
        detail.contains("not valid for the host name \"127.0.0.1\""),
        "{detail}"
    );
}

#[tokio::test]
async fn a_plain_http_port_behind_an_https_url_is_a_tls_error() {
    let port = plain_http_server().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let url = format!("https://127.0.0.1:{port}");
    let detail = tls_error(&client(&url, trusting(&ca)).unwrap()).await;
    assert!(detail.contains("did not answer in TLS"), "{detail}");
}

#[tokio::test]
async fn the_client_certificate_is_presented_when_the_server_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let (cert_file, key_file) = ca.client_files(dir.path());
    let url = https_server(&["127.0.0.1"], &ca, Some(&ca)).await;
    let with_cert = TlsFiles {
        ca_file: Some(ca.pem_file.clone()),
        client_cert_file: Some(cert_file),
        client_key_file: Some(key_file),
    };
    let answer = client(&url, with_cert)
        .unwrap()
        .query("SELECT 1", &[])
        .await
        .expect("the server accepts the client certificate");
    assert_eq!(answer, "client certificate: yes\n");
    // Without one the server refuses: an error, and not one to retry.
    match client(&url, trusting(&ca))
        .unwrap()
        .query("SELECT 1", &[])
        .await
    {
        Err(ClickHouseError::Tls { detail, .. }) => {
            assert!(detail.contains("client certificate"), "{detail}")
        }
        other => panic!("expected the server to refuse a client without a certificate: {other:?}"),
    }
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_fails_at_start_naming_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let (cert_file, _) = ca.client_files(dir.path());
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let tls = TlsFiles {
        ca_file: Some(ca.pem_file.clone()),
        client_cert_file: Some(cert_file.clone()),
        client_key_file: Some(other_key.clone()),
    };
    let err = client("https://127.0.0.1:1", tls).err().expect("refused");
    let text = err.to_string();
    assert!(matches!(err, ClickHouseError::TlsSetup(_)), "{text}");
    assert!(text.contains("does not match"), "{text}");
    assert!(text.contains(&other_key.display().to_string()), "{text}");
    assert!(text.contains(&cert_file.display().to_string()), "{text}");
}

/// The loader's own client: an untrusted certificate stops it (`Permanent`) instead of being
/// retried slot after slot; through the right CA the insert goes through.
#[tokio::test]
async fn the_loader_takes_an_untrusted_certificate_as_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let url = https_server(&["127.0.0.1"], &ca, None).await;
    let settings = |ca_file: Option<PathBuf>| ClickHouseSettings {
        url: url.clone(),
        ca_file,
        ..ClickHouseSettings::default()
    };
    let insert_url = format!("{url}/?query=INSERT");
    let untrusted = InsertClient::new(&settings(None), None, Duration::from_secs(20)).unwrap();
    match untrusted
        .send(&insert_url, BodyCompression::Gzip, b"body".to_vec())
        .await
    {
        Outcome::Permanent(why) => assert!(why.contains("not signed by a trusted CA"), "{why}"),
        other => panic!("expected Permanent, got {other:?}"),
    }
    let trusted = InsertClient::new(
        &settings(Some(ca.pem_file.clone())),
        None,
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(
        trusted
            .send(&insert_url, BodyCompression::Gzip, b"body".to_vec())
            .await,
        Outcome::Inserted
    );
    // A CA file that cannot be read stops the loader at start-up, naming the file.
    let missing = dir.path().join("missing-ca.pem");
    let err = InsertClient::new(
        &settings(Some(missing.clone())),
        None,
        Duration::from_secs(20),
    )
    .err()
    .expect("refused");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

/// reqwest is built without a crypto provider of its own: a plain-HTTP client built outside the
/// ClickHouse client (here `edgelog probe`, the Docker health check) must still work, not panic.
#[test]
fn edgelog_probe_works_over_plain_http() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut tcp, _)) = listener.accept() {
            let mut request = [0u8; 1024];
            let _ = std::io::Read::read(&mut tcp, &mut request);
            let _ = std::io::Write::write_all(
                &mut tcp,
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
            );
        }
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgelog"))
        .args(["probe", &format!("http://127.0.0.1:{port}/healthz")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "200 OK ok");
}

/// An `https` URL with no CA file on a machine without system roots (rustls-native-certs reads
/// `SSL_CERT_FILE`/`SSL_CERT_DIR`, pointed at nothing here): the tool stops before any request,
/// saying what to install or set.
#[test]
fn no_system_roots_and_no_ca_file_fail_at_start_saying_what_to_do() {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgelog"));
    for (name, _) in std::env::vars() {
        if name.starts_with("EDGELOG_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .arg("totals")
        .env("SSL_CERT_FILE", "/nonexistent/edgelog-test")
        .env("SSL_CERT_DIR", "/nonexistent/edgelog-test")
        // Port 1 on loopback: nothing is ever sent, client creation fails first.
        .env("EDGELOG_CLICKHOUSE__ADMIN_URL", "https://127.0.0.1:1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ClickHouse TLS settings unusable: system CA certificates")
            && stderr.contains("clickhouse.ca_file"),
        "{stderr}"
    );
}

/// The real loader binary, records waiting, its proxy URL an `https` server whose certificate it
/// does not trust: it exits non-zero at the first insert, naming the certificate problem, and
/// commits no progress, instead of retrying slot after slot.
#[tokio::test]
async fn the_loader_stops_on_an_untrusted_certificate_and_commits_no_progress() {
    common::require_stack();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "private");
    let mut s = common::fast_loader_settings();
    common::fill_anonymized_topic(&s, 20).await;
    s.clickhouse.url = https_server(&["127.0.0.1"], &ca, None).await;
    let mut loader = common::loader_command(&s);
    loader
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = common::KillOnDrop::spawn(&mut loader);
    let pid = child.0.id();
    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    let status = common::wait_for(
        "the loader to exit on the untrusted certificate",
        Duration::from_secs(120),
        || {
            let child = child.clone();
            async move { child.lock().unwrap().0.try_wait().unwrap() }
        },
    )
    .await;
    assert_eq!(status.code(), Some(1), "loader {pid}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(
        child.lock().unwrap().0.stderr.as_mut().unwrap(),
        &mut stderr,
    )
    .unwrap();
    assert!(
        stderr.contains("permanently") && stderr.contains("not signed by a trusted CA"),
        "{stderr}"
    );
    let (group, topic) = (s.loader.group_id.clone(), s.topics.anonymized.clone());
    let positions = tokio::task::spawn_blocking(move || common::committed_vs_end(&group, &topic))
        .await
        .unwrap();
    // The batch is recorded as pending before it is sent (the next loader finishes it), so a
    // position may be committed, but none past a record.
    assert!(
        positions
            .iter()
            .all(|(committed, _, _)| committed.unwrap_or(0) == 0),
        "no progress committed: {positions:?}"
    );
    assert!(
        positions.iter().any(|(_, end, _)| *end > 0),
        "{positions:?}"
    );
}
