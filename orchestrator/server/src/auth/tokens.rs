//! API tokens: `drv_<id>_<secret>`, 256 random bits of secret, stored only as a SHA-256
//! hash under `tokens/<id>`. The id is not secret (it names the token in lists and the
//! audit trail); the whole string is what is hashed and compared.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use drover_proto::v1 as pb;
use drover_store::{Compare, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::{Caller, Role, caller};
use crate::error::{ApiError, ApiResult};
use crate::model::now_ms;
use crate::repo::{MAX_PAGE, PageRequest, Repo, put, validate_name};
use crate::service::Core;

/// Where tokens live.
pub fn key(id: &str) -> String {
    format!("tokens/{id}")
}

/// One page of tokens in id order, from after `page.marker`: at most `page.limit` of
/// `project`'s (every project's when empty), reading at most [`MAX_PAGE`] records, so a
/// project with few tokens among many gets short pages (maybe empty) with a marker to go
/// on from.
async fn list_page(repo: &Repo, project: &str, page: &PageRequest) -> ApiResult<(Vec<pb::Token>, String)> {
    let limit = page.limit()?;
    if !page.marker.is_empty() && (page.marker.len() != 16 || !page.marker.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(ApiError::InvalidArgument(
            "`marker` is not a marker this server gave (pass the previous page's next_marker)".into(),
        ));
    }
    let mut after = if page.marker.is_empty() { Vec::new() } else { key(&page.marker).into_bytes() };
    let (mut out, mut read) = (Vec::new(), 0usize);
    loop {
        let got = repo.store().range_page(b"tokens/", &after, 100).await?;
        for kv in &got.kvs {
            read += 1;
            let k = String::from_utf8_lossy(&kv.key).into_owned();
            let t: TokenRec = serde_json::from_slice(&kv.value)
                .map_err(|e| ApiError::Internal(format!("token record {k} is unreadable: {e}")))?;
            if project.is_empty() || t.project == project {
                out.push(t.to_pb());
            }
            after = kv.key.clone();
            let more = got.more || kv.key != got.kvs.last().expect("a page").key;
            if (out.len() == limit || read >= MAX_PAGE as usize) && more {
                return Ok((out, k["tokens/".len()..].to_string()));
            }
        }
        if !got.more || got.kvs.is_empty() {
            return Ok((out, String::new()));
        }
    }
}

/// Names the bootstrap token once one exists, so later orchestrators make no other.
const BOOTSTRAP_KEY: &str = "auth/bootstrap";

const PREFIX: &str = "drv_";

/// A stored token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRec {
    pub id: String,
    pub name: String,
    pub project: String,
    pub role: Role,
    /// Hex SHA-256 of the whole token string.
    pub hash: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub created_by: String,
    #[serde(default)]
    pub revoked_at_ms: i64,
}

impl TokenRec {
    pub fn to_pb(&self) -> pb::Token {
        pb::Token {
            id: self.id.clone(),
            name: self.name.clone(),
            project: self.project.clone(),
            role: self.role.as_str().into(),
            created_at_ms: self.created_at_ms,
            created_by: self.created_by.clone(),
            revoked_at_ms: self.revoked_at_ms,
        }
    }
}

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn random(n: usize) -> ApiResult<Vec<u8>> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| ApiError::Internal(format!("no randomness for a token: {e}")))?;
    Ok(buf)
}

/// A new token string and its id.
fn generate() -> ApiResult<(String, String)> {
    let id: String = random(8)?.iter().map(|b| format!("{b:02x}")).collect();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random(32)?);
    Ok((format!("{PREFIX}{id}_{secret}"), id))
}

/// The id inside a token string, if it has the token's shape.
fn id_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() >= 40).then_some(id)
}

/// Why a token was not accepted.
#[derive(Debug)]
pub enum Rejected {
    /// Not a Drover token, or no such token, or the secret does not match.
    Invalid,
    Revoked {
        id: String,
        at_ms: i64,
    },
    /// The store could not be read.
    Unavailable(String),
}

/// Checks tokens against the store, trusting a verified one for a short while.
pub struct Verifier {
    repo: Repo,
    ttl: Duration,
    cache: Mutex<HashMap<String, (TokenRec, Instant)>>,
}

impl Verifier {
    pub fn new(repo: Repo, ttl: Duration) -> Self {
        Self { repo, ttl, cache: Mutex::new(HashMap::new()) }
    }

