//! `drover certs init DIR`: a CA and the certificates of a local cluster (rcgen).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use drover_proto::tls::{AGENT_NAME, ORCHESTRATOR_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// `drover certs …`
#[derive(Subcommand)]
pub enum CertsCmd {
    /// Make a CA, an orchestrator certificate and agent certificates in DIR.
    Init {
        dir: PathBuf,
        /// Agents to make a certificate for (one file pair each, agent-ID.pem and
        /// agent-ID.key); the orchestrator binds each agent id to the certificate it
        /// first registers with.
        #[arg(long = "agent", default_value = "agent")]
        agents: Vec<String>,
        /// More host names or IP addresses the servers are reached at (localhost,
        /// 127.0.0.1 and ::1 are always in).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

/// Writes `text` to a new file (never over an old one), readable by its owner only when
/// `private`.
fn write_new(path: &Path, text: &str, private: bool) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn leaf(role: &str, hosts: &[String], cn: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(vec![role.to_string(), "localhost".to_string()])?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    p.subject_alt_names.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    for h in hosts {
        match h.parse::<IpAddr>() {
            Ok(ip) => p.subject_alt_names.push(SanType::IpAddress(ip)),
            Err(_) => p.subject_alt_names.push(SanType::DnsName(h.as_str().try_into()?)),
        }
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(p)
}

/// Runs one certs command.
pub fn run(cmd: CertsCmd) -> Result<()> {
    let CertsCmd::Init { dir, agents, hosts } = cmd;
    let made = init(&dir, &agents, &hosts)?;
    println!("made in {}: {} (keys beside them, mode 0600)", dir.display(), made.join(", "));
    println!(
        "orchestrator: --set tls.ca={0}/ca.pem --set tls.cert={0}/orchestrator.pem --set tls.key={0}/orchestrator.key",
        dir.display()
    );
    println!(
        "agent:        --set tls.ca={0}/ca.pem --set tls.cert={0}/agent-ID.pem --set tls.key={0}/agent-ID.key",
        dir.display()
    );
    println!("CLI:          DROVER_CA_FILE={}/ca.pem, endpoint https://…", dir.display());
    Ok(())
}

/// Makes the CA (`ca.pem`, `ca.key`), `orchestrator.pem`/`.key` and one
/// `agent-ID.pem`/`.key` per agent in `dir`; returns the certificate files made.
pub fn init(dir: &Path, agents: &[String], hosts: &[String]) -> Result<Vec<String>> {
    for a in agents {
        if a.is_empty() || !a.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            bail!("agent id {a:?} may hold only letters, digits, '.', '_' and '-'");
        }
    }
    if dir.join("ca.pem").exists() {
        bail!("{} already holds a CA (ca.pem); pick an empty directory, or remove it to start over", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Drover CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write_new(&dir.join("ca.pem"), &ca_cert.pem(), false)?;
    write_new(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut made = vec!["ca.pem".to_string()];
    let mut issue = |file: &str, params: CertificateParams| -> Result<()> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&dir.join(format!("{file}.pem")), &cert.pem(), false)?;
        write_new(&dir.join(format!("{file}.key")), &key.serialize_pem(), true)?;
        made.push(format!("{file}.pem"));
        Ok(())
    };
    issue("orchestrator", leaf(ORCHESTRATOR_NAME, hosts, "drover orchestrator")?)?;
    for a in agents {
        issue(&format!("agent-{a}"), leaf(AGENT_NAME, hosts, &format!("drover agent {a}"))?)?;
    }
    Ok(made)
}
