//! What operators do to running executions besides cancelling them: pause and resume,
//! and decide prompts. Each is its own key, written only while the execution is pending,
//! so any orchestrator can take it and none outlives its execution.

use std::sync::Arc;

use drover_store::{Compare, Txn, TxnOp};

use super::{Manager, SubmitError};
use crate::Procedure;
use crate::record::{Decision, ExecutionRec, keys, now_ms};

impl Manager {
    /// Writes `key` while the execution `id` is pending; the error says why not.
    async fn signal(&self, id: &str, key: String, value: Vec<u8>) -> Result<ExecutionRec, SubmitError> {
        let rec = self.get(id).await?.ok_or_else(|| SubmitError::NotFound(id.to_string()))?;
        if rec.status.is_terminal() {
            return Err(SubmitError::Ended { id: id.to_string(), status: rec.status.as_str().into() });
        }
        let txn = Txn::new().when(Compare::Exists(keys::pending(id).into_bytes())).and_then(TxnOp::put(key, value));
        if !self.store.txn(txn).await?.succeeded {
            let status = self.get(id).await?.map_or("ended".to_string(), |r| r.status.as_str().to_string());
            return Err(SubmitError::Ended { id: id.to_string(), status });
        }
        Ok(rec)
    }

    /// Asks a running execution to start no new step until [`Manager::resume`]; steps
    /// already running (and their children) go on.
    pub async fn pause(&self, id: &str) -> Result<ExecutionRec, SubmitError> {
        let rec = self.signal(id, keys::pause(id), Vec::new()).await?;
        self.pauses.note(&keys::pause(id), true);
        Ok(rec)
    }

    /// Lets a paused execution go on.
    pub async fn resume(&self, id: &str) -> Result<ExecutionRec, SubmitError> {
        let rec = self.get(id).await?.ok_or_else(|| SubmitError::NotFound(id.to_string()))?;
        if rec.status.is_terminal() {
            return Err(SubmitError::Ended { id: id.to_string(), status: rec.status.as_str().into() });
        }
        self.store.delete(keys::pause(id).as_bytes()).await?;
        self.pauses.note(&keys::pause(id), false);
        Ok(rec)
    }

    /// Records an operator's decision on prompt `prompt` of execution `id`. The first
    /// decision stands: a second one is refused with the first.
    pub async fn decide(
        &self,
        id: &str,
        prompt: &str,
        approve: bool,
        by: &str,
        comment: &str,
    ) -> Result<Decision, SubmitError> {
        if let Some(first) = self.decision(id, prompt).await? {
            return Err(SubmitError::Decided { id: id.to_string(), prompt: prompt.to_string(), first });
        }
        let d = Decision { approve, by: by.to_string(), at_ms: now_ms(), comment: comment.to_string() };
        let value = serde_json::to_vec(&d).expect("decisions serialise");
        let rec = self.get(id).await?.ok_or_else(|| SubmitError::NotFound(id.to_string()))?;
        if rec.status.is_terminal() {
            return Err(SubmitError::Ended { id: id.to_string(), status: rec.status.as_str().into() });
        }
        let key = keys::decision(id, prompt);
        let txn = Txn::new()
            .when(Compare::Exists(keys::pending(id).into_bytes()))
            .when(Compare::Absent(key.clone().into_bytes()))
            .and_then(TxnOp::put(key, value));
        if !self.store.txn(txn).await?.succeeded {
            if let Some(first) = self.decision(id, prompt).await? {
                return Err(SubmitError::Decided { id: id.to_string(), prompt: prompt.to_string(), first });
            }
            return Err(SubmitError::Ended { id: id.to_string(), status: "ended".into() });
        }
        Ok(d)
    }

    /// The decision on prompt `prompt` of execution `id`, if any was made.
    pub async fn decision(&self, id: &str, prompt: &str) -> Result<Option<Decision>, SubmitError> {
        match self.store.get(keys::decision(id, prompt).as_bytes()).await? {
            Some(kv) => Ok(serde_json::from_slice(&kv.value).ok()),
            None => Ok(None),
        }
    }

    /// Like [`Manager::submit_with`], for an execution another one starts and follows
    /// itself (rather than through `Status::Children`): its record names `parent`.
    pub async fn submit_for(
        self: &Arc<Self>,
        parent: &str,
        proc: Box<dyn Procedure>,
        intent: Txn,
    ) -> Result<(String, i64), SubmitError> {
        let id = uuid::Uuid::now_v7().to_string();
        self.submit_as(id, parent.to_string(), proc, intent).await
    }
}