    /// The caller a token string stands for.
    pub async fn verify(&self, token: &str) -> Result<Caller, Rejected> {
        let id = id_of(token).ok_or(Rejected::Invalid)?;
        let h = hash(token);
        let cached = self.cache.lock().expect("token cache").get(id).cloned();
        let rec = match cached {
            Some((rec, at)) if at.elapsed() < self.ttl => rec,
            _ => {
                let rec = self
                    .repo
                    .get::<TokenRec>(&key(id))
                    .await
                    .map_err(|e| Rejected::Unavailable(e.to_string()))?
                    .ok_or(Rejected::Invalid)?
                    .rec;
                let mut cache = self.cache.lock().expect("token cache");
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(id.to_string(), (rec.clone(), Instant::now()));
                rec
            }
        };
        if rec.hash != h {
            return Err(Rejected::Invalid);
        }
        if rec.revoked_at_ms != 0 {
            return Err(Rejected::Revoked { id: rec.id, at_ms: rec.revoked_at_ms });
        }
        Ok(Caller { token_id: rec.id, project: rec.project, role: rec.role })
    }
}

/// Makes sure a bootstrap admin token exists: the one in `file` if it holds one,
/// otherwise (on a deployment's first start) a new one written to `file` with mode 0600.
/// Returns a line for the log.
pub async fn bootstrap(repo: &Repo, file: &Path) -> ApiResult<String> {
    if let Ok(text) = std::fs::read_to_string(file) {
        let token = text.trim();
        let id = id_of(token).ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "{} does not hold a Drover token (drv_…); remove it to have a new one made, or fix auth.token_file",
                file.display()
            ))
        })?;
        let rec = bootstrap_rec(id, token);
        // Registered once; a record already there (valid or revoked) is left alone.
        repo.txn(
            Txn::new()
                .when(Compare::Absent(key(id).into_bytes()))
                .and_then(put(&key(id), &rec))
                .and_then(TxnOp::put(BOOTSTRAP_KEY.as_bytes(), id.as_bytes())),
        )
        .await?;
        return Ok(format!("admin token: the one in {}", file.display()));
    }
    if let Some(kv) = repo.store().get(BOOTSTRAP_KEY.as_bytes()).await? {
        return Ok(format!(
            "no token file at {}; the bootstrap admin token ({}) was made earlier; make more with `drover token create`",
            file.display(),
            String::from_utf8_lossy(&kv.value)
        ));
    }
    let (mine, _) = generate()?;
    write_private(file, &mine)?;
    // Another orchestrator may have written the same path first: use whatever is there.
    let token = std::fs::read_to_string(file).map_err(|e| io_err(file, e))?.trim().to_string();
    let id = id_of(&token)
        .ok_or_else(|| ApiError::Internal(format!("{} does not hold a Drover token after writing it", file.display())))?
        .to_string();
    let won = repo
        .txn(
            Txn::new()
                .when(Compare::Absent(BOOTSTRAP_KEY.as_bytes().to_vec()))
                .and_then(put(&key(&id), &bootstrap_rec(&id, &token)))
                .and_then(TxnOp::put(BOOTSTRAP_KEY.as_bytes(), id.as_bytes())),
        )
        .await?
        .succeeded;
    if !won {
        let theirs = repo.store().get(BOOTSTRAP_KEY.as_bytes()).await?.map(|kv| kv.value);
        if theirs.as_deref() == Some(id.as_bytes()) {
            return Ok(format!("admin token: the one in {} (registered by another orchestrator)", file.display()));
        }
        // Another orchestrator, elsewhere, made the deployment's bootstrap token first.
        if token == mine {
            let _ = std::fs::remove_file(file);
        }
        return Ok("another orchestrator made the bootstrap admin token at the same time; use its file".into());
    }
    Ok(format!("created the bootstrap admin token {id}: it is in {} (mode 0600)", file.display()))
}

fn bootstrap_rec(id: &str, token: &str) -> TokenRec {
    TokenRec {
        id: id.into(),
        name: "bootstrap".into(),
        project: "admin".into(),
        role: Role::Admin,
        hash: hash(token),
        created_at_ms: now_ms(),
        created_by: String::new(),
        revoked_at_ms: 0,
    }
}

fn io_err(file: &Path, e: std::io::Error) -> ApiError {
    ApiError::Internal(format!("token file {}: {e}; check auth.token_file and its directory", file.display()))
}

