//! The webhook transport: the call as JSON, POSTed over HTTP/1.1 (TLS for https),
//! signed with HMAC-SHA256 of the body under the site's shared secret.
//!
//! Headers: `X-Drover-Signature: sha256=<hex>`, `X-Drover-Call` (the call's name) and
//! `X-Drover-Delivery` (the same for every attempt of one call). A 2xx answer is
//! success; a 5xx is retried up to `retries` times (backing off 200 ms, 400 ms, …);
//! anything else, a timeout or a connection failure is not retried.

use std::sync::Arc;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sha2::Sha256;

use super::{Call, ComputeSite};

/// The system's CA bundle (Debian's ca-certificates), for https webhooks without a
/// `ca_file` of their own.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The signature header's value for `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!("sha256={}", tag.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// POSTs `call` and returns the answer's body.
pub async fn post(cfg: &ComputeSite, call: &Call) -> Result<Vec<u8>, String> {
    let secret = std::fs::read(&cfg.secret_file)
        .map_err(|e| format!("cannot read the webhook secret {}: {e}", cfg.secret_file.display()))?;
    let secret = secret.trim_ascii_end();
    if secret.is_empty() {
        return Err(format!("the webhook secret {} is empty", cfg.secret_file.display()));
    }
    let body = serde_json::to_vec(call).expect("calls serialise");
    let signature = sign(secret, &body);
    let uri: http::Uri = cfg.url.parse().map_err(|e| format!("webhook url {:?}: {e}", cfg.url))?;
    let delivery = uuid::Uuid::now_v7().to_string();
    let mut attempt = 0;
    loop {
        let req = http::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, uri.authority().map_or("", |a| a.as_str()))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-drover-signature", &signature)
            .header("x-drover-call", call.name())
            .header("x-drover-delivery", &delivery)
            .body(Full::new(Bytes::from(body.clone())))
            .map_err(|e| format!("webhook request: {e}"))?;
        let sent = tokio::time::timeout(cfg.timeout, send(&uri, cfg, req)).await;
        let (status, answer) = match sent {
            Err(_) => return Err(format!("webhook {} did not answer within {:?}", cfg.url, cfg.timeout)),
            Ok(r) => r?,
        };
        if status.is_success() {
            return Ok(answer);
        }
        let said = String::from_utf8_lossy(&answer[..answer.len().min(200)]).trim().to_string();
        if status.is_server_error() && attempt < cfg.retries {
            attempt += 1;
            tracing::info!(url = %cfg.url, %status, attempt, "webhook answered a server error; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(200 << (attempt - 1))).await;
            continue;
        }
        return Err(format!("webhook {} answered {status} ({said}) after {} attempt(s)", cfg.url, attempt + 1));
    }
}

async fn send(
    uri: &http::Uri,
    cfg: &ComputeSite,
    req: http::Request<Full<Bytes>>,
) -> Result<(http::StatusCode, Vec<u8>), String> {
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or_else(|| format!("webhook url {uri} has no host"))?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("cannot connect to webhook {uri}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if https {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(cfg)?));
        let name =
            rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("webhook host {host}: {e}"))?;
        let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS with webhook {uri}: {e}"))?;
        exchange(TokioIo::new(tls), req).await
    } else {
        exchange(TokioIo::new(tcp), req).await
    }
}

async fn exchange<T>(io: T, req: http::Request<Full<Bytes>>) -> Result<(http::StatusCode, Vec<u8>), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("webhook HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| format!("webhook request failed: {e}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| format!("reading the webhook's answer: {e}"))?;
    Ok((status, body.to_bytes().to_vec()))
}

fn tls_config(cfg: &ComputeSite) -> Result<tokio_rustls::rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let path = match cfg.ca_file.as_os_str().is_empty() {
        true => std::path::PathBuf::from(SYSTEM_CA_BUNDLE),
        false => cfg.ca_file.clone(),
    };
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(&path)
        .map_err(|e| format!("cannot read the webhook CA {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("a certificate in {}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("a certificate in {}: {e}", path.display()))?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Ok(tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_signature_is_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            super::sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
