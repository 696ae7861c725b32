//! TLS between Drover's components, with rustls through tonic.
//!
//! One CA (made by `drover certs init`) signs every certificate. A component's role is
//! a DNS name in its certificate: [`ORCHESTRATOR_NAME`] or [`AGENT_NAME`]. Clients check
//! that the server they reach holds the role they expect (an agent certificate cannot
//! pose as the orchestrator), and servers read the role of a client certificate with
//! [`peer_role`]: agents admit mutations only from the orchestrator role and replica
//! streams only from the agent role; the orchestrator admits agent registrations only
//! from the agent role, bound to the certificate's [`fingerprint`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The DNS name that marks a certificate as an orchestrator's.
pub const ORCHESTRATOR_NAME: &str = "drover-orchestrator";
/// The DNS name that marks a certificate as an agent's.
pub const AGENT_NAME: &str = "drover-agent";

/// Where a component's TLS files are: the CA that signs every Drover certificate, and
/// this component's certificate and key (PEM).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(what: &str, p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read the TLS {what} {}: {e}", p.display()))
}

impl TlsFiles {
    /// Whether any file is named.
    pub fn is_set(&self) -> bool {
        !(self.ca.as_os_str().is_empty() && self.cert.as_os_str().is_empty() && self.key.as_os_str().is_empty())
    }

    /// The files to use, or none in plain-text mode. Plain text must be asked for
    /// (`insecure`); without it, missing files are an error that says how to make them.
    pub fn required(&self, insecure: bool, who: &str) -> Result<Option<&Self>, String> {
        if insecure {
            return Ok(None);
        }
        for (name, p) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if p.as_os_str().is_empty() {
                return Err(format!(
                    "the {who} serves TLS only: set tls.{name} (make a CA and certificates with `drover certs init DIR`), \
                     or pass --insecure to run in plain text for development"
                ));
            }
        }
        Ok(Some(self))
    }

    fn ca_cert(&self) -> Result<Certificate, String> {
        Ok(Certificate::from_pem(read("CA", &self.ca)?))
    }

    fn identity(&self) -> Result<Identity, String> {
        Ok(Identity::from_pem(read("certificate", &self.cert)?, read("key", &self.key)?))
    }

    /// A server config: this component's identity, and client certificates checked
    /// against the CA (required, or optional for the orchestrator's user API, whose
    /// callers present tokens).
    pub fn server(&self, require_client_cert: bool) -> Result<ServerTlsConfig, String> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca_cert()?)
            .client_auth_optional(!require_client_cert))
    }

    /// A client config that presents this component's certificate and accepts only a
    /// server whose certificate names `peer` ([`ORCHESTRATOR_NAME`] or [`AGENT_NAME`]).
    pub fn client(&self, peer: &str) -> Result<ClientTlsConfig, String> {
        Ok(ClientTlsConfig::new().ca_certificate(self.ca_cert()?).identity(self.identity()?).domain_name(peer))
    }
}

/// A client config with no certificate of its own (the CLI): it checks the server is
/// an orchestrator signed by the CA in `ca`.
pub fn user_client(ca: &Path) -> Result<ClientTlsConfig, String> {
    Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("CA", ca)?)).domain_name(ORCHESTRATOR_NAME))
}

/// The role a client certificate proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Orchestrator,
    Agent,
}

/// The role of the first (end-entity) certificate the peer presented. The TLS
/// handshake already checked it chains to the CA; this reads which role it names.
pub fn peer_role(certs: &[CertificateDer<'_>]) -> Option<PeerRole> {
    let cert = webpki::EndEntityCert::try_from(certs.first()?).ok()?;
    let names = |n: &'static str| {
        ServerName::try_from(n).is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    };
    if names(ORCHESTRATOR_NAME) {
        Some(PeerRole::Orchestrator)
    } else if names(AGENT_NAME) {
        Some(PeerRole::Agent)
    } else {
        None
    }
}

/// Hex SHA-256 of a certificate: what binds an agent id to the certificate it first
/// registered with.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The certificates a request's client presented over TLS, if any.
pub fn peer_certs(ext: &http::Extensions) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    ext.get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
}