/// Writes `text` to `file` readable by its owner only, without replacing a file that
/// appeared meanwhile (written aside, then hard-linked into place).
fn write_private(file: &Path, text: &str) -> ApiResult<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err(file, e))?;
    }
    let aside = file.with_extension(format!("new-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&aside)
        .map_err(|e| io_err(&aside, e))?;
    f.write_all(format!("{text}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(|e| io_err(&aside, e))?;
    let linked = std::fs::hard_link(&aside, file);
    let _ = std::fs::remove_file(&aside);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(file, e)),
    }
}

/// drover.v1.TokenService.
pub struct TokenApi {
    pub core: std::sync::Arc<Core>,
}

#[tonic::async_trait]
impl pb::token_service_server::TokenService for TokenApi {
    async fn create_token(&self, req: Request<pb::CreateTokenRequest>) -> Result<Response<pb::CreatedToken>, Status> {
        let by = caller(&req);
        let r = req.into_inner();
        validate_name("name", &r.name)?;
        validate_name("project", &r.project)?;
        let role = Role::parse(&r.role)?;
        let (token, id) = generate()?;
        let rec = TokenRec {
            id: id.clone(),
            name: r.name,
            project: r.project,
            role,
            hash: hash(&token),
            created_at_ms: now_ms(),
            created_by: by.token_id,
            revoked_at_ms: 0,
        };
        let done = self
            .core
            .repo
            .txn(Txn::new().when(Compare::Absent(key(&id).into_bytes())).and_then(put(&key(&id), &rec)))
            .await?;
        if !done.succeeded {
            return Err(ApiError::Aborted("a token id collided; retry".into()).into());
        }
        Ok(Response::new(pb::CreatedToken { token: Some(rec.to_pb()), secret: token }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let r = req.into_inner();
        if !r.project.is_empty() {
            validate_name("project", &r.project)?;
        }
        let (tokens, next_marker) =
            list_page(&self.core.repo, &r.project, &PageRequest { limit: r.limit, marker: r.marker }).await?;
        Ok(Response::new(pb::ListTokensResponse { tokens, next_marker }))
    }

    async fn revoke_token(&self, req: Request<pb::RevokeTokenRequest>) -> Result<Response<pb::Token>, Status> {
        let id = req.into_inner().id;
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::InvalidArgument(format!(
                "`id` {id:?} is not a token id (16 hex digits); see `drover token list`"
            ))
            .into());
        }
        let Some(mut t) = self.core.repo.get::<TokenRec>(&key(&id)).await? else {
            return Err(ApiError::NotFound(format!("token {id} not found; see `drover token list`")).into());
        };
        if t.rec.revoked_at_ms == 0 {
            t.rec.revoked_at_ms = now_ms();
            let done = self
                .core
                .repo
                .txn(
                    Txn::new()
                        .when(Compare::ModRevisionEquals(key(&id).into_bytes(), t.rev))
                        .and_then(put(&key(&id), &t.rec)),
                )
                .await?;
            if !done.succeeded {
                return Err(ApiError::Aborted(format!("token {id} changed meanwhile; retry")).into());
            }
        }
        Ok(Response::new(t.rec.to_pb()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_lists_page_and_a_rare_project_is_read_in_bounded_calls() {
        let (_dir, repo) = crate::repo::temp_repo().await;
        // 1,204 tokens of project "many" and 4 of "rare", spread through the id order.
        let mut txn = Txn::new();
        for i in 0..1208u64 {
            let project = if i % 400 == 7 { "rare" } else { "many" };
            let t = TokenRec {
                id: format!("{:016x}", i * 7919),
                name: format!("t{i}"),
                project: project.into(),
                role: Role::Member,
                hash: String::new(),
                created_at_ms: i as i64,
                created_by: String::new(),
                revoked_at_ms: 0,
            };
            txn = txn.and_then(put(&key(&t.id), &t));
        }
        repo.txn(txn).await.unwrap();
        let walk = |project: &'static str, limit: u32| {
            let repo = repo.clone();
            async move {
                let (mut ids, mut calls, mut marker) = (Vec::new(), 0, String::new());
                loop {
                    let (page, next) = list_page(&repo, project, &PageRequest { limit, marker }).await.unwrap();
                    calls += 1;
                    assert!(page.len() <= limit.max(1) as usize || limit == 0);
                    ids.extend(page.into_iter().map(|t| t.id));
                    if next.is_empty() {
                        return (ids, calls);
                    }
                    marker = next;
                }
            }
        };
        let (all, calls) = walk("", 500).await;
        assert_eq!((all.len(), calls), (1208, 3));
        assert!(all.windows(2).all(|w| w[0] < w[1]), "in id order, each once");
        let (rare, calls) = walk("rare", 0).await;
        assert_eq!(rare.len(), 4);
        assert_eq!(calls, 2, "at most 1,000 records read per call");
        let bad = list_page(&repo, "", &PageRequest { limit: 0, marker: "tokens/../x".into() }).await;
        assert!(matches!(bad, Err(ApiError::InvalidArgument(_))));
    }

    #[test]
    fn tokens_have_their_shape_and_are_unique() {
        let (a, id) = generate().unwrap();
        let (b, _) = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(id_of(&a), Some(id.as_str()));
        // 32 random bytes in unpadded base64url: 43 characters of secret.
        assert_eq!(a.len(), PREFIX.len() + 16 + 1 + 43);
        for bad in [
            "",
            "drv_",
            "Bearer x",
            "drv_0123456789abcdef_short",
            "drv_0123456789abcdeg_0123456789012345678901234567890123456789",
        ] {
            assert_eq!(id_of(bad), None, "{bad:?}");
        }
    }
}
