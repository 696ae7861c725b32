//! The operators' cancel and pause requests, kept in memory by a store watch: a run
//! checks them at every step boundary, and reading two keys from the store there cost
//! two round trips per step of every execution.
//!
//! Each prefix is read whole at one revision and then followed from the next, so no
//! request is missed between the two. While a prefix's view is not live (before its
//! first read, or after its watch broke until it is read again), callers read the key
//! from the store instead. Requests made through this manager are applied to the view
//! at once, so a run here sees its own member's cancel at its next boundary; one made
//! through another member arrives with the watch event, a few milliseconds later.

use std::collections::HashSet;
use std::sync::RwLock;

use drover_store::{KvStore, StoreError, WatchEvent};
use futures::StreamExt;

/// The keys set under one prefix.
#[derive(Default)]
pub(super) struct Watched {
    state: RwLock<(bool, HashSet<Vec<u8>>)>,
}

impl Watched {
    /// Whether `key` is set; `None` while the view is not live.
    pub(super) fn is_set(&self, key: &str) -> Option<bool> {
        let state = self.state.read().expect("signals poisoned");
        state.0.then(|| state.1.contains(key.as_bytes()))
    }

    /// Records a write this member just made (`set`) or a delete.
    pub(super) fn note(&self, key: &str, set: bool) {
        let mut state = self.state.write().expect("signals poisoned");
        if set {
            state.1.insert(key.as_bytes().to_vec());
        } else {
            state.1.remove(key.as_bytes());
        }
    }

    fn set_live(&self, live: bool) {
        self.state.write().expect("signals poisoned").0 = live;
    }

    /// Reads `prefix` into the view and follows it until the watch breaks; returns why.
    pub(super) async fn follow(&self, store: &dyn KvStore, prefix: &str) -> StoreError {
        let (kvs, revision) = match store.range(prefix.as_bytes()).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        let mut events = match store.watch(prefix.as_bytes(), revision + 1).await {
            Ok(w) => w,
            Err(e) => return e,
        };
        *self.state.write().expect("signals poisoned") = (true, kvs.into_iter().map(|kv| kv.key).collect());
        let why = loop {
            match events.next().await {
                Some(Ok(WatchEvent::Put(kv))) => {
                    self.state.write().expect("signals poisoned").1.insert(kv.key);
                }
                Some(Ok(WatchEvent::Delete(kv))) => {
                    self.state.write().expect("signals poisoned").1.remove(&kv.key);
                }
                Some(Err(e)) => break e,
                None => break StoreError::Unavailable("the watch stream ended".into()),
            }
        };
        self.set_live(false);
        why
    }
}
